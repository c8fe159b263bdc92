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

The worker itself (asking, proposing, scoring, recording) is `merge_mix.search.worker.Worker`;
halving and the surrogate live in `merge_mix.search.halving` and `merge_mix.search.surrogate`.
"""

from __future__ import annotations

import json
import platform
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from merge_mix.artifacts import write_atomic
from merge_mix.errors import MergeMixError
from merge_mix.objective import Objective
from merge_mix.search import Scorer
from merge_mix.search.config import SearchConfig
from merge_mix.search.simplex import normalise, simplex_grid
from merge_mix.search.study import (
    describe_storage,
    enqueue_once,
    export_trials,
    open_study,
    recover_stale,
)
from merge_mix.search.worker import Worker, baseline_mixtures, seed_sequence


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


def _unit_cube_only(space: dict[str, Any]) -> dict[str, Any]:
    # Trials also carry w:<domain>, the merge weights the u:<domain> coordinates decode to:
    # recorded, not search dimensions of their own (a joint model of both would propose w:
    # values nobody uses, and `record_params` would then record those instead).
    return {name: d for name, d in space.items() if name.startswith("u:")}


class UnitCubeTPE(optuna.samplers.TPESampler):
    """TPE (multivariate by default since Optuna 5) over the `u:<domain>` coordinates only."""

    def infer_relative_search_space(self, study: optuna.Study, trial: Any) -> dict[str, Any]:
        return _unit_cube_only(super().infer_relative_search_space(study, trial))


class UnitCubeCmaEs(optuna.samplers.CmaEsSampler):
    """CMA-ES over the `u:<domain>` coordinates only."""

    def infer_relative_search_space(self, study: optuna.Study, trial: Any) -> dict[str, Any]:
        return _unit_cube_only(super().infer_relative_search_space(study, trial))


def _optuna_sampler(config: SearchConfig, restarts: int) -> optuna.samplers.BaseSampler:
    seed = int(seed_sequence(config.seed, config.worker, restarts).generate_state(1)[0])
    if config.sampler == "tpe":
        return UnitCubeTPE(seed=seed)
    if config.sampler == "cmaes":
        return UnitCubeCmaEs(seed=seed, warn_independent_sampling=False)
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

    if config.halving and config.budget_tokens is None:
        raise MergeMixError("halving: needs budget_tokens (the full per-domain budget)")
    domains = list(scorer.domains)
    available = np.asarray(scorer.available_tokens, dtype=float)
    config.check_pool(domains, available)
    caps = config.caps_for(scorer)
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
    if caps.binding:
        # best.json ranks trials over a cap (the pure baselines, say) after those within.
        study.set_user_attr("caps", caps.to_dict()["mixture"])
    record = {
        "config": config.to_dict(),
        "objective": objective.to_dict(),
        "storage": where,
        "study_name": config.study_name,
        "worker": config.worker,
        "domains": domains,
        "natural_mixture": natural.tolist(),
        "available_tokens": available.tolist(),
        "caps": caps.to_dict(),
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
            planned = int(caps.admits(simplex_grid(len(domains), config.grid_step)).sum())
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
