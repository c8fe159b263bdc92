"""Successive halving over the evaluation budget.

Score M candidate mixtures with a small per-domain token budget, keep the best 1/eta, score
those with an eta-times larger budget, and so on up to the full budget (`rungs` levels):

    rung r:  max(1, M // eta^r) candidates  x  budget_tokens // eta^(rungs - 1 - r) tokens

The cost, in scored tokens, is a fraction of scoring all M at full budget; the summary
reports the speed-up and, with `halving_verify`, whether full-budget scoring of every
candidate picks the same mixture (those extra full-budget scores are trials of their own,
kind `halving:verify`).

Each candidate is ONE Optuna trial: the objective at rung r is its intermediate value at step
r. A candidate that stops below the last rung ends PRUNED (its row in trials.jsonl holds its
last rung, `full_budget: false`, and never competes for best.json); one that reaches the last
rung ends COMPLETE with its full-budget objective. Cheap rungs' objectives only rank
candidates within a rung (and any constraints compare them with the full-budget baseline,
which makes them stricter).

Each worker runs its own bracket of M candidates, drawn deterministically from the seed and
worker id, so a restarted worker rebuilds the same bracket; a candidate whose trial a dead
process left behind continues in a new trial that carries its reported rungs over, so no rung
is scored twice.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from merge_mix.errors import MergeMixError
from merge_mix.search.study import record_params
from merge_mix.search.worker import NOT_FINITE, Worker, seed_sequence


def rung_budgets(full_budget: int, eta: int, rungs: int) -> list[int]:
    """Per-domain token budget of each rung, smallest first, the last one `full_budget`."""
    return [full_budget // eta ** (rungs - 1 - r) for r in range(rungs)]


def rung_sizes(n_candidates: int, eta: int, rungs: int) -> list[int]:
    """How many candidates each rung scores."""
    return [max(1, n_candidates // eta**r) for r in range(rungs)]


@dataclass
class _Candidate:
    """One candidate of the bracket: the rungs it has been scored at and its trials."""

    values: dict[int, float] = field(default_factory=dict)
    """Objective per rung (the trial's intermediate values); a non-finite rung is absent."""
    carried: dict[str, Any] = field(default_factory=dict)
    """User attributes of an unfinished trial a dead process left (copied onto the next)."""
    state: TrialState | None = None
    """COMPLETE, PRUNED or FAIL (objective not finite) once finished; None before."""
    number: int | None = None
    """The number of its finished trial."""
    trial: optuna.Trial | None = None
    """Its trial in this process, once opened."""


def _history(worker: Worker, candidates: np.ndarray) -> tuple[list[_Candidate], dict[int, float]]:
    """What this worker's earlier processes did: each candidate's state, and the objective of
    each `halving:verify` trial by candidate."""
    config = worker.config
    bracket = [_Candidate() for _ in candidates]
    verified: dict[int, float] = {}
    for t in sorted(worker.study.get_trials(deepcopy=False), key=lambda t: t.number):
        attrs = t.user_attrs
        if attrs.get("worker") != config.worker or "halving" not in attrs:
            continue
        c = attrs["halving"]["candidate"]
        if c >= len(candidates) or not np.allclose(
            attrs["merge_weights"], candidates[c], atol=1e-9
        ):
            raise MergeMixError(
                f"halving: trial {t.number} of worker {config.worker!r} does not match this "
                "config's candidates (changed seed, sampler or n_trials?); use a new worker id"
            )
        if attrs["kind"] == "halving:verify":
            if t.state == TrialState.COMPLETE:
                verified[c] = t.value
            continue
        finished = t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        if finished and not t.intermediate_values:
            raise MergeMixError(
                f"halving: trial {t.number} of worker {config.worker!r} was made by an older "
                "merge-mix (one trial per rung); use a new worker id or run directory"
            )
        candidate = bracket[c]
        candidate.values.update(t.intermediate_values)
        if finished or attrs.get("reason") == NOT_FINITE:
            candidate.state = t.state
            candidate.number = t.number
        else:
            dropped = ("scored_by", "error", "reason")
            candidate.carried = {k: v for k, v in attrs.items() if k not in dropped}
    return bracket, verified


def run_halving(worker: Worker) -> dict[str, Any]:
    """Run (or resume) this worker's bracket; returns the summary also stored in the study's
    user attributes as `halving:<worker>`."""
    config = worker.config
    study = worker.study
    n = config.n_trials
    k = len(worker.domains)
    last = config.rungs - 1
    rng = np.random.default_rng(seed_sequence(config.seed, config.worker, "halving"))
    candidates = worker.draw(n, rng)
    budgets = rung_budgets(config.budget_tokens, config.eta, config.rungs)
    sizes = rung_sizes(n, config.eta, config.rungs)
    bracket, verified = _history(worker, candidates)

    def trial_of(c: int) -> optuna.Trial:
        candidate = bracket[c]
        if candidate.trial is None:
            # A new trial, or the continuation of one a dead process left: it gets the old
            # record and the rungs already reported, so nothing is scored again.
            trial = worker.next_fresh()
            for key, value in candidate.carried.items():
                trial.set_user_attr(key, value)
            record_params(trial, worker.domains, candidates[c], worker.unit_cube)
            for step, value in sorted(candidate.values.items()):
                trial.report(value, step)
            candidate.trial = trial
        return candidate.trial

    def score(c: int, rung: int) -> None:
        candidate = bracket[c]
        if rung in candidate.values or candidate.state is not None:
            return
        trial = trial_of(c)
        value = worker.score(
            trial,
            candidates[c],
            kind=f"halving:rung{rung}",
            # The last rung asks for budget_tokens itself, so it matches full-budget trials.
            budget_tokens=config.budget_tokens if rung == last else budgets[rung],
            full_budget=rung == last,
            extra={
                "key": f"halving:{config.worker}:{c}",
                "halving": {"candidate": c, "rung": rung},
            },
            step=rung,
            finish=rung == last,
        )
        if math.isfinite(value):
            candidate.values[rung] = value
        if rung == last or not math.isfinite(value):
            candidate.state = TrialState.COMPLETE if math.isfinite(value) else TrialState.FAIL
            candidate.number = trial.number

    def prune(c: int) -> None:
        candidate = bracket[c]
        if candidate.state is not None:
            return
        trial = trial_of(c)
        # Optuna keeps the last intermediate value as a pruned trial's value.
        study.tell(trial, state=TrialState.PRUNED)
        candidate.state = TrialState.PRUNED
        candidate.number = trial.number

    survivors = list(range(n))
    for rung in range(config.rungs):
        for c in survivors:
            score(c, rung)
        survivors.sort(key=lambda c: (bracket[c].values.get(rung, math.inf), c))
        if rung < last:
            for c in survivors[sizes[rung + 1] :]:
                prune(c)
            survivors = survivors[: sizes[rung + 1]]
    pick = survivors[0]

    scored_tokens = sum(s * b for s, b in zip(sizes, budgets, strict=True)) * k
    full_tokens = n * config.budget_tokens * k
    stopped = Counter(max(b.values) for b in bracket if b.state == TrialState.PRUNED)
    summary: dict[str, Any] = {
        "candidates": n,
        "eta": config.eta,
        "rungs": config.rungs,
        "budgets": budgets,
        "sizes": sizes,
        "pruned": [stopped.get(r, 0) for r in range(last)],
        "failed": sum(b.state == TrialState.FAIL for b in bracket),
        "scored_tokens": scored_tokens,
        "full_tokens": full_tokens,
        "speedup": full_tokens / scored_tokens,
        "pick": {
            "candidate": pick,
            "number": bracket[pick].number,
            "objective": bracket[pick].values.get(last, math.inf),
            "merge_weights": candidates[pick].tolist(),
        },
        "verified": None,
    }
    if config.halving_verify:
        full_values = {}
        for c in range(n):
            if bracket[c].state == TrialState.COMPLETE:
                full_values[c] = bracket[c].values[last]
            elif c in verified:
                full_values[c] = verified[c]
            else:
                value = worker.score(
                    worker.next_fresh(),
                    candidates[c],
                    kind="halving:verify",
                    budget_tokens=config.budget_tokens,
                    extra={
                        "key": f"halving:{config.worker}:verify:{c}",
                        "halving": {"candidate": c},
                    },
                )
                full_values[c] = value if math.isfinite(value) else math.inf
        full_pick = min(full_values, key=lambda c: (full_values[c], c))
        summary["verified"] = {
            "same_pick": full_pick == pick,
            "full_budget_pick": full_pick,
            "full_budget_objective": full_values[full_pick],
        }
    study.set_user_attr(f"halving:{config.worker}", summary)
    return summary
