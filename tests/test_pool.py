"""Building pools: tokenizer, splits, sampler, training resume, manifest, growth, errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import tiny_spec_dict, write_spec

from merge_mix.cli import main
from merge_mix.config import load_spec
from merge_mix.corpus import build_domain, cut_pieces
from merge_mix.errors import MergeMixError
from merge_mix.pool import Pool, format_pool_table
from merge_mix.pool_build import build_pool
from merge_mix.tokens import MixtureSampler, Shard, load_tokenizer


def test_tokenizer_round_trip_and_special_tokens(tiny_pool):
    tok = load_tokenizer(tiny_pool / "tokenizer")
    text = 'def f(x):\n    return "héllo — wörld ✓"  # tabs\tand\r\nnewlines\n'
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.bos_token == "<|bos|>" and tok.eos_token == "<|eos|>"
    assert len(tok) == 512
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(str(tiny_pool / "tokenizer"), local_files_only=True)
    assert again(text, add_special_tokens=False)["input_ids"] == ids


def test_split_is_deterministic_disjoint_and_deduplicated(tiny_spec_path, tmp_path):
    spec = load_spec(tiny_spec_path)
    code = spec.domains[0]
    a = build_domain(code, spec.data, "code")
    b = build_domain(code, spec.data, "code")
    assert a.splits == b.splits
    texts = {split: {p for doc in docs for p in doc} for split, docs in a.splits.items()}
    assert not texts["train"] & texts["search"]
    assert not texts["train"] & texts["test"]
    assert not texts["search"] & texts["test"]
    for split in ("train", "search", "test"):
        assert a.stats[f"{split}_pieces"] == len(a.pieces(split)) > 0
        assert a.stats[f"{split}_documents"] == len(a.splits[split]) > 0
    # A duplicated file is counted once, and whole documents go to one split.
    src = tmp_path / "src"
    src.mkdir()
    bodies = ["alpha " * 40, "beta " * 40, "alpha " * 40, "gamma " * 40, "delta\n" * 100]
    for i, body in enumerate(bodies):
        (src / f"{i}.txt").write_text(body)
    from merge_mix.config import DataSpec, DomainSpec, SourceSpec
    from merge_mix.corpus import read_domain, split_domain

    dom = DomainSpec("d", (SourceSpec("files", str(src / "*.txt")),))
    docs, stats = read_domain(dom, "d")
    assert stats["documents_read"] == 5 and stats["duplicates_removed"] == 1
    c = split_domain("d", docs, DataSpec(heldout_fraction=0.5, max_doc_bytes=256, min_doc_bytes=8))
    all_docs = [doc for split in c.splits.values() for doc in split]
    assert sorted("".join(doc) for doc in all_docs) == sorted(set(bodies))
    assert max(len(doc) for doc in all_docs) > 1  # the long document was cut into pieces


def test_cut_pieces_respects_size_and_keeps_text():
    text = "".join(f"line {i} " + "x" * (i % 50) + "\n" for i in range(500))
    pieces = cut_pieces(text, 300)
    assert "".join(pieces) == text
    assert all(len(p.encode()) <= 300 for p in pieces)


def test_sampler_draws_domains_in_proportion_and_is_deterministic():
    streams = {"a": np.zeros(10_000, dtype=np.uint16), "b": np.ones(10_000, dtype=np.uint16)}
    sampler = MixtureSampler(streams, {"a": 0.7, "b": 0.3}, seq_len=16, seed=3)
    rows = np.concatenate([sampler.batch(step, 0, 64)[0] for step in range(100)])
    share_b = rows[:, 0].mean()  # every token of a row comes from one domain
    assert abs(share_b - 0.3) < 0.02
    x1, c1 = sampler.batch(5, 1, 8)
    x2, c2 = sampler.batch(5, 1, 8)
    assert np.array_equal(x1, x2) and np.array_equal(c1, c2)
    assert not np.array_equal(x1, sampler.batch(6, 1, 8)[0])
    with pytest.raises(MergeMixError, match="fewer than seq_len"):
        MixtureSampler({"a": np.zeros(8, dtype=np.uint16)}, {"a": 1.0}, seq_len=16, seed=0)


def test_shards_index_matches_text(tiny_pool):
    tok = load_tokenizer(tiny_pool / "tokenizer")
    for split in ("search", "test"):
        shard = Shard.open(tiny_pool / "data" / "prose", split)
        start, n, nbytes, doc = shard.index[0]
        assert doc == 0 and np.all(np.diff(shard.index[:, 3]) >= 0)  # documents in order
        assert shard.tokens[start - 1] == tok.bos_token_id
        assert shard.tokens[start + n] == tok.eos_token_id
        assert len(tok.decode(shard.piece(0)).encode()) == nbytes
        # The held-out text is kept verbatim, one piece a line, with its document.
        lines = (tiny_pool / "data" / "prose" / f"{split}.jsonl").read_text().splitlines()
        first = json.loads(lines[0])
        assert len(lines) == len(shard.index) and first["document"] == 0
        assert tok(first["text"], add_special_tokens=False)["input_ids"] == shard.piece(0).tolist()


def test_search_and_test_splits_hold_different_documents(tiny_pool):
    data = json.loads((tiny_pool / "data" / "data.json").read_text())
    for d in ("code", "c", "prose"):
        texts = {}
        for split in ("search", "test"):
            rows = (tiny_pool / "data" / d / f"{split}.jsonl").read_text().splitlines()
            texts[split] = {json.loads(r)["text"] for r in rows}
            assert data["domains"][d][split]["documents"] >= 3, (d, split)
        assert not texts["search"] & texts["test"]


def test_cross_domain_duplicate_never_reaches_a_heldout_split(tmp_path):
    """A document in two domains stays in the first only; a held-out piece that copies
    training text of another domain is dropped; both are counted in data.json."""
    from merge_mix.config import DataSpec
    from merge_mix.corpus import check_corpus, split_domain, text_hash
    from merge_mix.decontaminate import decontaminate, drop_cross_domain_duplicates

    words = [f"w{i}" for i in range(4000)]
    docs = [" ".join(words[i : i + 60]) + "\n" for i in range(0, 4000, 60)]
    a = {f"a{i}": t for i, t in enumerate(docs[:40])}
    b = {f"b{i}": t for i, t in enumerate(docs[40:])}
    shared = "shared text " * 30
    a["a-shared"] = shared
    b["b-shared"] = shared
    rekey = {name: {text_hash(t): t for t in d.values()} for name, d in {"a": a, "b": b}.items()}
    removed = drop_cross_domain_duplicates(rekey, set())
    assert removed == {"a": 0, "b": 1}
    assert text_hash(shared) in rekey["a"] and text_hash(shared) not in rekey["b"]
    spec = DataSpec(heldout_fraction=0.4, max_doc_bytes=4096, min_doc_bytes=8)
    corpora = {n: split_domain(n, d, spec) for n, d in rekey.items()}
    # Plant a near-duplicate: b's first held-out document copies a training document of a
    # with one word changed.
    train_a = corpora["a"].splits["train"][0][0]
    near = train_a.replace(train_a.split()[3], "CHANGED", 1)
    corpora["b"].splits["search"].insert(0, [near])
    _, report = decontaminate(corpora, threshold=0.5, shingle_words=8)
    assert report["b"]["near_duplicate_heldout_pieces"] >= 1
    held = [p for n in corpora for s in ("search", "test") for p in corpora[n].pieces(s)]
    assert near not in held and shared not in corpora["b"].pieces("train")
    for n in corpora:
        check_corpus(corpora[n], n)


def test_pool_records_decontamination(tiny_pool):
    data = json.loads((tiny_pool / "data" / "data.json").read_text())
    for d in ("code", "c", "prose"):
        stats = data["domains"][d]["corpus"]
        for key in (
            "cross_domain_duplicates_removed",
            "near_duplicate_heldout_pieces",
            "near_duplicate_train_pieces",
        ):
            assert isinstance(stats[key], int), (d, key)


def test_tiny_pool_manifest_and_components_beat_base(tiny_pool):
    pool = Pool.open(tiny_pool, require_complete=True)
    m = pool.manifest
    assert pool.domains == ["code", "c", "prose"]
    assert m["complete"] and m["missing"] == []
    for d in pool.domains:
        comp = m["components"][d]
        assert comp["heldout"][d]["loss"] < m["base"]["heldout"][d]["loss"], d
        assert comp["training_mixture"][d] == pytest.approx(0.5 + 0.5 / 3)
        assert set(comp["heldout"]) == set(pool.domains)
        assert len(comp["sha256"]) == 64
        assert comp["tokens_seen"] >= 40_000
    table = format_pool_table(tiny_pool)
    assert "complete" in table and "prose" in table


def test_resume_after_crash_gives_identical_weights(tiny_spec_path, tiny_pool, tmp_path):
    """Crash a component mid-run (after its step-10 checkpoint), resume, compare bits."""
    root = tmp_path
    spec_path = write_spec(root, tiny_spec_dict(tiny_spec_path.parent, output=str(root / "p")))
    spec = load_spec(spec_path)

    def crash(domain, step):
        if domain == "c" and step == 13:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        build_pool(spec, show_progress=False, step_callback=crash)
    assert (root / "p" / "work" / "c" / "checkpoint" / "state.json").is_file()
    state = json.loads((root / "p" / "work" / "c" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 10
    pool = build_pool(spec, show_progress=False)
    assert pool is not None
    ref = Pool.open(tiny_pool).manifest["components"]
    got = pool.manifest["components"]
    for d in ("code", "c", "prose"):
        assert got[d]["sha256"] == ref[d]["sha256"], d


def test_pool_without_manifest_is_reported_incomplete(tiny_spec_path, tmp_path):
    spec_path = write_spec(
        tmp_path, tiny_spec_dict(tiny_spec_path.parent, output=str(tmp_path / "p"))
    )
    spec = load_spec(spec_path)

    def kill(domain, step):
        if domain == "base" and step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_pool(spec, show_progress=False, step_callback=kill)
    assert not (tmp_path / "p" / "manifest.json").exists()
    with pytest.raises(MergeMixError, match="incomplete"):
        Pool.open(tmp_path / "p")
    result = CliRunner().invoke(main, ["pool", "show", str(tmp_path / "p")])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "incomplete" in result.output


def test_only_and_growth_train_just_what_is_missing(tiny_spec_path, tiny_pool, tmp_path):
    pool_dir = tmp_path / "p"
    shutil.copytree(tiny_pool, pool_dir)
    spec = tiny_spec_dict(tiny_spec_path.parent, output=str(pool_dir))
    before = {
        d: (pool_dir / "components" / d / "model.safetensors").stat().st_mtime_ns
        for d in ("code", "c", "prose")
    }
    # Grow: a fourth domain made of other stdlib packages.
    import sysconfig
    from pathlib import Path

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    spec["domains"]["code2"] = {
        "sources": [{"files": str(stdlib / "asyncio" / "*.py")}],
        "max_bytes": 200_000,
    }
    grown = load_spec(write_spec(tmp_path, spec))
    assert build_pool(grown, only=["code"], show_progress=False) is None
    m = json.loads((pool_dir / "manifest.json").read_text())
    assert not m["complete"] and m["missing"] == ["code2"]
    assert "code2" in m["base"]["heldout"]  # the base is scored on the new domain
    assert "code2" in m["components"]["c"]["heldout"]  # and so are the finished components
    pool = build_pool(grown, show_progress=False)
    assert pool is not None and pool.domains == ["code", "c", "prose", "code2"]
    after = {
        d: (pool_dir / "components" / d / "model.safetensors").stat().st_mtime_ns
        for d in ("code", "c", "prose")
    }
    assert before == after
    # The new component's general share is the base's uniform mix over the original domains.
    mix = pool.manifest["components"]["code2"]["training_mixture"]
    assert mix == pytest.approx(
        {"code": 0.5 / 3, "c": 0.5 / 3, "prose": 0.5 / 3, "code2": 0.5}, abs=1e-6
    )


def test_changed_spec_is_refused(tiny_spec_path, tiny_pool, tmp_path):
    pool_dir = tmp_path / "p"
    shutil.copytree(tiny_pool, pool_dir)
    spec = tiny_spec_dict(tiny_spec_path.parent, output=str(pool_dir))
    spec["training"]["lr"] = 1e-3
    path = write_spec(tmp_path, spec)
    result = CliRunner().invoke(main, ["train-components", str(path), "--quiet"])
    assert result.exit_code == 2
    assert "training.lr differs" in result.output
    del spec["domains"]["prose"]
    spec["training"]["lr"] = 5e-3
    result = CliRunner().invoke(
        main, ["train-components", str(write_spec(tmp_path, spec)), "--quiet"]
    )
    assert result.exit_code == 2 and "domains.prose" in result.output


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda s: s.update(colour="red"), "colour: unknown key"),
        (lambda s: s["training"].update(lr=-1), "training.lr: must be > 0"),
        (lambda s: s["training"].update(lr="fast"), "training.lr: expected a number"),
        (lambda s: s["model"].update(hiden_size=3), "model.hiden_size: unknown key"),
        (lambda s: s["domains"]["c"].update(sources=[]), "domains.c.sources"),
        (
            lambda s: s["domains"]["c"].update(sources=[{"files": "/nonexistent/*.h"}]),
            "matched no files",
        ),
        (
            lambda s: s["domains"]["c"].update(sources=[{"jsonl": "/nonexistent.jsonl"}]),
            "does not exist",
        ),
        (
            lambda s: s["domains"]["c"].update(sources=[{"builtin": "poetry"}]),
            "unknown built-in corpus",
        ),
        (lambda s: s["training"].update(component_tokens=50_000_000), "over max_epochs"),
        (lambda s: s.update(general_share=1.5), "general_share: must be in"),
        (lambda s: s["data"].update(heldout_max_bytes=0), "data.heldout_max_bytes: must be >= 1"),
    ],
)
def test_bad_specs_fail_with_one_line(tiny_spec_path, tmp_path, mutate, expected):
    spec = tiny_spec_dict(tiny_spec_path.parent, output=str(tmp_path / "p"))
    mutate(spec)
    path = write_spec(tmp_path, spec)
    result = CliRunner().invoke(main, ["train-components", str(path), "--quiet"])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], result.output
    assert not (tmp_path / "p" / "manifest.json").exists()


def test_prepare_only_then_show_and_file_modes(tiny_spec_path, tmp_path):
    spec = load_spec(
        write_spec(tmp_path, tiny_spec_dict(tiny_spec_path.parent, output=str(tmp_path / "p")))
    )
    result = CliRunner().invoke(
        main, ["train-components", str(spec.spec_path), "--prepare-only", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    assert "missing: code, c, prose" in result.output
    assert not (tmp_path / "p" / "work" / "base").exists()  # finished base: no stale checkpoint
    base = tmp_path / "p" / "base"
    assert (base / "tokenizer.json").is_file()  # members are complete HF model directories
    for f in (base / "model.safetensors", tmp_path / "p" / "manifest.json"):
        assert f.stat().st_mode & 0o044 == 0o044, f  # readable by group and others


def test_runtime_settings_may_change_between_runs(tiny_spec_path, tiny_pool, tmp_path):
    pool_dir = tmp_path / "p"
    shutil.copytree(tiny_pool, pool_dir)
    spec = tiny_spec_dict(tiny_spec_path.parent, output=str(pool_dir))
    spec["training"].update(device="cpu", eval_every=7, checkpoint_every=3)
    result = CliRunner().invoke(
        main, ["train-components", str(write_spec(tmp_path, spec)), "--quiet"]
    )
    assert result.exit_code == 0, result.output


def test_pretrained_base_is_copied_with_its_tokenizer(tiny_spec_path, tiny_pool, tmp_path):
    """model.pretrained: the base is a copy of that model (same tensors), saved with the
    tokenizer taken from it, and components continue from it."""
    import torch
    from safetensors.torch import load_file

    from merge_mix.model import weights_sha256

    spec_dict = tiny_spec_dict(tiny_spec_path.parent, output=str(tmp_path / "p"))
    spec_dict["model"] = {"pretrained": str(tiny_pool / "base")}
    spec_dict["tokenizer"] = {}
    spec_dict["training"] = {**spec_dict["training"], "component_tokens": 2_048}
    pool = build_pool(load_spec(write_spec(tmp_path, spec_dict)), show_progress=False)
    assert pool is not None
    base = pool.manifest["base"]
    assert base["pretrained_from"] == str(tiny_pool / "base")
    assert base["sha256"] == weights_sha256(tmp_path / "p" / "base")
    ours = load_file(str(tmp_path / "p" / "base" / "model.safetensors"))
    theirs = load_file(str(tiny_pool / "base" / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert (tmp_path / "p" / "base" / "tokenizer.json").is_file()
    assert not (tmp_path / "p" / "base.tmp").exists()
    assert set(pool.manifest["components"]) == {"code", "c", "prose"}


def test_a_format_1_pool_is_refused_with_how_to_rebuild(tiny_pool, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(tiny_pool, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["format_version"] = 1
    (old / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(main, ["pool", "show", str(old)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "pool format 1" in lines[0]
    assert "search/test" in lines[0] and "train-components" in lines[0]
