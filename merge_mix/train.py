"""Training: one plain torch loop for the base, every component and reference models.

AdamW, linear warmup then cosine (or warmup-stable-decay) schedule, gradient
accumulation, gradient clipping, bf16 autocast on CUDA and fp32 on CPU. The loop saves a
resumable checkpoint (weights, optimizer state and counters; the sampler needs only the
step) every `checkpoint_every` steps and on Ctrl-C, so a killed run continues where it
stopped and ends with the same weights as an uninterrupted one. Checkpoints are
safetensors + JSON, never pickles.

Under ``torchrun`` (``WORLD_SIZE > 1``) the model is wrapped in DDP: every rank draws the
same global batch of ``batch_size`` sequences from the sampler and trains on its own
``batch_size / WORLD_SIZE`` of them, so the recipe is the same on any number of GPUs;
rank 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from merge_mix.artifacts import shareable
from merge_mix.config import TrainingSpec
from merge_mix.errors import MergeMixError
from merge_mix.evaluate import HeldoutSet, heldout_metrics
from merge_mix.model import autocast
from merge_mix.tokens import MixtureSampler

CHECKPOINT = "checkpoint"


@dataclass
class TrainResult:
    """What a finished training run reports into the pool's records."""

    steps: int
    tokens: int
    domain_tokens: dict[str, int]
    wall_time_s: float
    final_train_loss: float
    history: list[dict] = field(default_factory=list)


def lr_at(step: int, total: int, spec: TrainingSpec) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total`."""
    peak, floor = spec.lr, spec.lr * spec.min_lr_ratio
    warm = min(spec.warmup_steps, max(total - 1, 0))
    if step < warm:
        return peak * (step + 1) / warm
    if spec.schedule == "wsd":
        decay_steps = max(1, round(total * spec.decay_fraction))
        start = total - decay_steps
        if step < start:
            return peak
        return floor + (peak - floor) * (1 - (step - start + 1) / decay_steps)
    progress = (step - warm + 1) / max(1, total - warm)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_distributed() -> tuple[int, int]:
    """Join the torchrun process group if launched by torchrun; return (rank, world)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend=backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return _dist_info()


def _param_names(model) -> dict[torch.nn.Parameter, str]:
    return {p: n for n, p in model.named_parameters()}


def save_checkpoint(model, optimizer, state: dict, workdir: Path) -> None:
    """Atomically replace `workdir/checkpoint` (written beside it, then renamed)."""
    from safetensors.torch import save_file

    tmp = workdir / f"{CHECKPOINT}.tmp"
    old = workdir / f"{CHECKPOINT}.old"
    final = workdir / CHECKPOINT
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()}
    save_file(weights, str(tmp / "model.safetensors"))
    names = _param_names(model)
    opt_tensors = {}
    for p, st in optimizer.state.items():
        for key, value in st.items():
            if torch.is_tensor(value):
                opt_tensors[f"{names[p]}::{key}"] = value.detach().cpu().contiguous()
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    shareable(tmp)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(model, optimizer, workdir: Path) -> dict | None:
    """Restore weights and optimizer state from `workdir`; None if there is no checkpoint."""
    from safetensors.torch import load_file

    path = workdir / CHECKPOINT
    if not (path / "state.json").is_file():
        path = workdir / f"{CHECKPOINT}.old"  # killed between the two renames
        if not (path / "state.json").is_file():
            return None
    state = json.loads((path / "state.json").read_text())
    weights = load_file(str(path / "model.safetensors"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(weights[n].to(p.device))
    opt_tensors = load_file(str(path / "optimizer.safetensors"))
    for p, n in _param_names(model).items():
        keys = [k for k in ("step", "exp_avg", "exp_avg_sq") if f"{n}::{k}" in opt_tensors]
        if keys:
            optimizer.state[p] = {
                k: opt_tensors[f"{n}::{k}"].to(p.device if k != "step" else "cpu") for k in keys
            }
    return state


def train_model(
    model,
    sampler: MixtureSampler,
    spec: TrainingSpec,
    total_tokens: int,
    seq_len: int,
    workdir: Path,
    device: torch.device,
    heldout: HeldoutSet | None = None,
    desc: str = "train",
    step_callback: Callable[[int], None] | None = None,
    show_progress: bool = True,
) -> TrainResult:
    """Train `model` in place on `total_tokens` drawn by `sampler`, resuming from
    `workdir` if a checkpoint is there. `step_callback(step)` runs after each optimizer
    step (after any checkpoint of that step)."""
    from tqdm.auto import tqdm

    rank, world = _dist_info()
    if spec.batch_size % world:
        raise MergeMixError(
            f"training.batch_size: {spec.batch_size} sequences do not split evenly over"
            f" {world} processes"
        )
    per_rank = spec.batch_size // world
    tokens_per_step = spec.batch_size * spec.grad_accum * seq_len
    total_steps = max(1, math.ceil(total_tokens / tokens_per_step))
    model.to(device).train()
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim < 2 else decay).append(p)
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": spec.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=spec.lr,
        betas=(0.9, spec.beta2),
        eps=1e-8,
        fused=device.type == "cuda",
    )
    state = load_checkpoint(model, optimizer, workdir) or {
        "step": 0,
        "domain_sequences": [0] * len(sampler.domains),
        "wall_time_s": 0.0,
        "history": [],
        "last_loss": float("nan"),
    }
    train_module = model
    if world > 1:
        train_module = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    step = state["step"]
    counts = np.asarray(state["domain_sequences"], dtype=np.int64)
    started = time.perf_counter() - state["wall_time_s"]

    def snapshot() -> dict:
        return {
            "step": step,
            "domain_sequences": counts.tolist(),
            "wall_time_s": time.perf_counter() - started,
            "history": state["history"],
            "last_loss": state["last_loss"],
        }

    bar = tqdm(
        total=total_steps,
        initial=step,
        desc=desc,
        unit="step",
        disable=not show_progress or rank != 0,
        dynamic_ncols=True,
    )
    run_started, run_tokens = time.perf_counter(), 0
    try:
        while step < total_steps:
            lr = lr_at(step, total_steps, spec)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = 0.0
            for micro in range(spec.grad_accum):
                global_batch, batch_counts = sampler.batch(step, micro, spec.batch_size)
                counts += batch_counts
                rows = global_batch[rank * per_rank : (rank + 1) * per_rank]
                batch = torch.from_numpy(rows).to(device)
                sync = micro == spec.grad_accum - 1 or world == 1
                ctx = train_module.no_sync() if not sync else contextlib.nullcontext()
                with ctx, autocast(device, spec.precision):
                    logits = train_module(input_ids=batch[:, :-1]).logits
                    loss = torch.nn.functional.cross_entropy(
                        logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
                    )
                (loss / spec.grad_accum).backward()
                loss_sum += float(loss.detach()) / spec.grad_accum
            if spec.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            run_tokens += tokens_per_step
            state["last_loss"] = loss_sum
            postfix = {
                "loss": f"{loss_sum:.3f}",
                "tok/s": f"{run_tokens / max(1e-9, time.perf_counter() - run_started):.0f}",
            }
            record = {"step": step, "train_loss": round(loss_sum, 5), "lr": lr}
            if (
                heldout is not None
                and spec.eval_every
                and (step % spec.eval_every == 0 or step == total_steps)
            ):
                metrics = heldout_metrics(model, heldout, device, spec.precision)
                losses = [v for k, v in metrics.items() if k.endswith("/loss")]
                record["heldout_mean_loss"] = round(float(np.mean(losses)), 5)
                postfix["heldout"] = f"{record['heldout_mean_loss']:.3f}"
            state["history"].append(record)
            bar.set_postfix(postfix)
            bar.update(1)
            if spec.checkpoint_every and step % spec.checkpoint_every == 0 and step < total_steps:
                if rank == 0:
                    save_checkpoint(model, optimizer, snapshot(), workdir)
                if world > 1:
                    torch.distributed.barrier()
            if step_callback is not None:
                step_callback(step)
    except KeyboardInterrupt:
        if rank == 0 and step > 0:
            save_checkpoint(model, optimizer, snapshot(), workdir)
            bar.write(f"{desc}: interrupted; checkpoint saved at step {step}, run again to resume")
        raise
    finally:
        bar.close()
    final = snapshot()
    seq_tokens = {
        d: int(c) * seq_len for d, c in zip(sampler.domains, counts.tolist(), strict=True)
    }
    model.eval()
    return TrainResult(
        steps=step,
        tokens=int(sum(seq_tokens.values())),
        domain_tokens=seq_tokens,
        wall_time_s=round(final["wall_time_s"], 3),
        final_train_loss=float(state["last_loss"]),
        history=state["history"],
    )


def train_on_shards(
    model,
    data_dir: Path,
    mixture: dict[str, float],
    seed: int,
    spec: TrainingSpec,
    total_tokens: int,
    seq_len: int,
    workdir: Path,
    device: torch.device,
    heldout: HeldoutSet | None = None,
    desc: str = "train",
    step_callback: Callable[[int], None] | None = None,
    show_progress: bool = True,
) -> TrainResult:
    """`train_model` on the training shards under `data_dir` (``<data_dir>/<domain>/train``),
    drawn in the proportions of `mixture` by a `MixtureSampler` seeded with `seed`: how
    a pool trains its base, its components and its reference models."""
    from merge_mix.tokens import Shard

    streams = {d: Shard.open(data_dir / d, "train").tokens for d, p in mixture.items() if p > 0}
    sampler = MixtureSampler(streams, mixture, seq_len, seed)
    return train_model(
        model,
        sampler,
        spec,
        total_tokens,
        seq_len,
        workdir,
        device,
        heldout=heldout,
        desc=desc,
        step_callback=step_callback,
        show_progress=show_progress,
    )


def stage_model(model, out_dir: Path, tokenizer=None) -> Path:
    """Save `model` (and `tokenizer`, making a complete HF model directory) next to
    `out_dir` as ``<out_dir>.tmp``; `commit_model` moves it into place."""
    from merge_mix.model import save_model

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    return tmp


def commit_model(tmp: Path, out_dir: Path) -> str:
    """Replace `out_dir` by the staged `tmp` directory and return its weights' sha256."""
    from merge_mix.model import weights_sha256

    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return weights_sha256(out_dir)
