"""Surrogate models of metrics over the effective mixture, and the RegMix/DeMix final pick.

Per objective metric, two regressors from the effective mixture r to the metric:
  - the Data Mixing Laws form  L(r) = c + k * exp(sum_j t_j r_j), fitted by robust (Huber)
    least squares from several seeded starts;
  - a Gaussian-process / kernel-ridge regressor with an RBF kernel, its length scale and
    noise chosen by closed-form leave-one-out error.
Each is scored by the Spearman correlation of its out-of-fold predictions (k-fold), and the
better one predicts that metric for many simulated candidate mixtures (half around the prior,
half around the best scored mixtures). The candidates with the best predicted objective are
averaged (top-k) into the pick, which the caller scores for real.

Because a mixture sums to 1, t is identified only up to a shared shift (absorbed by k);
`MixingLaw` reports the gauge with mean(t) = 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from merge_mix.objective import Objective
from merge_mix.search.simplex import apply_caps

_LENGTHSCALES = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)
_NOISES = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1)
_MAX_KERNEL_POINTS = 1000
ANCHORS = 8
LOCAL_STRENGTH = (20.0, 200.0)


@dataclass(frozen=True)
class MixingLaw:
    """L(r) = c + k * exp(t . r), in the gauge mean(t) = 0."""

    c: float
    k: float
    t: np.ndarray

    def predict(self, r: np.ndarray) -> np.ndarray:
        """Predicted metric for effective mixtures r of shape (n, K)."""
        exponent = np.clip(np.atleast_2d(r) @ self.t, -700, 700)
        return self.c + self.k * np.exp(exponent)


def fit_mixing_law(r: np.ndarray, y: np.ndarray, seed: int = 0, restarts: int = 4) -> MixingLaw:
    """Fit L(r) = c + k * exp(t . r) by Huber least squares from `restarts` seeded starts."""
    from scipy.optimize import least_squares

    r = np.asarray(r, dtype=float)
    y = np.asarray(y, dtype=float)
    mean, scale = float(y.mean()), float(y.std()) or 1.0
    yn = (y - mean) / scale
    k_dim = r.shape[1]
    rng = np.random.default_rng(seed)

    def residuals(p: np.ndarray) -> np.ndarray:
        return p[0] + p[1] * np.exp(np.clip(r @ p[2:], -50, 50)) - yn

    best = None
    for attempt in range(restarts):
        t0 = np.zeros(k_dim) if attempt == 0 else rng.normal(0.0, 2.0, k_dim)
        c0 = yn.min() - rng.uniform(0.0, 1.0)
        basis = np.exp(r @ t0)
        k0 = float(np.dot(basis, yn - c0) / max(np.dot(basis, basis), 1e-12))
        fit = least_squares(
            residuals,
            np.concatenate([[c0, k0], t0]),
            loss="huber",
            f_scale=0.5,
            bounds=(
                np.concatenate([[-np.inf, -np.inf], np.full(k_dim, -30.0)]),
                np.concatenate([[np.inf, np.inf], np.full(k_dim, 30.0)]),
            ),
        )
        if best is None or fit.cost < best.cost:
            best = fit
    c, k, t = best.x[0], best.x[1], best.x[2:]
    shift = t.mean()
    return MixingLaw(
        c=mean + scale * c, k=scale * k * float(np.exp(shift)), t=np.asarray(t - shift)
    )


@dataclass(frozen=True)
class KernelRegressor:
    """Gaussian-process mean with an RBF kernel and a constant prior mean."""

    x: np.ndarray
    alpha: np.ndarray
    lengthscale: float
    noise: float
    mean: float
    scale: float

    def predict(self, r: np.ndarray, chunk: int = 8192) -> np.ndarray:
        """Predicted metric for effective mixtures r of shape (n, K), in chunks."""
        r = np.atleast_2d(r)
        out = np.empty(len(r))
        for start in range(0, len(r), chunk):
            kx = _rbf(r[start : start + chunk], self.x, self.lengthscale)
            out[start : start + chunk] = self.mean + self.scale * (kx @ self.alpha)
        return out


def _rbf(a: np.ndarray, b: np.ndarray, lengthscale: float) -> np.ndarray:
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.exp(-np.maximum(sq, 0.0) / (2.0 * lengthscale**2))


def fit_kernel(r: np.ndarray, y: np.ndarray, seed: int = 0) -> KernelRegressor:
    """Fit the RBF regressor; length scale and noise minimise the leave-one-out error."""
    r = np.asarray(r, dtype=float)
    y = np.asarray(y, dtype=float)
    mean, scale = float(y.mean()), float(y.std()) or 1.0
    yn = (y - mean) / scale
    select = np.arange(len(r))
    if len(r) > _MAX_KERNEL_POINTS:
        select = np.random.default_rng(seed).choice(len(r), _MAX_KERNEL_POINTS, replace=False)
    best = (np.inf, _LENGTHSCALES[0], _NOISES[-1])
    for lengthscale in _LENGTHSCALES:
        gram = _rbf(r[select], r[select], lengthscale)
        for noise in _NOISES:
            # inv, not eigh/pinv: small symmetric eigensolvers are pathologically slow in
            # some OpenBLAS builds under load, and the noise term keeps this well posed.
            inv = np.linalg.inv(gram + noise * np.eye(len(select)))
            loo = (inv @ yn[select]) / np.diag(inv)
            error = float(np.mean(loo**2))
            if error < best[0]:
                best = (error, lengthscale, noise)
    _, lengthscale, noise = best
    gram = _rbf(r, r, lengthscale) + noise * np.eye(len(r))
    alpha = np.linalg.solve(gram, yn)
    return KernelRegressor(r, alpha, lengthscale, noise, mean, scale)


def _ranks(a: np.ndarray) -> np.ndarray:
    """Ranks from 0, ties sharing their average rank."""
    order = np.argsort(a, kind="stable")
    ranks = np.empty(len(a))
    ranks[order] = np.arange(len(a))
    _, inverse, counts = np.unique(a, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=ranks) / counts)[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (Pearson of average ranks); 0 when either side is constant."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


def cross_val_spearman(
    fit: Callable[[np.ndarray, np.ndarray], Any],
    r: np.ndarray,
    y: np.ndarray,
    folds: int = 5,
    seed: int = 0,
) -> float:
    """Spearman correlation between y and out-of-fold predictions of k-fold cross-validation."""
    order = np.random.default_rng(seed).permutation(len(y))
    predicted = np.empty(len(y))
    for held_out in np.array_split(order, min(folds, len(y))):
        train = np.setdiff1d(order, held_out)
        predicted[held_out] = fit(r[train], y[train]).predict(r[held_out])
    return spearman(predicted, y)


@dataclass(frozen=True)
class MetricModel:
    """The chosen surrogate of one metric, with both candidates' held-out Spearman."""

    metric: str
    model: MixingLaw | KernelRegressor
    spearman: dict[str, float]

    @property
    def chosen(self) -> str:
        """Which regressor won: "mixing_law" or "kernel"."""
        return "mixing_law" if isinstance(self.model, MixingLaw) else "kernel"

    def summary(self) -> dict[str, Any]:
        """JSON-ready: the chosen model, both Spearmans, and the law's parameters if chosen."""
        out: dict[str, Any] = {"chosen": self.chosen, "spearman": self.spearman}
        if isinstance(self.model, MixingLaw):
            out["law"] = {"c": self.model.c, "k": self.model.k, "t": self.model.t.tolist()}
        return out


def fit_metric(metric: str, r: np.ndarray, y: np.ndarray, folds: int, seed: int) -> MetricModel:
    """Cross-validate both regressors on (r, y), refit the better one on all of it."""
    law = partial(fit_mixing_law, seed=seed)
    kernel = partial(fit_kernel, seed=seed)
    scores = {
        "mixing_law": cross_val_spearman(law, r, y, folds, seed),
        "kernel": cross_val_spearman(kernel, r, y, folds, seed),
    }
    fit = law if scores["mixing_law"] >= scores["kernel"] else kernel
    return MetricModel(metric, fit(r, y), scores)


def effective_mixtures(
    effective_mixture: Callable[[np.ndarray], np.ndarray], weights: np.ndarray
) -> np.ndarray:
    """effective_mixture applied to each row; one matrix product when the map is linear on
    the simplex (checked on a few rows), which it is for the usual recipes."""
    k = weights.shape[1]
    basis = np.stack([np.asarray(effective_mixture(e), dtype=float) for e in np.eye(k)])
    probe = weights[: min(8, len(weights))]
    exact = np.stack([np.asarray(effective_mixture(w), dtype=float) for w in probe])
    if np.allclose(probe @ basis, exact, rtol=0, atol=1e-9):
        return weights @ basis
    return np.stack([np.asarray(effective_mixture(w), dtype=float) for w in weights])


@dataclass(frozen=True)
class SurrogatePick:
    """The averaged top-k mixture, its predicted objective, and the fits behind it."""

    weights: np.ndarray
    predicted_objective: float
    models: dict[str, MetricModel]
    n_candidates: int
    top_k: int

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary, stored on the surrogate trial and in best.json."""
        return {
            "predicted_objective": self.predicted_objective,
            "candidates": self.n_candidates,
            "top_k": self.top_k,
            "fits": {name: m.summary() for name, m in self.models.items()},
        }


def surrogate_pick(
    objective: Objective,
    mixtures: np.ndarray,
    metrics: Sequence[Mapping[str, float]],
    candidates: np.ndarray,
    effective_mixture: Callable[[np.ndarray], np.ndarray],
    baseline: Mapping[str, float] | None = None,
    top_k: int = 128,
    folds: int = 5,
    seed: int = 0,
    caps: np.ndarray | None = None,
) -> SurrogatePick:
    """Fit every objective metric over the scored effective `mixtures`, predict them for the
    candidate merge weights, and average the `top_k` candidates with the best objective
    (projected onto the merge-weight `caps`, if any, as the candidates should be)."""
    keys = objective.relevant_keys(list(metrics[0]))
    models = {}
    for key in keys:
        y = np.array([m[key] for m in metrics], dtype=float)
        models[key] = fit_metric(key, mixtures, y, folds, seed)
    candidate_mixtures = effective_mixtures(effective_mixture, candidates)
    predicted = {key: model.model.predict(candidate_mixtures) for key, model in models.items()}
    values = np.asarray(objective.evaluate(predicted, baseline).value, dtype=float)
    values = np.where(np.isfinite(values), values, np.inf)
    top = np.argsort(values, kind="stable")[:top_k]
    weights = candidates[top].mean(axis=0)
    weights = weights / weights.sum()
    if caps is not None:
        # An average of capped candidates is capped; this only absorbs rounding.
        weights = apply_caps(weights, caps)
    pick_mixture = effective_mixtures(effective_mixture, weights[None, :])
    pick_metrics = {key: m.model.predict(pick_mixture) for key, m in models.items()}
    predicted_objective = float(objective.evaluate(pick_metrics, baseline).value[0])
    return SurrogatePick(weights, predicted_objective, models, len(candidates), len(top))


def candidate_pool(
    rng: np.random.Generator,
    n: int,
    prior: np.ndarray,
    strength: tuple[float, float],
    anchors: np.ndarray,
    caps: np.ndarray | None = None,
    min_weight: float = 0.0,
) -> np.ndarray:
    """n candidate mixtures: half drawn around the prior as RegMix/DeMix do, half drawn
    tightly (concentration 20-200) around the best scored mixtures (`anchors`), so the pick
    can also refine a small good region the global draws rarely land in (e.g. the feasible
    set of a constrained objective)."""
    from merge_mix.search.simplex import dirichlet_candidates

    n_local = n // 2 if len(anchors) else 0
    global_draws = dirichlet_candidates(rng, n - n_local, prior, strength, caps, min_weight)
    if not n_local:
        return global_draws
    parts = [global_draws]
    for i, chunk in enumerate(np.array_split(np.arange(n_local), len(anchors))):
        parts.append(
            dirichlet_candidates(rng, len(chunk), anchors[i], LOCAL_STRENGTH, caps, min_weight)
        )
    return np.concatenate(parts)


def run_surrogate(worker: Any) -> dict[str, Any]:
    """Fit the surrogate on the study's full-budget trials, score its pick for real as a
    `surrogate:topk` trial of this worker, and return the summary (also on the trial).

    Skipped (with a reason) when too few trials are scored, and not repeated when this worker
    already scored a pick fitted on the same trials (a resumed, finished run)."""
    from optuna.trial import TrialState

    from merge_mix.search.study import trial_rows
    from merge_mix.search.worker import seed_sequence

    config, study, domains = worker.config, worker.study, worker.domains
    rows = [
        r for r in trial_rows(study) if r["full_budget"] and not r["kind"].startswith("surrogate:")
    ]
    key = f"surrogate:{config.worker}:{len(rows)}"
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.user_attrs.get("key") == key:
            return {**t.user_attrs.get("surrogate", {}), "number": t.number, "objective": t.value}
    minimum = max(config.folds, len(domains) + 3)
    if len(rows) < minimum:
        return {"skipped": f"needs at least {minimum} full-budget trials, has {len(rows)}"}

    shared = set.intersection(
        *({k for k, v in r["metrics"].items() if v is not None} for r in rows)
    )
    metrics = [{k: v for k, v in r["metrics"].items() if k in shared} for r in rows]
    mixtures = np.array([[r["effective_mixture"][d] for d in domains] for r in rows])
    rng = np.random.default_rng(seed_sequence(config.seed, config.worker, "surrogate", len(rows)))
    ranked = sorted(rows, key=lambda r: (not r["feasible"], r["objective"]))
    anchors = np.array([[r["merge_weights"][d] for d in domains] for r in ranked[:ANCHORS]])
    candidates = candidate_pool(
        rng,
        config.surrogate_candidates,
        worker.prior,
        config.strength,
        anchors,
        worker.caps.weights,
        config.min_weight,
    )
    baseline = worker.baseline_for("surrogate:topk", True, {})
    pick = surrogate_pick(
        worker.objective,
        mixtures,
        metrics,
        candidates,
        worker.scorer.effective_mixture,
        baseline=baseline,
        top_k=config.top_k,
        folds=config.folds,
        seed=config.seed,
        caps=worker.caps.weights,
    )
    summary = {**pick.summary(), "fitted_on": len(rows)}
    trial = worker.next_fresh()
    value = worker.score(
        trial,
        pick.weights,
        "surrogate:topk",
        config.budget_tokens,
        extra={"key": key, "surrogate": summary, "predicted_objective": pick.predicted_objective},
    )
    return {**summary, "number": trial.number, "objective": value}
