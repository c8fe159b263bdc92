"""The GPU check (issue 13, item 5): build a small pool, search it, and print mixtures per
minute, peak GPU memory and the merge bandwidth against a device copy of the same bytes.

    bash benchmarks/gpu_check.sh [--out DIR] [--max-bytes N]   # a machine with a CUDA GPU
    bash benchmarks/gpu_check.sh --small [--out DIR]            # CPU, tiny pool: CI's smoke run

GPU mode: a pool of 4 built-in domains (python-stdlib, c-headers, config-files, prose, up
to ``--max-bytes`` each: all the text the machine's Python installation holds, roughly
80-300 MB) with a Llama of 104.6M parameters (hidden 768, 12 layers, intermediate 2304,
vocabulary 16,384, tied embeddings, seq_len 512) stored in bf16, a base trained on 8M
tokens and 4 components on 3M each under bf16 autocast; then ``merge-mix search`` on the
GPU with a bf16 resident stack. Goal: all of it in under 8 minutes on one data-centre GPU.
``--small`` runs the same steps on the CPU with the test suite's tiny pool in seconds; its
figures say the path works, not how fast a GPU is.

Both modes run the real commands in this process (``merge-mix train-components`` and
``merge-mix search`` through the click entry point), so that the peak GPU memory of the
search can be read from torch. Every result line starts with ``gpu_check:``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import tiny_pool_spec  # noqa: E402

GOAL_S = 480

# The GPU pool: built-in corpora, ~105M parameters, bf16 storage.
GPU_DOMAINS = {
    "code": "python-stdlib",
    "c": "c-headers",
    "config": "config-files",
    "prose": "prose",
}
GPU_MODEL = {
    "hidden_size": 768,
    "num_layers": 12,
    "num_heads": 12,
    "num_kv_heads": 12,
    "intermediate_size": 2304,
    "seq_len": 512,
}
GPU_TRAINING = {
    "base_tokens": 8_000_000,
    "component_tokens": 3_000_000,
    "batch_size": 32,
    "lr": 1.0e-3,
    "warmup_steps": 50,
    "eval_every": 0,
    "eval_tokens": 16_384,
    "checkpoint_every": 0,
    "device": "cuda",
    "storage_dtype": "bfloat16",
}
# Search settings per mode: sampled mixtures, gradient steps, held-out tokens per domain.
SEARCH = {"gpu": (32, 4, 16_384), "small": (4, 2, 1_024)}


def say(line: str) -> None:
    print(f"gpu_check: {line}", flush=True)


def gpu_spec(root: Path, max_bytes: int) -> Path:
    """Write the GPU mode's spec to ``root/pool.yaml``."""
    import yaml

    spec = {
        "name": "gpu-check",
        "output_dir": "pool",
        "seed": 0,
        "domains": {
            name: {"sources": [{"builtin": builtin}], "max_bytes": max_bytes}
            for name, builtin in GPU_DOMAINS.items()
        },
        "data": {
            "heldout_fraction": 0.05,
            "heldout_max_documents": 200,
            "heldout_max_pieces": 2,
            "max_doc_bytes": 8192,
        },
        "tokenizer": {"vocab_size": 16_384, "sample_bytes": 20_000_000},
        "model": GPU_MODEL,
        "training": GPU_TRAINING,
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / "pool.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def merge_mix(*args: str) -> None:
    """Run one `merge-mix` command in this process (a one-line error exits with code 2)."""
    from merge_mix.cli import main

    main.main(args=list(args), prog_name="merge-mix", standalone_mode=False)


def median_s(fn, repeat: int, sync) -> float:
    fn()  # warm-up
    sync()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def merge_bandwidth(pool, device, repeat: int) -> dict:
    """Median time of a resident bf16-stack merge and of a device copy of as many bytes as
    the merge reads (the stack), timed on the same device."""
    import numpy as np
    import torch

    from merge_mix.merge import merger_for_pool

    merger = merger_for_pool(pool, device, stack_dtype="bf16")
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    k = len(pool.domains)
    weights = np.arange(1, k + 1, dtype=np.float64) / (k * (k + 1) / 2)
    stack_bytes = sum(s.nbytes for s in merger.stacks.values())
    merged = sum(s.shape[1] for s in merger.stacks.values())
    merge_s = median_s(lambda: merger.merge(weights), repeat, sync)
    src = torch.empty(stack_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_s = median_s(lambda: dst.copy_(src), repeat, sync)
    return {
        "components": k,
        "merged_parameters": merged,
        "stack_bytes": stack_bytes,
        "stack_bytes_formula": (k + 1) * merged * 2,
        "merge_s": merge_s,
        "copy_s": copy_s,
        "merge_gb_s": stack_bytes / merge_s / 1e9,
        "copy_gb_s": stack_bytes / copy_s / 1e9,
        "ratio": copy_s / merge_s,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="CPU, tiny pool, seconds (CI)")
    ap.add_argument("--out", type=Path, help="working directory (default: a temporary one)")
    ap.add_argument(
        "--max-bytes",
        type=int,
        default=100_000_000,
        help="GPU mode: text per domain at most (default: 100 MB)",
    )
    ap.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    args = ap.parse_args()

    import torch

    started = time.perf_counter()
    mode = "small" if args.small else "gpu"
    if mode == "gpu" and not torch.cuda.is_available():
        say("no CUDA device; run with --small for the CPU smoke run")
        return 2
    device = torch.device("cpu") if args.small else torch.device("cuda", 0)
    out = args.out or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    out.mkdir(parents=True, exist_ok=True)
    if args.small:
        say("mode small: CPU smoke run on the tiny test pool (not a GPU measurement)")
        spec_path = tiny_pool_spec(out, storage_dtype="bfloat16")
    else:
        name = torch.cuda.get_device_name(device)
        total = torch.cuda.get_device_properties(device).total_memory
        say(f"mode gpu: {name}, {total / 1024**3:.1f} GiB, torch {torch.__version__}")
        spec_path = gpu_spec(out, args.max_bytes)
    say(f"device {device}; working directory {out}")
    result: dict = {"mode": mode, "device": str(device), "out": str(out)}

    # --- the pool ---
    t = time.perf_counter()
    merge_mix("train-components", str(spec_path), "--quiet")
    build_s = time.perf_counter() - t
    from merge_mix.pool import Pool

    pool = Pool.open(out / "pool")
    params = pool.manifest["model"]["parameters"]
    text = sum(
        pool.manifest["data"][d][split]["bytes"]
        for d in pool.domains
        for split in ("train", "search", "test")
    )
    tokens = sum(pool.manifest["data"][d]["train"]["tokens"] for d in pool.domains)
    say(
        f"pool {len(pool.domains)} components of {params:,} parameters (storage"
        f" {pool.manifest['spec']['training']['storage_dtype']}), {tokens:,} training tokens"
        f" ({text / 1e6:.1f} MB of text in all splits), built in {build_s:.1f} s"
    )
    result["pool"] = {"components": len(pool.domains), "parameters": params, "build_s": build_s}

    # --- the search (it prints its memory plan, "memory: ...", on stderr) ---
    n_trials, steps, heldout = SEARCH[mode]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run_dir = out / "run"
    t = time.perf_counter()
    merge_mix(
        "search", str(pool.path), "--run-dir", str(run_dir), "--n-trials", str(n_trials),
        "--gradient-steps", str(steps), "--heldout-tokens", str(heldout),
        "--stack-dtype", "bf16", "--device", str(device), "--quiet",
    )  # fmt: skip
    search_s = time.perf_counter() - t
    rows = [json.loads(line) for line in (run_dir / "trials.jsonl").read_text().splitlines()]
    scoring_s = sum(float(r.get("cost_s") or 0.0) for r in rows)
    per_min = len(rows) / (search_s / 60)
    say(
        f"search {len(rows)} mixtures in {search_s:.1f} s: {per_min:.1f} mixtures per minute"
        f" (scoring alone {len(rows) / (scoring_s / 60):.1f} per minute)"
    )
    result["search"] = {"mixtures": len(rows), "search_s": search_s, "scoring_s": scoring_s}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        reserved = torch.cuda.max_memory_reserved(device)
        say(
            f"peak GPU memory {peak / 1024**3:.2f} GiB allocated, {reserved / 1024**3:.2f} GiB"
            f" reserved (search); process peak RSS {rss / 1024**3:.2f} GiB"
        )
        result["peak_gpu_bytes"] = {"allocated": peak, "reserved": reserved}
    else:
        say(f"peak GPU memory n/a (CPU run); process peak RSS {rss / 1024**2:.0f} MiB")
    result["peak_rss_bytes"] = rss

    # --- merge bandwidth against a device copy ---
    import gc

    gc.collect()  # the search's scorer, before a second stack is built
    if device.type == "cuda":
        torch.cuda.empty_cache()
    bw = merge_bandwidth(pool, device, repeat=20)
    say(
        f"stack {bw['stack_bytes']:,} bytes = (K + 1) x P x 2 = ({bw['components']} + 1) x"
        f" {bw['merged_parameters']:,} x 2 (bf16)"
    )
    say(
        f"merge {bw['merge_s'] * 1e3:.3f} ms: {bw['merge_gb_s']:.2f} GB/s of stack read;"
        f" device copy of the same bytes {bw['copy_s'] * 1e3:.3f} ms: {bw['copy_gb_s']:.2f}"
        f" GB/s; merge/copy bandwidth ratio {bw['ratio']:.2f}"
    )
    result["merge"] = bw
    total_s = time.perf_counter() - started
    goal = ""
    if not args.small:
        goal = f" (goal: under {GOAL_S} s: {'met' if total_s < GOAL_S else 'NOT met'})"
    say(f"total {total_s:.1f} s{goal}")
    result["total_s"] = total_s
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
