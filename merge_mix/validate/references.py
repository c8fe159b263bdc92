"""Reference models: trained from the pool's base on the data mixture a set of merge weights
stands for, stored in the pool and reused by every later validation.

On disk, inside the pool::

    references/<id>/              HF save_pretrained directory (safetensors)
    references/<id>/reference.json  the record, written last and atomically: the commit marker
    work/ref-<id>/                resumable checkpoints while training (removed when done)
    work/ref-<id>.lock            per-reference lock, so several processes can fill references

`<id>` is a short hash of the rounded effective mixture, the token budget, the base's sha256
and the data seed: the same mixture at the same budget and training seed is the same
reference, whichever merge weights, label or validation asked for it. Training seed 0 is every
validation's reference; seeds 1, 2, ... are the extra seeds of the same recipe (a different
data order) that measure the seed-noise floor, stored side by side under their own ids.
A reference is trained with the components' hyperparameters (``manifest["spec"]["training"]``),
from the base, on ``tokens`` tokens (the components' budget unless overridden). A record whose weights no longer match their
sha256 is discarded and the reference retrained.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from merge_mix.artifacts import file_lock, library_versions, read_json, write_json_atomic
from merge_mix.config import TrainingSpec
from merge_mix.errors import MergeMixError
from merge_mix.pool import Pool, resolve_inside

FORMAT = "merge-mix-reference"
FORMAT_VERSION = 1
RECORD = "reference.json"
# Base and components use data seeds spec.seed * 1000 + 0..K. Every reference of training
# seed 0 shares one other seed: common random numbers, so references differ by their
# mixtures, not their draws. Training seed s > 0 adds 1000 * s, clear of all of those.
SEED_OFFSET = 999


@dataclass(frozen=True)
class ReferencePlan:
    """One reference to train or reuse."""

    id: str
    label: str
    """The label of the mixture in this validation (records do not keep it: many may share)."""
    merge_weights: np.ndarray
    mixture: np.ndarray
    """The effective data mixture the reference is trained on, aligned with the pool domains."""
    tokens: int
    seed: int = 0
    """The training seed: 0 for the validation's references, 1, 2, ... for extra seeds."""


def training_spec(pool: Pool) -> TrainingSpec:
    """The components' hyperparameters, rebuilt from the manifest's spec."""
    raw = pool.manifest["spec"]["training"]
    known = {f.name for f in dataclasses.fields(TrainingSpec)}
    return TrainingSpec(**{k: v for k, v in raw.items() if k in known})


def data_seed(pool: Pool, seed: int = 0) -> int:
    """The data-order seed of a reference of training seed `seed`."""
    return int(pool.manifest["spec"]["seed"]) * 1000 + SEED_OFFSET + 1000 * int(seed)


def reference_id(pool: Pool, mixture: np.ndarray, tokens: int, seed: int = 0) -> str:
    """Short stable hash of what determines a reference's weights (its training seed
    through the data seed, so seed 0 keeps the ids references had before seeds existed)."""
    blob = {
        "mixture": {
            d: round(float(p), 6)
            for d, p in zip(pool.domains, mixture, strict=True)
            if round(float(p), 6) > 0
        },
        "tokens": int(tokens),
        "base": pool.manifest["base"].get("sha256"),
        "seed": data_seed(pool, seed),
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]


def reference_dir(pool: Pool, ref_id: str) -> Path:
    """Where a reference lives; refused when a symlink leads it out of the pool."""
    rel = Path("references") / ref_id
    resolve_inside(pool.path, rel, f"{pool.path}: reference {ref_id}")
    return pool.path / rel


def check_epochs(pool: Pool, mixture: np.ndarray, tokens: int) -> None:
    """Refuse a budget that repeats a domain more often than the pool's max_epochs allows."""
    max_epochs = float(pool.manifest["spec"].get("max_epochs", float("inf")))
    for d, share, available in zip(pool.domains, mixture, pool.available_tokens(), strict=True):
        epochs = tokens * share / max(available, 1.0)
        if epochs > max_epochs:
            raise MergeMixError(
                f"reference_tokens: {tokens:,} tokens would repeat domain {d!r} {epochs:.1f}"
                f" times, over the pool's max_epochs ({max_epochs:g}); lower the budget"
            )


def verified_record(pool: Pool, ref_id: str, discard: bool = False) -> dict[str, Any] | None:
    """The reference's record if its weights match their sha256, else None (with `discard`,
    a mismatching record is deleted so the reference is retrained)."""
    from merge_mix.model import weights_sha256

    path = reference_dir(pool, ref_id) / RECORD
    if not path.is_file():
        return None
    record = read_json(path)
    try:
        ok = weights_sha256(path.parent) == record.get("sha256")
    except MergeMixError:
        ok = False
    if not ok and discard:
        logging.getLogger(__name__).warning(
            f"{path.parent}: weights do not match their recorded sha256; retraining"
        )
        path.unlink()
    return record if ok else None


def ensure_reference(
    pool: Pool,
    plan: ReferencePlan,
    spec: TrainingSpec,
    device,
    heldout,
    precision: str,
    blocking: bool = False,
    step_callback: Callable[[str, int], None] | None = None,
    show_progress: bool = True,
) -> tuple[dict[str, Any] | None, str]:
    """Reuse or train one reference. Returns (record, status) with status "reused",
    "trained" or "resumed"; or (None, "busy") when another process holds its lock and
    `blocking` is False."""
    record = verified_record(pool, plan.id)
    if record is not None:
        return record, "reused"
    lock = pool.path / "work" / f"ref-{plan.id}.lock"
    with file_lock(lock, blocking) as mine:
        if not mine:
            return None, "busy"
        record = verified_record(pool, plan.id, discard=True)
        if record is not None:  # another process finished it while we waited
            return record, "reused"
        record = _train(pool, plan, spec, device, heldout, precision, step_callback, show_progress)
        status = "resumed" if record["resumed_from_step"] else "trained"
        return record, status


def _train(pool, plan, spec, device, heldout, precision, step_callback, show_progress) -> dict:
    from merge_mix.evaluate import heldout_metrics
    from merge_mix.model import count_parameters, load_model
    from merge_mix.tokens import load_tokenizer
    from merge_mix.train import TrainPlan, commit_model, stage_model

    mixture = {d: float(p) for d, p in zip(pool.domains, plan.mixture, strict=True) if p > 0}
    workdir = pool.path / "work" / f"ref-{plan.id}"
    resumed_from = 0
    for name in ("checkpoint", "checkpoint.old"):
        state = workdir / name / "state.json"
        if state.is_file():
            resumed_from = int(json.loads(state.read_text())["step"])
            break
    _log(
        f"[{pool.name}] {'resuming' if resumed_from else 'training'} reference {plan.id}"
        f" ({plan.label}"
        + (f", seed {plan.seed}" if plan.seed else "")
        + ")"
        + (f" from step {resumed_from}" if resumed_from else "")
    )
    train = TrainPlan(
        label=f"reference {plan.label}",
        init_from=pool.base_dir,
        mixture=mixture,
        tokens=plan.tokens,
        seed=data_seed(pool, plan.seed),
        workdir=workdir,
        out_dir=reference_dir(pool, plan.id),
    )
    model = load_model(train.init_from, device)
    result = train.run(
        model,
        pool.data_dir,
        spec,
        pool.seq_len,
        device,
        heldout=heldout if spec.eval_every else None,
        step_callback=(lambda s: step_callback(plan.label, s)) if step_callback else None,
        show_progress=show_progress,
    )
    out_dir = train.out_dir
    # With the tokenizer, like base and components: a complete HF model directory on its own.
    tmp = stage_model(model, out_dir, load_tokenizer(pool.tokenizer_dir))
    metrics = heldout_metrics(model, heldout, device, precision)
    available = dict(zip(pool.domains, pool.available_tokens().tolist(), strict=True))
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "id": plan.id,
        "path": str(out_dir.relative_to(pool.path)),
        "effective_mixture": {
            d: round(float(p), 6) for d, p in zip(pool.domains, plan.mixture, strict=True)
        },
        "merge_weights": {
            d: round(float(w), 6) for d, w in zip(pool.domains, plan.merge_weights, strict=True)
        },
        "tokens": plan.tokens,
        "component_tokens": spec.component_tokens,
        "tokens_seen": result.tokens,
        "domain_tokens": result.domain_tokens,
        "epochs": {
            d: round(t / max(available[d], 1.0), 4) for d, t in result.domain_tokens.items()
        },
        "steps": result.steps,
        "resumed_from_step": resumed_from,
        "heldout": {k: round(v, 6) for k, v in metrics.items()},
        "heldout_tokens": heldout.max_tokens,
        "final_train_loss": round(result.final_train_loss, 6),
        "parameters": count_parameters(model),
        "initialised_from": str(pool.base_dir.relative_to(pool.path)),
        "base_sha256": pool.manifest["base"].get("sha256"),
        "seed": data_seed(pool, plan.seed),
        "training_seed": plan.seed,
        "wall_time_s": result.wall_time_s,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": library_versions(),
    }
    record["sha256"] = commit_model(tmp, out_dir)
    write_json_atomic(out_dir / RECORD, record)
    shutil.rmtree(workdir, ignore_errors=True)
    return record


def _log(msg: str) -> None:
    # Progress notes through logging (logger ``merge_mix.*``); the CLI shows INFO on stderr.
    logging.getLogger(__name__).info(msg)
