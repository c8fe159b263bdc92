"""Successive halving over the evaluation budget.

Score M candidate mixtures with a small per-domain token budget, keep the best 1/eta, score
those with an eta-times larger budget, and so on up to the full budget (`rungs` levels):

    rung r:  max(1, M // eta^r) candidates  x  budget_tokens // eta^(rungs - 1 - r) tokens

The cost, in scored tokens, is a fraction of scoring all M at full budget; the summary
reports the speed-up and, with `halving_verify`, whether full-budget scoring of every
candidate picks the same mixture. Early rungs are recorded with `full_budget: false` and
never compete for best.json; their objectives only rank candidates within a rung (and any
constraints compare them with the full-budget baseline, which makes them stricter).

Each worker runs its own bracket of M candidates, drawn deterministically from the seed and
worker id, so a restarted worker rebuilds the same bracket and scores only what is missing.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from optuna.trial import TrialState

from merge_mix.errors import MergeMixError
from merge_mix.search.worker import Worker, seed_sequence


def rung_budgets(full_budget: int, eta: int, rungs: int) -> list[int]:
    """Per-domain token budget of each rung, smallest first, the last one `full_budget`."""
    return [full_budget // eta ** (rungs - 1 - r) for r in range(rungs)]


def rung_sizes(n_candidates: int, eta: int, rungs: int) -> list[int]:
    """How many candidates each rung scores."""
    return [max(1, n_candidates // eta**r) for r in range(rungs)]


def _scored(worker: Worker) -> dict[tuple[Any, int], tuple[float, int, list[float]]]:
    """This worker's completed halving trials: (rung or "verify", candidate) ->
    (objective, trial number, merge weights)."""
    done = {}
    for t in worker.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        attrs = t.user_attrs
        if attrs.get("worker") == worker.config.worker and "halving" in attrs:
            position = (attrs["halving"]["rung"], attrs["halving"]["candidate"])
            done.setdefault(position, (t.value, t.number, attrs["merge_weights"]))
    return done


def run_halving(worker: Worker) -> dict[str, Any]:
    """Run (or resume) this worker's bracket; returns the summary also stored in the study's
    user attributes as `halving:<worker>`."""
    config = worker.config
    n = config.n_trials
    k = len(worker.domains)
    rng = np.random.default_rng(seed_sequence(config.seed, config.worker, "halving"))
    candidates = worker.draw(n, rng)
    budgets = rung_budgets(config.budget_tokens, config.eta, config.rungs)
    sizes = rung_sizes(n, config.eta, config.rungs)
    done = _scored(worker)
    for (_, c), (_, number, weights) in done.items():
        if c >= n or not np.allclose(weights, candidates[c], atol=1e-9):
            raise MergeMixError(
                f"halving: trial {number} of worker {config.worker!r} does not match this "
                "config's candidates (changed seed, sampler or n_trials?); use a new worker id"
            )

    def score(c: int, rung: Any, budget: int | None, full: bool) -> None:
        if (rung, c) in done:
            return
        trial = worker.next_fresh()
        kind = "halving:verify" if rung == "verify" else f"halving:rung{rung}"
        value = worker.score(
            trial,
            candidates[c],
            kind=kind,
            budget_tokens=budget,
            full_budget=full,
            extra={
                "key": f"halving:{config.worker}:{rung}:{c}",
                "halving": {"rung": rung, "candidate": c},
            },
        )
        done[(rung, c)] = (value if math.isfinite(value) else math.inf, trial.number, [])

    survivors = list(range(n))
    for rung in range(config.rungs):
        last = rung == config.rungs - 1
        survivors = survivors[: sizes[rung]]
        for c in survivors:
            # The last rung asks for budget_tokens itself, so it matches full-budget trials.
            score(c, rung, config.budget_tokens if last else budgets[rung], last)
        survivors.sort(key=lambda c: (done[(rung, c)][0], c))
    pick = survivors[0]
    pick_value, pick_number, _ = done[(config.rungs - 1, pick)]

    scored_tokens = sum(s * b for s, b in zip(sizes, budgets, strict=True)) * k
    full_tokens = n * config.budget_tokens * k
    summary: dict[str, Any] = {
        "candidates": n,
        "eta": config.eta,
        "rungs": config.rungs,
        "budgets": budgets,
        "sizes": sizes,
        "scored_tokens": scored_tokens,
        "full_tokens": full_tokens,
        "speedup": full_tokens / scored_tokens,
        "pick": {
            "candidate": pick,
            "number": pick_number,
            "objective": pick_value,
            "merge_weights": candidates[pick].tolist(),
        },
        "verified": None,
    }
    if config.halving_verify:
        full_values = {}
        for c in range(n):
            if (config.rungs - 1, c) in done:
                full_values[c] = done[(config.rungs - 1, c)][0]
            else:
                score(c, "verify", config.budget_tokens, True)
                full_values[c] = done[("verify", c)][0]
        full_pick = min(full_values, key=lambda c: (full_values[c], c))
        summary["verified"] = {
            "same_pick": full_pick == pick,
            "full_budget_pick": full_pick,
            "full_budget_objective": full_values[full_pick],
        }
    worker.study.set_user_attr(f"halving:{config.worker}", summary)
    return summary
