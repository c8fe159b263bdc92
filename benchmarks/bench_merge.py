"""Merge bandwidth: a 4-way resident merge (`Merger.merge`) against a plain torch copy of
the same number of bytes, in the same run; plus the same merge with ``stream=True``.

A seeded random Llama base (33,694,208 parameters at the default size: hidden 512, 8
layers, intermediate 1376, vocab 8192, untied embeddings) and 4 components (the base plus
seeded Gaussian perturbations) are saved with ``save_pretrained`` (safetensors) in a
temporary directory and loaded into a `Merger`.

- **merge** bytes/s = ``(K + 1) x parameters x 4`` / merge time: the resident stacked
  matrix ``S[name]`` holds the base row as well as the K component rows, and every merge
  reads all ``K + 1`` rows (the base's coefficient ``1 - sum(w)`` is 0 here, but its row is
  still read). The merge also writes ``parameters x 4`` bytes into the model.
- **copy** bytes/s = N / time of ``dst.copy_(src)`` on float32 buffers of the same N bytes
  (which reads N and writes N bytes).
- ratio = merge bytes/s / copy bytes/s (issue 3's goal: at least 0.5).
- **stream**: ``Merger(stream=True).merge`` of the same weights, reading each tensor
  from the safetensors files on every merge (files are in the page cache after warm-up).

Merge and copy are timed alternately (one of each per repeat) so that both see the same
machine; medians after a warm-up are reported.

    .venv/bin/python benchmarks/bench_merge.py --json benchmarks/results/merge.json
    .venv/bin/python benchmarks/bench_merge.py --small          # a few seconds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median_time, print_header, synthetic_pool, timed, write_json  # noqa: E402


def resident_vs_copy(made: dict, weights, repeat: int) -> dict:
    """Time `Merger.merge` and a torch copy of the same bytes, alternately."""
    import torch

    from merge_mix.merge import Merger

    t0 = time.perf_counter()
    merger = Merger(made["base"], made["components"])
    construct_s = time.perf_counter() - t0
    stacked = sum(s.numel() for s in merger.stacks.values())
    src = torch.empty(stacked, dtype=torch.float32).normal_()
    dst = torch.zeros_like(src)

    def merge():
        merger.merge(weights)

    def copy():
        dst.copy_(src)

    merge(), copy()  # warm-up
    merge_times, copy_times = [], []
    for _ in range(repeat):
        merge_times.append(timed(merge))
        copy_times.append(timed(copy))
    # The merge wrote sum_i w_i theta_i (base coefficient 0): check one tensor.
    name = "model.embed_tokens.weight"
    rows = merger.stacks[name]
    expect = sum(float(c) * rows[i + 1] for i, c in enumerate(weights))
    check = float((merger.params[name].reshape(-1) - expect).abs().max())
    return {
        "stacked": stacked,
        "construct_s": construct_s,
        "merge_times": merge_times,
        "copy_times": copy_times,
        "merge_s": statistics.median(merge_times),
        "copy_s": statistics.median(copy_times),
        "check": check,
    }


def run(args: argparse.Namespace, header: dict) -> dict:
    import torch

    from merge_mix.merge import Merger

    with synthetic_pool(args, "bench_merge_") as made:
        weights, k, size, n_params = made["weights"], made["k"], made["size"], made["parameters"]
        print(f"built and saved base + {k} components in {made['build_s']:.1f} s")

        res = resident_vs_copy(made, weights, args.repeat)
        assert res["stacked"] == (k + 1) * n_params, "every parameter should be merged"
        n_bytes = res["stacked"] * 4
        merge_s, copy_s = res["merge_s"], res["copy_s"]

        t0 = time.perf_counter()
        streamer = Merger(made["base"], made["components"], stream=True)
        stream_construct_s = time.perf_counter() - t0
        stream_s, stream_times = median_time(
            lambda: streamer.merge(weights), args.stream_repeat, warmup=1
        )

    merge_bps = n_bytes / merge_s
    copy_bps = n_bytes / copy_s
    return {
        **header,
        "size": size,
        "parameters_per_model": n_params,
        "components": k,
        "weights": weights.tolist(),
        "stacked_rows": k + 1,
        "bytes_read_per_merge": n_bytes,
        "bytes_written_per_merge": n_params * 4,
        "threads": torch.get_num_threads(),
        "repeat": args.repeat,
        "merger_construction_s": res["construct_s"],
        "merge_s": merge_s,
        "merge_times_s": res["merge_times"],
        "merge_bytes_per_s": merge_bps,
        "copy_s": copy_s,
        "copy_times_s": res["copy_times"],
        "copy_bytes_per_s": copy_bps,
        "ratio_merge_to_copy": merge_bps / copy_bps,
        "goal_ratio": 0.5,
        "goal_met": merge_bps / copy_bps >= 0.5,
        "embed_check_max_abs_diff": res["check"],
        "stream_construction_s": stream_construct_s,
        "stream_merge_s": stream_s,
        "stream_merge_times_s": stream_times,
        "stream_bytes_per_s": n_bytes / stream_s,
        "stream_over_resident": stream_s / merge_s,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny model (smoke test)")
    parser.add_argument("--repeat", type=int, default=15, help="timed merge/copy pairs")
    parser.add_argument("--stream-repeat", type=int, default=5, help="timed stream merges")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--json", metavar="PATH", default=None, help="write results here")
    args = parser.parse_args(argv)
    header = print_header("merge bandwidth (benchmarks/bench_merge.py)")
    r = run(args, header)
    gb = 1e9
    print(
        f"bytes read per merge: {r['bytes_read_per_merge']:,} = (K+1) x params x 4"
        f" = {r['stacked_rows']} x {r['parameters_per_model']:,} x 4 (the base row included)"
    )
    print(f"merger construction (load + stack): {r['merger_construction_s']:.2f} s")
    print(
        f"resident merge  {r['merge_s'] * 1e3:9.1f} ms  {r['merge_bytes_per_s'] / gb:6.2f} GB/s"
        f"  (median of {r['repeat']})"
    )
    print(
        f"torch copy      {r['copy_s'] * 1e3:9.1f} ms  {r['copy_bytes_per_s'] / gb:6.2f} GB/s"
        f"  (same bytes, dst.copy_(src))"
    )
    print(
        f"ratio merge/copy bytes/s: {r['ratio_merge_to_copy']:.2f}"
        f" (goal >= 0.5: {'met' if r['goal_met'] else 'NOT met'})"
    )
    print(
        f"stream merge    {r['stream_merge_s'] * 1e3:9.1f} ms  {r['stream_bytes_per_s'] / gb:6.2f}"
        f" GB/s  ({r['stream_over_resident']:.1f}x the resident merge time)"
    )
    print(
        f"check: max |merged - sum w_i theta_i| on embed_tokens = {r['embed_check_max_abs_diff']:.2e}"
    )
    write_json(args.json, r)


if __name__ == "__main__":
    main()
