"""A pool's calibration.json, and the calibrated proxies the scorer computes from it.

`load_calibration(pool_dir)` returns a `ProxyCalibration` whose ``apply(weights, metrics)``
turns a proxy's metrics into calibrated ones (``proxy - fitted gap(w)``), under new keys:

    calibrated/<domain>/loss    per-domain held-out loss
    calibrated/mean/loss        mean held-out loss over domains
    calibrated/worst/loss       worst domain's held-out loss

All keys follow the ``<source>/<name>/<metric>`` scheme of objective terms (source
``calibrated``). The aggregates have their own fitted gaps (the ones whose leave-one-out
fidelity validation reports), so ``calibrated/mean/loss`` is not exactly the mean of the
per-domain values.

calibration.json (format ``merge-mix-calibration``, written by `validate`) holds the fit
(`Calibration.to_dict`), the references it was fitted on, the evaluator settings it was
fitted with (``split``: always ``search``; ``heldout_tokens``: the per-domain budget, null for
every piece; keep_base), which a scorer applying it must share (`ProxyCalibration.check_scorer`;
it is never applied to a cheaper successive-halving rung), the component hashes it is valid for, each component's drift from the base
and whether raw fidelity held at that drift (see `merge_mix.validate.drift`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from merge_mix.artifacts import read_json
from merge_mix.errors import MergeMixError
from merge_mix.validate.calibration import Calibration
from merge_mix.validate.metrics import MEAN_TARGET, OBJECTIVE_TARGET, WORST_TARGET

FORMAT = "merge-mix-calibration"
FORMAT_VERSION = 1
CALIBRATION = "calibration.json"


def loss_key(domain: str) -> str:
    return f"heldout/{domain}/loss"


def calibrated_key(target: str) -> str:
    """The metric name a calibrated target is reported under (a validation's objective
    target, computed from calibrated losses, is ``calibrated/objective``)."""
    if target == OBJECTIVE_TARGET:
        return "calibrated/objective"
    if target.startswith("heldout/"):
        return "calibrated/" + target.removeprefix("heldout/")
    if target.startswith("target/"):  # a target set's loss: calibrated/target/<name>/loss
        return "calibrated/" + target
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
    split: str | None = "search"
    """The held-out split the gaps were measured on (None: a calibration that predates
    splits)."""

    def check_scorer(self, heldout_tokens: int | None, split: str) -> None:
        """Refuse, in one line, a scorer whose held-out budget or split differs from the
        ones the gaps were fitted on: the gap depends on the documents scored."""
        if (self.heldout_tokens, self.split) == (heldout_tokens, split):
            return

        def budget(tokens: int | None) -> str:
            return "every piece" if tokens is None else f"{tokens:,} tokens per domain"

        fitted = "no recorded split" if self.split is None else f"the {self.split} split"
        raise MergeMixError(
            f"{self.path}: fitted on {fitted} at {budget(self.heldout_tokens)}, not the"
            f" {split} split at {budget(heldout_tokens)}; score with the calibration's"
            " --heldout-tokens, or run `merge-mix validate` with this one"
        )

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
    return ProxyCalibration(
        calibration, path, record.get("heldout_tokens"), fitted_keep, record, record.get("split")
    )
