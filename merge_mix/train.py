"""Training: one plain torch loop for the base, every component and reference models.

AdamW, linear warmup then cosine (or warmup-stable-decay) schedule, gradient
accumulation, gradient clipping, bf16 autocast on CUDA and fp32 on CPU, optional
activation checkpointing. The loop saves a resumable checkpoint (weights,
`optimizer.state_dict()` and counters; the sampler needs only the step) every
`checkpoint_every` steps and, after SIGINT or SIGTERM, at the end of the current step, so a
stopped run continues where it stopped and ends with the same weights as an uninterrupted
one. Checkpoints (`merge_mix.checkpoint`) are safetensors + JSON, never pickles.

Under ``torchrun`` (``WORLD_SIZE > 1``) the model is wrapped in DDP or, with
``training.parallel: fsdp``, sharded with FSDP2 (``fully_shard``): every rank draws the
same global batch of ``batch_size`` sequences from the sampler and trains on its own
``batch_size / WORLD_SIZE`` of them, so the recipe is the same on any number of GPUs;
rank 0 writes the checkpoints, except under FSDP, where every rank writes its own shards.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from merge_mix.checkpoint import load_checkpoint, save_checkpoint
from merge_mix.config import TrainingSpec
from merge_mix.errors import MergeMixError
from merge_mix.evaluate import HeldoutSet, heldout_metrics
from merge_mix.model import autocast
from merge_mix.tokens import MixtureSampler


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


@contextlib.contextmanager
def stop_requests():
    """Defer SIGINT and SIGTERM to the next step boundary: the first one sets
    ``flag["signal"]``, which the loop reads after a complete optimizer step; a second
    SIGINT interrupts at once (losing the steps since the last checkpoint). Outside the
    main thread, signals keep their usual behaviour."""
    flag: dict = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag["signal"] is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["signal"] = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _shard(model, spec: TrainingSpec, device: torch.device):
    """Wrap every decoder layer, then the whole model, with FSDP2 `fully_shard`."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {}
    if device.type == "cuda" and spec.precision in ("auto", "bf16"):
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated transformer blocks of a causal LM (``model.model.layers`` for Llama and
    most HF decoders), the units FSDP shards and activation checkpointing recomputes."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    layers = getattr(base, "layers", None) or getattr(base, "h", None)
    if layers is None:
        raise MergeMixError(
            f"training.parallel: fsdp: cannot find the decoder layers of {type(model).__name__}"
        )
    return list(layers)


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
    step (after any checkpoint of that step).

    SIGINT/SIGTERM stop the run at the next step boundary with a checkpoint, then raise
    KeyboardInterrupt. An exception raised inside a step (a hook, a second Ctrl-C) saves
    nothing: the last checkpoint stands, and resuming gives the same weights.

    Under torchrun with ``spec.parallel == "fsdp"`` the training runs on a sharded copy;
    at the end rank 0's `model` receives the full trained weights (other ranks' `model`
    is left as it was)."""
    from tqdm.auto import tqdm

    rank, world = _dist_info()
    if spec.batch_size % world:
        raise MergeMixError(
            f"training.batch_size: {spec.batch_size} sequences do not split evenly over"
            f" {world} processes"
        )
    sharded = world > 1 and spec.parallel == "fsdp"
    per_rank = spec.batch_size // world
    tokens_per_step = spec.batch_size * spec.grad_accum * seq_len
    total_steps = max(1, math.ceil(total_tokens / tokens_per_step))
    if spec.activation_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise MergeMixError(
                f"training.activation_checkpointing: not supported by {type(model).__name__}"
            )
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x names
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable({"use_reentrant": False})
    if sharded:
        # fully_shard rewrites the module in place; train a copy so the caller's model
        # stays a plain one (kept on the CPU meanwhile), and moves each shard to `device`.
        model.to("cpu")
        trained = _shard(copy.deepcopy(model), spec, device)
    else:
        trained = model.to(device)
    trained.train()
    decay, no_decay = [], []
    for p in trained.parameters():
        (no_decay if p.ndim < 2 else decay).append(p)
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": spec.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=spec.lr,
        betas=(0.9, spec.beta2),
        eps=1e-8,
        # Fused AdamW exists on CUDA only (untested here: no GPU in CI).
        fused=device.type == "cuda",
    )
    state = load_checkpoint(trained, optimizer, workdir, sharded) or {
        "step": 0,
        "domain_sequences": [0] * len(sampler.domains),
        "wall_time_s": 0.0,
        "history": [],
        "last_loss": float("nan"),
    }
    train_module = trained
    if world > 1 and not sharded:
        train_module = torch.nn.parallel.DistributedDataParallel(
            trained, device_ids=[device.index] if device.type == "cuda" else None
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

    def checkpoint() -> None:
        save_checkpoint(trained, optimizer, snapshot(), workdir, sharded, rank)
        if world > 1:
            torch.distributed.barrier()

    bar = tqdm(
        total=total_steps,
        initial=step,
        desc=desc,
        unit="step",
        disable=not show_progress or rank != 0,
        dynamic_ncols=True,
    )
    run_started, run_tokens = time.perf_counter(), 0
    at_boundary = True  # weights, optimizer, counters and history describe `step` steps
    stop: dict = {"signal": None}
    try:
        with stop_requests() as stop:
            while step < total_steps:
                at_boundary = False
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
                    ctx = contextlib.nullcontext()
                    if sharded:
                        trained.set_requires_gradient_sync(sync)
                    elif not sync:
                        ctx = train_module.no_sync()
                    with ctx, autocast(device, spec.precision):
                        logits = train_module(input_ids=batch[:, :-1]).logits
                        loss = torch.nn.functional.cross_entropy(
                            logits.float().reshape(-1, logits.shape[-1]),
                            batch[:, 1:].reshape(-1),
                        )
                    (loss / spec.grad_accum).backward()
                    loss_sum += float(loss.detach()) / spec.grad_accum
                if spec.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(trained.parameters(), spec.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                stopping = stop["signal"] is not None
                if world > 1:
                    # The loss of the whole global batch, and a stop if any rank got one,
                    # so every rank checkpoints and stops at the same step.
                    both = torch.tensor([loss_sum, float(stopping)], device=device)
                    torch.distributed.all_reduce(both)
                    loss_sum, stopping = float(both[0]) / world, bool(both[1] > 0)
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
                    metrics = heldout_metrics(trained, heldout, device, spec.precision)
                    losses = [v for k, v in metrics.items() if k.endswith("/loss")]
                    record["heldout_mean_loss"] = round(float(np.mean(losses)), 5)
                    postfix["heldout"] = f"{record['heldout_mean_loss']:.3f}"
                state["history"].append(record)
                at_boundary = True
                bar.set_postfix(postfix)
                bar.update(1)
                if stopping and step < total_steps:
                    checkpoint()
                    bar.write(
                        f"{desc}: interrupted; checkpoint saved at step {step}, run again to resume"
                    )
                    raise KeyboardInterrupt
                if (
                    spec.checkpoint_every
                    and step % spec.checkpoint_every == 0
                    and step < total_steps
                ):
                    checkpoint()
                if step_callback is not None:
                    step_callback(step)
    except KeyboardInterrupt:
        # Raised inside a step, the weights may be half updated: save nothing then. Under
        # torchrun only the signal path above saves (it needs every rank).
        if at_boundary and world == 1 and step > 0 and stop["signal"] is None:
            checkpoint()
            bar.write(f"{desc}: interrupted; checkpoint saved at step {step}, run again to resume")
        raise
    finally:
        bar.close()
    if spec.activation_checkpointing:
        disable = getattr(model, "activation_checkpointing_disable", None)
        (disable or model.gradient_checkpointing_disable)()
    if sharded:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        full = get_model_state_dict(
            trained, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if rank == 0:
            model.load_state_dict(full)
        del trained, optimizer
        model.to(device)
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


@dataclass(frozen=True)
class TrainPlan:
    """One training run on a pool's shards, the same for the base, a component and a
    reference model: what to start from, what to draw, how much, with which seed, and where
    its checkpoints and its finished model go. The recipe (optimizer, schedule, batch) is the
    pool's ``training`` section (`TrainingSpec`)."""

    label: str
    """How progress bars and logs name the run (``base``, a domain, ``reference uniform``)."""
    init_from: Path | None
    """The HF model directory (safetensors) the weights start from; None: a fresh model
    from the spec's ``model`` section (a pool's own base)."""
    mixture: dict[str, float]
    """Per-domain sampling weights over the pool's training shards."""
    tokens: int
    """Token budget."""
    seed: int
    """Seed of the data stream (`MixtureSampler`)."""
    workdir: Path
    """Checkpoints, for resuming; removed once the model is committed."""
    out_dir: Path
    """Where the finished model directory is committed."""

    def run(
        self,
        model,
        data_dir: Path,
        spec: TrainingSpec,
        seq_len: int,
        device: torch.device,
        heldout: HeldoutSet | None = None,
        step_callback: Callable[[int], None] | None = None,
        show_progress: bool = True,
    ) -> TrainResult:
        """Train `model` (already initialised from `init_from`) by this plan."""
        return train_on_shards(
            model,
            data_dir,
            self.mixture,
            self.seed,
            spec,
            self.tokens,
            seq_len,
            self.workdir,
            device,
            heldout=heldout,
            desc=self.label,
            step_callback=step_callback,
            show_progress=show_progress,
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
    from merge_mix.tokens import save_tokenizer

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp)
    if tokenizer is not None:
        save_tokenizer(tokenizer, tmp)
    return tmp


def commit_model(tmp: Path, out_dir: Path) -> str:
    """Replace `out_dir` by the staged `tmp` directory and return its weights' sha256."""
    from merge_mix.model import weights_sha256

    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return weights_sha256(out_dir)
