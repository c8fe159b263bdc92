"""The search engine against fake scorers whose optimum is known.

The fake's mean-loss optimum is near (0.2, 0.61, 0.19), about 0.06 better than the uniform
mixture and 0.14 better than the natural one (see merge_mix/search/fake.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from merge_mix.errors import MergeMixError
from merge_mix.objective import load_objective
from merge_mix.search import SearchConfig, run_search
from merge_mix.search.fake import FakeScorer, best_on_grid
from merge_mix.search.gradient import mirror_step
from merge_mix.search.simplex import (
    apply_caps,
    dirichlet_candidates,
    from_unit_cube,
    simplex_grid,
    to_unit_cube,
    token_caps,
)
from merge_mix.search.surrogate import cross_val_spearman, fit_kernel, fit_mixing_law

MEAN_LOSS = load_objective("mean_loss")
BASELINE_KINDS = {
    "baseline:uniform",
    "baseline:natural",
    "baseline:pure:web",
    "baseline:pure:code",
    "baseline:pure:math",
}


def config(tmp_path: Path, **overrides) -> SearchConfig:
    """A fast config: journal storage (cheap commits), no surrogate, no progress bar."""
    values = {
        "n_trials": 12,
        "storage": str(tmp_path / "study.jsonl"),
        "surrogate": False,
        "progress": False,
    }
    return SearchConfig(**{**values, **overrides})


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "trials.jsonl").read_text().splitlines()]


def run_script(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], stderr=subprocess.PIPE)


# --- the simplex -------------------------------------------------------------------------


def test_simplex_helpers():
    assert len(simplex_grid(3, 0.1)) == 66
    assert len(simplex_grid(2, 0.25)) == 5
    for w in (np.array([0.2, 0.3, 0.5]), np.array([1.0, 0.0, 0.0])):
        np.testing.assert_allclose(from_unit_cube(to_unit_cube(w)), w, atol=1e-12)

    caps = token_caps(np.array([1e9, 4e9, 9e9]), train_tokens=10**10, max_epochs=2)
    np.testing.assert_allclose(caps, [0.2, 0.8, 1.0])
    np.testing.assert_allclose(apply_caps(np.array([0.9, 0.1, 0.0]), caps), [0.2, 0.8, 0.0])
    rng = np.random.default_rng(0)
    w = dirichlet_candidates(rng, 5000, np.array([0.7, 0.2, 0.1]), (0.5, 5.0), caps, 0.01)
    np.testing.assert_allclose(w.sum(axis=1), 1.0)
    assert (w <= caps + 1e-12).all()
    assert not ((w > 0) & (w < 0.01 - 1e-12)).any()

    with pytest.raises(MergeMixError, match="max_epochs"):
        token_caps(np.array([1e9, 1e9]), train_tokens=10**10, max_epochs=1)
    with pytest.raises(MergeMixError, match="at most 3 domains"):
        simplex_grid(4, 0.1)


# --- samplers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sampler", "n_trials", "tolerance"),
    [
        ("grid", 0, 1e-3),  # step 0.2: the grid contains (0.2, 0.6, 0.2)
        ("random", 24, 0.02),
        ("dirichlet", 24, 0.05),  # centred on the natural mixture, far from the optimum
        ("tpe", 24, 0.01),
        ("cmaes", 24, 0.01),
    ],
)
def test_sampler_gets_near_the_known_optimum(tmp_path, sampler, n_trials, tolerance):
    scorer = FakeScorer()
    _, optimum = best_on_grid(scorer, MEAN_LOSS)
    cfg = config(
        tmp_path, sampler=sampler, n_trials=n_trials, grid_step=0.2, seed=1, storage=":memory:"
    )
    result = run_search(scorer, MEAN_LOSS, cfg, tmp_path)

    assert result.best["objective"] - optimum < tolerance
    assert result.best["baselines"]["uniform"]["beaten"]
    # Every baseline scored exactly once, and recorded once.
    trials = rows(tmp_path)
    assert sorted(r["kind"] for r in trials if r["kind"].startswith("baseline:")) == sorted(
        BASELINE_KINDS
    )
    uniform_calls = [c for c in scorer.calls if np.allclose(c[0], 1 / 3)]
    assert len(uniform_calls) == 1
    expected = 21 if sampler == "grid" else n_trials
    assert sum(r["kind"] == f"sampler:{sampler}" for r in trials) == expected


def test_outputs_have_documented_shape(tmp_path):
    result = run_search(FakeScorer(lmeval=True), MEAN_LOSS, config(tmp_path, n_trials=3), tmp_path)
    first = rows(tmp_path)[0]
    assert list(first) == [
        "number",
        "kind",
        "worker",
        "merge_weights",
        "effective_mixture",
        "objective",
        "feasible",
        "metrics",
        "budget_tokens",
        "full_budget",
        "cost_s",
    ]
    assert list(first["merge_weights"]) == ["web", "code", "math"]
    assert "lmeval/mmx_choice_code/acc" in first["metrics"]
    header = (tmp_path / "trials.csv").read_text().splitlines()[0].split(",")
    assert header[:6] == ["number", "kind", "worker", "merge_weights/web"] + [
        "merge_weights/code",
        "merge_weights/math",
    ]
    assert header[-3:] == ["budget_tokens", "full_budget", "cost_s"]
    best = json.loads((tmp_path / "best.json").read_text())
    assert best == result.best
    assert {"merge_weights", "effective_mixture", "objective", "baselines", "metrics"} <= set(best)
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["config"]["n_trials"] == 3 and "optuna" in run["versions"] and run["finished_at"]


def test_sqlite_default_storage_resumes_without_rescoring(tmp_path):
    scorer = FakeScorer()
    cfg = SearchConfig(n_trials=3, surrogate=False, progress=False)
    run_search(scorer, MEAN_LOSS, cfg, tmp_path)
    assert (tmp_path / "study.db").exists()
    calls = len(scorer.calls)
    result = run_search(scorer, MEAN_LOSS, cfg, tmp_path)
    assert len(scorer.calls) == calls and result.n_trials == 3 + 5


# --- resume and workers ------------------------------------------------------------------


class CrashAfter(FakeScorer):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def score(self, weights, budget_tokens=None):
        if len(self.calls) == self.n:
            raise RuntimeError("simulated crash")
        return super().score(weights, budget_tokens)


def check_complete(run_dir: Path, per_worker: dict[str, int], sampler: str = "dirichlet") -> None:
    """Each worker's quota met exactly, every baseline once, no mixture scored twice."""
    trials = rows(run_dir)
    for worker, n in per_worker.items():
        mine = [r for r in trials if r["kind"] == f"sampler:{sampler}" and r["worker"] == worker]
        assert len(mine) == n, worker
    assert sorted(r["kind"] for r in trials if r["kind"].startswith("baseline")) == sorted(
        BASELINE_KINDS
    )
    weights = np.array([list(r["merge_weights"].values()) for r in trials])
    distinct = np.unique(weights.round(9), axis=0)
    assert len(distinct) == len(trials)


def test_crash_mid_search_then_resume_loses_and_duplicates_nothing(tmp_path):
    crashing = CrashAfter(9)  # the 5 baselines, 4 sampled trials, then a crash
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_search(crashing, MEAN_LOSS, config(tmp_path, n_trials=10), tmp_path)
    from merge_mix.search.study import open_study

    study = open_study(tmp_path, crashing.domains, MEAN_LOSS, str(tmp_path / "study.jsonl"))
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    assert len(failed) == 1 and "simulated crash" in failed[0].user_attrs["error"]
    lost = failed[0].user_attrs["merge_weights"]

    scorer = FakeScorer()
    run_search(scorer, MEAN_LOSS, config(tmp_path, n_trials=10), tmp_path)
    assert len(scorer.calls) == 10 - 4  # the crashed trial again, then the rest of the quota
    assert np.allclose(scorer.calls[0][0], lost)
    check_complete(tmp_path, {"main": 10})


KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
from merge_mix.objective import load_objective
from merge_mix.search import SearchConfig, run_search
from merge_mix.search.fake import FakeScorer

class KilledAfter(FakeScorer):
    def score(self, weights, budget_tokens=None):
        if len(self.calls) == 7:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().score(weights, budget_tokens)

run_dir = Path(sys.argv[1])
config = SearchConfig(n_trials=6, storage=str(run_dir / "study.jsonl"), surrogate=False,
                      progress=False)
run_search(KilledAfter(), load_objective("mean_loss"), config, run_dir)
"""


def test_sigkill_mid_trial_then_resume(tmp_path):
    process = run_script(KILL_SCRIPT, str(tmp_path))
    process.wait(timeout=60)
    assert process.returncode == -9
    from merge_mix.search.study import open_study

    study = open_study(tmp_path, ["web", "code", "math"], MEAN_LOSS, str(tmp_path / "study.jsonl"))
    running = [t for t in study.trials if t.state.name == "RUNNING"]
    assert len(running) == 1  # killed while scoring its 8th mixture (the 3rd sampled one)
    lost = running[0].user_attrs["merge_weights"]

    scorer = FakeScorer()
    run_search(scorer, MEAN_LOSS, config(tmp_path, n_trials=6), tmp_path)
    assert len(scorer.calls) == 1 + 3  # the killed trial again, then the rest of the quota
    assert np.allclose(scorer.calls[0][0], lost)
    check_complete(tmp_path, {"main": 6})


WORKER_SCRIPT = """
import sys
from pathlib import Path
from merge_mix.objective import load_objective
from merge_mix.search import SearchConfig, run_search
from merge_mix.search.fake import FakeScorer

run_dir, worker = Path(sys.argv[1]), sys.argv[2]
config = SearchConfig(sampler="tpe", n_trials=8, worker=worker, storage=str(run_dir / "shared.jsonl"),
                      surrogate=False, progress=False)
run_search(FakeScorer(), load_objective("mean_loss"), config, run_dir / worker)
"""


def test_two_workers_share_one_journal_study(tmp_path):
    workers = [run_script(WORKER_SCRIPT, str(tmp_path), name) for name in ("a", "b")]
    for process in workers:
        _, err = process.communicate(timeout=120)
        assert process.returncode == 0, err.decode()[-2000:]
    # Either worker's export holds the whole study; refresh it once both are done.
    from merge_mix.search.study import export_trials, open_study

    study = open_study(tmp_path, ["web", "code", "math"], MEAN_LOSS, str(tmp_path / "shared.jsonl"))
    export_trials(study, tmp_path)
    check_complete(tmp_path, {"a": 8, "b": 8}, sampler="tpe")
    errors = [t for t in study.trials if "error" in t.user_attrs]
    assert not errors


# --- caps in data-mixture space ----------------------------------------------------------

# The fake's floor is general_share / K = 0.1 per domain and its scale 1 - 0.3 = 0.7, so a
# cap of 0.3 on code's share of the data is the merge-weight cap (0.3 - 0.1) / 0.7. The
# uniform mixture (code's share 1/3) breaks it, and beats every mixture within it
# (mean loss 2.297 against 2.320 at best, on a 0.005 grid).
CODE_CAP = 0.3


@pytest.mark.parametrize(
    "overrides",
    [
        {"sampler": "grid", "grid_step": 0.1},
        {"sampler": "dirichlet"},
        {"sampler": "random"},
        {"sampler": "tpe"},
        {"sampler": "cmaes"},
        {"sampler": "dirichlet", "halving": True, "n_trials": 9, "budget_tokens": 9_000},
        {"sampler": "random", "surrogate": True, "surrogate_candidates": 5_000, "top_k": 64},
    ],
    ids=["grid", "dirichlet", "random", "tpe", "cmaes", "halving", "surrogate"],
)
def test_every_proposer_keeps_a_capped_domain_under_its_cap(tmp_path, overrides):
    scorer = FakeScorer()
    optimum, _ = best_on_grid(scorer, MEAN_LOSS)
    assert scorer.effective_mixture(optimum)[1] > CODE_CAP + 0.2  # the cap binds
    cfg = config(tmp_path, storage=":memory:", caps={"code": CODE_CAP}, **overrides)
    result = run_search(scorer, MEAN_LOSS, cfg, tmp_path)

    proposed = [r for r in rows(tmp_path) if not r["kind"].startswith("baseline:")]
    assert len(proposed) >= 9
    assert max(r["effective_mixture"]["code"] for r in proposed) <= CODE_CAP + 1e-9
    # The uniform baseline scores better than anything under the cap; it is still not
    # recommended.
    uniform = next(r for r in rows(tmp_path) if r["kind"] == "baseline:uniform")
    assert uniform["objective"] < result.best["objective"] - 0.01
    assert result.best["effective_mixture"]["code"] <= CODE_CAP + 1e-9
    assert not result.best["kind"].startswith("baseline:")
    recorded = json.loads((tmp_path / "run.json").read_text())
    assert recorded["config"]["caps"] == {"code": CODE_CAP}
    caps = recorded["caps"]
    assert caps["mixture"]["code"] == CODE_CAP and caps["floor"]["code"] == pytest.approx(0.1)
    assert caps["merge_weights"]["code"] == pytest.approx((CODE_CAP - 0.1) / 0.7)
    assert caps["mixture"]["web"] == 1.0  # no cap: the whole mixture


def test_repetition_caps_bound_the_effective_mixture():
    scorer = FakeScorer(available_tokens=(6e9, 1e9, 1e9))
    caps = SearchConfig(train_tokens=10**10, max_epochs=4).caps_for(scorer)
    # code may repeat its 1e9 tokens 4 times in 1e10: 40% of the data, the merge floor incl.
    np.testing.assert_allclose(caps.mixture, [1.0, 0.4, 0.4])
    np.testing.assert_allclose(caps.weights, [1.0, 3 / 7, 3 / 7])
    np.testing.assert_allclose(scorer.effective_mixture(caps.project([0.1, 0.8, 0.1]))[1], 0.4)
    # An explicit cap only tightens.
    both = SearchConfig(train_tokens=10**10, caps={"code": 0.5, "math": 0.2}).caps_for(scorer)
    np.testing.assert_allclose(both.mixture, [1.0, 0.4, 0.2])


@pytest.mark.parametrize(
    ("caps", "message"),
    [
        ({"code": 0.05}, "caps: code=0.05 is below 0.1, the share of code every merge keeps"),
        ({"law": 0.5}, "caps: 'law' is not a domain"),
        ({"web": 0.3, "code": 0.3, "math": 0.3}, "caps: they sum to 0.9"),
    ],
)
def test_impossible_caps_fail_with_one_line(tmp_path, caps, message):
    with pytest.raises(MergeMixError) as err:
        run_search(FakeScorer(), MEAN_LOSS, config(tmp_path, caps=caps), tmp_path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_mirror_step_finds_a_quadratic_minimum_inside_and_on_a_cap():
    # f(w) = |w - target|^2 on the simplex: the minimiser is `target` itself; with w_1 capped
    # at 0.4 it is (0.25, 0.4, 0.35) (the free coordinates share the leftover 0.6 so that
    # their gradients are equal).
    target = np.array([0.1, 0.7, 0.2])
    for caps, expected in ((None, target), (np.array([1.0, 0.4, 1.0]), [0.25, 0.4, 0.35])):
        w = np.full(3, 1 / 3)
        for _ in range(200):
            w = mirror_step(w, 2 * (w - target), lr=1.0, caps=caps)
            assert w.sum() == pytest.approx(1.0) and (caps is None or (w <= caps + 1e-12).all())
        np.testing.assert_allclose(w, expected, atol=1e-6)


# --- halving and the surrogate -------------------------------------------------------------


def test_halving_picks_what_full_budget_scoring_picks_for_less(tmp_path):
    full = 90_000
    scorer = FakeScorer(full_budget=full, budget_bias=0.05)
    cfg = config(
        tmp_path,
        sampler="random",
        n_trials=27,
        halving=True,
        eta=3,
        rungs=3,
        budget_tokens=full,
        halving_verify=True,
        storage=":memory:",
    )
    result = run_search(scorer, MEAN_LOSS, cfg, tmp_path)
    summary = result.halving
    assert summary["sizes"] == [27, 9, 3] and summary["budgets"] == [10_000, 30_000, 90_000]
    assert summary["speedup"] == pytest.approx(3.0)
    assert summary["verified"]["same_pick"] is True
    assert result.best["halving"]["main"]["pick"] == summary["pick"]
    # One row per candidate: 24 pruned below the full budget, 3 complete at it.
    cheap = [r for r in rows(tmp_path) if not r["full_budget"]]
    assert len(cheap) == 27 - 3 and all(r["budget_tokens"] < full for r in cheap)
    assert summary["pruned"] == [18, 6] and summary["failed"] == 0
    assert result.best["number"] not in {r["number"] for r in cheap}


def test_mixing_law_recovers_planted_parameters():
    rng = np.random.default_rng(0)
    r = rng.dirichlet(np.ones(3), size=60)
    c, k, t = 1.5, 0.8, np.array([-2.0, 0.5, 1.5])  # already in the gauge mean(t) = 0
    y = c + k * np.exp(r @ t) + rng.normal(0, 0.002, len(r))
    law = fit_mixing_law(r, y, seed=0)
    assert law.c == pytest.approx(c, abs=0.05)
    assert law.k == pytest.approx(k, rel=0.05)
    np.testing.assert_allclose(law.t, t, atol=0.05)
    assert cross_val_spearman(fit_mixing_law, r, y, folds=5) > 0.99
    assert cross_val_spearman(fit_kernel, r, y, folds=5) > 0.9


def test_surrogate_pick_beats_the_median_random_trial(tmp_path):
    scorer = FakeScorer()
    _, optimum = best_on_grid(scorer, MEAN_LOSS)
    cfg = config(
        tmp_path, sampler="random", n_trials=16, surrogate=True, surrogate_candidates=20_000
    )
    result = run_search(scorer, MEAN_LOSS, cfg, tmp_path)
    trials = rows(tmp_path)
    random_objectives = [r["objective"] for r in trials if r["kind"] == "sampler:random"]
    pick = [r for r in trials if r["kind"] == "surrogate:topk"]
    assert len(pick) == 1
    assert pick[0]["objective"] < np.median(random_objectives)
    assert pick[0]["objective"] - optimum < 0.02
    fits = result.surrogate["fits"]
    assert set(fits) == {f"heldout/{d}/loss" for d in scorer.domains}
    assert all(f["spearman"][f["chosen"]] > 0.9 for f in fits.values())
    # Resuming a finished run scores nothing new, not even the surrogate pick.
    calls = len(scorer.calls)
    run_search(scorer, MEAN_LOSS, cfg, tmp_path)
    assert len(scorer.calls) == calls


def test_target_objective_reports_feasibility(tmp_path):
    objective = load_objective("target:math")
    result = run_search(FakeScorer(), objective, config(tmp_path, sampler="tpe"), tmp_path)
    trials = rows(tmp_path)
    assert any(not r["feasible"] for r in trials)  # the pure components break the tolerance
    assert result.best["feasible"] is True
    assert next(r for r in trials if r["kind"] == "baseline:uniform")["feasible"] is True


def test_record_trial_adds_an_externally_scored_mixture(tmp_path):
    from merge_mix.search.study import export_trials, open_study, record_trial

    scorer = FakeScorer()
    run_search(scorer, MEAN_LOSS, config(tmp_path, n_trials=2), tmp_path)
    study = open_study(tmp_path, scorer.domains, MEAN_LOSS, str(tmp_path / "study.jsonl"))
    weights = np.array([0.2, 0.6, 0.2])
    value = record_trial(study, MEAN_LOSS, weights, scorer.score(weights), kind="gradient:adam")
    export_trials(study, tmp_path)
    recorded = [r for r in rows(tmp_path) if r["kind"] == "gradient:adam"]
    assert len(recorded) == 1 and recorded[0]["objective"] == pytest.approx(value)
    assert json.loads((tmp_path / "best.json").read_text())["kind"] == "gradient:adam"


# --- user errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sampler": "bayes"}, "sampler"),
        ({"n_trials": -1}, "n_trials"),
        ({"grid_step": 0.3}, "grid_step"),
        ({"strength": (5.0, 0.5)}, "strength"),
        ({"storage": "study.db"}, "storage"),
        ({"halving": True, "sampler": "tpe", "budget_tokens": 9}, "halving"),
        ({"halving": True, "budget_tokens": 8, "eta": 3, "rungs": 3}, "rungs"),
        ({"halving_verify": True}, "halving_verify"),
        ({"worker": "a b"}, "worker"),
        ({"top_k": 0}, "top_k"),
        ({"caps": {"code": 1.5}}, "caps"),
        ({"caps": {}}, "caps"),
    ],
)
def test_bad_configs_fail_with_one_line(overrides, message):
    with pytest.raises(MergeMixError) as err:
        SearchConfig(**overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_halving_without_a_budget_is_refused_by_run_search(tmp_path):
    """`search_pool` turns a missing budget into the search split's size; a direct
    `run_search` call must name the budget."""
    config = SearchConfig(halving=True, n_trials=9, storage=":memory:", progress=False)
    with pytest.raises(MergeMixError, match="budget_tokens"):
        run_search(FakeScorer(), MEAN_LOSS, config, tmp_path)


def test_unknown_config_key_is_named():
    with pytest.raises(MergeMixError, match="unknown key 'trials'"):
        SearchConfig.from_dict({"trials": 3})


def test_grid_needs_three_domains_or_fewer(tmp_path):
    four = FakeScorer(
        domains=("a", "b", "c", "d"),
        c=(1, 1, 1, 1),
        k=(1, 1, 1, 1),
        t=(1, 1, 1, 1),
        natural=(1, 1, 1, 1),
        available_tokens=(1, 1, 1, 1),
    )
    with pytest.raises(MergeMixError, match="at most 3 domains"):
        run_search(four, MEAN_LOSS, config(tmp_path, sampler="grid"), tmp_path)


def test_study_refuses_other_domains_or_objective(tmp_path):
    run_search(FakeScorer(), MEAN_LOSS, config(tmp_path, n_trials=1), tmp_path)
    with pytest.raises(MergeMixError, match="objective 'mean_loss'") as err:
        run_search(FakeScorer(), load_objective("worst_loss"), config(tmp_path), tmp_path)
    assert "\n" not in str(err.value)
    other = FakeScorer(domains=("web", "code", "law"))
    with pytest.raises(MergeMixError, match="for domains"):
        run_search(other, MEAN_LOSS, config(tmp_path), tmp_path)


def test_missing_metric_names_the_term(tmp_path):
    objective = load_objective({"terms": [{"source": "lmeval", "metric": "acc"}]})
    with pytest.raises(MergeMixError, match="lmeval/\\*/acc"):
        run_search(FakeScorer(), objective, config(tmp_path), tmp_path)


def test_importing_the_package_stays_light():
    code = "import sys, merge_mix.search, merge_mix.objective; print('optuna' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- the study in Optuna's own tools ------------------------------------------------------


def open_journal(tmp_path: Path, objective=MEAN_LOSS):
    from merge_mix.search.study import open_study

    return open_study(tmp_path, ["web", "code", "math"], objective, str(tmp_path / "study.jsonl"))


def check_named_params(study, domains) -> list:
    """Every completed or pruned trial carries its merge weights as `w:<domain>` params with
    a registered [0, 1] distribution, summing to 1 and equal to its `merge_weights`; returns
    those trials."""
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState

    done = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert done
    for t in done:
        weights = [t.params[f"w:{d}"] for d in domains]
        assert weights == pytest.approx(t.user_attrs["merge_weights"], abs=1e-12), t.number
        assert sum(weights) == pytest.approx(1.0)
        for d in domains:
            assert t.distributions[f"w:{d}"] == FloatDistribution(0.0, 1.0)
    return done


@pytest.mark.parametrize(
    "overrides",
    [
        {"sampler": "grid", "grid_step": 0.25},
        {"sampler": "dirichlet", "surrogate": True, "surrogate_candidates": 2_000},
        {"sampler": "tpe"},
        {"sampler": "cmaes"},
        {"sampler": "random", "halving": True, "n_trials": 9, "budget_tokens": 9_000},
    ],
    ids=["grid", "dirichlet+surrogate", "tpe", "cmaes", "halving"],
)
def test_every_trial_carries_its_merge_weights_as_named_params(tmp_path, overrides):
    from merge_mix.search.study import record_trial

    scorer = FakeScorer()
    run_search(scorer, MEAN_LOSS, config(tmp_path, **overrides), tmp_path)
    study = open_journal(tmp_path)
    weights = np.array([0.2, 0.6, 0.2])
    record_trial(study, MEAN_LOSS, weights, scorer.score(weights), kind="gradient:mirror")

    assert study.metric_names == ["mean_loss (nats/token, search split)"]
    done = check_named_params(study, scorer.domains)
    kinds = {t.user_attrs["kind"].split(":")[0] for t in done}
    assert {"baseline", "gradient"} <= kinds
    # tpe/cmaes also keep the unit-cube coordinates they learn on; the others do not.
    unit_cube = overrides["sampler"] in ("tpe", "cmaes")
    assert all(("u:code" in t.params) == unit_cube for t in done)


def test_halving_candidates_are_one_trial_with_rungs_as_intermediate_values(tmp_path):
    from optuna.trial import TrialState

    scorer = FakeScorer(full_budget=90_000, budget_bias=0.05)
    cfg = config(
        tmp_path, sampler="random", n_trials=27, halving=True, eta=3, rungs=3, budget_tokens=90_000
    )
    result = run_search(scorer, MEAN_LOSS, cfg, tmp_path)
    study = open_journal(tmp_path)
    candidates = [t for t in study.trials if "halving" in t.user_attrs]
    assert len(candidates) == 27
    assert len({t.user_attrs["halving"]["candidate"] for t in candidates}) == 27
    pruned = [t for t in candidates if t.state == TrialState.PRUNED]
    complete = [t for t in candidates if t.state == TrialState.COMPLETE]
    assert sorted(len(t.intermediate_values) for t in pruned) == [1] * 18 + [2] * 6
    assert len(complete) == 3 and all(list(t.intermediate_values) == [0, 1, 2] for t in complete)
    for t in pruned + complete:
        # A pruned trial's value is its last rung's (Optuna's rule), a complete one's the full
        # budget's; the record on the trial is that last rung's.
        assert t.value == t.intermediate_values[max(t.intermediate_values)]
        assert t.user_attrs["kind"] == f"halving:rung{max(t.intermediate_values)}"
    assert all(t.user_attrs["budget_tokens"] == 90_000 for t in complete)
    # Cheaper rungs carry the budget bias: the same mixture scores worse there.
    for t in complete:
        assert t.intermediate_values[0] > t.intermediate_values[1] > t.intermediate_values[2]
    assert result.halving["pick"]["number"] in {t.number for t in complete}
    # trials.jsonl: one row per candidate; the pruned ones are not full budget.
    halving_rows = {r["number"]: r for r in rows(tmp_path) if r["kind"].startswith("halving:")}
    assert set(halving_rows) == {t.number for t in candidates}
    assert all(not halving_rows[t.number]["full_budget"] for t in pruned)
    assert all(halving_rows[t.number]["objective"] == t.value for t in candidates)


def test_halving_resumes_from_reported_rungs_without_rescoring(tmp_path):
    from optuna.trial import TrialState

    def halving_config(run_dir):
        return config(
            run_dir, sampler="random", n_trials=27, halving=True, eta=3, budget_tokens=90_000
        )

    # 5 baselines, the 27 candidates at rung 0, 4 of the 9 at rung 1, then a crash.
    crashing = CrashAfter(5 + 27 + 4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_search(crashing, MEAN_LOSS, halving_config(tmp_path / "a"), tmp_path / "a")
    resumed = FakeScorer()
    result = run_search(resumed, MEAN_LOSS, halving_config(tmp_path / "a"), tmp_path / "a")
    # Only what was missing: the other 5 at rung 1 (the crashed one among them), 3 at rung 2.
    assert len(resumed.calls) == 5 + 3
    assert not set(resumed.calls) & set(crashing.calls)

    whole = run_search(FakeScorer(), MEAN_LOSS, halving_config(tmp_path / "b"), tmp_path / "b")
    assert result.halving["pick"]["merge_weights"] == whole.halving["pick"]["merge_weights"]
    assert result.halving["pick"]["objective"] == whole.halving["pick"]["objective"]
    assert result.halving["pruned"] == whole.halving["pruned"] == [18, 6]

    study = open_journal(tmp_path / "a")
    finished = [
        t
        for t in study.trials
        if "halving" in t.user_attrs and t.state in (TrialState.COMPLETE, TrialState.PRUNED)
    ]
    assert sorted(t.user_attrs["halving"]["candidate"] for t in finished) == list(range(27))
    check_named_params(study, resumed.domains)
    # The 3 survivors continued in new trials that carry the rungs scored before the crash.
    complete = [t for t in finished if t.state == TrialState.COMPLETE]
    assert len(complete) == 3 and all(list(t.intermediate_values) == [0, 1, 2] for t in complete)


def test_parameter_importances_read_merge_weights(tmp_path):
    import optuna

    # The code loss depends on code's weight alone (fake.py), so its importance leads.
    code_loss = load_objective(
        {"name": "code_loss", "terms": [{"source": "heldout", "metric": "loss", "name": "code"}]}
    )
    cfg = config(tmp_path, sampler="random", n_trials=30, seed=0)
    run_search(FakeScorer(), code_loss, cfg, tmp_path)
    study = open_journal(tmp_path, code_loss)
    assert study.metric_names == ["code_loss (nats/token, search split)"]
    importances = optuna.importance.get_param_importances(study)
    # Measured (Optuna 5.0's default, PED-ANOVA): code 0.56, web 0.31, math 0.13.
    assert set(importances) == {"w:web", "w:code", "w:math"}
    assert max(importances, key=importances.get) == "w:code"
    assert importances["w:code"] - max(importances["w:web"], importances["w:math"]) > 0.1


def test_tiny_pool_study_reads_by_domain_name(tiny_pool, tmp_path):

    from merge_mix.search.gradient import GradientConfig
    from merge_mix.search.pipeline import search_pool
    from merge_mix.search.study import open_study

    objective = load_objective("mean_loss")
    cfg = SearchConfig(sampler="random", halving=True, n_trials=4, eta=2, rungs=2, progress=False)
    summary = search_pool(
        tiny_pool,
        objective,
        cfg,
        tmp_path,
        gradient=GradientConfig(steps=1, train_tokens=600),
        scorer_options={"heldout_tokens": 600},
        judge_test=False,
    )
    domains = summary["domains"]
    study = open_study(tmp_path, domains, objective)
    assert study.metric_names == ["mean_loss (nats/token, search split)"]
    done = check_named_params(study, domains)
    assert {"baseline", "halving", "surrogate", "gradient"} == {
        t.user_attrs["kind"].split(":")[0] for t in done
    }
    uniform = next(t for t in done if t.user_attrs["kind"] == "baseline:uniform")
    assert {d: uniform.params[f"w:{d}"] for d in domains} == pytest.approx(
        {d: 1 / 3 for d in domains}
    )
    halving = [t for t in done if "halving" in t.user_attrs]
    assert sorted((t.state.name, len(t.intermediate_values)) for t in halving) == [
        ("COMPLETE", 2),
        ("COMPLETE", 2),
        ("PRUNED", 1),
        ("PRUNED", 1),
    ]
