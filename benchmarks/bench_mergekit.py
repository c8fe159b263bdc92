"""Our merge against mergekit's: the same 4-way linear merge, timed and compared.

The same synthetic models as bench_merge.py (a seeded random Llama base, 33,694,208
parameters at the default size, and 4 components = base + seeded perturbations, saved with
``save_pretrained``). Both sides start from weights already in memory:

- **ours**: ``Merger.merge(w)`` (resident stacked matrices; the merge writes in place),
- **mergekit**: ``mergekit.merge_methods.merge_state_dicts(models, "linear",
  parameters={"weight": {name: w_i}, "normalize": True})`` on the components' state dicts
  (loaded with ``safetensors.torch.load_file``); it returns new tensors.

With ``sum(w) = 1`` our rule ``theta_base + sum_i w_i (theta_i - theta_base)`` equals
mergekit's ``linear`` (``sum_i w_i theta_i / sum_i w_i``, no base). Note our merge reads
K + 1 rows (the base row, coefficient 0 here) and mergekit reads K tensors. The merged
tensors must agree within 1e-6 (max abs diff printed); reported: median times after a
warm-up and the ratio mergekit / ours (issue 3's goal: ours faster, ratio > 1).

Needs the optional extra (``pip install 'merge-mix[mergekit]'``); exits with code 2 if
mergekit is not installed.

    .venv/bin/python benchmarks/bench_mergekit.py --json benchmarks/results/mergekit.json
    .venv/bin/python benchmarks/bench_mergekit.py --small          # a few seconds
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median_time, print_header, synthetic_pool, write_json  # noqa: E402

TOLERANCE = 1e-6


def run(args: argparse.Namespace, header: dict) -> dict:
    import mergekit
    import numpy as np
    import torch
    from mergekit.merge_methods import merge_state_dicts
    from safetensors.torch import load_file

    from merge_mix.merge import Merger

    with synthetic_pool(args, "bench_mergekit_") as made:
        weights, k, size, n_params = made["weights"], made["k"], made["size"], made["parameters"]
        t0 = time.perf_counter()
        merger = Merger(made["base"], made["components"])
        construct_s = time.perf_counter() - t0
        names = list(made["components"])
        state_dicts = {}
        for d, path in made["components"].items():
            sd = {}
            for f in sorted(path.glob("*.safetensors")):
                sd.update(load_file(str(f)))
            state_dicts[d] = sd

    parameters = {
        "weight": {d: float(w) for d, w in zip(names, weights, strict=True)},
        "normalize": True,
    }
    out: dict = {}

    def theirs():
        with torch.no_grad():
            out["merged"] = merge_state_dicts(state_dicts, "linear", parameters=parameters)

    def ours():
        merger.merge(weights)

    # Alternate the two sides (one warm-up each, then repeats) so both see the same machine.
    ours(), theirs()
    ours_times, theirs_times = [], []
    for _ in range(args.repeat):
        ours_times.append(median_time(ours, 1, warmup=0)[0])
        theirs_times.append(median_time(theirs, 1, warmup=0)[0])
    ours_s = float(np.median(ours_times))
    theirs_s = float(np.median(theirs_times))

    merged_theirs = out["merged"]
    max_diff, worst = 0.0, ""
    for name, p in merger.params.items():
        if name not in merged_theirs:
            raise SystemExit(f"error: mergekit returned no tensor {name}")
        diff = float((p.detach() - merged_theirs[name].to(torch.float32)).abs().max())
        if diff > max_diff:
            max_diff, worst = diff, name
    n_bytes_theirs = k * n_params * 4
    return {
        **header,
        "mergekit_version": getattr(mergekit, "__version__", None) or _dist_version("mergekit"),
        "size": size,
        "parameters_per_model": n_params,
        "components": k,
        "weights": weights.tolist(),
        "threads": torch.get_num_threads(),
        "repeat": args.repeat,
        "ours_construction_s": construct_s,
        "ours_s": ours_s,
        "ours_times_s": ours_times,
        "mergekit_s": theirs_s,
        "mergekit_times_s": theirs_times,
        "ratio_mergekit_over_ours": theirs_s / ours_s,
        "goal": "ours faster (ratio > 1)",
        "goal_met": theirs_s > ours_s,
        "ours_bytes_read": (k + 1) * n_params * 4,
        "mergekit_bytes_read": n_bytes_theirs,
        "max_abs_diff": max_diff,
        "max_abs_diff_tensor": worst,
        "tolerance": TOLERANCE,
        "identical_within_tolerance": max_diff <= TOLERANCE,
    }


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny model (smoke test)")
    parser.add_argument("--repeat", type=int, default=9, help="timed runs per side (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--json", metavar="PATH", default=None, help="write results here")
    args = parser.parse_args(argv)
    try:
        import mergekit.merge_methods  # noqa: F401
    except ImportError as exc:
        print(
            f"error: mergekit is not installed ({exc}); install the optional extra:"
            " pip install 'merge-mix[mergekit]'",
            file=sys.stderr,
        )
        sys.exit(2)
    header = print_header("ours vs mergekit linear merge (benchmarks/bench_mergekit.py)")
    r = run(args, header)
    print(f"mergekit {r['mergekit_version']}, {r['threads']} torch threads")
    print(
        f"ours      {r['ours_s'] * 1e3:9.1f} ms  (Merger.merge, resident, in place;"
        f" median of {r['repeat']}; construction {r['ours_construction_s']:.2f} s, not included)"
    )
    print(
        f"mergekit  {r['mergekit_s'] * 1e3:9.1f} ms  (merge_state_dicts 'linear', normalize;"
        f" median of {r['repeat']})"
    )
    print(
        f"ratio mergekit/ours: {r['ratio_mergekit_over_ours']:.2f}"
        f" (goal: ours faster: {'met' if r['goal_met'] else 'NOT met'})"
    )
    print(
        f"max abs diff ours vs mergekit: {r['max_abs_diff']:.3e} ({r['max_abs_diff_tensor']});"
        f" within {TOLERANCE:g}: {'yes' if r['identical_within_tolerance'] else 'NO'}"
    )
    write_json(args.json, r)
    if not r["identical_within_tolerance"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
