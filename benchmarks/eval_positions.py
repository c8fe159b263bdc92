"""Positions the evaluator computes on a pool's held-out split, padded against token-batched.

The padded evaluator (before token batching) computed ``windows x seq_len`` positions; the
token-batched one computes each batch's windows at the batch's longest length
(`merge_mix.evaluate.token_batches`). Their ratio bounds what token batching can save on
that data: no timing, a count.

    .venv/bin/python benchmarks/eval_positions.py pools/demo [--split search] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import sys


def positions(windows, batch_size: int = 16) -> dict[str, int]:
    """Positions the padded evaluator computed (``windows x seq_len``), those the
    token-batched one computes (each batch at its longest window), and the scored ones."""
    from merge_mix.evaluate import token_batches, window_lengths

    n, seq = windows.input_ids.shape
    lengths = window_lengths(windows, n)
    batches = token_batches(lengths, batch_size * seq)
    return {
        "padded": int(n * seq),
        "token_batched": int(sum(len(b) * lengths[b[0]] for b in batches)),
        "scored": int((windows.labels != -100).sum()),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pools", nargs="+")
    ap.add_argument("--split", default="search", choices=("search", "test"))
    ap.add_argument("--batch-size", type=int, default=16, help="rows per padded batch")
    args = ap.parse_args()

    from merge_mix.evaluate import HeldoutSet
    from merge_mix.pool import Pool

    for path in args.pools:
        pool = Pool.open(path)
        seq = pool.seq_len
        held = HeldoutSet.from_pool_data(
            pool.data_dir, pool.domains, pool.bos_id, seq, None, split=args.split
        )
        total = [0, 0, 0]
        for domain, w in held.windows.items():
            n = w.input_ids.shape[0]
            row = list(positions(w, args.batch_size).values())
            total = [a + b for a, b in zip(total, row, strict=True)]
            print(
                f"{path} {domain}: {n} windows of {seq}; positions padded {row[0]:,},"
                f" token-batched {row[1]:,}, scored {row[2]:,}; ratio {row[0] / row[1]:.2f}"
            )
        print(
            f"{path} all domains: positions padded {total[0]:,}, token-batched {total[1]:,},"
            f" scored {total[2]:,}; ratio {total[0] / total[1]:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
