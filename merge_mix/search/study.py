"""The Optuna study behind a search: storage, trial records, the work queue, and exports.

Every scored mixture is one Optuna trial whose value is the objective (to minimise, named by
`metric_name`), whose parameters are its merge weights, `w:<domain>` (FloatDistribution(0, 1),
summing to 1; never sampled: `record_params` records them on every trial, whoever proposed
the mixture), and whose user attributes carry the record (see `TRIAL_ATTRS`). Studies run by
the tpe/cmaes samplers also carry the `u:<domain>` unit-cube coordinates those samplers learn
on. A successive-halving candidate is one trial: its rungs are intermediate values (step =
rung), and it ends PRUNED when it stops below the full budget.

Trials that must be scored exactly once per study — baselines, grid points, re-scores of
trials a dead worker left running — go through Optuna's queue (`enqueue_trial`) with a `key`;
a worker that pops a queued trial whose key an earlier live trial already holds marks it FAIL
as a duplicate, so two workers racing to enqueue the same work still score it once, and
`trial_rows` keeps one row per key.

Files written by `export_trials` into the run directory (each atomically: temp + rename):
  trials.jsonl  one JSON object per completed or pruned trial, keys in `ROW_KEYS` order
  trials.csv    the same rows flattened: merge_weights/<d>, effective_mixture/<d>, metrics
  best.json     the best full-budget trial (selected on the search split), how it compares
                with the baselines there, and, once the verdict has run, the verdict on the
                test split with its intervals (keys "verdict", "verdict_sentence", "test")
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.distributions import FloatDistribution
from optuna.exceptions import ExperimentalWarning
from optuna.trial import TrialState

from merge_mix.artifacts import write_atomic
from merge_mix.errors import MergeMixError
from merge_mix.objective import Evaluation, Objective
from merge_mix.search.config import JOURNAL_SUFFIXES
from merge_mix.search.simplex import U_LOW, normalise, to_unit_cube

TRIAL_ATTRS = {
    "kind": 'what proposed the mixture: "baseline:uniform", "sampler:tpe", "halving:rung1"'
    " (a halving candidate: the last rung it was scored at)...",
    "worker": "the worker whose quota the trial counts toward",
    "scored_by": "the worker process that scored it",
    "merge_weights": "merge weights, a list aligned with the study's domains",
    "effective_mixture": "the data mixture the merge weights stand for, aligned likewise",
    "metrics": "every metric the scorer returned",
    "feasible": "whether the objective's constraints hold (absent: no constraints, True)",
    "penalty": "the constraint penalty included in the objective (absent: 0)",
    "budget_tokens": "per-domain evaluation budget (absent: the scorer's default)",
    "full_budget": "False for a halving candidate pruned below the full budget (absent: True)",
    "cost_s": "seconds spent scoring (a halving candidate: summed over its rungs)",
    "halving": 'halving trials only: {"candidate": index in the bracket, "rung": last rung}',
    "key": "queued trials only: the unit of work it stands for (deduplicated)",
}
ROW_KEYS = (
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
)
BASELINES = ("uniform", "natural")
MAX_ATTEMPTS = 3
# A queued trial popped by a worker that died before recording who it was: how long it
# must have been running before any worker may re-queue it.
ORPHAN_AFTER = timedelta(seconds=60)


def redact(storage: str) -> str:
    """The storage URL with any password replaced by ***."""
    if "://" not in storage or "@" not in storage:
        return storage
    scheme, rest = storage.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in credentials else storage


def describe_storage(storage: str | None, run_dir: Path) -> str:
    """The storage as `resolve_storage` will open it, printable (passwords redacted)."""
    if storage is None:
        return f"sqlite:///{(Path(run_dir) / 'study.db').resolve()}"
    return redact(storage)


def _new_sqlite_in_wal_mode(url: str) -> None:
    # A new SQLite file is created in write-ahead-log mode (a property of the file): commits
    # get several times cheaper and readers stop blocking the writer. It stays safe against
    # killed processes; keep the file on a local disk.
    import sqlite3

    path = url.removeprefix("sqlite:///")
    if path and path != ":memory:" and not Path(path).exists():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with sqlite3.connect(path) as connection:
            connection.execute("PRAGMA journal_mode=WAL")


def resolve_storage(storage: str | None, run_dir: Path) -> Any:
    """An Optuna storage for `storage` (see `SearchConfig.storage`)."""
    if storage is None:
        storage = describe_storage(None, run_dir)
    if storage == ":memory:":
        return optuna.storages.InMemoryStorage()
    if storage.endswith(JOURNAL_SUFFIXES) and "://" not in storage:
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage

        path = Path(storage)
        path.parent.mkdir(parents=True, exist_ok=True)
        # The open(O_EXCL) lock also works where symlinks do not (some network file systems).
        backend = JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path)))
        return JournalStorage(backend)
    if "://" not in storage:
        raise MergeMixError(
            f"storage: {storage!r} is neither a journal file (.jsonl/.log) nor a database URL"
        )
    engine_kwargs = None
    if storage.startswith("sqlite:///"):
        _new_sqlite_in_wal_mode(storage)
        engine_kwargs = {"connect_args": {"timeout": 60}}
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(storage, engine_kwargs=engine_kwargs)
        except Exception as err:  # sqlalchemy raises many types; all mean "cannot open it"
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            # Workers starting together race to create the tables; the loser retries.
            racing = ("already exists", "UNIQUE constraint", "database is locked")
            if any(text in message for text in racing) and attempt < 4:
                time.sleep(0.2 * (attempt + 1))
                continue
            raise MergeMixError(f"storage: cannot open {redact(storage)}: {message}") from None
    raise AssertionError("unreachable")


def distributions(domains: Sequence[str]) -> dict[str, FloatDistribution]:
    """The unit-cube search space of the tpe/cmaes samplers, one parameter per domain."""
    return {f"u:{d}": FloatDistribution(U_LOW, 1.0) for d in domains}


def unit_cube_params(domains: Sequence[str], weights: np.ndarray) -> dict[str, float]:
    """Parameters that decode to `weights`, so every trial informs tpe/cmaes."""
    return {f"u:{d}": float(u) for d, u in zip(domains, to_unit_cube(weights), strict=True)}


def weight_distributions(domains: Sequence[str]) -> dict[str, FloatDistribution]:
    """The `w:<domain>` parameters every trial carries: its merge weights, by domain name."""
    return {f"w:{d}": FloatDistribution(0.0, 1.0) for d in domains}


def weight_params(
    domains: Sequence[str], weights: np.ndarray | Sequence[float]
) -> dict[str, float]:
    """`weights` as `w:<domain>` parameter values (clipped into [0, 1] against rounding)."""
    return {f"w:{d}": min(max(float(x), 0.0), 1.0) for d, x in zip(domains, weights, strict=True)}


class _Given(optuna.samplers.BaseSampler):
    """A sampler that proposes nothing: it hands back values decided elsewhere."""

    def __init__(self, values: Mapping[str, float]) -> None:
        self.values = values

    def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
        return {}

    def sample_relative(self, study: Any, trial: Any, search_space: Any) -> dict[str, Any]:
        return {}

    def sample_independent(self, study: Any, trial: Any, param_name: str, dist: Any) -> Any:
        return self.values[param_name]


def record_params(
    trial: optuna.Trial, domains: Sequence[str], weights: np.ndarray, unit_cube: bool = False
) -> None:
    """Record `weights` as the trial's `w:<domain>` parameters (and, with `unit_cube`, the
    `u:<domain>` coordinates tpe/cmaes learn on, unless the sampler already chose them).

    Optuna only records a parameter through `suggest_*`, which asks the study's sampler; the
    weights here come from outside it (a baseline, the dirichlet sampler, halving, the
    surrogate), so the sampler is swapped for one that returns them during the calls. A queued
    trial's values come from its `enqueue_trial` params the same way."""
    given = weight_params(domains, weights)
    dists = weight_distributions(domains)
    if unit_cube:
        given |= unit_cube_params(domains, weights)
        dists |= distributions(domains)
    if set(dists) <= set(trial.params):
        return  # a later rung of a halving candidate
    study = trial.study
    sampler = study.sampler
    study.sampler = _Given(given)
    try:
        for name, dist in dists.items():
            trial.suggest_float(name, dist.low, dist.high)
    finally:
        study.sampler = sampler


def metric_name(objective: Objective) -> str:
    """The study's metric name: what the objective is, its unit, and where it is measured,
    e.g. "mean_loss (nats/token, search split)"."""
    from merge_mix.compare import unit_of

    return f"{objective.name} ({unit_of(objective)}, search split)"


def _fingerprint(objective: Objective) -> str:
    return json.dumps(objective.to_dict(), sort_keys=True)


def open_study(
    run_dir: Path,
    domains: Sequence[str],
    objective: Objective,
    storage: str | None = None,
    study_name: str = "merge-mix",
    sampler: Any = None,
) -> optuna.Study:
    """Create or load the study; refuse one made for other domains or another objective."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    backend = resolve_storage(storage, run_dir)
    where = describe_storage(storage, run_dir)
    study = optuna.create_study(
        storage=backend,
        study_name=study_name,
        sampler=sampler,
        direction="minimize",
        load_if_exists=True,
    )
    attrs = study.user_attrs
    if "domains" not in attrs:
        # "domains" is written last: it marks the study's identity complete, so a worker
        # opening the study meanwhile never sees domains without the objective. Two
        # workers creating it at once write the same values; a differing objective is
        # caught by the check below, on the values as stored.
        from merge_mix import __version__

        study.set_user_attr("objective", _fingerprint(objective))
        study.set_user_attr("merge_mix_version", __version__)
        study.set_user_attr("domains", list(domains))
        attrs = study.user_attrs
    if list(attrs["domains"]) != list(domains):
        raise MergeMixError(
            f"study {study_name!r} in {where} is for domains {attrs['domains']}, not "
            f"{list(domains)}; use another run directory, storage or study name"
        )
    if attrs.get("objective") != _fingerprint(objective):
        theirs = json.loads(attrs.get("objective", "{}")).get("name", "?")
        raise MergeMixError(
            f"study {study_name!r} in {where} was made for objective {theirs!r}, which differs "
            f"from this run's {objective.name!r}; use another run directory or study name"
        )
    return _named(study, objective)


def _named(study: optuna.Study, objective: Objective) -> optuna.Study:
    # Also names studies made before metric names were set (a resumed older run).
    name = metric_name(objective)
    if study.metric_names != [name]:
        with warnings.catch_warnings():
            # set_metric_names is "experimental" since Optuna 3.2; dashboards read it.
            warnings.simplefilter("ignore", ExperimentalWarning)
            study.set_metric_names([name])
    return study


def study_domains(study: optuna.Study) -> list[str]:
    """The ordered domain list the study was created for."""
    return list(study.user_attrs["domains"])


# --- the queue ---------------------------------------------------------------------------


def enqueue(
    study: optuna.Study,
    weights: np.ndarray,
    kind: str,
    key: str,
    *,
    worker: str | None = None,
    budget_tokens: int | None = None,
    full_budget: bool = True,
    attempt: int = 1,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Queue a mixture to be scored by whichever worker asks next."""
    domains = study_domains(study)
    user_attrs = {
        "kind": kind,
        "key": key,
        "merge_weights": [float(x) for x in weights],
        "budget_tokens": budget_tokens,
        "full_budget": full_budget,
        "attempt": attempt,
        **(extra or {}),
    }
    if worker is not None:
        user_attrs["worker"] = worker
    # The w: values are the merge weights whatever the sampler; u: serve tpe/cmaes workers.
    params = {**weight_params(domains, weights), **unit_cube_params(domains, weights)}
    study.enqueue_trial(params, user_attrs=user_attrs)


def enqueue_once(
    study: optuna.Study,
    items: Sequence[tuple[str, str, np.ndarray]],
    budget_tokens: int | None = None,
) -> int:
    """Queue (key, kind, weights) items whose key no live trial holds yet, to be scored at
    `budget_tokens`; returns how many were queued."""
    held = {
        t.user_attrs.get("key")
        for t in study.get_trials(deepcopy=False)
        if t.state != TrialState.FAIL
    }
    queued = 0
    for key, kind, weights in items:
        if key not in held:
            enqueue(study, weights, kind, key, budget_tokens=budget_tokens)
            queued += 1
    return queued


def earlier_holder(study: optuna.Study, number: int, key: str) -> int | None:
    """The number of an earlier, not failed trial with the same key, if any."""
    for t in study.get_trials(deepcopy=False):
        if t.number < number and t.state != TrialState.FAIL and t.user_attrs.get("key") == key:
            return t.number
    return None


def requeue(study: optuna.Study, attrs: Mapping[str, Any], number: int, scored_by: str) -> bool:
    """Queue the mixture of failed trial `number` (user attributes `attrs`) again, with the
    same kind, key and owner, unless it has used up its attempts. Returns whether it did.
    Halving trials are not queued: `run_halving` resumes them from their intermediate values."""
    if "merge_weights" not in attrs or attrs.get("attempt", 1) >= MAX_ATTEMPTS:
        return False
    if "halving" in attrs:
        return False
    extra = {k: attrs[k] for k in ("predicted_objective", "surrogate") if k in attrs}
    enqueue(
        study,
        np.asarray(attrs["merge_weights"]),
        attrs["kind"],
        attrs.get("key") or f"retry:{number}",
        worker=attrs.get("worker", scored_by),
        budget_tokens=attrs.get("budget_tokens"),
        full_budget=attrs.get("full_budget", True),
        attempt=attrs.get("attempt", 1) + 1,
        extra=extra,
    )
    return True


def recover_stale(study: optuna.Study, worker: str) -> int:
    """Fail and re-queue the trials a dead process of this worker id left RUNNING (and
    long-orphaned queued trials nobody claimed). Returns how many were recovered."""
    recovered = 0
    now = datetime.now()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        scored_by = t.user_attrs.get("scored_by")
        orphan = (
            scored_by is None
            and "key" in t.user_attrs
            and t.datetime_start is not None
            and now - t.datetime_start > ORPHAN_AFTER
        )
        if scored_by != worker and not orphan:
            continue
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        # Fresh sampler trials of our own are re-queued too: their weights were recorded
        # before scoring started.
        requeue(study, t.user_attrs, t.number, worker)
        recovered += 1
    return recovered


# --- records -------------------------------------------------------------------------------


def baseline_metrics(study: optuna.Study, name: str) -> dict[str, float] | None:
    """Metrics of the study's full-budget `baseline:<name>` trial, or None if not scored yet."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        attrs = t.user_attrs
        if attrs.get("kind") == f"baseline:{name}" and attrs.get("full_budget", True):
            return dict(attrs["metrics"])
    return None


def check_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The scorer's metrics as a plain dict of floats (NaN allowed, strings not)."""
    try:
        return {str(k): float(v) for k, v in metrics.items()}
    except (TypeError, ValueError, AttributeError):
        raise MergeMixError("scorer: score() must return a dict of metric name -> number") from None


def result_attrs(
    weights: np.ndarray,
    effective_mixture: np.ndarray,
    metrics: Mapping[str, float],
    evaluation: Evaluation,
    cost_s: float,
) -> dict[str, Any]:
    """The user attributes that record a scored trial."""
    return {
        "merge_weights": [float(x) for x in weights],
        "effective_mixture": [float(x) for x in effective_mixture],
        "metrics": dict(metrics),
        "feasible": bool(evaluation.feasible),
        "penalty": float(evaluation.penalty),
        "cost_s": float(cost_s),
    }


def record_trial(
    study: optuna.Study,
    objective: Objective,
    weights: np.ndarray | Sequence[float],
    metrics: Mapping[str, float],
    *,
    kind: str,
    worker: str = "main",
    effective_mixture: np.ndarray | Sequence[float] | None = None,
    budget_tokens: int | None = None,
    full_budget: bool = True,
    cost_s: float = 0.0,
    extra: Mapping[str, Any] | None = None,
) -> float:
    """Record a mixture scored outside `run_search` (e.g. by a gradient-based search) as a
    completed trial of the study, and return its objective value.

    The objective is computed here, against the study's baseline when it has constraints, so
    the record is comparable with every other trial. Pass `effective_mixture` when it differs
    from the merge weights. Returns NaN (and records a FAIL) if the objective is not finite.
    """
    domains = study_domains(study)
    w = normalise(weights, where=f"record_trial({kind}).weights")
    if len(w) != len(domains):
        raise MergeMixError(f"record_trial: {len(w)} weights for {len(domains)} domains")
    mixture = w if effective_mixture is None else np.asarray(effective_mixture, dtype=float)
    metrics = check_metrics(metrics)
    baseline = None
    if objective.constraints:
        baseline = baseline_metrics(study, objective.baseline)
        if baseline is None and kind != f"baseline:{objective.baseline}":
            raise MergeMixError(
                f"record_trial: the objective's constraints need baseline:{objective.baseline}"
                " scored first (run_search scores the baselines)"
            )
    evaluation = objective.evaluate(metrics, baseline if baseline is not None else metrics)
    attrs = {
        "kind": kind,
        "worker": worker,
        "scored_by": worker,
        "budget_tokens": budget_tokens,
        "full_budget": full_budget,
        **result_attrs(w, mixture, metrics, evaluation, cost_s),
        **(extra or {}),
    }
    finite = math.isfinite(evaluation.value)
    constraints = (
        {"baseline_tolerance": max(evaluation.violations.values())}
        if (evaluation.violations) and finite
        else None
    )
    params, dists = weight_params(domains, w), weight_distributions(domains)
    if uses_unit_cube(study):
        params |= unit_cube_params(domains, w)
        dists |= distributions(domains)
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.COMPLETE if finite else TrialState.FAIL,
            value=evaluation.value if finite else None,
            params=params,
            distributions=dists,
            user_attrs=attrs,
            constraints=constraints,
        )
    )
    return evaluation.value if finite else float("nan")


def uses_unit_cube(study: optuna.Study) -> bool:
    """Whether the study's trials carry the `u:<domain>` coordinates (a tpe/cmaes study)."""
    return any(
        name.startswith("u:")
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        for name in t.params
    )


# --- exports -------------------------------------------------------------------------------


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One row per completed or pruned trial (one per key for queued work), ordered by trial
    number. A pruned halving candidate's row holds its last rung (`full_budget` false)."""
    domains = study_domains(study)
    rows: list[dict[str, Any]] = []
    seen_keys: set[str] = set()
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    for t in sorted(trials, key=lambda t: t.number):
        attrs = t.user_attrs
        if "metrics" not in attrs:
            continue
        key = attrs.get("key")
        if key is not None:
            if key in seen_keys:
                continue
            seen_keys.add(key)
        row = {
            "number": t.number,
            "kind": attrs.get("kind", "external"),
            "worker": attrs.get("worker"),
            "merge_weights": dict(zip(domains, attrs["merge_weights"], strict=True)),
            "effective_mixture": dict(zip(domains, attrs["effective_mixture"], strict=True)),
            "objective": t.value,
            "feasible": attrs.get("feasible", True),
            # NaN is not JSON; a metric the scorer could not compute is written as null.
            "metrics": {k: v if math.isfinite(v) else None for k, v in attrs["metrics"].items()},
            "budget_tokens": attrs.get("budget_tokens"),
            # A pruned trial never competes for best.json, whatever budget it stopped at.
            "full_budget": attrs.get("full_budget", True) and t.state == TrialState.COMPLETE,
            "cost_s": attrs.get("cost_s"),
        }
        rows.append({k: row[k] for k in ROW_KEYS})
    return rows


def best_row(
    rows: Sequence[Mapping[str, Any]], caps: Mapping[str, float] | None = None
) -> Mapping[str, Any] | None:
    """The full-budget row with the lowest objective, rows within the effective-mixture
    `caps` first, then feasible rows."""
    full = [r for r in rows if r["full_budget"]]
    if not full:
        return None

    def over_cap(r: Mapping[str, Any]) -> bool:
        mixture = r["effective_mixture"]
        return any(mixture[d] > c + 1e-9 for d, c in (caps or {}).items())

    return min(full, key=lambda r: (over_cap(r), not r["feasible"], r["objective"], r["number"]))


def _compare(best: Mapping[str, Any], base: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if base is None:
        return None
    loss_delta = {
        key.split("/")[1]: best["metrics"][key] - value
        for key, value in base["metrics"].items()
        if key.startswith("heldout/")
        and key.endswith("/loss")
        and best["metrics"].get(key) is not None
        and value is not None
    }
    return {
        "number": base["number"],
        "objective": base["objective"],
        "feasible": base["feasible"],
        "beaten": best["objective"] < base["objective"] and best["number"] != base["number"],
        "objective_delta": best["objective"] - base["objective"],
        "heldout_loss_delta": loss_delta,
    }


def best_summary(study: optuna.Study, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The content of best.json (see `export_trials`)."""
    best = best_row(rows, study.user_attrs.get("caps"))
    if best is None:
        raise MergeMixError("search: no full-budget trial completed; nothing to recommend")
    full = [r for r in rows if r["full_budget"]]
    baselines = {
        name: next((r for r in full if r["kind"] == f"baseline:{name}"), None) for name in BASELINES
    }
    attrs = study.user_attrs
    surrogate = [r for r in rows if r["kind"] == "surrogate:topk"]
    summary = {
        "domains": study_domains(study),
        "objective_spec": json.loads(attrs["objective"]),
        "number": best["number"],
        "kind": best["kind"],
        "worker": best["worker"],
        "merge_weights": best["merge_weights"],
        "effective_mixture": best["effective_mixture"],
        "selected_on": "search",
        "objective": best["objective"],
        "feasible": best["feasible"],
        "metrics": best["metrics"],
        "baselines": {name: _compare(best, base) for name, base in baselines.items()},
        "verdict": None,
        "verdict_sentence": "not judged on the test split yet",
        "test": None,
        "n_trials": len(rows),
        "halving": {k.split(":", 1)[1]: v for k, v in attrs.items() if k.startswith("halving:")},
        "surrogate": None,
    }
    if surrogate:
        number = surrogate[-1]["number"]
        latest = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
        summary["surrogate"] = {
            "number": number,
            "objective": surrogate[-1]["objective"],
            **latest.user_attrs.get("surrogate", {}),
        }
    return summary


def _csv_text(rows: Sequence[Mapping[str, Any]], domains: Sequence[str]) -> str:
    metric_names = sorted({k for r in rows for k in r["metrics"]})
    header = (
        ["number", "kind", "worker"]
        + [f"merge_weights/{d}" for d in domains]
        + [f"effective_mixture/{d}" for d in domains]
        + ["objective", "feasible"]
        + metric_names
        + ["budget_tokens", "full_budget", "cost_s"]
    )
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for r in rows:
        writer.writerow(
            [r["number"], r["kind"], r["worker"]]
            + [r["merge_weights"][d] for d in domains]
            + [r["effective_mixture"][d] for d in domains]
            + [r["objective"], r["feasible"]]
            + [r["metrics"].get(m, "") for m in metric_names]
            + [r["budget_tokens"], r["full_budget"], r["cost_s"]]
        )
    return out.getvalue()


def export_trials(study: optuna.Study, run_dir: Path) -> dict[str, Any] | None:
    """Write trials.jsonl, trials.csv and best.json into run_dir; return the best summary
    (None when no full-budget trial has completed yet, in which case best.json is skipped)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = trial_rows(study)
    jsonl = "".join(json.dumps(r) + "\n" for r in rows)
    write_atomic(run_dir / "trials.jsonl", jsonl)
    write_atomic(run_dir / "trials.csv", _csv_text(rows, study_domains(study)))
    if best_row(rows) is None:
        return None
    summary = _with_verdict(best_summary(study, rows), run_dir)
    write_atomic(run_dir / "best.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _with_verdict(summary: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """best.json's summary with the test-split verdict, when verdict.json judged this trial."""
    path = Path(run_dir) / "verdict.json"
    if not path.is_file():
        return summary
    verdict = json.loads(path.read_text())
    if verdict.get("trial") != summary["number"]:
        return summary
    summary["verdict"] = verdict["verdict"]
    summary["verdict_sentence"] = verdict["sentence"]
    summary["test"] = {k: v for k, v in verdict.items() if k != "settings"}
    return summary


def attach_verdict(run_dir: Path) -> dict[str, Any]:
    """Rewrite best.json with the verdict of verdict.json (atomically); returns it."""
    path = Path(run_dir) / "best.json"
    summary = _with_verdict(json.loads(path.read_text()), run_dir)
    write_atomic(path, json.dumps(summary, indent=2) + "\n")
    return summary
