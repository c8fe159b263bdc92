"""One search worker: the `Worker` that asks, scores and records trials, and what it shares.

`Worker` ties a scorer and an objective to an Optuna study: it pops queued trials, proposes
fresh ones from the configured sampler, scores them and records everything on the trial. It
is used by `run_search` (`merge_mix.search.run`), successive halving (`halving`) and the
surrogate pick (`surrogate`), which also share `seed_sequence` (the deterministic seeding of
each worker's draws) and `baseline_mixtures` (the baselines every study scores first).
"""

from __future__ import annotations

import math
import time
import zlib
from typing import Any

import numpy as np
import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from merge_mix.errors import MergeMixError
from merge_mix.objective import Objective
from merge_mix.search import Scorer
from merge_mix.search.config import OPTUNA_SAMPLERS, SearchConfig
from merge_mix.search.simplex import (
    U_LOW,
    dirichlet_candidates,
    dirichlet_prior,
    from_unit_cube,
    is_near,
    normalise,
    simplex_grid,
    uniform,
)
from merge_mix.search.study import (
    baseline_metrics,
    check_metrics,
    earlier_holder,
    enqueue_once,
    record_params,
    requeue,
    result_attrs,
)

_MAX_REDRAWS = 100
NOT_FINITE = "objective is not finite"


def seed_sequence(*parts: int | str) -> np.random.SeedSequence:
    """A seed sequence from ints and strings (strings hashed by CRC-32): the same parts give
    the same draws in every process."""
    return np.random.SeedSequence(
        [zlib.crc32(p.encode()) if isinstance(p, str) else int(p) for p in parts]
    )


def baseline_mixtures(domains: list[str], natural: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """(kind, weights) of the baselines every study scores first."""
    k = len(domains)
    items = [("baseline:uniform", uniform(k)), ("baseline:natural", natural)]
    items += [(f"baseline:pure:{d}", np.eye(k)[i]) for i, d in enumerate(domains)]
    return items


class Worker:
    """One search worker: the scorer, the study, and the bookkeeping that ties them."""

    def __init__(
        self,
        scorer: Scorer,
        objective: Objective,
        config: SearchConfig,
        study: optuna.Study,
        restarts: int = 0,
    ) -> None:
        self.scorer = scorer
        self.objective = objective
        self.config = config
        self.study = study
        self.domains = list(scorer.domains)
        self.natural = normalise(scorer.natural_mixture, "scorer.natural_mixture")
        self.prior = dirichlet_prior(self.natural, config.temperature)
        self.caps = config.caps_for(scorer)
        # tpe/cmaes learn on u:<domain>, so every trial of theirs records those too.
        self.unit_cube = config.sampler in OPTUNA_SAMPLERS
        # `restarts` (trials in the study at start) keeps a resumed worker off the draws it
        # already made.
        self.rng = np.random.default_rng(seed_sequence(config.seed, config.worker, restarts))
        self.bar: Any = None
        self.best = math.inf
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.user_attrs.get("full_budget", True) and t.user_attrs.get("feasible", True):
                self.best = min(self.best, t.value)

    # --- asking ---------------------------------------------------------------------------

    def ask(self) -> optuna.Trial | None:
        """A trial from the queue if any is waiting, else a fresh one; claimed by this worker.
        None if another worker finished the queued trial first (possible with SQLite, which
        cannot lock the row Optuna pops)."""
        try:
            trial = self.study.ask()
            trial.set_user_attr("scored_by", self.config.worker)
        except UpdateFinishedTrialError:
            return None
        return trial

    def has_waiting(self) -> bool:
        return bool(self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))

    def next_fresh(self) -> optuna.Trial:
        """A fresh trial, after scoring whatever queued trials `ask` pops on the way."""
        while True:
            trial = self.ask()
            if trial is None:
                continue
            if "key" not in trial.user_attrs:
                return trial
            self.score_queued(trial)

    def abandon(self, trial: optuna.Trial, reason: str) -> None:
        trial.set_user_attr("reason", reason)
        self.study.tell(trial, state=TrialState.FAIL)

    def drain_queue(self) -> None:
        """Score queued trials until none is waiting."""
        while self.has_waiting():
            trial = self.ask()
            if trial is None:
                continue
            if "key" not in trial.user_attrs:
                # Another worker took the last queued trial between our check and our ask.
                self.abandon(trial, "queue emptied by another worker")
                return
            self.score_queued(trial)

    def score_queued(self, trial: optuna.Trial) -> float:
        attrs = trial.user_attrs
        holder = earlier_holder(self.study, trial.number, attrs["key"])
        if holder is not None:
            self.abandon(trial, f"duplicate of trial {holder}")
            return math.nan
        try:
            return self.score(
                trial,
                np.asarray(attrs["merge_weights"], dtype=float),
                kind=attrs["kind"],
                budget_tokens=attrs.get("budget_tokens"),
                full_budget=attrs.get("full_budget", True),
                owner=attrs.get("worker", self.config.worker),
            )
        except (UpdateFinishedTrialError, ValueError):
            # Popped by two workers at once (SQLite); the other one recorded it.
            if not self.finished_elsewhere(trial.number):
                raise
            return math.nan

    def finished_elsewhere(self, number: int) -> bool:
        trials = self.study.get_trials(deepcopy=False)
        return any(t.number == number and t.state.is_finished() for t in trials)

    # --- scoring --------------------------------------------------------------------------

    def score(
        self,
        trial: optuna.Trial,
        weights: np.ndarray,
        kind: str,
        budget_tokens: int | None,
        full_budget: bool = True,
        owner: str | None = None,
        extra: dict[str, Any] | None = None,
        step: int | None = None,
        finish: bool = True,
    ) -> float:
        """Score `weights`, record everything on the trial (its `w:<domain>` params included),
        tell the study; returns the objective (NaN if not finite, and the trial is then FAIL).

        A halving rung passes `step` (the objective becomes the intermediate value of that
        step, and cost_s sums over steps) and, below the full budget, `finish=False`: the
        trial stays running for the caller to promote or prune."""
        attrs = {
            "kind": kind,
            "worker": owner or self.config.worker,
            "merge_weights": [float(x) for x in weights],
            **(extra or {}),
        }
        # Defaults stay unwritten (readers use .get): every attribute is one storage write.
        # A halving candidate's budget changes between rungs, so a written one is updated.
        if budget_tokens is not None or "budget_tokens" in trial.user_attrs:
            attrs["budget_tokens"] = budget_tokens
        if not full_budget or "full_budget" in trial.user_attrs:
            attrs["full_budget"] = full_budget
        for key, value in attrs.items():
            if trial.user_attrs.get(key, object()) != value:
                trial.set_user_attr(key, value)
        record_params(trial, self.domains, weights, self.unit_cube)
        spent = trial.user_attrs.get("cost_s", 0.0) if step is not None else 0.0
        start = time.perf_counter()
        try:
            metrics = check_metrics(self.scorer.score(weights, budget_tokens))
            mixture = np.asarray(self.scorer.effective_mixture(weights), dtype=float)
            cost_s = time.perf_counter() - start
            baseline = self.baseline_for(kind, full_budget, metrics)
            evaluation = self.objective.evaluate(metrics, baseline)
        except BaseException as err:
            # Crashed or interrupted mid-score: record why, queue the mixture again (a few
            # attempts at most), pass the error on.
            trial.set_user_attr("error", f"{type(err).__name__}: {err}"[:500])
            self.study.tell(trial, state=TrialState.FAIL)
            requeue(self.study, trial.user_attrs, trial.number, self.config.worker)
            raise
        recorded = result_attrs(weights, mixture, metrics, evaluation, spent + cost_s)
        for key, value in recorded.items():
            if self.objective.constraints or key not in ("feasible", "penalty"):
                trial.set_user_attr(key, value)
        value = evaluation.value
        if not math.isfinite(value):
            self.abandon(trial, NOT_FINITE)
            return math.nan
        if evaluation.violations:
            trial.set_constraint("baseline_tolerance", max(evaluation.violations.values()))
        if step is not None:
            trial.report(value, step)
        if not finish:
            self.tick(kind)
            return value
        self.study.tell(trial, value)
        if full_budget and evaluation.feasible:
            self.best = min(self.best, value)
        self.tick(kind)
        return value

    def tick(self, kind: str) -> None:
        """Advance the progress bar by one scored mixture."""
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(best=f"{self.best:.4f}", last=kind, refresh=False)

    def baseline_for(
        self, kind: str, full_budget: bool, metrics: dict[str, float]
    ) -> dict[str, float] | None:
        """The metrics the objective's constraints compare against (None without any)."""
        if not self.objective.constraints:
            return None
        name = self.objective.baseline
        if kind == f"baseline:{name}" and full_budget:
            return metrics
        while True:
            found = baseline_metrics(self.study, name)
            if found is not None:
                return found
            pending = [
                t
                for t in self.study.get_trials(
                    deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING)
                )
                if t.user_attrs.get("kind") == f"baseline:{name}"
            ]
            if not pending:
                raise MergeMixError(
                    f"search: the {name} baseline was not scored, and the objective's "
                    "constraints are relative to it"
                )
            waiting = [t for t in pending if t.state == TrialState.WAITING]
            if waiting and not any(t.state == TrialState.RUNNING for t in pending):
                self.claim_and_score(waiting[0])
            else:
                time.sleep(0.5)

    def claim_and_score(self, frozen: optuna.trial.FrozenTrial) -> None:
        # The queue pops in trial order; a re-queued baseline can sit behind trials that need
        # it, so take it out of turn the way Study.ask does (an atomic WAITING -> RUNNING).
        storage = self.study._storage
        try:
            if not storage.set_trial_state_values(frozen._trial_id, state=TrialState.RUNNING):
                return
            trial = optuna.Trial(self.study, frozen._trial_id)
            trial.set_user_attr("scored_by", self.config.worker)
        except UpdateFinishedTrialError:
            return
        self.score_queued(trial)

    # --- proposing ------------------------------------------------------------------------

    def my_completed(self) -> int:
        kind = f"sampler:{self.config.sampler}"
        return sum(
            1
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.user_attrs.get("worker") == self.config.worker and t.user_attrs.get("kind") == kind
        )

    def existing_weights(self) -> np.ndarray:
        rows = [
            t.user_attrs["merge_weights"]
            for t in self.study.get_trials(deepcopy=False)
            if t.state != TrialState.FAIL and "merge_weights" in t.user_attrs
        ]
        return np.asarray(rows, dtype=float).reshape(-1, len(self.domains))

    def draw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """n proposals of the dirichlet or random sampler (no de-duplication), inside the
        caps."""
        if self.config.sampler == "random":
            return self.caps.project(rng.dirichlet(np.ones(len(self.domains)), size=n))
        return dirichlet_candidates(
            rng, n, self.prior, self.config.strength, self.caps.weights, self.config.min_weight
        )

    def propose(self, trial: optuna.Trial) -> np.ndarray:
        """Merge weights for a fresh trial from the configured sampler, inside the caps."""
        if self.config.sampler in OPTUNA_SAMPLERS:
            u = [trial.suggest_float(f"u:{d}", U_LOW, 1.0) for d in self.domains]
            # The sampler learns on u; the projection makes over-cap u score as their
            # capped mixture.
            return self.caps.project(from_unit_cube(np.array(u)))
        existing = self.existing_weights()
        for _ in range(_MAX_REDRAWS):
            weights = self.draw(1, self.rng)[0]
            if not is_near(weights, existing, self.config.dedup_tol):
                return weights
        return weights

    def run_sampler(self) -> None:
        """Drain the queue and sample until this worker's quota is complete."""
        config = self.config
        if config.sampler == "grid":
            grid = simplex_grid(len(self.domains), config.grid_step)
            # Grid points over a cap are dropped (not projected: that would stack duplicates
            # on the cap); keys keep the uncapped numbering.
            items = [
                (f"grid:{i}", "sampler:grid", w) for i, w in enumerate(grid) if self.caps.admits(w)
            ]
            if not items:
                raise MergeMixError(
                    f"grid_step: no point of the {config.grid_step} grid obeys the caps; "
                    "use a finer grid"
                )
            enqueue_once(self.study, items, config.budget_tokens)
            self.drain_queue()
            return
        while True:
            done = self.my_completed()
            if done >= config.n_trials and not self.has_waiting():
                return
            trial = self.ask()
            if trial is None:
                continue
            if "key" in trial.user_attrs:
                self.score_queued(trial)
            elif done >= config.n_trials:
                self.abandon(trial, "queue emptied by another worker")
                return
            else:
                weights = self.propose(trial)
                self.score(trial, weights, f"sampler:{config.sampler}", config.budget_tokens)
