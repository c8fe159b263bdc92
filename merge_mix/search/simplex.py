"""Mixtures on the probability simplex: grids, Dirichlet proposals, token caps, encodings.

Pure numpy. A mixture of K domains is an array of shape (K,) (or (n, K) for a batch) with
non-negative entries summing to 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from merge_mix.errors import MergeMixError

# Lower bound of the unit-cube parameters u_i; -log(U_LOW) ~ 23 bounds how lopsided a
# TPE/CMA-ES proposal can get before normalisation.
U_LOW = 1e-10


def uniform(k: int) -> np.ndarray:
    """The uniform mixture over k domains."""
    return np.full(k, 1.0 / k)


def normalise(weights: np.ndarray | Sequence[float], where: str = "weights") -> np.ndarray:
    """Check that weights are finite, non-negative and not all zero; return them summing to 1."""
    w = np.asarray(weights, dtype=float)
    if w.ndim != 1 or w.size == 0:
        raise MergeMixError(f"{where}: expected a non-empty vector, got shape {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise MergeMixError(f"{where}: must be finite, non-negative and not all zero: {w}")
    return w / w.sum()


def simplex_grid(k: int, step: float) -> np.ndarray:
    """All mixtures of k <= 3 domains whose weights are multiples of `step` (1/step integer)."""
    if k > 3:
        raise MergeMixError(
            f"sampler: grid covers at most 3 domains (this pool has {k}); "
            "use dirichlet, tpe, cmaes or random"
        )
    n = round(1.0 / step)
    if not 0 < step <= 1 or abs(n * step - 1.0) > 1e-9:
        raise MergeMixError(f"grid_step: {step} must divide 1 into a whole number of steps")
    if k == 1:
        return np.ones((1, 1))
    if k == 2:
        return np.array([[i / n, (n - i) / n] for i in range(n + 1)])
    return np.array(
        [[i / n, j / n, (n - i - j) / n] for i in range(n + 1) for j in range(n + 1 - i)]
    )


def from_unit_cube(u: np.ndarray) -> np.ndarray:
    """Optuna's simplex recipe: x_i = -log(u_i), p = x / sum(x); uniform u gives Dirichlet(1)."""
    x = np.maximum(-np.log(np.clip(np.asarray(u, dtype=float), U_LOW, 1.0)), 0.0)
    total = x.sum()
    return x / total if total > 0 else uniform(len(x))


def to_unit_cube(weights: np.ndarray) -> np.ndarray:
    """A point u with from_unit_cube(u) == weights (x = K * weights, the typical scale)."""
    w = np.asarray(weights, dtype=float)
    return np.clip(np.exp(-len(w) * w), U_LOW, 1.0)


def dirichlet_prior(natural: np.ndarray, temperature: float) -> np.ndarray:
    """The proposal centre natural ** temperature, renormalised (0 flattens it to uniform)."""
    prior = np.power(np.clip(np.asarray(natural, dtype=float), 1e-12, None), temperature)
    return prior / prior.sum()


def token_caps(
    available_tokens: np.ndarray, train_tokens: int | None, max_epochs: float
) -> np.ndarray:
    """Largest share of `train_tokens` each domain can fill without repeating its data more
    than `max_epochs` times; all ones when no training budget is planned."""
    available = np.asarray(available_tokens, dtype=float)
    if train_tokens is None:
        return np.ones_like(available)
    caps = np.minimum(available * max_epochs / float(train_tokens), 1.0)
    if caps.sum() < 1.0 - 1e-9:
        raise MergeMixError(
            f"max_epochs: {max_epochs} epochs of the available data cover only "
            f"{caps.sum():.1%} of train_tokens={train_tokens}; raise max_epochs or lower "
            "train_tokens"
        )
    return caps


def apply_caps(weights: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """Clip each weight to its cap and hand the excess to the uncapped domains in proportion
    to their weights (water-filling); rows of a batch are handled independently."""
    w = np.array(weights, dtype=float, ndmin=2)
    caps = np.broadcast_to(caps, w.shape)
    for _ in range(w.shape[1] + 1):
        over = w > caps + 1e-12
        if not over.any():
            break
        excess = np.where(over, w - caps, 0.0).sum(axis=1, keepdims=True)
        w = np.minimum(w, caps)
        room = caps - w
        free = room > 1e-12
        share = np.where(free, w, 0.0)
        # A row whose free domains all have weight 0 spreads the excess by remaining room.
        share = np.where(share.sum(axis=1, keepdims=True) > 0, share, np.where(free, room, 0.0))
        w = w + excess * share / np.maximum(share.sum(axis=1, keepdims=True), 1e-300)
    return w[0] if np.ndim(weights) == 1 else w


def apply_min_weight(weights: np.ndarray, min_weight: float) -> np.ndarray:
    """Zero the weights below `min_weight` and renormalise (each row keeps its largest)."""
    w = np.array(weights, dtype=float, ndmin=2)
    keep = (w >= min_weight) | (w == w.max(axis=1, keepdims=True))
    w = np.where(keep, w, 0.0)
    w = w / w.sum(axis=1, keepdims=True)
    return w[0] if np.ndim(weights) == 1 else w


def dirichlet_candidates(
    rng: np.random.Generator,
    n: int,
    prior: np.ndarray,
    strength: tuple[float, float],
    caps: np.ndarray | None = None,
    min_weight: float = 0.0,
) -> np.ndarray:
    """n mixtures drawn RegMix/DeMix style: Dirichlet(s * prior) with s log-uniform in
    `strength`, then small weights dropped and token caps applied. Shape (n, K)."""
    low, high = strength
    s = np.exp(rng.uniform(math.log(low), math.log(high), size=(n, 1)))
    alpha = np.maximum(s * prior, 1e-3)
    # Dirichlet via normalised gammas: vectorised over rows with different concentrations.
    g = rng.gamma(alpha)
    zero = g.sum(axis=1) <= 0
    g[zero] = prior
    w = g / g.sum(axis=1, keepdims=True)
    for _ in range(3):
        if min_weight > 0:
            w = apply_min_weight(w, min_weight)
        if caps is not None:
            w = apply_caps(w, caps)
    return w


def is_near(weights: np.ndarray, others: np.ndarray, tol: float) -> bool:
    """Whether `weights` lies within `tol` (max-abs distance) of any row of `others`."""
    if len(others) == 0:
        return False
    return bool(np.any(np.max(np.abs(np.asarray(others) - weights), axis=1) < tol))
