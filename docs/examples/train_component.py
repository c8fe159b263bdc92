"""Train one merge-mix component from a recipe, with plain torch, outside merge-mix.

The recipe is the JSON `merge-mix plan` writes per component; this script reads only it,
the base model directory and the token shards it names (numpy), and imports nothing from
merge-mix: it stands for your own trainer. It runs alone or under torchrun (DDP: every
rank draws the same global batch and trains on its own rows, so the recipe does not
depend on the number of processes)::

    merge-mix plan pools/demo --out recipes
    torchrun --nproc_per_node 2 docs/examples/train_component.py recipes/code.json --out trained/code
    merge-mix pool import pools/demo --domain code --model trained/code \\
        --mixture code=0.625,... --tokens N     # the exact command is printed at the end

`--max-steps` stops early (a smoke test); the learning-rate schedule still follows the
recipe's `total_steps`, and the printed import command declares the tokens actually seen.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch


def open_streams(recipe: dict) -> dict[str, np.ndarray]:
    """Each domain's training stream, memory-mapped (flat tokens, BOS ... EOS per piece)."""
    dtype = np.dtype(recipe["data"]["token_dtype"])
    return {
        d: np.memmap(recipe["data"]["shards"][d]["tokens"], dtype=dtype, mode="r")
        for d in recipe["mixture"]
    }


class Sampler:
    """The recipe's sampling rule: a batch is a pure function of (seed, step, micro_step)."""

    def __init__(self, streams: dict[str, np.ndarray], mixture: dict[str, float], seq_len, seed):
        self.domains = [d for d in mixture if mixture[d] > 0]
        p = np.array([mixture[d] for d in self.domains], dtype=np.float64)
        self.probs = p / p.sum()
        self.streams = [streams[d] for d in self.domains]
        self.seq_len, self.seed = seq_len, seed

    def batch(self, step: int, micro_step: int, batch_size: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step, micro_step])
        which = rng.choice(len(self.domains), size=batch_size, p=self.probs)
        out = np.empty((batch_size, self.seq_len + 1), dtype=np.int64)
        for row, k in enumerate(which):
            stream = self.streams[k]
            start = int(rng.integers(0, len(stream) - self.seq_len))
            out[row] = stream[start : start + self.seq_len + 1]
        return out


def lr_at(step: int, total: int, schedule: dict) -> float:
    """Warmup, then cosine (or warmup-stable-decay) down to min_lr at the last step."""
    peak, floor, warm = schedule["lr"], schedule["min_lr"], schedule["warmup_steps"]
    if step < warm:
        return peak * (step + 1) / warm
    if schedule["name"] == "wsd":
        decay = max(1, round(total * schedule["decay_fraction"]))
        if step < total - decay:
            return peak
        return floor + (peak - floor) * (1 - (step - (total - decay) + 1) / decay)
    progress = min((step - warm + 1) / max(1, total - warm), 1.0)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path, help="A recipe JSON from `merge-mix plan`.")
    parser.add_argument("--out", type=Path, required=True, help="Output HF model directory.")
    parser.add_argument("--max-steps", type=int, default=None, help="Stop after this many.")
    args = parser.parse_args()
    recipe = json.loads(args.recipe.read_text())
    t = recipe["training"]

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend=backend)
    rank = torch.distributed.get_rank() if world > 1 else 0
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if t["batch_size"] % world:
        raise SystemExit(f"batch_size {t['batch_size']} does not split over {world} processes")
    per_rank = t["batch_size"] // world

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    # safetensors only, no remote code, fp32 weights (trained in fp32 whatever the pool
    # stores); bf16 autocast on CUDA.
    model = AutoModelForCausalLM.from_pretrained(
        recipe["init_from"],
        local_files_only=True,
        trust_remote_code=False,
        use_safetensors=True,
        torch_dtype=torch.float32,
    ).to(device)
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = t["optimizer"]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": opt["weight_decay"]},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=opt["lr"],
        betas=tuple(opt["betas"]),
        eps=opt["eps"],
    )
    train_module = model
    if world > 1:
        train_module = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    use_bf16 = t["precision"] == "bf16" or (t["precision"] == "auto" and device.type == "cuda")
    sampler = Sampler(open_streams(recipe), recipe["mixture"], t["seq_len"], recipe["seed"])
    total = t["total_steps"]
    steps = total if args.max_steps is None else min(total, args.max_steps)
    started = time.perf_counter()
    for step in range(steps):
        lr = lr_at(step, total, t["schedule"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for micro in range(t["grad_accum"]):
            rows = sampler.batch(step, micro, t["batch_size"])[
                rank * per_rank : (rank + 1) * per_rank
            ]
            batch = torch.from_numpy(rows).to(device)
            last = micro == t["grad_accum"] - 1
            sync = train_module.no_sync() if world > 1 and not last else contextlib.nullcontext()
            autocast = (
                torch.autocast(device.type, dtype=torch.bfloat16)
                if use_bf16
                else contextlib.nullcontext()
            )
            with sync, autocast:
                logits = train_module(input_ids=batch[:, :-1]).logits
                loss = torch.nn.functional.cross_entropy(
                    logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
                )
            (loss / t["grad_accum"]).backward()
            loss_sum += float(loss.detach()) / t["grad_accum"]
        if opt["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), opt["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if rank == 0 and (step + 1) % 10 == 0:
            print(f"step {step + 1}/{total} loss {loss_sum:.4f} lr {lr:.2e}", flush=True)

    if rank == 0:
        tmp = args.out.with_name(args.out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.eval()
        if t.get("storage_dtype") == "bfloat16":  # the pool's dtype (training.storage_dtype)
            model.to(torch.bfloat16)
        model.save_pretrained(str(tmp), safe_serialization=True)
        # The pool tokenizer beside the weights: `pool import` checks it is the pool's.
        for f in Path(recipe["tokenizer"]).iterdir():
            if f.name.startswith(("tokenizer", "special_tokens_map", "vocab", "merges")):
                shutil.copyfile(f, tmp / f.name)
        tokens = steps * t["tokens_per_step"]
        run = {
            "recipe": str(args.recipe),
            "steps": steps,
            "tokens": tokens,
            "world_size": world,
            "wall_time_s": round(time.perf_counter() - started, 3),
        }
        (tmp / "training_run.json").write_text(json.dumps(run, indent=2) + "\n")
        shutil.rmtree(args.out, ignore_errors=True)
        tmp.rename(args.out)
        mixture = ",".join(f"{d}={p:.6g}" for d, p in recipe["mixture"].items())
        print(
            f"merge-mix pool import {recipe['pool']} --domain {recipe['domain']}"
            f" --model {args.out} --mixture {mixture} --tokens {tokens}"
            f" --seed {recipe['seed']} --wall-time-s {run['wall_time_s']}"
        )
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
