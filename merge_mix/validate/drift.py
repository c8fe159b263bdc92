"""How far components drift from the base, and whether their proxies can be trusted there.

`relative_drift` is ``||theta_component - theta_base|| / ||theta_base||`` over all parameters,
streamed tensor by tensor; `component_drift` computes it from safetensors directories and
`pool_drift` for every component of a pool. `drift_warning` compares a pool's drift against
the drift at which validations (their calibration.json) saw proxy fidelity hold.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from itertools import zip_longest
from pathlib import Path
from typing import Any

import numpy as np

from merge_mix.artifacts import read_json
from merge_mix.errors import MergeMixError
from merge_mix.validate.metrics import FIDELITY_HOLDS
from merge_mix.validate.proxy_calibration import CALIBRATION, load_calibration

_CHUNK = 1 << 22  # elements per float64 chunk in relative_drift: bounds its extra memory


def relative_drift(base_tensors: Iterable[Any], comp_tensors: Iterable[Any]) -> float:
    """||theta_component - theta_base|| / ||theta_base|| over all parameters together.

    Takes two iterables of numpy arrays or torch tensors in matching order, or two mappings
    name -> tensor matched by name. Streams tensor by tensor (in chunks), accumulating sums of
    squares in float64, so it never holds more than a chunk of extra memory.
    """
    if isinstance(base_tensors, Mapping) and isinstance(comp_tensors, Mapping):
        only = sorted(set(base_tensors) ^ set(comp_tensors))
        if only:
            raise MergeMixError(f"tensor {only[0]!r} is in only one of base and component")
        pairs: Iterable[tuple[str, Any, Any]] = (
            (name, base_tensors[name], comp_tensors[name]) for name in base_tensors
        )
    else:
        pairs = (
            (f"#{i}", b, c)
            for i, (b, c) in enumerate(zip_longest(base_tensors, comp_tensors, fillvalue=None))
        )
    diff_sq = base_sq = 0.0
    for name, b, c in pairs:
        if b is None or c is None:
            raise MergeMixError("base and component have different numbers of tensors")
        b, c = _tensor(b), _tensor(c)
        if tuple(b.shape) != tuple(c.shape):
            raise MergeMixError(
                f"tensor {name}: base shape {tuple(b.shape)} but component shape {tuple(c.shape)}"
            )
        b, c = b.reshape(-1), c.reshape(-1)
        for s in range(0, b.shape[0], _CHUNK):
            bb, cc = _float64(b[s : s + _CHUNK]), _float64(c[s : s + _CHUNK])
            diff_sq += float(np.square(cc - bb).sum())
            base_sq += float(np.square(bb).sum())
    if not math.isfinite(diff_sq) or not math.isfinite(base_sq):
        raise MergeMixError("parameters contain NaN or infinity; relative drift is undefined")
    if base_sq == 0:
        raise MergeMixError("base parameters are all zero; relative drift is undefined")
    return math.sqrt(diff_sq / base_sq)


def _tensor(t: Any) -> Any:
    # Torch tensors stay torch until chunked, so a bf16 GPU tensor is never copied whole.
    return t if hasattr(t, "detach") else np.asarray(t)


def _float64(t: Any) -> np.ndarray:
    if hasattr(t, "detach"):
        import torch  # only when torch tensors are passed: keeps numpy callers light

        return t.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(t, dtype=np.float64)


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
