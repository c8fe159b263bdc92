"""The data stage of a pool: new domains' sources -> splits -> token shards, streaming.

`prepare_domains` turns the spec domains not yet in ``data/data.json`` into shards. No
domain is ever held in memory whole; each is read as a stream (`merge_mix.data.sources`)
several times:

1. **Scan** (workers): one `merge_mix.data.split.DOC_DTYPE` row per document (digest,
   size, bytes of its kept pieces), spilled to disk by digest. De-duplication within and
   across domains, the byte cap and the split are decided from these rows, one digest
   bucket at a time (`merge_mix.data.scan`, with the rules of `merge_mix.data.split`).
2. **Tokenizer sample** (only when the pool trains its BPE): the first training
   documents in digest order, up to `tokenizer.sample_bytes` split evenly over domains.
3. **Growth check** (workers; only when the pool already holds held-out text): which new
   training pieces share word n-grams with existing held-out pieces; those that would
   push one over `data.near_duplicate_threshold` are dropped
   (`merge_mix.decontaminate`'s rule, decided from the shared n-grams only).
4. **Tokenize** (workers): training documents are cut, tokenized and shingled in
   batches; tokens are appended to the shard as they come back (`ShardWriter`), n-gram
   hashes spilled to disk in `spill_buckets` files by their top bits and de-duplicated
   one bucket at a time (`ShingleSpill`). Held-out documents (a ``heldout_fraction``
   share, capped by ``heldout_max_bytes``, ``heldout_max_documents`` and
   ``heldout_max_pieces``) are kept in
   memory as text. A domain's training shard is done when ``train.done.json`` is written,
   after its tokens, index and shingles: a rerun after an interrupt skips such domains'
   tokenizing (if nothing that decides their content changed) and redoes any other.

Then, with every new domain's training text known, held-out pieces near-duplicating any
training text are dropped, search and test are kept apart (`separate_splits`), the
held-out shards and ``documents.sha256`` are written, and ``data.json`` last.

Memory: one digest file of the scan's rows or one range of its routes
(`merge_mix.data.scan`), one group of the piece index (`ShardWriter`), one bucket of n-gram
hashes (at most twice `BUCKET_BYTES`, about four times that while it is de-duplicated,
at any domain size: larger buckets are split first), ``2 x workers`` batches of
`BATCH_BYTES` text in flight, and the held-out text with its n-grams (capped by
``heldout_max_bytes``, 64 MB by default; a warning says when it is large and
uncapped); nothing per training document or piece, and not the training text.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from merge_mix.artifacts import read_json, write_json_atomic
from merge_mix.config import DataSpec, DomainSpec, PoolSpec
from merge_mix.data.scan import (
    BucketFiles,
    DomainPlan,
    allow_open_files,
    bucket_digests,
    plan_domain,
    spill_scan,
)
from merge_mix.data.shards import ShardWriter, write_shard
from merge_mix.data.sources import SKIP_REASONS, domain_documents
from merge_mix.data.split import (
    SPLIT_CODE,
    check_split,
    document_pieces,
    text_hash,
    trim_heldout,
)
from merge_mix.data.tokenizer import (
    load_tokenizer,
    save_tokenizer,
    special_ids,
    token_dtype,
    train_tokenizer,
)
from merge_mix.data.workers import (
    batched,
    default_workers,
    overlap_batch,
    parallel_map,
    scan_batch,
    tokenize_batch,
)
from merge_mix.decontaminate import Shingler, coverage, separate_splits, union
from merge_mix.errors import MergeMixError

logger = logging.getLogger(__name__)
HELDOUT = ("search", "test")
TRAIN_DONE = "train.done.json"
SHINGLE_BUCKETS = 64
"""Fewest n-gram spill buckets; more for large domains (`spill_buckets`)."""
BUCKET_BYTES = 16 << 20
GROUP_BYTES = 64 << 20
"""Training text per group of documents whose piece index is sorted at once."""
MAX_GROUPS = 256
PLAN_DIR = "plan.parts"
"""Where a domain's first-pass decisions are kept while it is prepared (removed after)."""
DIGEST_CHUNK = 1 << 20
HELDOUT_WARN_BYTES = 256 << 20
_CHUNK = 1 << 22  # shingles compared per step against a stored set


def _size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def _stream(
    domain: DomainSpec,
    where: str,
    desc: str,
    show_progress: bool,
    total: int | None = None,
    skipped: dict[str, int] | None = None,
) -> Iterator[str]:
    """The domain's documents with a progress bar in bytes (and MB/s)."""
    from tqdm.auto import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not show_progress) as bar:
        for text in domain_documents(domain, where, skipped, warn=skipped is not None):
            bar.update(_size(text))
            yield text


def scan_domain(
    domain: DomainSpec,
    data: DataSpec,
    where: str,
    directory: Path,
    workers: int = 1,
    show_progress=False,
) -> DomainPlan:
    """Pass 1: the row of every document read, spilled to bucket files in `directory`
    (decided on by `plan_domain`)."""
    skipped = dict.fromkeys(SKIP_REASONS, 0)
    texts = _stream(domain, where, f"{domain.name}: scan", show_progress, skipped=skipped)
    initargs = (data, None, None, "u2", None)
    parts = parallel_map(scan_batch, batched(texts, _size), workers, initargs)
    plan = spill_scan(parts, directory, domain.name)
    plan.stats["skipped"] = skipped
    return plan


def read_kept(domain: DomainSpec, data: DataSpec, where: str) -> tuple[dict[str, str], dict]:
    """A small domain's kept documents (de-duplicated, capped) by digest, read in two
    streaming passes so that only the kept ones are ever held (target sets)."""
    with tempfile.TemporaryDirectory(prefix="merge-mix-scan-") as tmp:
        plan = plan_domain(scan_domain(domain, data, where, Path(tmp)), domain.max_bytes, None)
        docs: dict[str, str] = {}
        for _, _, digest, text in _documents_of(plan, domain, where, "", False):
            _check_digest(text, digest, where)
            docs[digest] = text
    return docs, plan.stats


def _documents_of(plan: DomainPlan, domain, where, desc, show_progress) -> Iterator[tuple]:
    """Pass 2+: ``(split code, rank, digest, text)`` of the documents the plan keeps."""
    routes = plan.routes()
    route = next(routes, None)
    for i, text in enumerate(_stream(domain, where, desc, show_progress, plan.read_bytes)):
        if route is None:
            return  # nothing further is kept
        if i == route[0]:
            yield route[1], route[2], route[3], text
            route = next(routes, None)
    if route is not None:  # the source ended before a document the plan keeps
        _check_digest("", route[3], where)


def _check_digest(text: str, digest: str, where: str) -> None:
    if text_hash(text) != digest:
        raise MergeMixError(
            f"{where}: a source changed while the pool's data was prepared (document"
            f" {digest[:12]} is no longer where it was read); rerun"
        )


def spill_buckets(text_bytes: int) -> int:
    """Buckets so that one holds about `BUCKET_BYTES` of n-gram hashes (a hash per word,
    about 1.6 bytes of hash per byte of text), a power of two from `SHINGLE_BUCKETS` to
    512 (each is an open file; 1024 is a common limit): up to ~5 GB of training text per
    domain a bucket stays near `BUCKET_BYTES`; past that, larger buckets are split again
    when they are de-duplicated (`_unique_bucket`)."""
    need = 1.6 * text_bytes / BUCKET_BYTES
    n = SHINGLE_BUCKETS
    while n < need and n < 512:
        n *= 2
    return n


class ShingleSpill:
    """Sorted unique union of many uint64 arrays with one bucket in memory at a time."""

    def __init__(self, directory: Path, buckets: int = SHINGLE_BUCKETS):
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        self.dir, self.buckets = directory, buckets
        self.shift = np.uint64(64 - (buckets - 1).bit_length())
        self._files = [(directory / f"{b}.u8").open("ab") for b in range(buckets)]

    def add(self, shingles: np.ndarray) -> None:
        if not len(shingles):
            return
        which = (shingles >> self.shift).astype(np.int64)  # sorted input: sorted buckets
        edges = np.searchsorted(which, np.arange(self.buckets + 1))
        for b in range(self.buckets):
            if edges[b + 1] > edges[b]:
                self._files[b].write(shingles[edges[b] : edges[b + 1]].tobytes())

    def finish(self, path: Path) -> int:
        """Write the union to `path` (an ``.npy``, via a tmp name); return its size."""
        for fh in self._files:
            fh.close()
        uniques = self.dir / "unique.u8"
        with uniques.open("wb") as out:
            n = sum(
                _unique_bucket(self.dir / f"{b}.u8", int(self.shift), out)
                for b in range(self.buckets)
            )
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("wb") as out, uniques.open("rb") as src:
            header = {"descr": "<u8", "fortran_order": False, "shape": (n,)}
            np.lib.format.write_array_header_1_0(out, header)
            shutil.copyfileobj(src, out, _CHUNK)
        tmp.replace(path)
        shutil.rmtree(self.dir, ignore_errors=True)
        return n


def _unique_bucket(path: Path, low: int, out) -> int:
    """Append the sorted unique hashes of bucket file `path` (hashes that agree above bit
    `low`) to `out`; return how many. A file over twice `BUCKET_BYTES` is first split, a
    chunk of `BUCKET_BYTES` at a time (de-duplicated), by its next 4 bits into 16 files,
    each done the same way: memory stays near `BUCKET_BYTES` at any domain size."""
    if path.stat().st_size <= 2 * BUCKET_BYTES or low < 4:
        part = np.unique(np.fromfile(path, dtype=np.uint64))
        out.write(part.tobytes())
        return len(part)
    low -= 4
    parts = BucketFiles(path.with_name(path.stem + ".split"), np.dtype(np.uint64))
    with path.open("rb") as fh:
        while chunk := fh.read(BUCKET_BYTES):
            hashes = np.unique(np.frombuffer(chunk, dtype=np.uint64))
            parts.add(hashes, ((hashes >> np.uint64(low)) & np.uint64(15)).astype(np.int64))
    parts.close()
    path.unlink()
    n = sum(_unique_bucket(parts.dir / f"{k}.bin", low, out) for k in parts.numbers())
    parts.remove()
    return n


def covered_by(shingles: np.ndarray, paths: list[Path]) -> np.ndarray:
    """Mask over the sorted `shingles`: which occur in any of the stored sorted sets
    (``.npy`` files, read a chunk at a time)."""
    covered = np.zeros(len(shingles), dtype=bool)
    if not len(shingles):
        return covered
    for path in paths:
        with path.open("rb") as fh:
            major, _ = np.lib.format.read_magic(fh)
            read_header = (
                np.lib.format.read_array_header_1_0
                if major == 1
                else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read_header(fh)
            left = int(np.prod(shape))
            while left:
                chunk = np.fromfile(fh, dtype=dtype, count=min(left, _CHUNK))
                left -= len(chunk)
                idx = np.minimum(np.searchsorted(chunk, shingles), len(chunk) - 1)
                covered |= chunk[idx] == shingles
    return covered


def pool_digests(data_dir: Path, earlier: list[str]) -> Iterator[np.ndarray]:
    """The ``documents.sha256`` of domains `earlier`, as ``S64`` arrays of at most
    `DIGEST_CHUNK` digests."""
    from merge_mix.pool import DIGESTS

    for d in earlier:
        path = data_dir / d / DIGESTS
        if not path.is_file():
            continue
        with path.open("rb") as fh:
            while lines := fh.readlines(DIGEST_CHUNK * 65):
                yield np.array([line.strip() for line in lines], dtype="S64")


def heldout_texts(data_dir: Path, data: dict, split: str) -> list[str]:
    """The pool's held-out pieces of `split` prepared so far: every domain's and every
    target set's (what new text must be kept apart from)."""
    from merge_mix.targets import target_texts

    return [
        json.loads(line)["text"]
        for d in data["domains"]
        for line in (data_dir / d / f"{split}.jsonl").read_text("utf-8").splitlines()
    ] + target_texts(data_dir, data, (split,))  # target sets are held-out text too


def _train_tokenizer(spec, plans, domains, where, show_progress):
    """Pass 2: the BPE, trained on the first training pieces (digest order) of every
    domain, `tokenizer.sample_bytes` split evenly."""
    per_domain = max(1, spec.tokenizer.sample_bytes // max(1, len(plans)))
    sample = {}
    for plan, domain in zip(plans, domains, strict=True):
        needed = sum(int((before < per_domain).sum()) for before in plan.train_bytes_before())
        docs: dict[int, list[str]] = {}
        for code, rank, digest, text in _documents_of(
            plan, domain, where[plan.name], f"{plan.name}: tokenizer sample", show_progress
        ):
            if code == SPLIT_CODE["train"] and rank < needed:
                _check_digest(text, digest, where[plan.name])
                docs[rank] = document_pieces(text, spec.data)
        sample[plan.name] = [p for r in sorted(docs) for p in docs[r]]
    return train_tokenizer(sample, spec.tokenizer.vocab_size, spec.tokenizer.sample_bytes)


def _protect(plans, domains, where, existing, earlier_train, spec, workers, show_progress):
    """Pass 3 (growth): new training pieces to drop so that no existing held-out piece
    becomes `near_duplicate_threshold` covered by training text. Returns
    ``{domain: {rank: {piece numbers}}}`` and the count per domain."""
    threshold = spec.data.near_duplicate_threshold
    dropped: dict[str, dict[int, set[int]]] = {p.name: {} for p in plans}
    counts = dict.fromkeys(dropped, 0)
    protect = union(existing)
    old_mask = covered_by(protect, earlier_train)
    shared: dict[tuple[str, int, int], np.ndarray] = {}
    for plan, domain in zip(plans, domains, strict=True):
        items = (
            (rank, text, digest, ())
            for code, rank, digest, text in _documents_of(
                plan, domain, where[plan.name], f"{plan.name}: growth check", show_progress
            )
            if code == SPLIT_CODE["train"]
        )
        initargs = (spec.data, None, None, "u2", protect)
        for found in parallel_map(
            overlap_batch, batched(items, lambda x: _size(x[1])), workers, initargs
        ):
            for rank, j, common in found:
                shared[(plan.name, rank, j)] = common

    def remaining() -> np.ndarray:
        return union(
            s for key, s in shared.items() if key[2] not in dropped[key[0]].get(key[1], ())
        )

    for s_old in existing:
        in_old = old_mask[np.searchsorted(protect, s_old)] if len(s_old) else np.zeros(0, bool)
        if not len(s_old) or in_old.mean() >= threshold:
            continue  # contaminated before this growth; its scores are recorded
        if (in_old | np.isin(s_old, remaining())).mean() < threshold:
            continue
        overlaps = sorted(
            (-int(np.isin(s_old, s, assume_unique=True).sum()), key)
            for key, s in shared.items()
            if key[2] not in dropped[key[0]].get(key[1], ())
        )
        for n, (name, rank, j) in overlaps:
            if n == 0:
                break
            if (in_old | np.isin(s_old, remaining())).mean() < threshold:
                break
            dropped[name].setdefault(rank, set()).add(j)
            counts[name] += 1
    return dropped, counts


def _train_key(plan: DomainPlan, spec: PoolSpec, tok_sha: str, dropped) -> str:
    blob = hashlib.sha256()
    plan.update_train_hash(blob)
    blob.update(json.dumps(spec.data.identity(), sort_keys=True).encode())
    blob.update(tok_sha.encode())
    blob.update(json.dumps(sorted((r, sorted(js)) for r, js in dropped.items())).encode())
    return blob.hexdigest()


def _tokenize_domain(
    plan, domain, where, out: Path, spec, tokenizer, dropped, workers, show_progress, key
):
    """Pass 4: the training shard (unless done with the same key) and the held-out
    documents ``{split: {rank: pieces}}`` with the number of pieces trimmed."""
    from merge_mix.pool import SHINGLES

    out.mkdir(parents=True, exist_ok=True)
    marker = out / TRAIN_DONE
    done = read_json(marker) if marker.is_file() else None
    if done is not None and done.get("key") != key:
        done = None
    held: dict[str, dict[int, list[str]]] = {s: {} for s in HELDOUT}
    trimmed = [0]

    def train_items():
        for code, rank, digest, text in _documents_of(
            plan, domain, where, f"{plan.name}: tokenize", show_progress
        ):
            if code == SPLIT_CODE["train"]:
                if done is None:
                    yield rank, text, digest, frozenset(dropped.get(rank, ()))
                continue
            _check_digest(text, digest, where)
            pieces, cut = trim_heldout(document_pieces(text, spec.data), spec.data)
            trimmed[0] += cut
            held[HELDOUT[code - 1]][rank] = pieces

    if done is not None:
        logger.info("%s: training shard already done; reading held-out text", plan.name)
        for _ in train_items():
            pass
        return done["counts"], held, trimmed[0]
    marker.unlink(missing_ok=True)
    bos, eos = special_ids(tokenizer)
    dtype = token_dtype(len(tokenizer))
    writer = ShardWriter(out, "train", dtype, plan.rank_groups(GROUP_BYTES, MAX_GROUPS))
    spill = ShingleSpill(out / "train.shingles.parts", spill_buckets(plan.read_bytes))
    initargs = (spec.data, tokenizer.backend_tokenizer.to_str(), (bos, eos), dtype.str, None)
    batches = batched(train_items(), lambda x: _size(x[1]))
    try:
        for tokens, rows, shingles in parallel_map(tokenize_batch, batches, workers, initargs):
            writer.add(tokens, rows)
            spill.add(shingles)
    except MergeMixError as exc:  # from a worker: say which domain
        raise MergeMixError(f"{where}: {exc}") from None
    counts = writer.finish()
    spill.finish(out / SHINGLES)
    write_json_atomic(marker, {"key": key, "counts": counts})
    return counts, held, trimmed[0]


def prepare_domains(
    spec: PoolSpec,
    pool_dir: Path,
    data: dict,
    sources_hash,
    workers: int | None = None,
    show_progress: bool = False,
) -> dict:
    """Prepare every spec domain not in `data` (``data.json``, updated and written last).
    `sources_hash(spec, name)` is recorded per domain; `workers` defaults to the cores
    available."""
    allow_open_files()
    try:
        return _prepare_domains(spec, pool_dir, data, sources_hash, workers, show_progress)
    finally:  # the first pass's files, whether the stage finished or not
        for path in (pool_dir / "data").glob(f"*/{PLAN_DIR}"):
            shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(pool_dir / "data" / f"{PLAN_DIR}.pool", ignore_errors=True)


def _warn_heldout_size(plan: DomainPlan, data: DataSpec, where: str) -> None:
    """Held-out text is held in memory while it is decontaminated: say so when a domain's
    is large and nothing caps it."""
    held = sum(plan.piece_bytes.get(SPLIT_CODE[s], 0) for s in HELDOUT)
    if data.heldout_max_pieces is not None:
        documents = sum(plan.count(s) for s in HELDOUT)
        held = min(held, documents * data.heldout_max_pieces * data.max_doc_bytes)
    if held > HELDOUT_WARN_BYTES:
        logger.warning(
            "%s: %d MB of held-out text (heldout_fraction %g) will be held in memory while"
            " it is decontaminated; set data.heldout_max_bytes (or heldout_max_documents,"
            " heldout_max_pieces) to cap it",
            where, held >> 20, data.heldout_fraction,
        )  # fmt: skip


def _prepare_domains(spec, pool_dir, data, sources_hash, workers, show_progress) -> dict:
    from merge_mix.pool import DIGESTS, SHINGLES

    workers = workers or default_workers()
    data_dir = pool_dir / "data"
    todo = [d for d in spec.domains if d.name not in data["domains"]]
    where = {d.name: f"{spec.spec_path}: domains.{d.name}" for d in todo}
    plans = []
    for d in todo:
        logger.info("[%s] reading domain %r", spec.name, d.name)
        directory = data_dir / d.name / PLAN_DIR
        plans.append(scan_domain(d, spec.data, where[d.name], directory, workers, show_progress))
    earlier = list(data["domains"])
    in_pool = bucket_digests(pool_digests(data_dir, earlier), data_dir / f"{PLAN_DIR}.pool")
    taken = [in_pool.read]
    for plan, d in zip(plans, todo, strict=True):
        plan_domain(plan, d.max_bytes, spec.data, taken)
        check_split(plan.count("train"), "train", where[plan.name])
        _warn_heldout_size(plan, spec.data, where[plan.name])
        taken.append(plan.kept_digests)
    tok_dir = pool_dir / "tokenizer"
    if not (tok_dir / "tokenizer_config.json").is_file():
        if spec.tokenizer.path is not None:
            tokenizer = load_tokenizer(spec.tokenizer.path)
        else:
            logger.info(
                "[%s] training a %d-token byte-level BPE", spec.name, spec.tokenizer.vocab_size
            )
            tokenizer = _train_tokenizer(spec, plans, todo, where, show_progress)
        tmp = pool_dir / "tokenizer.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_tokenizer(tokenizer, tmp)
        shutil.rmtree(tok_dir, ignore_errors=True)
        tmp.rename(tok_dir)
    tokenizer = load_tokenizer(tok_dir)
    tok_sha = hashlib.sha256((tok_dir / "tokenizer.json").read_bytes()).hexdigest()
    data["token_dtype"] = token_dtype(len(tokenizer)).str
    earlier_by_split = {split: heldout_texts(data_dir, data, split) for split in HELDOUT}
    earlier_train = [data_dir / d / SHINGLES for d in earlier]
    shingle = Shingler(spec.data.shingle_words)
    existing = [shingle(t) for split in HELDOUT for t in earlier_by_split[split]]
    dropped: dict[str, dict[int, set[int]]] = {p.name: {} for p in plans}
    drop_counts = dict.fromkeys(dropped, 0)
    if existing:
        logger.info("[%s] checking new training text against existing held-out text", spec.name)
        dropped, drop_counts = _protect(
            plans, todo, where, existing, earlier_train, spec, workers, show_progress
        )
    train_counts, held = {}, {}
    for plan, d in zip(plans, todo, strict=True):
        logger.info("[%s] tokenizing domain %r", spec.name, d.name)
        key = _train_key(plan, spec, tok_sha, dropped[d.name])
        counts, docs, trimmed = _tokenize_domain(
            plan, d, where[d.name], data_dir / d.name, spec, tokenizer, dropped[d.name],
            workers, show_progress, key,
        )  # fmt: skip
        train_counts[d.name] = counts
        held[d.name] = {s: [docs[s][r] for r in sorted(docs[s])] for s in HELDOUT}
        plan.stats["heldout_pieces_trimmed"] = trimmed
    logger.info("[%s] removing held-out near-duplicates of training text", spec.name)
    threshold = spec.data.near_duplicate_threshold
    new_shingles = {
        n: {s: [[shingle(p) for p in doc] for doc in docs[s]] for s in HELDOUT}
        for n, docs in held.items()
    }
    every = union(x for v in new_shingles.values() for s in HELDOUT for doc in v[s] for x in doc)
    seen = every[covered_by(every, earlier_train + [data_dir / n / SHINGLES for n in held])]
    for plan in plans:
        removed = 0
        for s in HELDOUT:
            kept_docs = []
            for doc, sh in zip(held[plan.name][s], new_shingles[plan.name][s], strict=True):
                kept = [p for p, x in zip(doc, sh, strict=True) if coverage(x, seen) < threshold]
                removed += len(doc) - len(kept)
                if kept:
                    kept_docs.append(kept)
            held[plan.name][s] = kept_docs
        plan.stats["near_duplicate_heldout_pieces"] = removed
        plan.stats["near_duplicate_train_pieces"] = drop_counts[plan.name]
    logger.info("[%s] keeping search and test text apart", spec.name)
    apart = separate_splits(
        held, threshold, spec.data.shingle_words, earlier_by_split["search"],
        earlier_by_split["test"],
    )  # fmt: skip
    data["format_version"] = _format_version()
    for plan in plans:
        plan.stats.update(apart[plan.name])
        counts = {"train": train_counts[plan.name]}
        for s in HELDOUT:
            check_split(len(held[plan.name][s]), s, where[plan.name])
        stats = plan.stats
        for s in ("train", *HELDOUT):
            if s != "train":
                docs = held[plan.name][s]
                stats[f"{s}_documents"] = len(docs)
                stats[f"{s}_pieces"] = sum(len(doc) for doc in docs)
                stats[f"{s}_bytes"] = sum(len(p.encode("utf-8")) for doc in docs for p in doc)
            else:
                stats["train_documents"] = counts["train"]["documents"]
                stats["train_pieces"] = counts["train"]["pieces"]
                stats["train_bytes"] = counts["train"]["bytes"]
    for plan in plans:
        out = data_dir / plan.name
        entry = {"sources_hash": sources_hash(spec, plan.name), "corpus": plan.stats}
        entry["train"] = train_counts[plan.name]
        for s in HELDOUT:
            entry[s] = write_shard(tokenizer, held[plan.name][s], out, s, keep_text=True)
        with (out / (DIGESTS + ".tmp")).open("w") as fh:
            fh.writelines(f"{h}\n" for h in plan.digests())
        (out / (DIGESTS + ".tmp")).replace(out / DIGESTS)
        data["domains"][plan.name] = entry
    write_json_atomic(data_dir / "data.json", data)
    return data


def _format_version() -> int:
    from merge_mix.pool import FORMAT_VERSION

    return FORMAT_VERSION
