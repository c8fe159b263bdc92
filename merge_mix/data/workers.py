"""The data stage's worker processes: first-pass document rows, tokenizing and shingling.

`parallel_map` runs a function over a stream of batches in `workers` processes, returns
results in input order and keeps
at most ``2 * workers`` batches in flight, so a fast reader never piles text up in
memory. With one worker everything runs in the calling process: the results are the same
for any number of workers.

Workers are forked where the platform can (Linux): a fork starts at once and does not
re-run the caller's main module, so a script calling `merge_mix.pool_build.build_pool` needs no
``if __name__ == "__main__":`` guard there. Workers touch neither torch nor the parent's
tokenizer (each builds its own from the tokenizer's JSON, single threaded). Elsewhere
they are spawned, and scripts need the guard.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from merge_mix.config import DataSpec
from merge_mix.data.split import doc_info, document_pieces
from merge_mix.errors import MergeMixError

BATCH_BYTES = 1 << 20
"""Text per batch sent to a worker."""

WORD_CACHE = 200_000
"""Word hashes a worker caches (about 150 bytes each)."""
_state: dict[str, Any] = {}


def default_workers() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def init_worker(data: DataSpec, tokenizer_json: str | None, specials, dtype: str, protect):
    """Worker state: the data rules, the tokenizer backend (from its JSON, single
    threaded: parallelism comes from processes), BOS/EOS, the token dtype and, for the
    growth check, the existing held-out shingles."""
    _state.clear()
    _state.update(data=data, specials=specials, dtype=np.dtype(dtype), protect=protect)
    if tokenizer_json is not None:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(tokenizer_json)
        tok.no_truncation()
        tok.no_padding()
        _state["tokenizer"] = tok
    if data is not None:
        from merge_mix.decontaminate import Shingler

        _state["shingler"] = Shingler(data.shingle_words, max_cached=WORD_CACHE)


def parallel_map(fn: Callable, batches: Iterable, workers: int, initargs: tuple = ()) -> Iterator:
    """``fn(batch)`` for each batch, in order, in `workers` processes."""
    if workers <= 1:
        init_worker(*initargs)
        for batch in batches:
            yield fn(batch)
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ctx.Pool(workers, initializer=init_worker, initargs=initargs) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.apply_async(fn, (batch,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def batched(items: Iterable[tuple], size_of: Callable[[tuple], int]) -> Iterator[list]:
    """Group `items` into lists of about `BATCH_BYTES`."""
    batch: list = []
    size = 0
    for item in items:
        batch.append(item)
        size += size_of(item)
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def scan_batch(texts: list[str]) -> np.ndarray:
    """First pass: the document rows of a batch (`merge_mix.data.split.doc_info`)."""
    return doc_info(texts, _state["data"])


def _train_pieces(item) -> list[tuple[int, str]]:
    """The kept pieces ``(j, text)`` of one training document; checks its digest."""
    rank, text, digest, dropped = item
    if hashlib.sha256(text.encode("utf-8")).hexdigest() != digest:
        raise MergeMixError(
            f"a source changed while the pool's data was prepared (document {digest[:12]}"
            " is no longer where it was read); rerun"
        )
    pieces = document_pieces(text, _state["data"])
    return [(j, p) for j, p in enumerate(pieces) if j not in dropped]


def tokenize_batch(items: list[tuple]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training documents ``(rank, text, digest, dropped piece numbers)`` -> their tokens
    (``BOS piece EOS`` each), rows ``(rank, piece, start, n_tokens, n_bytes)`` and the
    sorted unique shingles of all their pieces."""
    bos, eos = _state["specials"]
    shingle = _state["shingler"]
    keys, texts = [], []
    for item in items:
        for j, p in _train_pieces(item):
            keys.append((item[0], j))
            texts.append(p)
    tok = _state["tokenizer"]
    # The same ids as encode_batch, without the character offsets nobody reads here.
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    encs = encode(texts, add_special_tokens=False)
    rows = np.zeros((len(texts), 5), dtype=np.int64)
    parts = []
    pos = 0
    shingles = []
    for k, ((rank, j), text, enc) in enumerate(zip(keys, texts, encs, strict=True)):
        ids = enc.ids
        parts.append(np.array([bos, *ids, eos], dtype=_state["dtype"]))
        rows[k] = (rank, j, pos, len(ids), len(text.encode("utf-8")))
        pos += len(ids) + 2
        shingles.append(shingle.hashes(text))
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=_state["dtype"])
    union = np.unique(np.concatenate(shingles)) if shingles else np.zeros(0, np.uint64)
    return tokens, rows, union


def overlap_batch(items: list[tuple]) -> list[tuple[int, int, np.ndarray]]:
    """Growth check: ``(rank, piece, shingles shared with existing held-out text)`` for
    each training piece of the batch that shares any."""
    protect = _state["protect"]
    shingle = _state["shingler"]
    out = []
    for item in items:
        for j, p in _train_pieces(item):
            common = np.intersect1d(shingle(p), protect, assume_unique=True)
            if len(common):
                out.append((item[0], j, common))
    return out
