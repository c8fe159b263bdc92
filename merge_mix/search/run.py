"""`run_search`: score baselines, sample mixtures, optionally halve and fit a surrogate.

One call is one worker. Several workers (processes or machines, distinct `worker` ids) may
share a study through a journal file or a database; each completes its own `n_trials`.
Killed and restarted with the same run directory and worker id, a worker resumes: trials it
left running are marked FAIL and their mixtures re-scored, and it completes only the rest of
its quota.

Order of work: (1) re-queue stale trials of this worker, (2) queue the baselines once per
study (uniform, natural, each pure component), (3) drain the queue and sample until the quota
is met (or run successive halving), (4) fit the surrogate and score its pick, (5) export
trials.jsonl, trials.csv, best.json, and rewrite run.json with `finished_at` last.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from merge_mix.artifacts import write_atomic
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
    token_caps,
    uniform,
)
from merge_mix.search.study import (
    baseline_metrics,
    check_metrics,
    describe_storage,
    distributions,
    earlier_holder,
    enqueue_once,
    export_trials,
    open_study,
    recover_stale,
    requeue,
    result_attrs,
)

_MAX_REDRAWS = 100


@dataclass(frozen=True)
class SearchResult:
    """What a finished `run_search` call leaves behind (all of it is also on disk)."""

    run_dir: Path
    """The run directory holding trials.jsonl, trials.csv, best.json and run.json."""
    study_name: str
    """The Optuna study name."""
    storage: str
    """The storage, printable (passwords redacted)."""
    best: dict[str, Any] | None
    """The content of best.json (None if no full-budget trial completed)."""
    n_trials: int
    """Completed trials in the study, all workers, one per unit of work."""
    halving: dict[str, Any] | None
    """This worker's successive-halving summary, if it ran."""
    surrogate: dict[str, Any] | None
    """This worker's surrogate summary, if it ran."""


def _seed(*parts: int | str) -> np.random.SeedSequence:
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
        self.caps = token_caps(scorer.available_tokens, config.train_tokens, config.max_epochs)
        self.dists = distributions(self.domains) if config.sampler in OPTUNA_SAMPLERS else None
        # `restarts` (trials in the study at start) keeps a resumed worker off the draws it
        # already made.
        self.rng = np.random.default_rng(_seed(config.seed, config.worker, restarts))
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
            trial = self.study.ask(self.dists)
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
    ) -> float:
        """Score `weights`, record everything on the trial, tell the study; returns the
        objective (NaN if not finite, and the trial is then FAIL)."""
        attrs = {
            "kind": kind,
            "worker": owner or self.config.worker,
            "merge_weights": [float(x) for x in weights],
            **(extra or {}),
        }
        # Defaults stay unwritten (readers use .get): every attribute is one storage write.
        if budget_tokens is not None:
            attrs["budget_tokens"] = budget_tokens
        if not full_budget:
            attrs["full_budget"] = False
        for key, value in attrs.items():
            if trial.user_attrs.get(key, object()) != value:
                trial.set_user_attr(key, value)
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
        for key, value in result_attrs(weights, mixture, metrics, evaluation, cost_s).items():
            if self.objective.constraints or key not in ("feasible", "penalty"):
                trial.set_user_attr(key, value)
        value = evaluation.value
        if not math.isfinite(value):
            self.abandon(trial, "objective is not finite")
            return math.nan
        if evaluation.violations:
            trial.set_constraint("baseline_tolerance", max(evaluation.violations.values()))
        self.study.tell(trial, value)
        if full_budget and evaluation.feasible:
            self.best = min(self.best, value)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(best=f"{self.best:.4f}", last=kind, refresh=False)
        return value

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
        """n proposals of the dirichlet or random sampler (no de-duplication)."""
        if self.config.sampler == "random":
            return rng.dirichlet(np.ones(len(self.domains)), size=n)
        return dirichlet_candidates(
            rng, n, self.prior, self.config.strength, self.caps, self.config.min_weight
        )

    def propose(self, trial: optuna.Trial) -> np.ndarray:
        """Merge weights for a fresh trial from the configured sampler."""
        if self.config.sampler in OPTUNA_SAMPLERS:
            u = [trial.suggest_float(f"u:{d}", U_LOW, 1.0) for d in self.domains]
            return from_unit_cube(np.array(u))
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
            items = [(f"grid:{i}", "sampler:grid", w) for i, w in enumerate(grid)]
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


def _optuna_sampler(config: SearchConfig, restarts: int) -> optuna.samplers.BaseSampler:
    seed = int(_seed(config.seed, config.worker, restarts).generate_state(1)[0])
    if config.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if config.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    # The other samplers propose outside Optuna; this one is never asked for a value.
    return optuna.samplers.RandomSampler(seed=seed)


def _versions() -> dict[str, str]:
    import scipy

    from merge_mix import __version__

    return {
        "merge_mix": __version__,
        "optuna": optuna.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "python": platform.python_version(),
    }


def _write_run_json(run_dir: Path, record: dict[str, Any]) -> None:
    write_atomic(run_dir / "run.json", json.dumps(record, indent=2) + "\n")


def run_search(
    scorer: Scorer, objective: Objective, config: SearchConfig, run_dir: Path
) -> SearchResult:
    """Run (or resume) one worker's search and export the study into `run_dir`.

    Raises `MergeMixError` for bad configs, a study made for other domains or another
    objective, or metrics the objective needs but the scorer does not produce.
    """
    from tqdm import tqdm

    from merge_mix.search.halving import run_halving, rung_sizes
    from merge_mix.search.surrogate import run_surrogate

    domains = list(scorer.domains)
    available = np.asarray(scorer.available_tokens, dtype=float)
    config.check_pool(domains, available)
    objective.check_domains(domains)
    natural = normalise(scorer.natural_mixture, "scorer.natural_mixture")
    if len(natural) != len(domains):
        raise MergeMixError(
            f"scorer: natural_mixture has {len(natural)} entries, not {len(domains)}"
        )
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    where = describe_storage(config.storage, run_dir)
    study = open_study(run_dir, domains, objective, config.storage, config.study_name)
    restarts = len(study.get_trials(deepcopy=False))
    study.sampler = _optuna_sampler(config, restarts)
    record = {
        "config": config.to_dict(),
        "objective": objective.to_dict(),
        "storage": where,
        "study_name": config.study_name,
        "worker": config.worker,
        "domains": domains,
        "natural_mixture": natural.tolist(),
        "available_tokens": available.tolist(),
        "versions": _versions(),
        "started_at": datetime.now(timezone.utc).isoformat(),
    }
    _write_run_json(run_dir, record)

    worker = Worker(scorer, objective, config, study, restarts)
    recover_stale(study, config.worker)
    baselines = baseline_mixtures(domains, natural)
    enqueue_once(study, [(kind, kind, w) for kind, w in baselines], config.budget_tokens)

    halving_summary = surrogate_summary = None
    failed = True
    try:
        if config.halving:
            planned = sum(rung_sizes(config.n_trials, config.eta, config.rungs))
            planned += config.n_trials if config.halving_verify else 0
        elif config.sampler == "grid":
            planned = len(simplex_grid(len(domains), config.grid_step))
        else:
            planned = max(config.n_trials - worker.my_completed(), 0)
        waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
        total = planned + waiting + int(config.surrogate)
        with tqdm(
            total=total,
            desc=f"search [{config.worker}]",
            file=sys.stderr,
            disable=not config.progress,
            dynamic_ncols=True,
        ) as bar:
            worker.bar = bar
            if config.halving:
                worker.drain_queue()
                halving_summary = run_halving(worker)
                worker.drain_queue()
            else:
                worker.run_sampler()
            if config.surrogate:
                surrogate_summary = run_surrogate(worker)
            worker.drain_queue()
        failed = False
    finally:
        # Export even after a crash so the run directory shows what the study holds, but
        # never let an export error hide the original one.
        try:
            best = export_trials(study, run_dir)
        except Exception:
            if not failed:
                raise
            best = None
    record["finished_at"] = datetime.now(timezone.utc).isoformat()
    _write_run_json(run_dir, record)
    n_rows = len((run_dir / "trials.jsonl").read_text().splitlines())
    return SearchResult(
        run_dir=run_dir,
        study_name=config.study_name,
        storage=where,
        best=best,
        n_trials=n_rows,
        halving=halving_summary,
        surrogate=surrogate_summary,
    )
