"""Search on a real pool: gradient search against random sampling, the search command."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from merge_mix.cli import main
from merge_mix.objective import load_objective
from merge_mix.proxy import ProxyScorer
from merge_mix.search.gradient import GradientConfig, gradient_search
from merge_mix.search.pipeline import sampling_at_equal_time


@pytest.fixture(scope="module")
def scorer(tiny_pool):
    return ProxyScorer(tiny_pool, heldout_tokens=3000)


def test_gradient_search_matches_random_sampling_with_a_fifth_of_the_evaluations(scorer):
    objective = load_objective("mean_loss", scorer.domains)
    rng = np.random.default_rng(0)
    n_random = 50
    random_best = min(
        objective.evaluate(scorer.score(rng.dirichlet(np.ones(3)))).value for _ in range(n_random)
    )
    result = gradient_search(
        scorer, objective, GradientConfig(steps=9, lr=1.0, train_tokens=100_000)
    )
    evaluations = result.evaluations + 1  # the final scoring of the result
    assert evaluations <= n_random // 5
    assert objective.evaluate(scorer.score(result.weights)).value <= random_best
    assert result.weights.sum() == pytest.approx(1.0) and (result.weights > 0).all()
    first, last = result.history[0]["objective_train"], result.history[-1]["objective_train"]
    assert last < first


def test_gradient_search_needs_held_out_terms(scorer):
    from merge_mix.errors import MergeMixError
    from merge_mix.objective import Objective, Term

    acc_only = Objective(terms=(Term("lmeval", "acc", direction="maximize"),))
    with pytest.raises(MergeMixError, match="no held-out terms"):
        gradient_search(scorer, acc_only, GradientConfig(steps=1))


def test_sampling_at_equal_time_counts_cost_in_order():
    rows = [
        {"number": 0, "kind": "baseline:uniform", "objective": 3.0, "cost_s": 1.0},
        {"number": 1, "kind": "sampler:dirichlet", "objective": 2.0, "cost_s": 1.0},
        {"number": 2, "kind": "sampler:dirichlet", "objective": 1.0, "cost_s": 5.0},
        {"number": 3, "kind": "gradient:mirror", "objective": 0.5, "cost_s": 0.1},
    ]
    assert sampling_at_equal_time(rows, 2.5)["objective"] == 2.0
    assert sampling_at_equal_time(rows, 10)["objective"] == 1.0
    assert sampling_at_equal_time(rows, 0.5) is None


def test_search_command_writes_report_and_resumes(tiny_pool, tmp_path):
    run = tmp_path / "run"
    args = [
        "search",
        str(tiny_pool),
        "--run-dir",
        str(run),
        "--n-trials",
        "4",
        "--heldout-tokens",
        "600",
        "--gradient-steps",
        "2",
        "--quiet",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "best: trial" in result.output and "report:" in result.output
    for name in (
        "trials.jsonl",
        "trials.csv",
        "best.json",
        "report.md",
        "report.html",
        "gradient.json",
        "run.json",
    ):
        assert (run / name).is_file(), name
    rows = [json.loads(line) for line in (run / "trials.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in rows]
    assert kinds.count("baseline:uniform") == 1 and "gradient:mirror" in kinds
    assert sum(k.startswith("sampler:") for k in kinds) == 4
    grad = json.loads((run / "gradient.json").read_text())
    assert {"uniform", "gradient"} <= set(grad["on_training_slice"])
    assert grad["evaluations"] == 3 and grad["best_sampled"] is not None
    # Run again: the sampler quota is met and the gradient search is done, so nothing is
    # re-scored or duplicated.
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    rows2 = [json.loads(line) for line in (run / "trials.jsonl").read_text().splitlines()]
    assert sum(r["kind"].startswith("sampler:") for r in rows2) == 4
    assert sum(r["kind"].startswith("gradient:") for r in rows2) == 1
    assert [r["number"] for r in rows2[: len(rows)]] == [r["number"] for r in rows]


def test_search_command_bad_objective_is_one_line(tiny_pool, tmp_path):
    result = CliRunner().invoke(
        main,
        ["search", str(tiny_pool), "--run-dir", str(tmp_path / "r"), "--objective", "target:web"],
    )
    assert result.exit_code == 2
    assert result.output.startswith("error:") and result.output.count("\n") == 1
