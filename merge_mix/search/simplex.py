"""Mixtures on the probability simplex: grids, Dirichlet proposals, caps, encodings.

Pure numpy. A mixture of K domains is an array of shape (K,) (or (n, K) for a batch) with
non-negative entries summing to 1.

Caps bound the *effective data mixture* a merge weight vector stands for,
``r = s * g + (1 - s) * w`` (s = the pool's general_share, g = its general mixture): a cap
c_i on r_i is the merge-weight cap ``w_i <= (c_i - s * g_i) / (1 - s)`` (`Caps`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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
    """Largest share of the training data (of `train_tokens`) each domain can fill without
    repeating its data more than `max_epochs` times: caps on the effective mixture; all ones
    when no training budget is planned."""
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


def mixture_floor(
    effective_mixture: Callable[[np.ndarray], np.ndarray], k: int
) -> tuple[np.ndarray, float]:
    """(floor, scale) of the affine map r = floor + scale * w behind `effective_mixture`
    (floor = s * g, scale = 1 - s), read off at the simplex's vertices: r(e_j)_i = floor_i
    for every j != i."""
    vertices = np.stack([np.asarray(effective_mixture(e), dtype=float) for e in np.eye(k)])
    floor = (vertices.sum(axis=0) - np.diag(vertices)) / (k - 1)
    scale = float(np.mean(np.diag(vertices) - floor))
    return floor, scale


@dataclass(frozen=True)
class Caps:
    """Per-domain caps on the effective data mixture and the merge-weight caps they imply."""

    domains: tuple[str, ...]
    mixture: np.ndarray
    """c_i: the most of domain i's data the effective mixture r may hold."""
    floor: np.ndarray
    """s * g_i: the share of domain i every merge keeps from the components' general data."""
    weights: np.ndarray
    """The merge-weight caps, (c_i - s * g_i) / (1 - s) clipped to [0, 1]."""

    @property
    def binding(self) -> bool:
        """Whether any cap excludes part of the simplex."""
        return bool(np.any(self.weights < 1.0 - 1e-12))

    def project(self, weights: np.ndarray) -> np.ndarray:
        """Weights (or a batch) moved inside the caps by `apply_caps`."""
        return apply_caps(weights, self.weights) if self.binding else np.asarray(weights)

    def admits(self, weights: np.ndarray, tol: float = 1e-9) -> np.ndarray | bool:
        """Whether weights (or each row of a batch) obey every cap."""
        inside = np.all(np.asarray(weights) <= self.weights + tol, axis=-1)
        return bool(inside) if np.ndim(inside) == 0 else inside

    def to_dict(self) -> dict[str, Any]:
        """Plain values for run.json: both spaces and the floor, so a reader can check that
        mixture = floor + (1 - general_share) * merge_weights at each cap."""

        def named(values: np.ndarray) -> dict[str, float]:
            return {d: float(v) for d, v in zip(self.domains, values, strict=True)}

        return {
            "mixture": named(self.mixture),
            "merge_weights": named(self.weights),
            "floor": named(self.floor),
        }


def data_caps(
    domains: Sequence[str],
    available_tokens: np.ndarray,
    train_tokens: int | None,
    max_epochs: float,
    explicit: Mapping[str, float] | None,
    effective_mixture: Callable[[np.ndarray], np.ndarray],
) -> Caps:
    """The caps of a search: the tighter of the repetition caps (`token_caps`) and the
    `explicit` per-domain ones, in effective-mixture space, and the merge-weight caps they
    imply. A cap below the floor s * g_i, or caps that leave no mixture, are errors."""
    domains = list(domains)
    mixture = token_caps(available_tokens, train_tokens, max_epochs)
    for name, cap in (explicit or {}).items():
        if name not in domains:
            raise MergeMixError(
                f"caps: {name!r} is not a domain of this pool ({', '.join(domains)})"
            )
        mixture[domains.index(name)] = min(mixture[domains.index(name)], float(cap))
    if mixture.sum() < 1.0 - 1e-9:
        raise MergeMixError(
            f"caps: they sum to {mixture.sum():.4g} < 1, so no mixture obeys them all; raise one"
        )
    floor, scale = mixture_floor(effective_mixture, len(domains))
    for name, cap, low in zip(domains, mixture, floor, strict=True):
        if cap < low - 1e-12:
            raise MergeMixError(
                f"caps: {name}={cap:.4g} is below {low:.4g}, the share of {name} every merge"
                " keeps from the components' general data (general_share x general mix)"
            )
    weights = np.clip((mixture - floor) / scale, 0.0, 1.0) if scale > 0 else np.ones(len(domains))
    return Caps(tuple(domains), mixture, floor, weights)


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
