"""Pool integrity and hostile input: weights are verified before use, manifest paths stay
inside the pool, the base must be a causal LM, specs, weights and objectives are checked,
and every such failure is one line with exit code 2 that names the culprit."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import unicodedata
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import tiny_spec_dict, write_spec

from merge_mix.cli import main
from merge_mix.config import load_spec
from merge_mix.errors import MergeMixError
from merge_mix.merge import parse_assignment, resolve_weights
from merge_mix.model import weights_sha256
from merge_mix.objective import load_objective, objective_from_dict
from merge_mix.pool import VERIFIED, Pool

DOMAINS = ["code", "c", "prose"]


def _one_error_line(result) -> str:
    """The single `error:` line of a failed command (asserting exit code 2)."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], result.output
    assert "Traceback" not in result.output
    return errors[0]


@pytest.fixture
def pool_copy(tiny_pool, tmp_path) -> Path:
    dst = tmp_path / "pool"
    shutil.copytree(tiny_pool, dst)
    # Other tests' evaluations of the shared pool leave a verification cache in it.
    (dst / VERIFIED).unlink(missing_ok=True)
    return dst


def _eval(pool: Path, *extra: str):
    args = ["eval", str(pool), "--weights", "uniform", "--heldout-tokens", "128", "--json"]
    return CliRunner().invoke(main, [*args, *extra])


def _listing(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


# --- 1. verify on read ------------------------------------------------------------------


def test_truncated_component_is_refused_and_pool_show_says_damaged(pool_copy, tmp_path):
    weights = pool_copy / "components" / "code" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    line = _one_error_line(_eval(pool_copy))
    assert str(weights) in line and "do not match the sha256" in line
    out = tmp_path / "export"
    line = _one_error_line(
        CliRunner().invoke(main, ["export", str(pool_copy), str(out), "--weights", "uniform"])
    )
    assert str(weights) in line
    assert not out.exists() and not (tmp_path / ".export.tmp").exists()
    result = CliRunner().invoke(main, ["pool", "show", str(pool_copy)])
    assert result.exit_code == 0, result.output
    first = result.output.splitlines()[0]
    assert "complete" not in first and "DAMAGED (1 of 4 members unusable)" in first
    assert f"DAMAGED code: {weights}:" in result.output


def test_missing_component_is_reported_by_pool_show(pool_copy):
    shutil.rmtree(pool_copy / "components" / "prose")
    result = CliRunner().invoke(main, ["pool", "show", str(pool_copy)])
    assert "DAMAGED (1 of 4 members unusable)" in result.output.splitlines()[0]
    assert f"DAMAGED prose: {pool_copy / 'components' / 'prose'}: missing" in result.output
    line = _one_error_line(_eval(pool_copy))
    assert "prose" in line and "missing" in line


def test_verification_cache_skips_unchanged_files_and_full_rehashes(pool_copy):
    assert _eval(pool_copy).exit_code == 0
    cache = json.loads((pool_copy / VERIFIED).read_text())
    assert set(cache) == {"base", "components/code", "components/c", "components/prose"}
    recorded = Pool.open(pool_copy).manifest["components"]["c"]["sha256"]
    assert cache["components/c"]["sha256"] == recorded
    # Flip one byte in place, keeping size, inode and mtime: only a full check sees it.
    weights = pool_copy / "components" / "c" / "model.safetensors"
    st = weights.stat()
    with weights.open("r+b") as fh:
        fh.seek(st.st_size - 1)
        last = fh.read(1)
        fh.seek(st.st_size - 1)
        fh.write(bytes([last[0] ^ 1]))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights.stat().st_ino == st.st_ino
    assert _eval(pool_copy).exit_code == 0  # the cache vouches for an unchanged file
    line = _one_error_line(_eval(pool_copy, "--verify", "full"))
    assert str(weights) in line
    # A copy has new inodes: the cache does not carry over, the damage is found.
    copy = pool_copy.parent / "copy"
    shutil.copytree(pool_copy, copy)
    assert str(copy / "components" / "c" / "model.safetensors") in _one_error_line(_eval(copy))


def test_read_only_pool_is_still_verified_and_read(pool_copy, monkeypatch):
    def read_only(path, obj):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr("merge_mix.pool.write_json_atomic", read_only)
    result = _eval(pool_copy)
    assert result.exit_code == 0, result.output
    assert not (pool_copy / VERIFIED).exists()


def test_export_records_the_hashes_of_the_weights_merged(pool_copy, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["export", str(pool_copy), str(out), "--weights", "code", "--verify", "full"]
    )
    assert result.exit_code == 0, result.output
    record = json.loads((out / "merge_mix_export.json").read_text())
    assert record["base_sha256"] == weights_sha256(pool_copy / "base")
    assert record["components_sha256"] == {
        d: weights_sha256(pool_copy / "components" / d) for d in DOMAINS
    }
    # One-hot weights return the component bit for bit.
    assert record["sha256"] == weights_sha256(pool_copy / "components" / "code")


# --- 2. paths stay inside the pool ------------------------------------------------------


@pytest.mark.parametrize("path", ["../other/components/code", "/etc", "../../../etc"])
def test_manifest_paths_outside_the_pool_are_refused(pool_copy, path):
    manifest_path = pool_copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["components"]["code"]["path"] = path
    manifest_path.write_text(json.dumps(manifest))
    for args in (["pool", "show", str(pool_copy)], ["eval", str(pool_copy)]):
        line = _one_error_line(CliRunner().invoke(main, args))
        assert f"{manifest_path}: components.code.path: {path!r}" in line
        assert "outside the pool" in line


def test_symlink_out_of_the_pool_is_refused(pool_copy, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    shutil.move(pool_copy / "components" / "c", elsewhere)
    (pool_copy / "components" / "c").symlink_to(elsewhere)
    line = _one_error_line(CliRunner().invoke(main, ["pool", "show", str(pool_copy)]))
    assert "components.c.path: 'components/c'" in line and str(elsewhere) in line


# --- 3. the base must be a causal LM ----------------------------------------------------


def _word_tokenizer(n_tokens: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, n_tokens)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


def _pretrained_spec(tiny_spec_path, tmp_path, pretrained: Path, tokenizer: Path | None = None):
    spec = tiny_spec_dict(tiny_spec_path.parent, output=str(tmp_path / "p"))
    spec["model"] = {"pretrained": str(pretrained)}
    spec["tokenizer"] = {} if tokenizer is None else {"path": str(tokenizer)}
    return write_spec(tmp_path, spec)


def _train(spec_path: Path):
    return CliRunner().invoke(main, ["train-components", str(spec_path), "--quiet"])


def test_a_bert_base_is_refused_as_not_causal(tiny_spec_path, tmp_path):
    from transformers import BertConfig, BertLMHeadModel

    bert = tmp_path / "bert"
    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        is_decoder=False,
    )
    BertLMHeadModel(config).save_pretrained(str(bert), safe_serialization=True)
    _word_tokenizer(64).save_pretrained(str(bert))
    line = _one_error_line(_train(_pretrained_spec(tiny_spec_path, tmp_path, bert)))
    assert "model.pretrained:" in line and "is an encoder (bert, is_decoder: false)" in line
    assert not (tmp_path / "p" / "data").exists()  # refused before any data was read


def test_check_causal_tells_a_causal_model_from_an_encoder(tiny_pool):
    from transformers import BertConfig, BertLMHeadModel

    from merge_mix.model import check_causal, load_model

    check_causal(load_model(tiny_pool / "base"))
    config = BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, is_decoder=False,
    )  # fmt: skip
    with pytest.raises(MergeMixError, match="not causal"):
        check_causal(BertLMHeadModel(config).eval())


def test_missing_pretrained_path_names_model_pretrained(tiny_spec_path, tmp_path):
    line = _one_error_line(_train(_pretrained_spec(tiny_spec_path, tmp_path, tmp_path / "nope")))
    assert f"model.pretrained: {tmp_path / 'nope'} not found" in line
    assert "tokenizer directory" not in line


def test_tokenizer_larger_than_the_embeddings_is_refused(tiny_spec_path, tiny_pool, tmp_path):
    big = tmp_path / "big_tokenizer"
    _word_tokenizer(600).save_pretrained(str(big))
    line = _one_error_line(
        _train(_pretrained_spec(tiny_spec_path, tmp_path, tiny_pool / "base", big))
    )
    assert f"tokenizer.path: {big} has 600 tokens, more than the 512 input embeddings" in line


# --- 4. spec and weights parsing --------------------------------------------------------


def test_duplicate_yaml_key_names_key_and_line(tiny_spec_path, tmp_path):
    text = (tiny_spec_path.parent / "spec.yaml").read_text()
    extra = "  code:\n    sources:\n    - files: /nonexistent/*.py\n"
    marker = "domains:\n"
    lines_before = text[: text.index(marker) + len(marker)].count("\n")
    path = tmp_path / "dup.yaml"
    path.write_text(
        text.replace(marker, marker + extra, 1).replace("output_dir: pool", "output_dir: p")
    )
    line = _one_error_line(_train(path))
    # The second `code:` is the original one, after the three inserted lines.
    assert f"line {lines_before + 4}: duplicate key 'code'" in line, line
    assert not (tmp_path / "p").exists()


def test_output_dir_with_a_users_files_is_refused_untouched(tiny_spec_path, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    (out / "tokenizer.tmp").mkdir()  # a name a build would delete
    before = _listing(out)
    spec = tiny_spec_dict(tiny_spec_path.parent, output=str(out))
    line = _one_error_line(_train(write_spec(tmp_path, spec)))
    assert f"output_dir: {out} is not empty and is not a merge-mix pool" in line
    assert _listing(out) == before


def test_unicode_lookalike_domain_names_are_one_name(tiny_spec_path, tmp_path):
    spec = tiny_spec_dict(tiny_spec_path.parent, output=str(tmp_path / "p"))
    nfc, nfd = "caf\u00e9", unicodedata.normalize("NFD", "caf\u00e9")
    assert nfc != nfd
    spec["domains"][nfc] = spec["domains"]["c"]
    spec["domains"][nfd] = spec["domains"]["prose"]
    line = _one_error_line(_train(write_spec(tmp_path, spec)))
    assert f"domains.{nfc}: given twice" in line
    del spec["domains"][nfc]
    assert load_spec(write_spec(tmp_path, spec)).domain_names[-1] == nfc  # normalised
    assert parse_assignment(f"{nfd}=1") == {nfc: 1.0}


@pytest.mark.parametrize(
    "weights, expected",
    [
        ("code=0.5,code=0.3,c=0.2", "weights: 'code' is given twice"),
        ("code=1e308,c=1e308", "weights: the values overflow when summed"),
        ("code=nan,c=1", "weights: code is not a finite number (nan)"),
        ("code=inf", "weights: code is not a finite number (inf)"),
    ],
)
def test_bad_weight_strings_are_refused(pool_copy, tmp_path, weights, expected):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["export", str(pool_copy), str(out), "--weights", weights])
    assert expected in _one_error_line(result)
    assert not out.exists()


def test_overflowing_arrays_are_refused_too():
    with pytest.raises(MergeMixError, match="overflow"):
        resolve_weights([1e308, 1e308, 0.0], DOMAINS, extrapolate=True)


# --- 5. objectives ----------------------------------------------------------------------


def test_all_zero_objective_is_refused_before_a_run_dir_exists(tiny_pool, tmp_path):
    terms = [{"source": "heldout", "metric": "loss", "name": d, "weight": 0} for d in DOMAINS]
    with pytest.raises(MergeMixError, match="every term has weight 0"):
        objective_from_dict({"terms": terms})
    path = tmp_path / "zero.yaml"
    path.write_text(json.dumps({"terms": terms}))
    run = tmp_path / "run"
    result = CliRunner().invoke(
        main, ["search", str(tiny_pool), "--run-dir", str(run), "--objective", str(path)]
    )
    assert "every term has weight 0" in _one_error_line(result)
    assert not run.exists()


def test_duplicate_key_in_an_objective_file_is_refused(tmp_path):
    path = tmp_path / "obj.yaml"
    path.write_text("terms:\n- {source: heldout, metric: loss}\npenalty: 1\npenalty: 2\n")
    with pytest.raises(MergeMixError, match="line 4: duplicate key 'penalty'"):
        load_objective(path)


def test_lmeval_metric_typo_fails_before_scoring(tiny_pool, tmp_path):
    from merge_mix.lmeval import make_tasks

    tasks = tmp_path / "tasks"
    make_tasks(tiny_pool, tasks, max_docs_per_domain=8, n_choices=2, seed=0)
    path = tmp_path / "typo.yaml"
    path.write_text(
        "terms:\n- {source: lmeval, metric: acc_nrom, name: mm_tiny_code_choice,"
        " direction: maximize}\n"
    )
    run = tmp_path / "run"
    result = CliRunner().invoke(
        main,
        [
            "search", str(tiny_pool), "--run-dir", str(run), "--objective", str(path),
            "--tasks", "mm_tiny_code_choice", "--include-path", str(tasks),
        ],
    )  # fmt: skip
    line = _one_error_line(result)
    assert "lmeval/mm_tiny_code_choice/acc_nrom: no task declares that metric" in line
    assert "acc_norm" in line  # the metrics that exist are listed
    assert not run.exists()


# --- 6. one-line errors for damaged files, disk full and read-only pools ----------------


def test_loading_a_truncated_safetensors_names_the_file(tiny_pool, tmp_path):
    from merge_mix.model import load_model

    base = tmp_path / "base"
    shutil.copytree(tiny_pool / "base", base)
    with (base / "model.safetensors").open("r+b") as fh:
        fh.truncate(1000)
    with pytest.raises(MergeMixError) as info:
        load_model(base)
    message = str(info.value)
    assert message.startswith(f"{base / 'model.safetensors'}: unreadable safetensors")
    assert "\n" not in message


def test_disk_full_during_export_is_one_line_and_leaves_nothing(pool_copy, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def full(tensors, filename, metadata=None):
        # What safetensors raises when the disk fills up mid-write.
        raise SafetensorError(
            "Error while serializing: IoError(Os { code: 28, kind: StorageFull,"
            ' message: "No space left on device" })'
        )

    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", full)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["export", str(pool_copy), str(out), "--weights", "uniform"])
    line = _one_error_line(result)
    assert line.startswith(f"error: {tmp_path / '.out.tmp'}: disk full; free some space")
    assert not out.exists() and not (tmp_path / ".out.tmp").exists()


def test_disk_full_during_a_build_is_one_line_and_not_complete(
    tiny_spec_path, tmp_path, monkeypatch
):
    def full(writer, tokens, rows):
        raise OSError(errno.ENOSPC, "No space left on device", str(writer.out_dir / "train.tokens"))

    monkeypatch.setattr("merge_mix.data.shards.ShardWriter.add", full)
    spec = tiny_spec_dict(tiny_spec_path.parent, output=str(tmp_path / "p"))
    line = _one_error_line(_train(write_spec(tmp_path, spec)))
    assert "train.tokens: disk full" in line
    assert not (tmp_path / "p" / "manifest.json").exists()
    assert not (tmp_path / "p" / "data" / "data.json").exists()


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    import torch
    from safetensors import SafetensorError

    from merge_mix.train import load_checkpoint, save_checkpoint

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    save_checkpoint(model, optimizer, {"step": 1}, tmp_path)

    def full(tensors, filename, metadata=None):
        # What safetensors raises when the disk fills up mid-write (no errno).
        raise SafetensorError(
            "Error while serializing: IoError(Os { code: 28, kind: StorageFull,"
            ' message: "No space left on device" })'
        )

    monkeypatch.setattr("safetensors.torch.save_file", full)
    with pytest.raises(OSError) as info:
        save_checkpoint(model, optimizer, {"step": 2}, tmp_path)
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == str(tmp_path / "checkpoint.tmp" / "model.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    monkeypatch.undo()
    assert load_checkpoint(model, optimizer, tmp_path)["step"] == 1


def test_validate_lmeval_metric_typo_fails_before_scoring(pool_copy, tmp_path):
    from merge_mix.lmeval import make_tasks

    tasks = tmp_path / "tasks"
    make_tasks(pool_copy, tasks, max_docs_per_domain=8, n_choices=2, seed=0)
    path = tmp_path / "typo.yaml"
    path.write_text(
        "terms:\n- {source: lmeval, metric: acc_nrom, name: mm_tiny_code_choice,"
        " direction: maximize}\n"
    )
    before = _listing(pool_copy)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        [
            "validate", str(pool_copy), "-n", "4", "--out", str(out), "--objective", str(path),
            "--tasks", "mm_tiny_code_choice", "--include-path", str(tasks), "--quiet",
        ],
    )  # fmt: skip
    line = _one_error_line(result)
    assert "lmeval/mm_tiny_code_choice/acc_nrom: no task declares that metric" in line
    assert not out.exists() and _listing(pool_copy) == before


def test_train_components_on_a_read_only_pool(tiny_spec_path, pool_copy, tmp_path, monkeypatch):
    def read_only(path, blocking=True):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr("merge_mix.pool_build.file_lock", read_only)
    monkeypatch.setattr("merge_mix.pool.file_lock", read_only)  # write_manifest
    spec = tiny_spec_dict(tiny_spec_path.parent, output=str(pool_copy))
    line = _one_error_line(_train(write_spec(tmp_path, spec)))
    assert line.startswith(f"error: {pool_copy / '.prepare.lock'}: read-only file system")


def test_validate_on_a_read_only_pool(pool_copy, monkeypatch):
    def denied(pool, plan, **kw):
        raise PermissionError(errno.EACCES, "Permission denied", str(pool.path / "references"))

    monkeypatch.setattr("merge_mix.validate.references.ensure_reference", denied)
    result = CliRunner().invoke(
        main, ["validate", str(pool_copy), "-n", "4", "--heldout-tokens", "128", "--quiet"]
    )
    line = _one_error_line(result)
    assert line.startswith(f"error: {pool_copy / 'references'}: permission denied")


# --- 7. files that are not UTF-8 text ---------------------------------------------------


def _files_domain(root: Path, good: int, latin1: int, nul: int, **options):
    from merge_mix.config import DomainSpec, SourceSpec

    root.mkdir()
    for i in range(good):
        (root / f"good{i}.txt").write_text(f"document {i} " * 20)
    for i in range(latin1):
        (root / f"latin{i}.txt").write_bytes(f"caf\u00e9 {i} ".encode("latin-1") * 20)
    for i in range(nul):
        (root / f"nul{i}.txt").write_bytes(b"binary\x00data" * 10)
    return DomainSpec("d", (SourceSpec("files", str(root / "*.txt"), **options),))


def test_non_utf8_files_are_counted_and_warned_about(tmp_path, caplog):
    from merge_mix.corpus import read_domain

    domain = _files_domain(tmp_path / "src", good=3, latin1=2, nul=1)
    with caplog.at_level(logging.WARNING, logger="merge_mix.corpus"):
        docs, stats = read_domain(domain, "spec.yaml: domains.d")
    assert len(docs) == 3
    assert stats["skipped"] == {"not_utf8": 2, "binary": 1, "too_large": 0}
    assert (
        "spec.yaml: domains.d.sources[0]: 3 files skipped: 2 not UTF-8 text, 1 binary (NUL bytes)"
        in caplog.text
    )


def test_latin1_files_are_read_with_their_encoding(tmp_path, caplog):
    from merge_mix.corpus import read_domain

    domain = _files_domain(tmp_path / "src", good=1, latin1=2, nul=1, encoding="latin-1")
    with caplog.at_level(logging.WARNING, logger="merge_mix.corpus"):
        docs, stats = read_domain(domain, "spec.yaml: domains.d")
    assert stats["skipped"] == {"not_utf8": 0, "binary": 1, "too_large": 0}
    assert len(docs) == 3 and sum("caf\u00e9 0" in t for t in docs.values()) == 1
    assert "domains.d.sources[0]: 1 files skipped: 1 binary (NUL bytes)" in caplog.text


def test_files_over_max_file_bytes_are_counted(tmp_path, caplog):
    from merge_mix.corpus import read_domain

    # The good files are 220 bytes, the latin-1 ones 140.
    domain = _files_domain(
        tmp_path / "src", good=2, latin1=2, nul=0, encoding="latin-1", max_file_bytes=200
    )
    with caplog.at_level(logging.WARNING, logger="merge_mix.corpus"):
        docs, stats = read_domain(domain, "spec.yaml: domains.d")
    assert len(docs) == 2 and all("caf\u00e9" in t for t in docs.values())
    assert stats["skipped"] == {"not_utf8": 0, "binary": 0, "too_large": 2}
    assert "domains.d.sources[0]: 2 files skipped: 2 too large" in caplog.text


def test_source_encoding_and_max_file_bytes_in_the_spec(tiny_spec_path, tmp_path):
    spec = tiny_spec_dict(tiny_spec_path.parent, output=str(tmp_path / "p"))
    source = {"files": str(tmp_path / "*.txt"), "encoding": "latin-1", "max_file_bytes": 1000}
    spec["domains"]["c"] = {"sources": [source]}
    loaded = load_spec(write_spec(tmp_path, spec))
    src = next(d for d in loaded.domains if d.name == "c").sources[0]
    assert (src.encoding, src.max_file_bytes) == ("latin-1", 1000)
    # Unset options leave a source's identity (and so existing pools' hashes) as before.
    plain = next(d for d in loaded.domains if d.name == "code").sources[0]
    assert set(plain.identity()) == {"kind", "location", "text_field", "split"}
    source["encoding"] = "latin-9000"
    with pytest.raises(MergeMixError, match=r"domains\.c\.sources\[0\]\.encoding: unknown text"):
        load_spec(write_spec(tmp_path, spec))


def test_domain_of_only_non_utf8_files_says_so(tiny_spec_path, tmp_path):
    _files_domain(tmp_path / "src", good=0, latin1=2, nul=1)
    spec = tiny_spec_dict(tiny_spec_path.parent, output=str(tmp_path / "p"))
    spec["domains"]["c"] = {"sources": [{"files": str(tmp_path / "src" / "*.txt")}]}
    line = _one_error_line(_train(write_spec(tmp_path, spec)))
    assert "domains.c.sources[0]" in line
    assert "3 files skipped: 2 not UTF-8 text, 1 binary (NUL bytes); no documents left" in line


def test_tiny_pool_records_skipped_counts(tiny_pool):
    data = json.loads((tiny_pool / "data" / "data.json").read_text())
    for d in DOMAINS:
        skipped = data["domains"][d]["corpus"]["skipped"]
        assert set(skipped) == {"not_utf8", "binary", "too_large"}
