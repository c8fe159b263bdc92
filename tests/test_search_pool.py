"""Search on a real pool: the gradient search (its slice, its derivatives, its caps) and the
search command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from merge_mix.cli import main
from merge_mix.evaluate import HeldoutSet, heldout_metrics
from merge_mix.objective import Constraint, Objective, Term, load_objective
from merge_mix.proxy import ProxyScorer
from merge_mix.search.config import SearchConfig
from merge_mix.search.gradient import (
    GradientConfig,
    differentiable_metrics,
    gradient_search,
    training_slice,
)
from merge_mix.search.pipeline import sampling_at_equal_time


@pytest.fixture(scope="module")
def scorer(tiny_pool):
    return ProxyScorer(tiny_pool, heldout_tokens=3000)


def on_slice(scorer, weights, heldout) -> dict[str, float]:
    """Held-out metrics of the merge of `weights` on `heldout` (not differentiated)."""
    model = scorer.merger.merge(np.asarray(weights, dtype=np.float64))
    return heldout_metrics(model, heldout, scorer.device, scorer.precision, scorer.batch_size)


UNIFORM = np.full(3, 1 / 3)


def test_gradient_lowers_its_objective_on_its_slice_and_beats_uniform_there(scorer):
    objective = load_objective("mean_loss", scorer.domains)
    result = gradient_search(scorer, objective, GradientConfig(steps=5, lr=3.0, train_tokens=2000))
    assert result.evaluations == 6 and [h["step"] for h in result.history] == list(range(6))
    # Measured: the first iterate (uniform) 4.505, the best 0.031 lower.
    first = result.history[0]["objective_train"]
    best = min(h["objective_train"] for h in result.history)
    assert first - best > 0.01
    uniform = objective.evaluate(on_slice(scorer, UNIFORM, result.training_slice)).value
    picked = objective.evaluate(on_slice(scorer, result.weights, result.training_slice)).value
    assert picked == pytest.approx(best, abs=1e-5)  # the same slice, the same number
    assert uniform - picked > 0.01
    assert result.weights.sum() == pytest.approx(1.0) and (result.weights > 0).all()


def test_autograd_through_the_merge_matches_finite_differences(scorer):
    # d loss_d / d w along the simplex's edges e_i - e_j, at an interior point. Measured with
    # h = 3e-3 (float32 model): largest disagreement 1.1e-5, smallest derivative 0.068.
    heldout = HeldoutSet(training_slice(scorer, 600), 600)
    w0 = np.array([0.5, 0.3, 0.2])
    w = torch.tensor(w0, dtype=torch.float64, requires_grad=True)
    metrics = differentiable_metrics(scorer, heldout.windows, w)
    h = 3e-3
    for d in scorer.domains:
        (grad,) = torch.autograd.grad(metrics[f"heldout/{d}/loss"], w, retain_graph=True)
        for i, j in ((0, 1), (1, 2), (0, 2)):
            edge = np.eye(3)[i] - np.eye(3)[j]
            plus = on_slice(scorer, w0 + h * edge, heldout)[f"heldout/{d}/loss"]
            minus = on_slice(scorer, w0 - h * edge, heldout)[f"heldout/{d}/loss"]
            analytic = float(grad.numpy() @ edge)
            assert abs(analytic) > 0.03, (d, i, j)
            assert analytic == pytest.approx((plus - minus) / (2 * h), abs=1e-4), (d, i, j)
    # And the differentiable metrics are the evaluator's (measured: 5.5e-7 apart).
    plain = on_slice(scorer, w0, heldout)
    for key, value in metrics.items():
        assert float(value.detach()) == pytest.approx(plain[key], rel=1e-5), key


def test_constraint_baseline_is_measured_on_the_training_slice(scorer):
    # A probe objective pins every other domain's loss to the uniform baseline's in both
    # directions (tolerance 0), so at the uniform start its penalty is 0 only when metrics and
    # baseline come from the same text (measured: 1.1e-5, float32 noise times the penalty
    # 100). A baseline from the scorer's own search set would cost 3.8.
    pinned = Objective(
        terms=(Term("heldout", "loss", "code"),),
        constraints=tuple(
            Constraint("heldout", "loss", "*", ("code",), 0.0, direction)
            for direction in ("minimize", "maximize")
        ),
    )
    result = gradient_search(scorer, pinned, GradientConfig(steps=1, train_tokens=2000))
    start = on_slice(scorer, UNIFORM, result.training_slice)
    assert result.history[0]["objective_train"] == pytest.approx(
        start["heldout/code/loss"], abs=1e-3
    )
    assert pinned.evaluate(start, scorer.score(UNIFORM)).value - start["heldout/code/loss"] > 1

    # The preset: its pick, judged on the slice it optimised against uniform there, is
    # feasible and better (measured: 4.631 against 4.674).
    target = load_objective("target:code", scorer.domains)
    result = gradient_search(scorer, target, GradientConfig(steps=3, lr=2.0, train_tokens=2000))
    picked = target.evaluate(on_slice(scorer, result.weights, result.training_slice), start)
    assert picked.feasible
    assert target.evaluate(start, start).value - picked.value > 0.02


def test_gradient_search_stays_inside_the_caps(scorer):
    objective = load_objective("mean_loss", scorer.domains)
    caps = SearchConfig(caps={"code": 0.2}).caps_for(scorer)
    # The pool's floor is general_share / 3 = 1/6 per domain, so 0.2 of the data is a merge
    # weight of (0.2 - 1/6) / 0.5 = 1/15: uniform (1/3) breaks it.
    assert caps.weights[0] == pytest.approx(1 / 15)
    result = gradient_search(
        scorer, objective, GradientConfig(steps=3, lr=2.0, train_tokens=2000), caps=caps.weights
    )
    for h in result.history:
        assert scorer.effective_mixture(h["weights"])[0] <= 0.2 + 1e-9
    assert scorer.effective_mixture(result.weights)[0] <= 0.2 + 1e-9
    assert result.weights.sum() == pytest.approx(1.0)


def test_gradient_search_needs_held_out_terms(scorer):
    from merge_mix.errors import MergeMixError

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
    assert (
        "pick: trial" in result.output
        and "verdict on the test split" in result.output
        and "report:" in result.output
    )
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
    assert grad["evaluations"] == 4 and grad["best_sampled"] is not None
    # Run again: the sampler quota is met and the gradient search is done, so nothing is
    # re-scored or duplicated.
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    rows2 = [json.loads(line) for line in (run / "trials.jsonl").read_text().splitlines()]
    assert sum(r["kind"].startswith("sampler:") for r in rows2) == 4
    assert sum(r["kind"].startswith("gradient:") for r in rows2) == 1
    assert [r["number"] for r in rows2[: len(rows)]] == [r["number"] for r in rows]


def test_search_command_keeps_a_capped_domain_under_its_cap(tiny_pool, tmp_path):
    run = tmp_path / "run"
    cap = 0.22  # code's share of the data; the floor is 1/6, uniform gives it 1/3
    args = ["search", str(tiny_pool), "--run-dir", str(run), "--cap", f"code={cap}"]
    args += ["--n-trials", "4", "--heldout-tokens", "600", "--gradient-steps", "1", "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (run / "trials.jsonl").read_text().splitlines()]
    proposed = [r for r in rows if not r["kind"].startswith("baseline:")]
    assert {"sampler:dirichlet", "surrogate:topk", "gradient:mirror"} <= {
        r["kind"] for r in proposed
    }
    assert max(r["effective_mixture"]["code"] for r in proposed) <= cap + 1e-9
    assert max(r["effective_mixture"]["code"] for r in rows) > cap  # baselines break it
    best = json.loads((run / "best.json").read_text())
    assert best["effective_mixture"]["code"] <= cap + 1e-9
    caps = json.loads((run / "run.json").read_text())["caps"]
    assert caps["mixture"]["code"] == cap
    assert caps["merge_weights"]["code"] == pytest.approx((cap - 1 / 6) / 0.5)


def test_search_command_cap_below_the_floor_is_one_line(tiny_pool, tmp_path):
    args = ["search", str(tiny_pool), "--run-dir", str(tmp_path / "r"), "--cap", "code=0.1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert result.output.startswith("error: caps: code=0.1 is below 0.1667, the share of code")
    assert result.output.count("\n") == 1


def test_search_command_bad_objective_is_one_line(tiny_pool, tmp_path):
    result = CliRunner().invoke(
        main,
        ["search", str(tiny_pool), "--run-dir", str(tmp_path / "r"), "--objective", "target:web"],
    )
    assert result.exit_code == 2
    assert result.output.startswith("error:") and result.output.count("\n") == 1
