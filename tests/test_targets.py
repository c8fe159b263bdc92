"""Target sets: evaluation-only data, kept out of training, scored and searched for."""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from merge_mix.cli import main
from merge_mix.errors import MergeMixError

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def target_pool(tiny_pool, tiny_spec_path, tmp_path_factory) -> Path:
    """A copy of the tiny pool grown with a spec ``targets:`` section: `docs` (the http
    package, and three files the code domain holds)."""
    from merge_mix.config import load_spec
    from merge_mix.pool_build import build_pool

    root = tmp_path_factory.mktemp("targets")
    shutil.copytree(tiny_pool, root / "pool")
    raw = yaml.safe_load(tiny_spec_path.read_text())
    raw["output_dir"] = str(root / "pool")
    # Files the code domain holds (any split), by document digest: the target set lists
    # them too, and must drop them.
    from merge_mix.corpus import text_hash
    from merge_mix.decontaminate import load_digests

    held = load_digests(tiny_pool / "data" / "code" / "documents.sha256")
    subs = ("email", "json", "importlib", "logging", "urllib", "xml/dom")
    files = [f for sub in subs for f in sorted((STDLIB / sub).glob("*.py"))]
    shared = [f for f in files if text_hash(f.read_text()) in held][:3]
    raw["targets"] = {
        "docs": {
            "sources": [{"files": str(STDLIB / "http" / "*.py")}]
            + [{"files": str(f)} for f in shared]
        }
    }
    (root / "shared.txt").write_text("\n".join(map(str, shared)))
    spec_path = root / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert build_pool(load_spec(spec_path), show_progress=False) is not None
    return root / "pool"


def test_target_set_is_prepared_and_listed(target_pool):
    from merge_mix.pool import Pool

    pool = Pool.open(target_pool)
    assert pool.targets == ["docs"]
    entry = pool.manifest["targets"]["docs"]
    assert entry["search"]["documents"] > 0 and entry["test"]["documents"] > 0
    for split in ("search", "test"):
        assert (target_pool / "data" / "targets" / "docs" / f"{split}.tokens").is_file()
    assert not (target_pool / "data" / "targets" / "docs" / "train.tokens").exists()
    assert pool.manifest["spec"]["targets"][0]["name"] == "docs"


def test_target_documents_never_in_training(target_pool):
    from merge_mix.corpus import text_hash
    from merge_mix.decontaminate import Shingler, coverage, load_digests, union

    data_dir = target_pool / "data"
    data = json.loads((data_dir / "data.json").read_text())
    domains = list(data["domains"])
    digests = set().union(*(load_digests(data_dir / d / "documents.sha256") for d in domains))
    # Every file the code domain holds was dropped from the target set.
    held = [Path(p) for p in (target_pool.parent / "shared.txt").read_text().split()]
    assert len(held) == 3 and all(text_hash(f.read_text()) in digests for f in held)
    assert data["targets"]["docs"]["corpus"]["training_duplicates_removed"] == len(held)
    train = union(np.load(data_dir / d / "train.shingles.npy") for d in domains)
    shingle = Shingler(8)
    pieces = []
    for split in ("search", "test"):
        path = data_dir / "targets" / "docs" / f"{split}.jsonl"
        pieces += [json.loads(line)["text"] for line in path.read_text().splitlines()]
    assert pieces
    assert max(coverage(shingle(p), train) for p in pieces) < 0.5
    for f in held:
        assert f.read_text()[:2000] not in "".join(pieces)


def test_near_duplicates_of_training_text_are_dropped():
    from merge_mix.config import DataSpec
    from merge_mix.corpus import text_hash
    from merge_mix.decontaminate import Shingler

    trained = " ".join(f"word{i}" for i in range(200))
    fresh = " ".join(f"other{i}" for i in range(200))
    docs = {text_hash(t): t for t in (trained + " tail", fresh)}
    from merge_mix.targets import split_target

    splits, stats = split_target(docs, DataSpec(), set(), Shingler(8)(trained))
    kept = [p for s in splits.values() for d in s for p in d]
    assert kept == [fresh] and stats["near_duplicate_pieces"] == 1


def test_spec_refuses_a_target_named_like_a_domain(tmp_path, tiny_spec_path):
    from merge_mix.config import load_spec

    raw = yaml.safe_load(tiny_spec_path.read_text())
    raw["targets"] = {"code": {"sources": [{"files": str(STDLIB / "http" / "*.py")}]}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(MergeMixError, match="targets.code: also a domain"):
        load_spec(path)


def test_scorer_scores_target_sets_per_document(target_pool):
    from merge_mix.proxy import ProxyScorer

    scorer = ProxyScorer(target_pool, device="cpu")
    metrics = scorer.score(np.full(3, 1 / 3))
    assert {"target/docs/loss", "target/docs/ppl", "target/docs/bpb"} <= set(metrics)
    docs = scorer.last_documents["target/docs"]
    assert metrics["target/docs/loss"] == pytest.approx(docs.nll.sum() / docs.tokens.sum())
    data = json.loads((target_pool / "data" / "data.json").read_text())
    assert len(docs.nll) == data["targets"]["docs"]["search"]["documents"]
    test = scorer.document_scores(np.full(3, 1 / 3), "test")
    assert len(test["target/docs"].nll) == data["targets"]["docs"]["test"]["documents"]


def test_objectives_name_target_sets():
    from merge_mix.objective import load_objective

    obj = load_objective("target-set:docs", ["code", "c"], targets=["docs"])
    assert obj.evaluate({"target/docs/loss": 2.5, "heldout/code/loss": 1.0}).value == 2.5
    same = load_objective({"terms": [{"source": "target", "metric": "loss", "name": "docs"}]})
    assert same.terms == obj.terms
    with pytest.raises(MergeMixError, match="target set 'nope' is not in the pool"):
        load_objective("target-set:nope", ["code"], targets=["docs"])


def test_search_for_a_target_set_is_judged_with_intervals(target_pool, tmp_path):
    from merge_mix.objective import load_objective
    from merge_mix.search.config import SearchConfig
    from merge_mix.search.pipeline import search_pool

    run = tmp_path / "run"
    search_pool(
        target_pool,
        load_objective("target-set:docs", ["code", "c", "prose"], targets=["docs"]),
        SearchConfig(n_trials=4, progress=False),
        run,
        None,
        {"device": "cpu"},
    )
    verdict = json.loads((run / "verdict.json").read_text())
    c = verdict["comparisons"]["uniform"]
    assert c["unit"] == "nats/token" and c["lo"] <= c["delta"] <= c["hi"] and c["lo"] < c["hi"]
    data = json.loads((target_pool / "data" / "data.json").read_text())
    assert verdict["documents"]["target/docs"] == data["targets"]["docs"]["test"]["documents"]
    best = json.loads((run / "best.json").read_text())
    assert best["objective"] == pytest.approx(best["metrics"]["target/docs/loss"])


def test_a_target_set_objective_picks_another_mixture_than_mean_loss(target_pool, tmp_path):
    """The target set (the http package: Python code) pulls the pick to the code component;
    mean loss over code, c and prose does not. Same candidates for both (the baselines and
    pure components, sampled mixtures after), the verdict covers the target set too."""
    from merge_mix.objective import load_objective
    from merge_mix.search.config import SearchConfig
    from merge_mix.search.pipeline import search_pool

    domains = ["code", "c", "prose"]
    picks = {}
    for preset in ("target-set:docs", "mean_loss"):
        run = tmp_path / preset.replace(":", "-")
        search_pool(
            target_pool,
            load_objective(preset, domains, targets=["docs"]),
            SearchConfig(n_trials=6, surrogate=False, progress=False),
            run,
            None,
            {"device": "cpu"},
        )
        picks[preset] = json.loads((run / "best.json").read_text())
        verdict = json.loads((run / "verdict.json").read_text())
        assert list(verdict["per_domain_loss"]) == [*domains, "target/docs"]
    target, mean = picks["target-set:docs"], picks["mean_loss"]
    assert target["merge_weights"] != mean["merge_weights"]
    assert max(target["merge_weights"], key=target["merge_weights"].get) == "code"
    assert target["metrics"]["target/docs/loss"] < mean["metrics"]["target/docs/loss"]


def test_add_target_command(target_pool, tmp_path):
    from merge_mix.pool import Pool

    pool_dir = tmp_path / "pool"
    shutil.copytree(target_pool, pool_dir)
    result = CliRunner().invoke(
        main,
        ["pool", "add-target", str(pool_dir), "mail", "--source", f"files:{STDLIB / 'asyncio' / '*.py'}",
         "--source", str(STDLIB / "smtplib.py")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "target set 'mail' added" in result.output
    pool = Pool.open(pool_dir)
    assert pool.targets == ["docs", "mail"]
    assert [t["name"] for t in pool.manifest["spec"]["targets"]] == ["docs", "mail"]
    again = CliRunner().invoke(
        main, ["pool", "add-target", str(pool_dir), "mail", "--source", str(STDLIB / "ftplib.py")]
    )
    assert again.exit_code != 0 and "already in the pool" in again.output


ARC_TASK = """task: mini_arc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices.text}}}}"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_a_vendored_arc_shaped_task_runs_offline(tiny_pool, tmp_path):
    """A standard benchmark vendored as a local task (ARC's fields, `dataset_path: json`)
    is scored by `merge-mix eval --tasks` with the network off."""
    rows = [
        {
            "id": f"q{i}",
            "question": f"Which module parses {topic}?",
            "choices": {"text": ["json", "email", "logging", "urllib"], "label": list("ABCD")},
            "answerKey": "ABCD"[i % 4],
        }
        for i, topic in enumerate(["JSON text", "mail", "log records", "web addresses", "data"])
    ]
    data = tmp_path / "mini_arc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mini_arc.yaml").write_text(ARC_TASK.format(data=data))
    result = CliRunner().invoke(
        main,
        ["eval", str(tiny_pool), "--weights", "uniform", "--tasks", "mini_arc",
         "--include-path", str(tasks), "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    out = json.loads(result.output[result.output.index("{") :])
    acc = out["mixtures"][0]["metrics"]["lmeval/mini_arc/acc"]
    assert acc * len(rows) == pytest.approx(round(acc * len(rows)))


def test_a_builtin_task_without_its_dataset_says_so(tiny_pool, tmp_path, monkeypatch):
    import datasets.config

    from merge_mix.lmeval import evaluate_tasks

    # An empty cache: the dataset cannot be there, and the network is off.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(MergeMixError, match="arc_easy: dataset not available: it is not in"):
        evaluate_tasks(None, None, ["arc_easy"], include_path=tmp_path)


def test_search_and_test_text_are_kept_apart():
    """A section published alone and inside a longer document (pydoc's `if` inside
    `compound`): whichever split each lands in, selection and judgement never share it."""
    from merge_mix.decontaminate import separate_splits

    section = " ".join(f"if{i}" for i in range(100))
    rest = " ".join(f"loop{i}" for i in range(40))
    whole = section + " " + rest  # the section is 71% of the whole
    other = " ".join(f"x{i}" for i in range(50))
    # Section in search, whole in test: the search piece is covered by test text; dropped.
    splits = {"t": {"search": [[section], [other]], "test": [[whole]]}}
    report = separate_splits(splits, 0.5, 8)
    assert splits["t"] == {"search": [[other]], "test": [[whole]]}
    assert report["t"] == {"search_pieces_in_test": 1, "test_pieces_in_search": 0}
    # Whole in search, section in test: the search piece is 71% test text; dropped (test
    # text wins, the verdicts read it).
    splits = {"t": {"search": [[whole]], "test": [[section], [other]]}}
    report = separate_splits(splits, 0.5, 8)
    assert splits["t"] == {"search": [], "test": [[section], [other]]}
    assert report["t"] == {"search_pieces_in_test": 1, "test_pieces_in_search": 0}
    # A test piece inside a long search piece (29% of it): the test piece goes.
    splits = {"t": {"search": [[whole]], "test": [[rest]]}}
    report = separate_splits(splits, 0.5, 8)
    assert splits["t"] == {"search": [[whole]], "test": []}
    assert report["t"] == {"search_pieces_in_test": 0, "test_pieces_in_search": 1}
    # Growth: an existing test piece stays as it was judged; the new search piece that
    # covers it goes, and a new test piece covered by existing search text goes too.
    seen = " ".join(f"seen{i}" for i in range(60))
    splits = {"new": {"search": [[whole], [other]], "test": [[seen + " tail"]]}}
    report = separate_splits(splits, 0.5, 8, earlier_search=[seen], earlier_test=[rest])
    assert splits["new"] == {"search": [[other]], "test": []}
    assert report["new"] == {"search_pieces_in_test": 1, "test_pieces_in_search": 1}


def test_built_pools_share_no_text_between_search_and_test(target_pool):
    from merge_mix.decontaminate import Shingler, coverage, union

    data_dir = target_pool / "data"
    data = json.loads((data_dir / "data.json").read_text())
    dirs = [data_dir / d for d in data["domains"]]
    dirs += [data_dir / "targets" / t for t in data["targets"]]
    shingle = Shingler(8)
    text = {
        split: [
            json.loads(line)["text"]
            for d in dirs
            for line in (d / f"{split}.jsonl").read_text().splitlines()
        ]
        for split in ("search", "test")
    }
    search = union(shingle(p) for p in text["search"])
    test = union(shingle(p) for p in text["test"])
    assert max(coverage(shingle(p), search) for p in text["test"]) < 0.5
    assert max(coverage(shingle(p), test) for p in text["search"]) < 0.5
