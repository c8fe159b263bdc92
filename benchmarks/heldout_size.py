"""How many held-out documents are enough: interval width against split size.

For a search run on a pool, scores the run's pick and the uniform mixture on every document
of the pool's test split, then, for growing random subsets of the documents (the same
subset for both sides, every domain subsampled in proportion), computes the 95% paired
bootstrap interval of the mean held-out loss difference (pick - uniform). The half-width
shrinks roughly as 1/sqrt(documents); "enough" is the size at which it falls below the
differences a search must resolve.

    .venv/bin/python benchmarks/heldout_size.py pools/demo runs/demo \
        --json benchmarks/results/heldout_size.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from merge_mix.compare import paired_bootstrap
from merge_mix.evaluate import DocumentScores
from merge_mix.proxy import ProxyScorer


def _subset(scores: dict[str, DocumentScores], keep: dict[str, np.ndarray]):
    return {
        d: DocumentScores(s.nll[keep[d]], s.tokens[keep[d]], s.bytes[keep[d]])
        for d, s in scores.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pool", type=Path)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--fractions", default="0.125,0.25,0.5,1.0")
    parser.add_argument("--repeats", type=int, default=5, help="random subsets per fraction")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    scorer = ProxyScorer(args.pool, device="cpu")
    best = json.loads((args.run_dir / "best.json").read_text())
    k = len(scorer.domains)
    pick_w = np.asarray([best["merge_weights"][d] for d in scorer.domains])
    pick = scorer.document_scores(pick_w, "test")
    uniform = scorer.document_scores(np.full(k, 1.0 / k), "test")
    domains = scorer.domains

    def mean_loss(m):
        return float(np.mean([m[f"heldout/{d}/loss"] for d in domains]))

    rows = []
    rng = np.random.default_rng(0)
    for fraction in (float(x) for x in args.fractions.split(",")):
        widths, deltas = [], []
        for r in range(args.repeats if fraction < 1 else 1):
            keep = {}
            for d, s in pick.items():
                n = max(2, round(len(s.nll) * fraction))
                keep[d] = np.sort(rng.choice(len(s.nll), size=n, replace=False))
            c = paired_bootstrap(_subset(pick, keep), _subset(uniform, keep), mean_loss, seed=r)
            widths.append((c.hi - c.lo) / 2)
            deltas.append(c.delta)
        docs = {d: max(2, round(len(s.nll) * fraction)) for d, s in pick.items()}
        rows.append(
            {
                "fraction": fraction,
                "documents": docs,
                "documents_total": int(sum(docs.values())),
                "half_width_mean": float(np.mean(widths)),
                "half_width_max": float(np.max(widths)),
                "delta_mean": float(np.mean(deltas)),
                "delta_spread": float(np.ptp(deltas)) if len(deltas) > 1 else 0.0,
            }
        )
        print(
            f"{fraction:>6.3f} of the test split: {rows[-1]['documents_total']:>5} documents,"
            f" half-width {rows[-1]['half_width_mean']:.5f} (max {rows[-1]['half_width_max']:.5f})"
            f" nats/token, delta {rows[-1]['delta_mean']:+.5f}"
        )
    out = {
        "pool": str(args.pool),
        "run_dir": str(args.run_dir),
        "pick": best["number"],
        "rows": rows,
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
