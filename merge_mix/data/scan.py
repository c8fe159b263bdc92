"""The first pass's decisions, made on disk one digest bucket at a time.

The scan reads a domain once and records one `SCAN_DTYPE` row per document (its digest,
size, bytes of its kept pieces and its ordinal in read order). Rows are appended to
`DIGEST_BUCKETS` files by the first two hex digits of the digest, so that the buckets, each
sorted in memory, one after the other, are the whole domain in digest order.
`plan_domain` walks the buckets in that order and applies the rules of
`merge_mix.data.split` with counters carried from bucket to bucket: de-duplication (first
occurrence), the byte cap, cross-domain de-duplication (against the same bucket of the
earlier domains) and the split. It writes per bucket the kept rows (`KEPT_DTYPE`), and per
range of ordinals the routes that the later passes follow while they read the sources again
in read order (`ROUTE_DTYPE`).

Memory: one bucket of rows (about ``100 x documents / 256`` bytes, 10 MB for 25 million
documents) or one range of routes (at most `ROUTE_CHUNK` rows, 20 MB, for domains of up to
67 million documents), whatever the domain's size.
"""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from merge_mix.config import DataSpec
from merge_mix.data.split import DOC_DTYPE, DROPPED, SPLIT_CODE, split_of

DIGEST_BUCKETS = 256
"""Files per domain for the scan's rows, by the digest's first two hex digits."""
ROUTE_CHUNK = 1 << 18
"""Fewest document ordinals per route file (more when a domain has over 67 million)."""

SCAN_DTYPE = np.dtype([*DOC_DTYPE.descr, ("ordinal", "<i8")])
KEPT_DTYPE = np.dtype([*SCAN_DTYPE.descr, ("split", "i1"), ("rank", "<i8")])
ROUTE_DTYPE = np.dtype([("ordinal", "<i8"), ("split", "i1"), ("rank", "<i8"), ("digest", "S64")])
_HEX = np.full(256, -1, dtype=np.int64)
_HEX[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16)

OPEN_FILES = 2048
"""Open files the data stage may need at once: 256 scan or kept files, up to 256 route
files, up to 512 n-gram buckets and 256 index groups, with room to spare."""


def allow_open_files(n: int = OPEN_FILES) -> None:
    """Raise this process's soft limit on open files to `n` (or the hard limit, if lower):
    the default soft limit is 1024 on Linux and 256 on macOS."""
    try:
        import resource
    except ImportError:  # not POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n if hard == resource.RLIM_INFINITY else min(n, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def digest_bucket(digests: np.ndarray) -> np.ndarray:
    """The bucket (0-255) of each ``S64`` hex digest: its first two hex digits."""
    raw = np.frombuffer(np.ascontiguousarray(digests, dtype="S64").tobytes(), np.uint8)
    head = raw.reshape(-1, 64)[:, :2]
    return _HEX[head[:, 0]] * 16 + _HEX[head[:, 1]]


def copy_fields(rows: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`rows` as a new array of `dtype`: the fields they share copied, the others zero."""
    out = np.zeros(len(rows), dtype)
    for key in dtype.names:
        if key in rows.dtype.names:
            out[key] = rows[key]
    return out


class BucketFiles:
    """Rows of one dtype appended to numbered files (``<directory>/<b>.bin``) and read back
    one file at a time. Files stay open while rows are added."""

    def __init__(self, directory: Path, dtype: np.dtype, fresh: bool = True):
        self.dir, self.dtype = Path(directory), np.dtype(dtype)
        if fresh:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir.mkdir(parents=True)
        self._files: dict[int, Any] = {}

    def add(self, rows: np.ndarray, which: np.ndarray) -> None:
        """Append each row to the file `which` names (rows of one file keep their order)."""
        if not len(rows):
            return
        order = np.argsort(which, kind="stable")
        which, rows = which[order], rows[order]
        edges = [0, *(np.flatnonzero(np.diff(which)) + 1).tolist(), len(rows)]
        for lo, hi in itertools.pairwise(edges):
            b = int(which[lo])
            fh = self._files.get(b)
            if fh is None:
                fh = self._files[b] = (self.dir / f"{b}.bin").open("ab")
            fh.write(np.ascontiguousarray(rows[lo:hi], dtype=self.dtype).tobytes())

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()
        self._files.clear()

    def numbers(self) -> list[int]:
        """The numbers of the files written, in order."""
        return sorted(int(p.stem) for p in self.dir.glob("*.bin"))

    def read(self, b: int) -> np.ndarray:
        path = self.dir / f"{b}.bin"
        return np.fromfile(path, dtype=self.dtype) if path.is_file() else np.zeros(0, self.dtype)

    def remove(self) -> None:
        self.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class DomainPlan:
    """What the first pass decided for one domain, in files under `directory`."""

    name: str
    directory: Path
    n_read: int = 0
    read_bytes: int = 0
    """UTF-8 bytes of every document read (duplicates included)."""
    stats: dict[str, Any] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=dict)
    """Documents per split code (`DROPPED` included)."""
    piece_bytes: dict[int, int] = field(default_factory=dict)
    """Bytes of kept pieces per split code (held-out documents before their trim)."""

    def kept(self) -> Iterator[np.ndarray]:
        """The `KEPT_DTYPE` rows of the documents kept (de-duplicated, capped, not
        taken by an earlier domain), one bucket at a time, in digest order."""
        files = BucketFiles(self.directory / "kept", KEPT_DTYPE, fresh=False)
        for b in files.numbers():
            yield files.read(b)

    def kept_digests(self, b: int) -> np.ndarray:
        """The digests kept in bucket `b` (what later domains must not take again)."""
        return BucketFiles(self.directory / "kept", KEPT_DTYPE, fresh=False).read(b)["digest"]

    def routes(self) -> Iterator[tuple[int, int, int, str]]:
        """``(ordinal, split code, rank, digest)`` of every document with pieces, in read
        order (one route file in memory at a time)."""
        files = BucketFiles(self.directory / "routes", ROUTE_DTYPE, fresh=False)
        for c in files.numbers():
            rows = files.read(c)
            rows = rows[np.argsort(rows["ordinal"], kind="stable")]
            for lo in range(0, len(rows), 4096):  # as Python objects a few at a time
                for ordinal, code, rank, digest in rows[lo : lo + 4096].tolist():
                    yield ordinal, code, rank, digest.decode()

    def count(self, split: str) -> int:
        return self.counts.get(SPLIT_CODE[split], 0)

    def digests(self) -> Iterator[str]:
        """The digests of the documents with pieces (``documents.sha256``), digest order."""
        for rows in self.kept():
            yield from (d.decode() for d in rows["digest"][rows["split"] != DROPPED])

    def update_train_hash(self, blob) -> None:
        """Feed `blob` (a hashlib object) the training documents' digests, digest order."""
        for rows in self.kept():
            blob.update(rows["digest"][rows["split"] == SPLIT_CODE["train"]].tobytes())

    def train_bytes_before(self) -> Iterator[np.ndarray]:
        """Per training document (rank order), the piece bytes of the ranks before it;
        one array per bucket."""
        total = 0
        for rows in self.kept():
            piece_bytes = rows["piece_bytes"][rows["split"] == SPLIT_CODE["train"]]
            yield total + np.concatenate([[0], np.cumsum(piece_bytes)[:-1]]).astype(np.int64)
            total += int(piece_bytes.sum())

    def rank_groups(self, text_per_group: int, most: int) -> np.ndarray:
        """First training rank of each group of consecutive documents: a group starts
        where the piece bytes before a document cross a multiple of `text_per_group`
        (raised so that there are at most about `most` groups)."""
        total = self.piece_bytes.get(SPLIT_CODE["train"], 0)
        step = max(text_per_group, -(-total // most), 1)
        bounds, last, rank = [0], 0, 0
        for before in self.train_bytes_before():
            group = before // step
            previous = np.concatenate([[last], group[:-1]])
            bounds.extend((rank + np.flatnonzero(group != previous)).tolist())
            last = int(group[-1]) if len(group) else last
            rank += len(group)
        return np.asarray(bounds, dtype=np.int64)

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def spill_scan(parts: Iterable[np.ndarray], directory: Path, name: str) -> DomainPlan:
    """Pass 1's sink: `DOC_DTYPE` rows in read order -> bucket files under `directory`."""
    plan = DomainPlan(name=name, directory=Path(directory))
    files = BucketFiles(plan.directory / "scan", SCAN_DTYPE)
    for part in parts:
        rows = copy_fields(part, SCAN_DTYPE)
        rows["ordinal"] = np.arange(plan.n_read, plan.n_read + len(part))
        plan.n_read += len(part)
        plan.read_bytes += int(part["bytes"].sum())
        files.add(rows, digest_bucket(rows["digest"]))
    files.close()
    return plan


def bucket_digests(chunks: Iterable[np.ndarray], directory: Path) -> BucketFiles:
    """Digests (``S64`` arrays, e.g. a pool's ``documents.sha256`` read in chunks) in
    bucket files, for `plan_domain`'s cross-domain check."""
    files = BucketFiles(directory, np.dtype("S64"))
    for chunk in chunks:
        files.add(chunk, digest_bucket(chunk))
    files.close()
    return files


def _split_bucket(kept: np.ndarray, data: DataSpec | None, state: dict) -> None:
    """Fill the split and rank of one bucket's kept rows; `state` carries the held-out
    count and the next rank per split from bucket to bucket."""
    kept["split"] = DROPPED
    for i, (digest, piece_bytes) in enumerate(
        zip(kept["digest"].tolist(), kept["piece_bytes"].tolist(), strict=True)
    ):
        if data is None:
            kept["split"][i] = SPLIT_CODE["train"]
            continue
        if not piece_bytes:
            continue
        code = SPLIT_CODE[split_of(digest.decode(), data, state["held"], state["bytes"])]
        if code != SPLIT_CODE["train"]:
            state["held"] += 1
            state["bytes"] += piece_bytes
        kept["split"][i] = code
        kept["rank"][i] = state[code]
        state[code] += 1


def plan_domain(
    plan: DomainPlan,
    max_bytes: int | None,
    data: DataSpec | None,
    earlier: Sequence[Callable[[int], np.ndarray]] = (),
) -> DomainPlan:
    """Decide, bucket by bucket in digest order, which documents `plan`'s scan keeps and
    where they go: de-duplicate (first occurrence), cap at `max_bytes` (documents taken in
    digest order while the bytes taken are under it), drop the digests that `earlier` (one
    function per earlier domain: bucket number -> its digests) gives for the bucket, then
    split by `data`'s rules (with `data` None, every kept document is routed as training
    text without a rank: a target set is read that way). Writes the kept rows and the
    routes, and removes the scan's files."""
    scan = BucketFiles(plan.directory / "scan", SCAN_DTYPE, fresh=False)
    kept_files = BucketFiles(plan.directory / "kept", KEPT_DTYPE)
    routes = BucketFiles(plan.directory / "routes", ROUTE_DTYPE)
    chunk = max(ROUTE_CHUNK, -(-plan.n_read // DIGEST_BUCKETS))
    state = {"held": 0, "bytes": 0, **dict.fromkeys(SPLIT_CODE.values(), 0)}
    taken = unique = kept_n = cross = 0
    counts: dict[int, int] = {}
    sizes: dict[int, int] = {}
    for b in scan.numbers():
        rows = scan.read(b)
        rows = rows[np.lexsort((rows["ordinal"], rows["digest"]))]
        rows = rows[np.concatenate([[True], rows["digest"][1:] != rows["digest"][:-1]])]
        unique += len(rows)
        if max_bytes is not None:
            before = taken + np.concatenate([[0], np.cumsum(rows["bytes"])[:-1]])
            rows = rows[before < max_bytes]
        taken += int(rows["bytes"].sum())
        kept_n += len(rows)
        for digests_in in earlier:
            dup = np.isin(rows["digest"], digests_in(b))
            cross += int(dup.sum())
            rows = rows[~dup]
        kept = copy_fields(rows, KEPT_DTYPE)
        _split_bucket(kept, data, state)
        for code in np.unique(kept["split"]).tolist():
            mine = kept["split"] == code
            counts[code] = counts.get(code, 0) + int(mine.sum())
            sizes[code] = sizes.get(code, 0) + int(kept["piece_bytes"][mine].sum())
        kept_files.add(kept, np.full(len(kept), b))
        route = copy_fields(kept[kept["split"] != DROPPED], ROUTE_DTYPE)
        routes.add(route, route["ordinal"] // chunk)
    scan.remove()
    kept_files.close()
    routes.close()
    plan.counts, plan.piece_bytes = counts, sizes
    plan.stats.update(
        documents_read=plan.n_read,
        duplicates_removed=plan.n_read - unique,
        documents_kept=kept_n,
    )
    if data is not None:
        plan.stats["cross_domain_duplicates_removed"] = cross
    return plan
