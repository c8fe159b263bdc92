"""Measure the memory model's numbers on a pool: the bf16 stack's error against the fp32
stack, the token-batched chunked evaluator against the padded one (agreement and tokens
per second on pieces of mixed lengths), per-batch gradients against one graph, and the
streaming merge's file opens and bytes read against the files' sizes.

    python benchmarks/memory_check.py POOL [--weights 0.2,0.5,0.3]

Prints one JSON object (the figures quoted in docs/merging.md and docs/performance.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import numpy as np
import torch


class ReadCount:
    """Files opened and tensor bytes read through `safetensors.safe_open`."""

    def __init__(self):
        self.opened: list[str] = []
        self.bytes = 0

    def clear(self) -> None:
        self.opened.clear()
        self.bytes = 0


@contextlib.contextmanager
def count_reads():
    """Count what `safetensors.safe_open` opens and the tensor bytes read through it while
    the block runs (the streaming merge's reads per merge)."""
    import safetensors

    real = safetensors.safe_open
    count = ReadCount()

    class Counted:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def get_tensor(self, key):
            t = self.handle.get_tensor(key)
            count.bytes += t.numel() * t.element_size()
            return t

    def counting(path, *a, **kw):
        count.opened.append(str(path))
        return Counted(real(path, *a, **kw))

    safetensors.safe_open = counting
    try:
        yield count
    finally:
        safetensors.safe_open = real


def padded_nll(model, windows, n_windows: int, batch_size: int = 16) -> np.ndarray:
    """The evaluator before token batching: padded windows, whole-batch logits."""
    out = np.zeros(n_windows)
    with torch.no_grad():
        for lo in range(0, n_windows, batch_size):
            hi = min(lo + batch_size, n_windows)
            logits = model(input_ids=windows.input_ids[lo:hi]).logits
            nll = torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]),
                windows.labels[lo:hi].reshape(-1),
                reduction="none",
            )
            out[lo:hi] = nll.view(hi - lo, -1).double().sum(dim=1).numpy()
    return out


def mixed_windows(pool, pieces: int = 200, seed: int = 0, seq_len: int | None = None):
    """Windows of `pieces` pieces of 3 to 2.5 x seq_len tokens cut from the pool's search
    split (pieces of mixed lengths, as real documents are); `seq_len` defaults to the
    pool's."""
    from merge_mix.evaluate import DomainWindows, rolling_windows
    from merge_mix.tokens import Shard

    seq_len = seq_len or pool.seq_len
    rng = np.random.default_rng(seed)
    tokens = np.concatenate(
        [
            Shard.open(pool.data_dir / d, "search").piece(i)
            for d in pool.domains
            for i in range(min(40, len(Shard.open(pool.data_dir / d, "search").index)))
        ]
    )
    inputs, labels, ends, lo = [], [], [], 0
    sizes = rng.integers(3, int(2.5 * seq_len), size=pieces)
    for n in sizes:
        chunk = tokens[lo % (len(tokens) - n) :][:n]
        for inp, lab in rolling_windows(chunk, pool.bos_id, seq_len):
            pad = seq_len - len(inp)
            inputs.append(np.pad(inp, (0, pad), constant_values=pool.bos_id))
            labels.append(np.pad(lab, (0, pad), constant_values=-100))
        ends.append(len(inputs))
        lo += int(n)
    return DomainWindows(
        input_ids=torch.from_numpy(np.stack(inputs)),
        labels=torch.from_numpy(np.stack(labels)),
        piece_end=np.asarray(ends),
        piece_tokens=np.cumsum(sizes),
        piece_bytes=np.cumsum(sizes),
        piece_document=np.arange(pieces),
    )


def main() -> None:
    from merge_mix.evaluate import HeldoutSet, document_scores, window_nll
    from merge_mix.merge import merger_for_pool
    from merge_mix.pool import Pool

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pool")
    ap.add_argument("--weights", default=None, help="comma-separated merge weights")
    args = ap.parse_args()
    torch.set_num_threads(1)
    pool = Pool.open(args.pool)
    k = len(pool.domains)
    w = (
        np.array([float(x) for x in args.weights.split(",")])
        if args.weights
        else np.arange(1, k + 1) / (k * (k + 1) / 2)
    )
    out: dict = {"pool": str(pool.path), "weights": w.tolist()}

    full = merger_for_pool(pool, stack_dtype="fp32")
    half = merger_for_pool(pool, stack_dtype="bf16")
    ref = {n: t.clone() for n, t in full.merge(w).state_dict().items()}
    got = half.merge(w).state_dict()
    heldout = HeldoutSet.from_pool_data(
        pool.data_dir, pool.domains, pool.bos_id, pool.seq_len, None, "search"
    )
    a = document_scores(full.merge(w), heldout)
    b = document_scores(half.merge(w), heldout)
    out["bf16_stack"] = {
        "stack_bytes_fp32": sum(s.nbytes for s in full.stacks.values()),
        "stack_bytes_bf16": sum(s.nbytes for s in half.stacks.values()),
        "max_abs_weight_diff": max(float((got[n] - ref[n]).abs().max()) for n in ref),
        "max_abs_loss_diff": max(
            abs(float(a[d].nll.sum() / a[d].tokens.sum() - b[d].nll.sum() / b[d].tokens.sum()))
            for d in a
        ),
        "heldout_tokens": int(sum(s.tokens.sum() for s in a.values())),
    }

    model = full.merge(w)
    windows = mixed_windows(pool)
    n = len(windows.input_ids)
    scored = int((windows.labels != -100).sum())
    started = time.perf_counter()
    old = padded_nll(model, windows, n)
    t_old = time.perf_counter() - started
    started = time.perf_counter()
    new = window_nll(model, windows, n, torch.device("cpu"), "fp32")
    t_new = time.perf_counter() - started
    out["evaluator"] = {
        "windows": n,
        "scored_tokens": scored,
        "padded_tokens": int(windows.labels.numel()),
        "max_rel_diff": float(np.max(np.abs(new - old) / np.abs(old))),
        "tokens_per_s_padded": scored / t_old,
        "tokens_per_s_token_batched": scored / t_new,
        "speedup": t_old / t_new,
    }

    streamed = merger_for_pool(pool, stream=True)
    with count_reads() as reads:
        merged = streamed.merge(w).state_dict()
    files = [f for fs in streamed._files.values() for f in fs]
    out["streaming"] = {
        "files": len(files),
        "opens_per_merge": len(reads.opened),
        "bit_identical_to_resident": all(torch.equal(merged[n], ref[n]) for n in ref),
        "tensor_bytes_read": reads.bytes,
        "file_bytes": sum(f.stat().st_size for f in files),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
