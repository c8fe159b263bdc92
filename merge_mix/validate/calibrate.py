"""Calibrated proxies as the scorer uses them, the pool's calibration.json, and drift.

`load_calibration(pool_dir)` returns a `ProxyCalibration` whose ``apply(weights, metrics)``
turns a proxy's metrics into calibrated ones (``proxy - fitted gap(w)``), under new keys:

    calibrated/<domain>/loss    per-domain held-out loss
    calibrated/mean/loss        mean held-out loss over domains
    calibrated/worst/loss       worst domain's held-out loss

All keys follow the ``<source>/<name>/<metric>`` scheme of objective terms (source
``calibrated``). The aggregates have their own fitted gaps (the ones whose leave-one-out
fidelity validation reports), so ``calibrated/mean/loss`` is not exactly the mean of the
per-domain values.

calibration.json (format ``merge-mix-calibration``) holds the fit (`fidelity.Calibration`
``to_dict``), the references it was fitted on, the evaluator settings (held-out tokens,
keep_base), the component hashes it is valid for, each component's drift from the base and
whether raw fidelity held at that drift. `drift_warning` compares a pool's drift against
the drift at which validations saw fidelity hold.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from merge_mix.artifacts import read_json
from merge_mix.errors import MergeMixError
from merge_mix.fidelity import (
    MEAN_TARGET,
    OBJECTIVE_TARGET,
    WORST_TARGET,
    Calibration,
    relative_drift,
)

FORMAT = "merge-mix-calibration"
FORMAT_VERSION = 1
CALIBRATION = "calibration.json"
FIDELITY_HOLDS = 0.8
"""Raw Spearman, on the mean loss over domains and macro over domains, at or above which
validation calls proxy fidelity "holding" (DeMix reports a macro 0.81)."""


def loss_key(domain: str) -> str:
    return f"heldout/{domain}/loss"


def calibrated_key(target: str) -> str:
    """The metric name a calibrated target is reported under (a validation's objective
    target, computed from calibrated losses, is ``calibrated/objective``)."""
    if target == OBJECTIVE_TARGET:
        return "calibrated/objective"
    if target.startswith("heldout/"):
        return "calibrated/" + target.removeprefix("heldout/")
    return f"calibrated/{target.removesuffix('_loss')}/loss"


@dataclass(frozen=True)
class ProxyCalibration:
    """A pool's fitted calibration, applied to a proxy's metrics by `ProxyScorer`."""

    calibration: Calibration
    path: Path
    heldout_tokens: int | None
    """The per-domain held-out budget the gaps were measured with."""
    keep_base: tuple[str, ...]
    """The merge rule's keep-base patterns the gaps were measured with."""
    record: dict[str, Any] = field(repr=False, default_factory=dict)
    """The whole calibration.json."""

    @property
    def domains(self) -> tuple[str, ...]:
        return self.calibration.domains

    def apply(self, weights: Any, metrics: Mapping[str, float]) -> dict[str, float]:
        """Calibrated metrics (keys in the module docstring) for one mixture's merge weights
        and its proxy metrics. Targets whose proxy metrics are missing are left out."""
        w = np.asarray(weights, dtype=np.float64)
        if (
            w.shape != (len(self.domains),)
            or not np.all(np.isfinite(w))
            or (w < -1e-9).any()
            or abs(w.sum() - 1.0) > 1e-6
        ):
            raise MergeMixError(
                f"calibration: merge weights {np.round(w, 6).tolist()} are not on the simplex"
                f" over {list(self.domains)}; calibrated proxies are defined there only"
            )
        proxy = {
            loss_key(d): float(metrics[loss_key(d)]) for d in self.domains if loss_key(d) in metrics
        }
        if len(proxy) == len(self.domains):
            losses = list(proxy.values())
            proxy[MEAN_TARGET] = float(np.mean(losses))
            proxy[WORST_TARGET] = float(np.max(losses))
        proxy = {t: v for t, v in proxy.items() if t in self.calibration.gaps}
        return {calibrated_key(t): float(v) for t, v in self.calibration.apply(w, proxy).items()}


def load_calibration(
    pool_dir: str | Path,
    path: str | Path | None = None,
    keep_base: Sequence[str] | None = None,
) -> ProxyCalibration:
    """The calibration of the pool in `pool_dir` (``<pool>/calibration.json`` unless `path`
    names another file, e.g. a validation's own). Refused with a one-line MergeMixError when
    missing, malformed, fitted for other components, or (when `keep_base` is given) for
    another merge rule."""
    from merge_mix.pool import Pool

    pool = Pool.open(pool_dir)
    path = Path(path) if path is not None else pool.path / CALIBRATION
    if not path.is_file():
        raise MergeMixError(f"{path}: no calibration; run `merge-mix validate {pool.path}` first")
    try:
        record = read_json(path)
    except (OSError, ValueError) as exc:
        raise MergeMixError(f"{path}: unreadable calibration ({exc})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise MergeMixError(f"{path}: not a merge-mix calibration file")
    try:
        calibration = Calibration.from_dict(record["calibration"])
    except KeyError:
        raise MergeMixError(f"{path}: calibration data is missing") from None
    except MergeMixError as exc:
        raise MergeMixError(f"{path}: {exc}") from None
    if list(calibration.domains) != pool.domains:
        raise MergeMixError(
            f"{path}: fitted for domains {list(calibration.domains)}, the pool has"
            f" {pool.domains}; run `merge-mix validate {pool.path}` again"
        )
    recorded = record.get("components_sha256", {})
    for d in pool.domains:
        if recorded.get(d) != pool.manifest["components"][d].get("sha256"):
            raise MergeMixError(
                f"{path}: component {d!r} changed since the calibration was fitted;"
                f" run `merge-mix validate {pool.path}` again"
            )
    fitted_keep = tuple(record.get("keep_base", ()))
    if keep_base is not None and tuple(keep_base) != fitted_keep:
        raise MergeMixError(
            f"{path}: fitted with keep_base {list(fitted_keep)}, not {list(keep_base)}; the"
            " gap depends on the merge rule, so validate with the same --keep-base"
        )
    return ProxyCalibration(calibration, path, record.get("heldout_tokens"), fitted_keep, record)


# --- drift -----------------------------------------------------------------------------------


def component_drift(base_dir: Path, component_dir: Path) -> float:
    """Relative weight distance ``||theta_c - theta_base|| / ||theta_base||`` over every
    tensor in the safetensors files, read one tensor at a time."""
    from safetensors import safe_open

    def index(path: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(path.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as fh:
                out.update({name: f for name in fh.keys()})
        if not out:
            raise MergeMixError(f"{path}: no .safetensors weights")
        return out

    base, comp = index(base_dir), index(component_dir)
    only = sorted(set(base) ^ set(comp))
    if only:
        raise MergeMixError(f"{component_dir}: tensor {only[0]} is in only one of it and the base")
    names = sorted(base)

    def tensors(files: dict[str, Path]):
        for name in names:
            with safe_open(str(files[name]), framework="pt") as fh:
                yield fh.get_tensor(name)

    return relative_drift(tensors(base), tensors(comp))


def pool_drift(pool) -> dict[str, Any]:
    """Each component's relative drift from the base, and the largest."""
    components = {d: component_drift(pool.base_dir, pool.component_dir(d)) for d in pool.domains}
    return {"components": components, "max": max(components.values())}


def fidelity_holds(macro_spearman: float | None, mean_spearman: float | None) -> bool:
    """Whether raw proxies rank faithfully enough to trust (see FIDELITY_HOLDS)."""
    return all(v is not None and v >= FIDELITY_HOLDS for v in (macro_spearman, mean_spearman))


def drift_warning(pool_dir: str | Path, validated: Sequence[str | Path] = ()) -> str | None:
    """One warning line when raw proxies of this pool should not be trusted, else None.

    If the pool has a current calibration.json, its own validation decides (a warning when
    raw fidelity did not hold there). Otherwise the pool's largest component drift is
    compared with the largest drift at which any of the `validated` pools (directories or
    calibration.json files) saw fidelity hold: beyond it, or with no such validation among
    them, it warns. Without any `validated` pool it cannot say, and returns None."""
    from merge_mix.pool import Pool

    pool = Pool.open(pool_dir)
    own = pool.path / CALIBRATION
    if own.is_file():
        try:
            record = load_calibration(pool.path).record
        except MergeMixError:
            record = None  # stale: fall through to the drift comparison
        if record is not None:
            fid = record.get("fidelity", {})
            if fid.get("holds"):
                return None
            raw, cal = fid.get("mean_loss_spearman"), fid.get("mean_loss_spearman_calibrated")
            advice = (
                f"calibrated proxies do better ({_num(cal)} out of sample): use --calibrated"
                if raw is not None and cal is not None and cal > raw
                else f"calibration does not fix it ({_num(cal)} out of sample)"
            )
            return (
                f"warning: validation of {pool.path} (component drift up to"
                f" {record['drift']['max']:.3g}) found raw proxies rank the mean loss with"
                f" Spearman {_num(raw)} (macro {_num(fid.get('macro_spearman'))}), below"
                f" {FIDELITY_HOLDS}; {advice}"
            )
    if not validated:
        return None
    drift = pool_drift(pool)["max"]
    held, where = -math.inf, None
    for v in validated:
        path = Path(v)
        path = path / CALIBRATION if path.is_dir() else path
        try:
            record = read_json(path)
        except (OSError, ValueError) as exc:
            raise MergeMixError(f"{path}: unreadable calibration ({exc})") from None
        at = record.get("drift", {}).get("max") if isinstance(record, dict) else None
        if at is None:
            raise MergeMixError(f"{path}: not a calibration.json (no drift recorded)")
        if record.get("fidelity", {}).get("holds") and at > held:
            held, where = at, path
    if where is None:
        return (
            f"warning: none of the given validations saw proxy fidelity hold; {pool.path}"
            f" (component drift up to {drift:.3g}) is unvalidated: run `merge-mix validate`"
        )
    if drift > held:
        return (
            f"warning: components of {pool.path} drift up to {drift:.3g} from the base, beyond"
            f" {held:.3g}, the largest drift at which validation ({where}) saw proxy fidelity"
            f" hold; run `merge-mix validate {pool.path}`"
        )
    return None


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"
