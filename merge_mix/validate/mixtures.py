"""The mixtures a validation trains references on: from a file, a search run, or the defaults.

A mixture is ``(label, merge_weights)``: merge weights on the simplex, aligned with the pool's
domains. Its effective data mixture (what a reference model is trained on) follows from the
pool (`merge_mix.merge.effective_mixture`).

Mixtures file (JSON or YAML): a list, or a mapping with a ``mixtures`` list, of entries ::

    - label: code-heavy              # optional; default "mixture-<n>"
      weights: {code: 0.6, c: 0.2, prose: 0.2}     # merge weights, sum 1
    - mixture: {code: 0.5, c: 0.25, prose: 0.25}  # or an effective data mixture, sum 1

Each entry has exactly one of ``weights`` and ``mixture``; domains left out get 0. Values must
be finite, non-negative and sum to 1 (within 1e-3, then normalised exactly): weights off the
simplex are refused, never silently rescaled. A data mixture must be reachable with
non-negative weights (every domain at least ``general_share x general mix``).

Default set (`default_mixtures`): the search's picks (if a run directory is given), uniform,
natural token proportions, each pure component, then flat Dirichlet draws (seeded) up to N in
total; duplicates (the same effective mixture) are dropped, the first label kept.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from merge_mix.errors import MergeMixError
from merge_mix.merge import mixture_to_weights

MIN_MIXTURES = 4
"""Fewest mixtures a validation takes: leave-one-out calibration fits on n - 1 >= 3."""
SIMPLEX_TOL = 1e-3
"""How far from 1 a file's weights may sum (hand-written thirds) before they are refused."""

Mixtures = list[tuple[str, np.ndarray]]


def mixture_key(weights: np.ndarray) -> tuple[float, ...]:
    """Weights rounded so that two spellings of one mixture compare equal."""
    return tuple(np.round(np.asarray(weights, dtype=np.float64), 6).tolist())


def check_mixtures(mixtures: Sequence[tuple[str, Any]], domains: Sequence[str]) -> Mixtures:
    """Checked (label, weights) pairs: K finite non-negative weights summing to 1, unique
    labels; mixtures equal to an earlier one are dropped. Raises a one-line MergeMixError."""
    out: Mixtures = []
    seen: set[tuple[float, ...]] = set()
    labels: set[str] = set()
    for label, weights in mixtures:
        label = str(label)
        if label in labels:
            raise MergeMixError(f"mixtures: label {label!r} is used twice")
        labels.add(label)
        w = _on_simplex(np.asarray(weights, dtype=np.float64).reshape(-1), domains, label)
        key = mixture_key(w)
        if key not in seen:
            seen.add(key)
            out.append((label, w))
    if len(out) < MIN_MIXTURES:
        raise MergeMixError(
            f"mixtures: {len(out)} distinct mixtures given; validation needs at least"
            f" {MIN_MIXTURES} (leave-one-out calibration fits on all but one)"
        )
    return out


def _on_simplex(w: np.ndarray, domains: Sequence[str], where: str) -> np.ndarray:
    if len(w) != len(domains):
        raise MergeMixError(
            f"{where}: {len(w)} weights for {len(domains)} domains ({', '.join(domains)})"
        )
    if not np.all(np.isfinite(w)):
        raise MergeMixError(f"{where}: weights must be finite numbers, got {w.tolist()}")
    if (w < 0).any():
        bad = domains[int(np.flatnonzero(w < 0)[0])]
        raise MergeMixError(
            f"{where}: weight of {bad} is negative; weights must lie on the simplex"
        )
    if abs(w.sum() - 1.0) > SIMPLEX_TOL:
        raise MergeMixError(
            f"{where}: weights sum to {w.sum():.6g}, not 1; weights must lie on the simplex"
        )
    return w / w.sum()


def load_mixtures(
    path: str | Path, domains: Sequence[str], general_share: float, general: np.ndarray
) -> Mixtures:
    """Read a mixtures file (format in the module docstring) into checked (label, weights)."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())  # YAML is a superset of JSON
    except OSError as exc:
        raise MergeMixError(f"{path}: cannot read mixtures file ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        raise MergeMixError(f"{path}: not valid JSON or YAML{at}") from None
    if isinstance(raw, dict) and set(raw) == {"mixtures"}:
        raw = raw["mixtures"]
    if not isinstance(raw, list):
        raise MergeMixError(
            f"{path}: expected a list of {{label, weights}} or {{label, mixture}} entries"
        )
    out = []
    for i, entry in enumerate(raw):
        where = f"{path}: mixtures[{i}]"
        if not isinstance(entry, dict):
            raise MergeMixError(f"{where}: expected a mapping with 'weights' or 'mixture'")
        extra = sorted(set(entry) - {"label", "weights", "mixture"})
        if extra:
            raise MergeMixError(f"{where}.{extra[0]}: unknown key (known: label, weights, mixture)")
        kinds = [k for k in ("weights", "mixture") if k in entry]
        if len(kinds) != 1:
            raise MergeMixError(f"{where}: give exactly one of 'weights' and 'mixture'")
        kind = kinds[0]
        values = _domain_values(entry[kind], domains, f"{where}.{kind}")
        label = str(entry.get("label", f"mixture-{i + 1}"))
        if kind == "weights":
            out.append((label, _on_simplex(values, domains, f"{where}.weights")))
            continue
        mixture = _on_simplex(values, domains, f"{where}.mixture")
        try:
            weights = mixture_to_weights(mixture, general_share, general, list(domains))
        except MergeMixError as exc:
            raise MergeMixError(f"{where}.{exc}") from None
        out.append((label, weights / weights.sum()))
    try:
        return check_mixtures(out, domains)
    except MergeMixError as exc:
        raise MergeMixError(f"{path}: {exc}") from None


def _domain_values(raw: Any, domains: Sequence[str], where: str) -> np.ndarray:
    if not isinstance(raw, dict) or not raw:
        raise MergeMixError(f"{where}: expected a mapping domain -> number")
    unknown = [d for d in raw if d not in domains]
    if unknown:
        raise MergeMixError(
            f"{where}.{unknown[0]}: not a domain of the pool (domains: {', '.join(domains)})"
        )
    values = []
    for d in domains:
        v = raw.get(d, 0.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise MergeMixError(f"{where}.{d}: {v!r} is not a finite number")
        values.append(float(v))
    return np.array(values)


def search_picks(run_dir: str | Path, domains: Sequence[str], top: int = 3) -> Mixtures:
    """Up to `top` mixtures a search recommends: best.json first, then the best full-budget
    feasible trials of trials.jsonl (baselines excluded: the default set has them anyway).
    Empty if the run directory holds neither file."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MergeMixError(f"{run_dir}: search run directory not found")
    picks: Mixtures = []
    best_path, trials_path = run_dir / "best.json", run_dir / "trials.jsonl"
    try:
        if best_path.is_file():
            best = json.loads(best_path.read_text())
            _same_domains(best["domains"], domains, best_path)
            picks.append(("search:best", _weights_of(best["merge_weights"], domains, best_path)))
        rows = []
        if trials_path.is_file():
            rows = [json.loads(line) for line in trials_path.read_text().splitlines() if line]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise MergeMixError(f"{run_dir}: malformed search results ({exc})") from None
    ranked = sorted(
        (
            r
            for r in rows
            if r.get("full_budget", True)
            and r.get("feasible", True)
            and isinstance(r.get("objective"), (int, float))
            and math.isfinite(r["objective"])
            and not str(r.get("kind", "")).startswith("baseline:")
        ),
        key=lambda r: (r["objective"], r["number"]),
    )
    seen = {mixture_key(w) for _, w in picks}
    for r in ranked:
        if len(picks) >= top:
            break
        w = _weights_of(r["merge_weights"], domains, trials_path)
        if mixture_key(w) not in seen:
            seen.add(mixture_key(w))
            picks.append((f"search:#{r['number']}", w))
    return picks[:top]


def _same_domains(found: Sequence[str], domains: Sequence[str], where: Path) -> None:
    if sorted(found) != sorted(domains):
        raise MergeMixError(
            f"{where}: searched domains {list(found)} are not the pool's ({list(domains)})"
        )


def _weights_of(raw: Any, domains: Sequence[str], where: Path) -> np.ndarray:
    if isinstance(raw, dict):
        _same_domains(list(raw), domains, where)
        raw = [raw[d] for d in domains]
    return _on_simplex(np.asarray(raw, dtype=np.float64), domains, str(where))


def default_mixtures(
    domains: Sequence[str],
    natural: np.ndarray,
    n: int,
    seed: int = 0,
    picks: Mixtures = (),
) -> Mixtures:
    """`picks`, uniform, natural, each pure component, then Dirichlet(1) draws: `n` in all
    (the fixed ones first, cut at `n`), distinct."""
    if n < MIN_MIXTURES:
        raise MergeMixError(f"n_references: {n} is too few; validation needs at least 4")
    k = len(domains)
    fixed = list(picks) + [("uniform", np.full(k, 1.0 / k)), ("natural", np.asarray(natural))]
    fixed += [(f"pure:{d}", np.eye(k)[i]) for i, d in enumerate(domains)]
    out: Mixtures = []
    seen: set[tuple[float, ...]] = set()
    for label, w in fixed:
        if len(out) < n and mixture_key(w) not in seen:
            seen.add(mixture_key(w))
            out.append((label, np.asarray(w, dtype=np.float64)))
    rng = np.random.default_rng(seed)
    draws = 0
    while len(out) < n:
        draws += 1
        if draws > 100 * n:  # only reachable with K = 1, where every draw is the same point
            raise MergeMixError(f"cannot draw {n} distinct mixtures over {k} domain(s)")
        # Rounded so the mixture written to validation.json is the one trained on.
        w = np.round(rng.dirichlet(np.ones(k)), 6)
        w[-1] = 1.0 - w[:-1].sum()
        if (w < 0).any() or mixture_key(w) in seen:
            continue
        seen.add(mixture_key(w))
        out.append((f"dirichlet:{len(out) + 1}", w))
    return out
