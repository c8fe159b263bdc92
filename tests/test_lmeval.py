"""lm-eval integration on the tiny pool: generated tasks, our bits-per-byte against
lm-eval's on the same documents, in-place merges without stale results, and the
`merge-mix` model type through lm-eval's own command line (results folder named after the
pool and mixture, the device it ran on recorded)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from merge_mix.errors import MergeMixError
from merge_mix.evaluate import HeldoutSet, heldout_metrics
from merge_mix.lmeval import (
    evaluate_tasks,
    make_tasks,
    register_model_type,
    rewrite_model_args,
    run_lm_eval_cli,
    run_name,
)
from merge_mix.merge import merger_for_pool
from merge_mix.pool import Pool
from merge_mix.tokens import Shard, load_tokenizer

N_CHOICES = 4
MAX_DOCS = 24  # six groups of four multiple-choice items per domain


@pytest.fixture(scope="module")
def pool(tiny_pool) -> Pool:
    return Pool.open(tiny_pool)


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory, tiny_pool):
    out = tmp_path_factory.mktemp("eval_tasks")
    make_tasks(tiny_pool, out, max_docs_per_domain=MAX_DOCS, n_choices=N_CHOICES, seed=0)
    return out


@pytest.fixture(scope="module")
def merger(pool):
    return merger_for_pool(pool)


@pytest.fixture(scope="module")
def tokenizer(pool):
    return load_tokenizer(pool.tokenizer_dir)


def _rows(tasks_dir, name: str) -> list[dict]:
    path = tasks_dir / "tiny" / "data" / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_make_tasks_writes_complete_task_dir(tiny_pool, tasks_dir, pool):
    task_dir = tasks_dir / "tiny"
    expected = [f"mm_tiny_{d}_{k}" for d in pool.domains for k in ("ppl", "choice")]
    manifest = json.loads((task_dir / "tasks.json").read_text())
    assert manifest["tasks"] == expected
    assert sorted(p.stem for p in task_dir.glob("*.yaml")) == sorted([*expected, "mm_tiny"])
    assert not list(tasks_dir.glob(".*partial*")) and not list(task_dir.glob("*.partial"))
    # Unchanged inputs: same names, nothing rewritten.
    before = (task_dir / "mm_tiny_code_ppl.yaml").stat().st_mtime_ns
    again = make_tasks(tiny_pool, tasks_dir, max_docs_per_domain=MAX_DOCS, n_choices=N_CHOICES)
    assert again == expected
    assert (task_dir / "mm_tiny_code_ppl.yaml").stat().st_mtime_ns == before


def test_ppl_documents_are_the_exact_heldout_pieces(tasks_dir, pool, tokenizer):
    for d in pool.domains:
        shard = Shard.open(pool.data_dir / d, "search")
        rows = _rows(tasks_dir, f"mm_tiny_{d}_ppl")
        assert [r["piece"] for r in rows] == list(range(min(MAX_DOCS, len(shard.index))))
        for r in rows:
            assert len(r["text"].encode("utf-8")) == shard.index[r["piece"], 2]
            ids = tokenizer(r["text"], add_special_tokens=False)["input_ids"]
            assert ids == shard.piece(r["piece"]).tolist()


def test_choice_items_have_n_choices_and_the_right_gold(tasks_dir, pool, tokenizer):
    for d in pool.domains:
        shard = Shard.open(pool.data_dir / d, "search")
        rows = _rows(tasks_dir, f"mm_tiny_{d}_choice")
        assert 0 < len(rows) <= MAX_DOCS and len(rows) % N_CHOICES == 0
        for r in rows:
            assert len(r["choices"]) == N_CHOICES == len(set(r["choices"]))
            text = tokenizer.decode(shard.piece(r["piece"]).tolist(), skip_special_tokens=False)
            assert r["context"] + r["choices"][r["gold"]] in text
            for k, choice in enumerate(r["choices"]):
                if k != r["gold"]:
                    assert r["context"] + choice not in text
        # Each group shares one choice list and uses every gold position once: a model
        # blind to the context scores exactly chance on it.
        for g in range(0, len(rows), N_CHOICES):
            group = rows[g : g + N_CHOICES]
            assert all(r["choices"] == group[0]["choices"] for r in group)
            assert sorted(r["gold"] for r in group) == list(range(N_CHOICES))
            assert len({r["piece"] for r in group}) == N_CHOICES


def test_bits_per_byte_matches_our_evaluator(tasks_dir, pool, merger, tokenizer):
    """Same documents, same windows: lm-eval's loglikelihood_rolling bits_per_byte equals
    our evaluator's bpb up to float rounding (the spec allows 1%)."""
    model = merger.merge(np.array([0.5, 0.2, 0.3]))
    heldout = HeldoutSet.from_pool_data(
        pool.data_dir, pool.domains, pool.bos_id, pool.seq_len, max_tokens=2500
    )
    ours = heldout_metrics(model, heldout, "cpu")
    for d in pool.domains:
        k = len(heldout.windows[d].piece_end)  # pieces our budget takes
        assert 1 < k < MAX_DOCS
        theirs = evaluate_tasks(
            model,
            tokenizer,
            [f"mm_tiny_{d}_ppl"],
            include_path=tasks_dir,
            limit=k,
            max_length=pool.seq_len,
        )
        a, b = ours[f"heldout/{d}/bpb"], theirs[f"lmeval/mm_tiny_{d}_ppl/bits_per_byte"]
        assert abs(a - b) / a < 1e-4, (d, a, b)


def test_tasks_run_through_lm_eval_from_another_directory(
    tasks_dir, pool, merger, tokenizer, tmp_path, monkeypatch
):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    model = merger.merge(np.full(3, 1 / 3))
    results = simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, max_length=pool.seq_len, batch_size=16),
        tasks=["mm_tiny"],
        task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
        limit=N_CHOICES,
        bootstrap_iters=0,
    )["results"]
    ours = evaluate_tasks(
        model, tokenizer, ["mm_tiny"], include_path=tasks_dir, limit=N_CHOICES,
        max_length=pool.seq_len,
    )  # fmt: skip
    for d in pool.domains:
        ppl, choice = results[f"mm_tiny_{d}_ppl"], results[f"mm_tiny_{d}_choice"]
        assert 0 < ppl["bits_per_byte,none"] < math.log2(len(tokenizer)) * 4
        assert 0 <= choice["acc,none"] <= 1 and 0 <= choice["acc_norm,none"] <= 1
        for task, metrics in ((f"mm_tiny_{d}_ppl", ppl), (f"mm_tiny_{d}_choice", choice)):
            for key, value in metrics.items():
                if key.endswith(",none") and "_stderr" not in key:
                    got = ours[f"lmeval/{task}/{key.removesuffix(',none')}"]
                    assert got == pytest.approx(value, rel=1e-9)
    assert not any("stderr" in k or "," in k for k in ours)


def test_in_place_merges_are_never_served_from_a_cache(tasks_dir, pool, merger, tokenizer):
    tasks = [f"mm_tiny_{d}_ppl" for d in pool.domains] + ["mm_tiny_code_choice"]

    def score(weights):
        model = merger.merge(np.asarray(weights, dtype=np.float64))
        assert model is merger.model  # the same module object, merged in place
        return evaluate_tasks(
            model, tokenizer, tasks, include_path=tasks_dir, limit=N_CHOICES,
            max_length=pool.seq_len, device="cpu",
        )  # fmt: skip

    code, prose, code_again = score([1, 0, 0]), score([0, 0, 1]), score([1, 0, 0])
    for d in pool.domains:
        key = f"lmeval/mm_tiny_{d}_ppl/bits_per_byte"
        assert abs(code[key] - prose[key]) > 1e-3
    assert code_again == code


def test_unknown_task_names_the_task_and_where_it_looked(tasks_dir, merger, tokenizer, tmp_path):
    with pytest.raises(MergeMixError, match=rf"'mm_tiny_nope_ppl' not found in {tasks_dir}"):
        evaluate_tasks(merger.model, tokenizer, ["mm_tiny_nope_ppl"], include_path=tasks_dir)
    with pytest.raises(MergeMixError, match="task directory not found"):
        evaluate_tasks(merger.model, tokenizer, ["mm_tiny"], include_path=tmp_path / "missing")


def test_make_tasks_rejects_impossible_choice_counts(tiny_pool, tmp_path):
    with pytest.raises(MergeMixError, match=r"domain '\w+': \d+ held-out pieces .* n_choices"):
        make_tasks(tiny_pool, tmp_path, n_choices=50)
    assert not list(tmp_path.glob("*/*.yaml")) and not list(tmp_path.glob(".*partial*"))


def test_model_args_keep_commas_inside_weights():
    argv = ["--model_args", "pool=P,weights=code:0.5,prose:0.5,batch_size=4", "--limit", "2"]
    assert rewrite_model_args(argv) == [
        "--model_args", "pool=P,weights=code:0.5;prose:0.5,batch_size=4", "--limit", "2",
    ]  # fmt: skip
    assert rewrite_model_args(["-a", "mixture=c:.2,code:1e-1", "pool=P"]) == [
        "-a", "mixture=c:.2;code:1e-1", "pool=P",
    ]  # fmt: skip
    assert rewrite_model_args(["--model_args=weights=uniform,pool=P"]) == [
        "--model_args=weights=uniform,pool=P"
    ]


def test_merge_mix_model_type_rejects_weights_written_with_equals(tiny_pool):
    model_type = register_model_type()
    with pytest.raises(MergeMixError, match="prose=0.5 looks like a merge weight"):
        model_type.create_from_arg_string(f"pool={tiny_pool},weights=code=0.5,prose=0.5")


def test_run_names_say_pool_and_mixture():
    assert run_name("tiny", {"code": 0.5, "c": 0.0, "prose": 0.5}) == (
        "tiny_weights_code=0.5_c=0_prose=0.5"
    )
    third = {"code": 1 / 3, "c": 1 / 3, "prose": 1 / 3}
    assert run_name("My Pool", third, "mixture") == (
        "my_pool_mixture_code=0.3333_c=0.3333_prose=0.3333"
    )
    kept = run_name("tiny", third, keep_base=["*embed*"])
    assert kept.startswith("tiny_weights_code=0.3333_c=0.3333_prose=0.3333_keep_base=")
    assert kept != run_name("tiny", third, keep_base=["*norm*"])
    # Many domains: cut to 120 characters, the end a hash of the exact values.
    many = {f"domain_{i}": 1 / 40 for i in range(40)}
    other = {**many, "domain_0": 1 / 40 + 1e-9}
    assert len(run_name("tiny", many)) == 120
    assert run_name("tiny", many)[:111] == run_name("tiny", other)[:111]
    assert run_name("tiny", many) != run_name("tiny", other)


def _expected_auto_device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


def test_merge_mix_model_type_through_lm_eval_cli(
    tiny_pool, tasks_dir, pool, merger, tokenizer, tmp_path, capsys
):
    out = tmp_path / "out"
    code = run_lm_eval_cli(
        [
            "--model", "merge-mix",
            "--model_args", f"pool={tiny_pool},weights=code:0.5,prose:0.5",
            "--tasks", "mm_tiny_code_ppl,mm_tiny_prose_choice",
            "--include_path", str(tasks_dir),
            "--limit", str(N_CHOICES),
            "--output_path", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    captured = capsys.readouterr()
    assert "mm_tiny_code_ppl" in captured.out
    assert "not available" not in captured.err  # no --device given: nothing to fall back from
    # The folder is named after the pool and the mixture, not at random.
    (path,) = out.glob("**/results_*.json")
    assert path.parent == out / "tiny_weights_code=0.5_c=0_prose=0.5"
    saved = json.loads(path.read_text())
    assert saved["model_name"] == "tiny_weights_code=0.5_c=0_prose=0.5"
    assert saved["config"]["merge_weights"] == {"code": 0.5, "c": 0.0, "prose": 0.5}
    # What the run used, not lm-eval's command-line defaults (cuda:0, batch size 1).
    assert saved["config"]["device"] == _expected_auto_device()
    assert str(saved["config"]["batch_size"]) == "16"
    # Both pairs reached the merge: the same numbers as merging 50/50 ourselves.
    model = merger.merge(np.array([0.5, 0.0, 0.5]))
    ours = evaluate_tasks(
        model, tokenizer, ["mm_tiny_code_ppl", "mm_tiny_prose_choice"], include_path=tasks_dir,
        limit=N_CHOICES, max_length=pool.seq_len,
    )  # fmt: skip
    got = saved["results"]["mm_tiny_code_ppl"]["bits_per_byte,none"]
    assert got == pytest.approx(ours["lmeval/mm_tiny_code_ppl/bits_per_byte"], rel=1e-9)
    got = saved["results"]["mm_tiny_prose_choice"]["acc,none"]
    assert got == pytest.approx(ours["lmeval/mm_tiny_prose_choice/acc"])


def test_lm_eval_cli_records_the_device_it_fell_back_to(tiny_pool, tasks_dir, tmp_path, caplog):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    out = tmp_path / "out"
    code = run_lm_eval_cli(
        [
            "--model", "merge-mix",
            "--model_args", f"pool={tiny_pool},mixture=uniform",
            "--tasks", "mm_tiny_code_ppl",
            "--include_path", str(tasks_dir),
            "--limit", "2",
            "--device", "cuda:0",
            "--output_path", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    assert "device cuda:0 is not available; using auto" in caplog.text
    (path,) = out.glob("**/results_*.json")
    assert path.parent.name == "tiny_mixture_code=0.3333_c=0.3333_prose=0.3333"
    saved = json.loads(path.read_text())
    assert saved["config"]["device"] == _expected_auto_device() != "cuda:0"
    assert saved["config"]["effective_mixture"] == pytest.approx(
        {"code": 1 / 3, "c": 1 / 3, "prose": 1 / 3}
    )
