"""Multiple-choice fidelity from saved validations: macro Spearman, and leave-one-out calibration.

Reads finished validations run with --tasks/--objective (their validation.json) and prints,
for each: the macro Spearman (95% bootstrap interval) over its multiple-choice metrics alone,
so runs with different task sets compare like for like; and what the leave-one-out gap
calibration `merge-mix validate` applies to losses would do to the rank fidelity of every
multiple-choice metric and of the objective (the evidence behind leaving benchmark metrics
uncalibrated, docs/fidelity.md).

    python benchmarks/benchmark_metrics.py benchmarks/results/fidelity/demo-lmeval \
        benchmarks/results/fidelity/demo-lmeval-1000 benchmarks/results/fidelity/long16-lmeval
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from merge_mix.validate.calibration import loo_fidelity
from merge_mix.validate.metrics import OBJECTIVE_TARGET, fidelity_table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("validations", nargs="+", type=Path, help="validation output directories")
    parser.add_argument("--n-boot", type=int, default=2000)
    args = parser.parse_args()
    print(f"$ python {' '.join(sys.argv)}")
    print(f"{'validation':<18}{'target':<42}{'raw':>6}{'LOO cal':>9}")
    macro: dict[str, tuple] = {}
    for directory in args.validations:
        result = json.loads((directory / "validation.json").read_text())
        domains, mixtures = result["domains"], result["mixtures"]
        weights = np.array([[m["merge_weights"][d] for d in domains] for m in mixtures])
        targets = [t for t in result["benchmark_targets"] if "_choice/" in t]
        choice = fidelity_table(
            {t: np.array([m["proxy"][t] for m in mixtures]) for t in targets},
            {t: np.array([m["real"][t] for m in mixtures]) for t in targets},
            [m["label"] for m in mixtures],
            domain_targets=targets,
            higher_is_better=True,
            n_boot=args.n_boot,
        )["macro"]["spearman"]
        span = None
        if result.get("objective"):
            real_objective = [m["real"][OBJECTIVE_TARGET] for m in mixtures]
            span = max(real_objective) - min(real_objective)
        macro[directory.name] = (choice["value"], choice["low"], choice["high"], len(targets), span)
        if result.get("objective"):
            targets.append(OBJECTIVE_TARGET)
        proxy = {t: np.array([m["proxy"][t] for m in mixtures]) for t in targets}
        real = {t: np.array([m["real"][t] for m in mixtures]) for t in targets}
        loo = loo_fidelity(weights, proxy, real, domains, n_boot=args.n_boot)
        for t in targets:
            raw = loo[t]["raw"]["spearman"]["value"]
            cal = loo[t]["calibrated"]["spearman"]["value"]
            print(f"{directory.name:<18}{t.removeprefix('lmeval/'):<42}{raw:>6.2f}{cal:>9.2f}")
    print()
    print("macro Spearman over the multiple-choice metrics (raw proxies)")
    for name, (value, low, high, n, span) in macro.items():
        line = f"{name:<18}{value:.2f} [{low:.2f}, {high:.2f}] over {n} metrics"
        if span is not None:
            line += f"; the references' real objective values span {span:.4f}"
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
