"""Token shards: the on-disk format of a tokenized split, its writers and its readers.

Each domain and split (``train``, ``search``, ``test``) is one shard in
``data/<domain>/``: ``<split>.tokens``, a flat little-endian array (uint16 when the
vocabulary fits, else uint32; ``token_dtype`` in ``data.json``) holding every piece as
``BOS tokens... EOS``, and ``<split>.index.npy``, an int64 array with one row per piece:
``(start, n_tokens, n_bytes, document)``, where ``start`` is the offset of the piece's
first text token (after its BOS), ``n_tokens`` excludes BOS and EOS, and ``document``
numbers the source document the piece was cut from (pieces of one document are
contiguous, documents in digest order; bootstrap intervals resample whole documents).
The held-out splits also keep their text, ``<split>.jsonl`` (one piece a line, with its
document number). Both files read with numpy alone (``np.memmap``, ``np.load``).
Training samples windows from the flat stream; held-out scoring reads pieces through the
index.

Writers never leave a file under its final name half written: the training shard is
appended to ``train.tokens.part`` as workers return tokens (`ShardWriter`), then copied
in document order to ``train.tokens.tmp`` and renamed; every other file is written to a
``.tmp`` name and renamed. A domain's training shard counts as done only when
``train.done.json`` exists (written last, `merge_mix.data.prepare`).

`MixtureSampler` draws training sequences from several domains in given proportions.
A batch is a pure function of (seed, step, micro-step), so a resumed run needs no
sampler state beyond the step counter, and every process of a torchrun job can draw the
same global batch and keep its own slice.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from merge_mix.data.scan import BucketFiles
from merge_mix.data.tokenizer import encode_pieces, special_ids, token_dtype
from merge_mix.errors import MergeMixError

COPY_BYTES = 8 << 20
"""Buffer size when a training shard is copied into document order."""


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """`np.save` to ``<path>.tmp``, then rename."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        np.save(fh, array, allow_pickle=False)
    tmp.replace(path)


def write_shard(
    tokenizer,
    documents: Sequence[Sequence[str]],
    out_dir: Path,
    split: str,
    batch: int = 512,
    keep_text: bool = False,
) -> dict[str, int]:
    """Tokenize `documents` held in memory (each a list of pieces: held-out splits and
    target sets, which are small) into `<split>.tokens` + `<split>.index.npy`; with
    `keep_text`, also `<split>.jsonl`. Returns counts."""
    out_dir.mkdir(parents=True, exist_ok=True)
    bos, eos = special_ids(tokenizer)
    dtype = token_dtype(len(tokenizer))
    pieces = [(i, p) for i, doc in enumerate(documents) for p in doc]
    index = np.zeros((len(pieces), 4), dtype=np.int64)
    tmp = out_dir / f"{split}.tokens.tmp"
    text_tmp = out_dir / f"{split}.jsonl.tmp"
    pos = 0
    text_out = text_tmp.open("w", encoding="utf-8") if keep_text else contextlib.nullcontext()
    with tmp.open("wb") as fh, text_out as th:
        for lo in range(0, len(pieces), batch):
            chunk = pieces[lo : lo + batch]
            ids = encode_pieces(tokenizer, [p for _, p in chunk])
            for j, ((doc, text), toks) in enumerate(zip(chunk, ids, strict=True)):
                arr = np.asarray([bos, *toks, eos], dtype=dtype)
                fh.write(arr.tobytes())
                index[lo + j] = (pos + 1, len(toks), len(text.encode("utf-8")), doc)
                pos += len(arr)
                if th is not None:
                    th.write(json.dumps({"document": doc, "text": text}) + "\n")
    save_npy_atomic(out_dir / f"{split}.index.npy", index)
    if keep_text:
        text_tmp.replace(out_dir / f"{split}.jsonl")
    tmp.replace(out_dir / f"{split}.tokens")
    return shard_counts(index, len(documents), pos)


def shard_counts(index: np.ndarray, documents: int, stream_tokens: int) -> dict[str, int]:
    """The counts ``data.json`` records per split."""
    return {
        "documents": documents,
        "pieces": len(index),
        "tokens": int(index[:, 1].sum()),
        "stream_tokens": stream_tokens,
        "bytes": int(index[:, 2].sum()),
    }


ROW_DTYPE = np.dtype(
    [("rank", "<i8"), ("piece", "<i8"), ("start", "<i8"), ("n_tokens", "<i8"), ("n_bytes", "<i8")]
)
"""A piece as `ShardWriter` receives it: document rank, piece number, start in the part
file, tokens without BOS/EOS, UTF-8 bytes."""


class ShardWriter:
    """Appends tokenized pieces, in the order workers return them, to
    ``<split>.tokens.part``; `finish` writes the shard in document order.

    `add` takes one batch: its tokens (``BOS piece EOS`` after each other) and one row per
    piece, ``(document rank, piece, start, n_tokens, n_bytes)``, `start` relative to the
    batch and pointing at the piece's BOS. Rows go to disk, one file per group of
    documents (`groups`: the first rank of each group, from 0), and `finish` sorts one
    group at a time: memory is one group's rows (40 bytes a piece), not the domain's."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, groups=None):
        self.out_dir, self.split, self.dtype = Path(out_dir), split, np.dtype(dtype)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.part = self.out_dir / f"{split}.tokens.part"
        self.groups = np.zeros(1, np.int64) if groups is None else np.asarray(groups, np.int64)
        self._fh = self.part.open("wb")
        self._rows = BucketFiles(self.out_dir / f"{split}.rows.parts", ROW_DTYPE)
        self.pos = self.n_pieces = self._row_tokens = 0
        self._last = (-1, -1)  # (rank, piece) of the last row added
        self.in_order = True
        """Whether every piece so far came after the one before it in (rank, piece) order:
        then the part file is already in document order."""

    def add(self, tokens: np.ndarray, rows: np.ndarray) -> None:
        if len(rows):
            rows = np.array(rows, dtype=np.int64).view(ROW_DTYPE).reshape(-1)  # a copy
            rows["start"] += self.pos
            rank, piece = rows["rank"], rows["piece"]
            if self.in_order:
                before_rank = np.r_[self._last[0], rank[:-1]]
                before_piece = np.r_[self._last[1], piece[:-1]]
                after = (rank > before_rank) | ((rank == before_rank) & (piece > before_piece))
                self.in_order = bool(after.all())
            self._last = (int(rank[-1]), int(piece[-1]))
            group = np.searchsorted(self.groups, rank, side="right") - 1
            self._rows.add(rows, group)
            self.n_pieces += len(rows)
            self._row_tokens += int((rows["n_tokens"] + 2).sum())
        self._fh.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self.pos += len(tokens)

    def abort(self) -> None:
        self._fh.close()
        self._rows.remove()
        self.part.unlink(missing_ok=True)

    def _write_index(self, out, counts: dict[str, int]):
        """Write the index one group at a time (rows sorted by (rank, piece), documents
        renumbered densely) to `out`, adding to `counts`; yield each group's runs of the
        part file (starts and lengths in tokens) in that order, for the copy."""
        start = 0
        for g in self._rows.numbers():
            rows = self._rows.read(g)
            rows = rows[np.lexsort((rows["piece"], rows["rank"]))]
            index = np.zeros((len(rows), 4), dtype=np.int64)
            lengths = rows["n_tokens"] + 2
            index[:, 0] = start + np.concatenate([[0], np.cumsum(lengths)[:-1]]) + 1
            index[:, 1] = rows["n_tokens"]
            index[:, 2] = rows["n_bytes"]
            _, dense = np.unique(rows["rank"], return_inverse=True)
            index[:, 3] = counts["documents"] + dense.reshape(-1)
            out.write(index.tobytes())
            start += int(lengths.sum())
            counts["documents"] += int(dense.max()) + 1 if len(rows) else 0
            counts["tokens"] += int(rows["n_tokens"].sum())
            counts["bytes"] += int(rows["n_bytes"].sum())
            yield rows["start"], lengths

    def finish(self) -> dict[str, int]:
        """Write ``<split>.tokens`` and ``<split>.index.npy`` with the pieces sorted by
        (document, piece) and documents renumbered densely, reading each group of rows
        once; return the counts."""
        self._fh.close()
        self._rows.close()
        index_tmp = self.out_dir / f"{self.split}.index.npy.tmp"
        final = self.out_dir / f"{self.split}.tokens"
        tmp = self.out_dir / f"{self.split}.tokens.tmp"
        counts = {
            "documents": 0,
            "pieces": self.n_pieces,
            "tokens": 0,
            "stream_tokens": self.pos,
            "bytes": 0,
        }
        with index_tmp.open("wb") as out:
            header = {"descr": "<i8", "fortran_order": False, "shape": (self.n_pieces, 4)}
            np.lib.format.write_array_header_1_0(out, header)
            runs = self._write_index(out, counts)
            if self.in_order and self.pos == self._row_tokens:
                for _ in runs:  # the index only: the part file is in document order
                    pass
                self.part.replace(tmp)
            else:
                _copy_in_order(self.part, tmp, self.dtype, runs)
                self.part.unlink()
        self._rows.remove()
        with tmp.open("rb+") as fh:
            os.fsync(fh.fileno())
        index_tmp.replace(self.out_dir / f"{self.split}.index.npy")
        tmp.replace(final)
        return counts


def _copy_in_order(src: Path, dst: Path, dtype, runs):
    """Copy runs of `src` to `dst` in the given order (`runs`: pairs of arrays, starts and
    lengths in tokens), with positioned reads (no memory map, whose pages would count in
    the process's resident memory)."""
    size = np.dtype(dtype).itemsize
    with src.open("rb") as fin, dst.open("wb") as fout:
        fd = fin.fileno()
        buf: list[bytes] = []
        held = 0
        run_start, run_len = -1, 0
        for starts, lengths in [*runs, (np.array([-1]), np.array([0]))]:
            for start, n in zip(starts.tolist(), lengths.tolist(), strict=True):
                if start == run_start + run_len and run_len:
                    run_len += n  # contiguous in the source: one read
                    continue
                if run_len:
                    buf.append(os.pread(fd, run_len * size, run_start * size))
                    held += run_len * size
                    if held >= COPY_BYTES:
                        fout.write(b"".join(buf))
                        buf, held = [], 0
                run_start, run_len = start, n
        fout.write(b"".join(buf))


@dataclass
class Shard:
    """One domain/split on disk: the memory-mapped stream and its piece index."""

    tokens: np.ndarray
    index: np.ndarray

    @classmethod
    def open(cls, data_dir: Path, split: str) -> Shard:
        meta_path = data_dir.parent / "data.json"
        if not meta_path.is_file() and data_dir.parent.name == "targets":
            meta_path = data_dir.parent.parent / "data.json"  # a target set's shard
        dtype = np.dtype("<u2")
        if meta_path.is_file():
            dtype = np.dtype(json.loads(meta_path.read_text())["token_dtype"])
        path = data_dir / f"{split}.tokens"
        if not path.is_file():
            raise MergeMixError(f"{path}: token shard missing (pool incomplete?)")
        tokens = np.memmap(path, dtype=dtype, mode="r")
        index = np.load(data_dir / f"{split}.index.npy", allow_pickle=False)
        return cls(tokens=tokens, index=index)

    def piece(self, i: int) -> np.ndarray:
        start, n = self.index[i, 0], self.index[i, 1]
        return np.asarray(self.tokens[start : start + n], dtype=np.int64)


class MixtureSampler:
    """Draws (batch, seq_len + 1) token windows from domains in fixed proportions.

    The domain of each sequence is drawn independently with probability `weights[d]`
    and the window start uniformly over the domain's training stream, from a generator
    seeded by (seed, step, micro_step): deterministic, resumable and rank-independent.
    """

    def __init__(
        self, streams: dict[str, np.ndarray], weights: dict[str, float], seq_len: int, seed: int
    ):
        self.domains = [d for d in streams if weights.get(d, 0.0) > 0]
        if not self.domains:
            raise MergeMixError("sampler: the training mixture gives no domain a positive weight")
        w = np.array([weights[d] for d in self.domains], dtype=np.float64)
        self.probs = w / w.sum()
        self.streams = [streams[d] for d in self.domains]
        self.seq_len = seq_len
        self.seed = seed
        for d, s in zip(self.domains, self.streams, strict=True):
            if len(s) < seq_len + 1:
                raise MergeMixError(
                    f"domain {d!r}: only {len(s)} training tokens, fewer than seq_len + 1"
                    f" ({seq_len + 1})"
                )

    def batch(self, step: int, micro_step: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Return the token windows and how many sequences came from each domain."""
        rng = np.random.default_rng([self.seed, step, micro_step])
        which = rng.choice(len(self.domains), size=batch_size, p=self.probs)
        out = np.empty((batch_size, self.seq_len + 1), dtype=np.int64)
        for row, k in enumerate(which):
            stream = self.streams[k]
            start = int(rng.integers(0, len(stream) - self.seq_len))
            out[row] = stream[start : start + self.seq_len + 1]
        counts = np.bincount(which, minlength=len(self.domains))
        return out, counts
