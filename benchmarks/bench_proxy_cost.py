"""Proxy cost: scoring one mixture through `ProxyScorer` (merge + our held-out evaluator)
against training one model on that mixture's effective data mixture at the component
budget.

- **score**: a `ProxyScorer` on the pool is built once (loading the base and components
  into resident stacked matrices and the held-out windows; reported separately as the
  one-time construction cost), warmed up with one score, then ``score(w)`` is timed for
  ``--mixtures`` mixtures (uniform, then seeded Dirichlet(1) draws) at the default
  held-out budget (16,384 tokens per domain); the median is reported, and search
  throughput = 60 / median = mixtures scored per minute.
- **train**: exactly what a component build does, on the effective data mixture
  ``r(w) = general_share x general + (1 - general_share) x w`` of the first mixture
  (uniform unless ``--train-weights``): load the pool's base, draw from the pool's training
  shards with `MixtureSampler`, `merge_mix.train.train_model` with the pool's training spec
  (``manifest["spec"]["training"]``: same budget ``component_tokens``, schedule,
  periodic held-out checks and checkpoints, in a temporary workdir), then save the model
  and score it on every domain. ``--train-fraction f`` stops the loop after a fraction f
  of its steps (the schedule is still that of the full run) and extrapolates the loop time
  linearly to all steps; the setup and finish times are measured once and added. The
  result records whether it was extrapolated.

Reported: ratio = train time / score time (issue 3's goal: at least 50x). The pool's own
component records (``wall_time_s`` of each component's training loop) are printed as a
cross-check.

    .venv/bin/python benchmarks/bench_proxy_cost.py pools/demo --json benchmarks/results/proxy_cost.json
    .venv/bin/python benchmarks/bench_pool.py --small --keep /tmp/tiny-pool   # a tiny pool
    .venv/bin/python benchmarks/bench_proxy_cost.py /tmp/tiny-pool --mixtures 3 --train-fraction 0.5
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_header, write_json  # noqa: E402

GOAL_RATIO = 50.0


class _StopTraining(Exception):
    pass


def train_like_component(
    pool, mixture: dict[str, float], fraction: float, seed: int, progress: bool
) -> dict:
    """Train one model from the pool's base on `mixture` at the component budget."""
    import torch

    from merge_mix.config import TrainingSpec
    from merge_mix.evaluate import HeldoutSet, heldout_metrics
    from merge_mix.model import load_model, pick_device, save_model
    from merge_mix.tokens import MixtureSampler, Shard
    from merge_mix.train import train_model

    raw = pool.manifest["spec"]["training"]
    spec = TrainingSpec(**raw)
    device = pick_device(spec.device)
    seq_len = pool.seq_len
    tokens_per_step = spec.batch_size * spec.grad_accum * seq_len
    total_steps = max(1, math.ceil(spec.component_tokens / tokens_per_step))
    stop_at = total_steps if fraction >= 1.0 else max(1, round(total_steps * fraction))

    def stop(step: int) -> None:
        if step >= stop_at and stop_at < total_steps:
            raise _StopTraining

    with tempfile.TemporaryDirectory(prefix="bench_proxy_train_") as tmp:
        t0 = time.perf_counter()
        model = load_model(pool.base_dir, device)
        streams = {
            d: Shard.open(pool.data_dir / d, "train").tokens for d, p in mixture.items() if p > 0
        }
        sampler = MixtureSampler(streams, mixture, seq_len, seed)
        heldout = HeldoutSet.from_pool_data(
            pool.data_dir, list(pool.manifest["data"]), pool.bos_id, seq_len, spec.eval_tokens
        )
        setup_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        try:
            train_model(
                model, sampler, spec, spec.component_tokens, seq_len, Path(tmp) / "work", device,
                heldout=heldout, desc="train", step_callback=stop, show_progress=progress,
            )  # fmt: skip
        except _StopTraining:
            pass
        loop_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        model.eval()
        save_model(model, Path(tmp) / "model")
        with torch.no_grad():
            heldout_metrics(model, heldout, device, spec.precision)
        finish_s = time.perf_counter() - t0

    loop_full_s = loop_s * total_steps / stop_at
    return {
        "training_spec": raw,
        "component_tokens": spec.component_tokens,
        "total_steps": total_steps,
        "steps_run": stop_at,
        "extrapolated": stop_at < total_steps,
        "train_fraction": stop_at / total_steps,
        "setup_s": setup_s,
        "loop_s_measured": loop_s,
        "loop_s_full": loop_full_s,
        "finish_s": finish_s,
        "train_s": setup_s + loop_full_s + finish_s,
        "tokens_per_s": stop_at * tokens_per_step / loop_s,
    }


def run(args: argparse.Namespace, header: dict) -> dict:
    import numpy as np
    import torch

    from merge_mix.pool import Pool
    from merge_mix.proxy import DEFAULT_HELDOUT_TOKENS, ProxyScorer

    if args.threads:
        torch.set_num_threads(args.threads)
    heldout_tokens = args.heldout_tokens or DEFAULT_HELDOUT_TOKENS
    pool = Pool.open(args.pool, require_complete=True)
    print(
        f"pool {pool.path}: {len(pool.domains)} components ({', '.join(pool.domains)}),"
        f" {pool.manifest['model']['parameters']:,} parameters each, seq_len {pool.seq_len}"
    )

    t0 = time.perf_counter()
    scorer = ProxyScorer(pool, heldout_tokens=heldout_tokens)
    construct_s = time.perf_counter() - t0
    scored_tokens = sum(int(w.piece_tokens[-1]) for w in scorer.heldout.windows.values())

    k = len(pool.domains)
    rng = np.random.default_rng(args.seed)
    mixtures = [np.full(k, 1.0 / k)] + [rng.dirichlet(np.ones(k)) for _ in range(args.mixtures - 1)]
    if args.train_weights:
        mixtures[0] = scorer.weights(args.train_weights)
    scorer.score(mixtures[0])  # warm-up
    times = []
    for w in mixtures:
        t0 = time.perf_counter()
        scorer.score(w)
        times.append(time.perf_counter() - t0)
    merge_times = []
    for w in mixtures:
        t0 = time.perf_counter()
        scorer.merger.merge(w)
        merge_times.append(time.perf_counter() - t0)
    score_s = statistics.median(times)

    effective = scorer.effective_mixture(mixtures[0])
    mixture = {d: float(p) for d, p in zip(pool.domains, effective, strict=True)}
    del scorer
    print(
        f"training one model on the effective mixture"
        f" {', '.join(f'{d}={p:.3f}' for d, p in mixture.items())}"
        + (
            f" (fraction {args.train_fraction:g} of the steps, extrapolated)"
            if args.train_fraction < 1
            else ""
        )
    )
    train = train_like_component(
        pool,
        mixture,
        args.train_fraction,
        pool.manifest["spec"]["seed"] * 1000 + 999,
        args.progress,
    )

    recorded = {d: c.get("wall_time_s") for d, c in pool.manifest["components"].items()}
    ratio = train["train_s"] / score_s
    return {
        **header,
        "pool": str(pool.path),
        "domains": pool.domains,
        "parameters": pool.manifest["model"]["parameters"],
        "threads": torch.get_num_threads(),
        "heldout_tokens_per_domain": heldout_tokens,
        "scored_tokens": scored_tokens,
        "scorer_construction_s": construct_s,
        "mixtures": [m.tolist() for m in mixtures],
        "score_times_s": times,
        "score_s": score_s,
        "merge_only_s": statistics.median(merge_times),
        "mixtures_per_minute": 60.0 / score_s,
        "train_weights": mixtures[0].tolist(),
        "train_effective_mixture": mixture,
        "train": train,
        "recorded_component_wall_time_s": recorded,
        "ratio_train_over_score": ratio,
        "goal_ratio": GOAL_RATIO,
        "goal_met": ratio >= GOAL_RATIO,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pool", nargs="?", default="pools/demo", help="pool directory")
    parser.add_argument("--mixtures", type=int, default=9, help="mixtures scored (median)")
    parser.add_argument(
        "--heldout-tokens", type=int, default=0, help="per domain (0: default 16,384)"
    )
    parser.add_argument(
        "--train-weights",
        default="",
        help="merge weights whose mixture is trained (default uniform)",
    )
    parser.add_argument(
        "--train-fraction",
        type=float,
        default=1.0,
        help="train this fraction of the steps, extrapolate",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--progress", action="store_true", help="show the training progress bar")
    parser.add_argument("--json", metavar="PATH", default=None, help="write results here")
    args = parser.parse_args(argv)
    if not 0 < args.train_fraction <= 1:
        parser.error("--train-fraction must be in (0, 1]")
    if args.mixtures < 1:
        parser.error("--mixtures must be at least 1")
    from merge_mix.errors import MergeMixError

    header = print_header("proxy cost (benchmarks/bench_proxy_cost.py)")
    try:
        r = run(args, header)
    except MergeMixError as exc:
        sys.exit(f"error: {exc}")
    t = r["train"]
    print(f"scorer construction (once): {r['scorer_construction_s']:.2f} s")
    print(
        f"score one mixture: {r['score_s']:.3f} s median of {len(r['score_times_s'])}"
        f" (merge alone {r['merge_only_s'] * 1e3:.1f} ms; {r['scored_tokens']:,} held-out tokens,"
        f" {r['heldout_tokens_per_domain']:,} per domain budget; {r['threads']} threads)"
    )
    print(f"search throughput: {r['mixtures_per_minute']:.1f} mixtures scored per minute")
    how = (
        f"{t['steps_run']} of {t['total_steps']} steps run ({t['loop_s_measured']:.1f} s),"
        " loop extrapolated linearly"
        if t["extrapolated"]
        else f"all {t['total_steps']} steps run"
    )
    print(
        f"train one model at the component budget ({t['component_tokens']:,} tokens): {t['train_s']:.1f} s"
        f" = setup {t['setup_s']:.1f} + loop {t['loop_s_full']:.1f} + save/score {t['finish_s']:.1f}"
        f" ({how}; {t['tokens_per_s']:,.0f} tokens/s)"
    )
    rec = ", ".join(f"{d} {v:.1f} s" for d, v in r["recorded_component_wall_time_s"].items() if v)
    print(f"pool's recorded component training loops: {rec}")
    print(
        f"ratio train / score: {r['ratio_train_over_score']:.0f}x"
        f" (goal >= {GOAL_RATIO:.0f}x: {'met' if r['goal_met'] else 'NOT met'})"
    )
    write_json(args.json, r)


if __name__ == "__main__":
    main()
