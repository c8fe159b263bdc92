"""A scorer with a known optimum, for tests, benchmarks and dry runs of the search.

Each domain's held-out loss follows a planted mixing law of the effective mixture,

    r = general_share / K + (1 - general_share) * w        (components saw general data too)
    loss_d(w) = c_d + k_d * exp(-t_d * r_d)

so the best mixture of any objective over these losses can be found by brute force
(`best_on_grid`). With the defaults, the mean-loss optimum is near (0.2, 0.61, 0.19): inside
the simplex and clearly better than the uniform and natural mixtures. Smaller evaluation budgets add a deterministic, weight-independent bias
(`budget_bias * (full / budget - 1)`, so rankings hold) and optional deterministic noise.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np

from merge_mix.objective import Objective
from merge_mix.search.simplex import simplex_grid


class FakeScorer:
    """Implements `merge_mix.search.Scorer` with closed-form losses; counts its calls."""

    def __init__(
        self,
        domains: Sequence[str] = ("web", "code", "math"),
        c: Sequence[float] = (2.0, 1.2, 1.5),
        k: Sequence[float] = (1.5, 3.2, 1.4),
        t: Sequence[float] = (5.0, 2.0, 5.0),
        natural: Sequence[float] = (0.6, 0.3, 0.1),
        available_tokens: Sequence[float] = (6e9, 3e9, 1e9),
        general_share: float = 0.3,
        full_budget: int = 1_000_000,
        budget_bias: float = 0.0,
        noise: float = 0.0,
        lmeval: bool = False,
    ) -> None:
        self.domains = list(domains)
        self.c, self.k, self.t = (np.asarray(v, dtype=float) for v in (c, k, t))
        self.natural_mixture = np.asarray(natural, dtype=float) / np.sum(natural)
        self.available_tokens = np.asarray(available_tokens, dtype=float)
        self.general_share = general_share
        self.full_budget = full_budget
        self.budget_bias = budget_bias
        self.noise = noise
        self.lmeval = lmeval
        self.calls: list[tuple[tuple[float, ...], int | None]] = []

    def effective_mixture(self, weights: np.ndarray) -> np.ndarray:
        k = len(self.domains)
        return self.general_share / k + (1.0 - self.general_share) * np.asarray(weights)

    def losses(self, weights: np.ndarray) -> np.ndarray:
        """Noise-free full-budget held-out losses; weights may be a batch of shape (n, K)."""
        r = self.effective_mixture(np.asarray(weights, dtype=float))
        return self.c + self.k * np.exp(-self.t * r)

    def score(self, weights: np.ndarray, budget_tokens: int | None = None) -> dict[str, float]:
        w = np.asarray(weights, dtype=float)
        self.calls.append((tuple(np.round(w, 12)), budget_tokens))
        budget = self.full_budget if budget_tokens is None else budget_tokens
        loss = self.losses(w) + self.budget_bias * (self.full_budget / budget - 1.0)
        if self.noise:
            digest = hashlib.sha256(np.round(w, 9).tobytes() + str(budget).encode()).digest()
            rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
            loss = loss + rng.normal(0.0, self.noise * math.sqrt(self.full_budget / budget), len(w))
        metrics: dict[str, float] = {}
        for name, value in zip(self.domains, loss, strict=True):
            metrics[f"heldout/{name}/loss"] = float(value)
            metrics[f"heldout/{name}/ppl"] = float(np.exp(value))
            metrics[f"heldout/{name}/bpb"] = float(value / math.log(2) / 4.0)
            if self.lmeval:
                metrics[f"lmeval/mmx_choice_{name}/acc"] = float(1.0 / (1.0 + value))
        return metrics


def best_on_grid(
    scorer: FakeScorer, objective: Objective, step: float = 0.005
) -> tuple[np.ndarray, float]:
    """The best mixture on a fine simplex grid (K <= 3) and its objective, noise-free."""
    grid = simplex_grid(len(scorer.domains), step)
    losses = scorer.losses(grid)
    metrics = {f"heldout/{d}/loss": losses[:, i] for i, d in enumerate(scorer.domains)}
    baseline = None
    if objective.constraints:
        base = scorer.losses(np.full(len(scorer.domains), 1.0 / len(scorer.domains)))
        baseline = {f"heldout/{d}/loss": float(base[i]) for i, d in enumerate(scorer.domains)}
    values = objective.evaluate(metrics, baseline).value
    best = int(np.argmin(values))
    return grid[best], float(values[best])
