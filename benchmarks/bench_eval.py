"""Held-out scoring speed: our evaluator (merge_mix.evaluate) against lm-eval's
loglikelihood_rolling, on the same merged model and the same documents.

For each domain both score the held-out pieces our evaluator takes for a token budget
(lm-eval through the generated ``mm_<pool>_<domain>_ppl`` task with ``limit`` = that many
pieces). Prints scored tokens per second for each, their ratio, and the largest relative
difference between the two bits-per-byte values (they score the same windows, so it
should be float rounding). Each side is warmed up once, then timed over ``--repeat`` runs
(best run reported).

    .venv/bin/python benchmarks/bench_eval.py pools/demo --tokens 16384
    .venv/bin/python benchmarks/bench_eval.py pools/demo --tokens 4096 --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _best_time(fn, repeat: int) -> tuple[float, object]:
    fn()  # warm-up: task loading, allocator, first-call overheads
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def run(args: argparse.Namespace) -> dict:
    import torch

    from merge_mix.evaluate import HeldoutSet, heldout_metrics
    from merge_mix.lmeval import evaluate_tasks, make_tasks, task_names
    from merge_mix.merge import merger_for_pool, resolve_weights
    from merge_mix.pool import Pool
    from merge_mix.tokens import load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    pool = Pool.open(args.pool)
    domains = args.domains.split(",") if args.domains else pool.domains
    unknown = [d for d in domains if d not in pool.domains]
    if unknown:
        sys.exit(f"error: {unknown[0]!r} is not a component of {args.pool}")
    weights = resolve_weights(args.weights, pool.domains, natural=pool.natural_mixture())
    model = merger_for_pool(pool, args.device).merge(weights)
    tokenizer = load_tokenizer(pool.tokenizer_dir)
    heldout = HeldoutSet.from_pool_data(
        pool.data_dir, domains, pool.bos_id, pool.seq_len, args.tokens
    )
    pieces = {d: len(heldout.windows[d].piece_end) for d in domains}
    tokens = {d: int(heldout.windows[d].piece_tokens[-1]) for d in domains}
    names = task_names(pool.name, pool.domains)

    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        tasks_dir = Path(args.tasks_dir or tmp)
        make_tasks(pool.path, tasks_dir, max_docs_per_domain=max(pieces.values()))

        def ours():
            return heldout_metrics(model, heldout, args.device, batch_size=args.batch_size)

        def lmeval():
            out = {}
            for d in domains:
                out |= evaluate_tasks(
                    model,
                    tokenizer,
                    [names[d]["ppl"]],
                    include_path=tasks_dir,
                    limit=pieces[d],
                    max_length=pool.seq_len,
                    device=args.device,
                    batch_size=args.batch_size,
                )
            return out

        t_ours, m_ours = _best_time(ours, args.repeat)
        t_lmeval, m_lmeval = _best_time(lmeval, args.repeat)

    total = sum(tokens.values())
    bpb = {
        d: {
            "ours": m_ours[f"heldout/{d}/bpb"],
            "lmeval": m_lmeval[f"lmeval/{names[d]['ppl']}/bits_per_byte"],
        }
        for d in domains
    }
    max_rel = max(abs(v["ours"] - v["lmeval"]) / abs(v["ours"]) for v in bpb.values())
    return {
        "pool": str(pool.path),
        "domains": domains,
        "weights": dict(zip(pool.domains, map(float, weights), strict=True)),
        "token_budget": args.tokens,
        "pieces": pieces,
        "scored_tokens": total,
        "seq_len": pool.seq_len,
        "batch_size": args.batch_size,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "ours_s": t_ours,
        "lmeval_s": t_lmeval,
        "ours_tokens_per_s": total / t_ours,
        "lmeval_tokens_per_s": total / t_lmeval,
        "speedup": t_lmeval / t_ours,
        "bpb": bpb,
        "max_rel_bpb_diff": max_rel,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pool", nargs="?", default="pools/demo", help="pool directory")
    parser.add_argument(
        "--tokens", type=int, default=16_384, help="held-out token budget per domain"
    )
    parser.add_argument("--domains", default="", help="comma-separated (default: all)")
    parser.add_argument("--weights", default="uniform", help="merge weights (default uniform)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs per side (best)")
    parser.add_argument("--tasks-dir", default=None, help="keep the generated tasks here")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    from merge_mix.errors import MergeMixError

    try:
        result = run(args)
    except MergeMixError as exc:
        sys.exit(f"error: {exc}")
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"pool {result['pool']}: {len(result['domains'])} domains,"
        f" {result['scored_tokens']:,} scored tokens, seq_len {result['seq_len']},"
        f" batch {result['batch_size']}, {result['device']}, {result['threads']} threads"
    )
    print(f"ours    {result['ours_tokens_per_s']:>12,.0f} tokens/s  ({result['ours_s']:.3f} s)")
    print(f"lm-eval {result['lmeval_tokens_per_s']:>12,.0f} tokens/s  ({result['lmeval_s']:.3f} s)")
    print(f"ratio   {result['speedup']:.2f}x (ours / lm-eval throughput)")
    print(f"max relative bits-per-byte difference: {result['max_rel_bpb_diff']:.2e}")


if __name__ == "__main__":
    main()
