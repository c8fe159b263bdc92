"""De-duplication, the byte cap and the train/search/test split, from document digests.

A document is known by the SHA-256 of its UTF-8 text (`text_hash`, 64 hex digits). One
streaming pass over a domain's sources (`merge_mix.data.prepare`) records, per document
read, only a `DOC_DTYPE` row: its digest, its size and how many bytes its kept pieces hold.
Everything below is decided from those rows, never from texts, one digest bucket at a time
(`merge_mix.data.scan`):

- **Within-domain de-duplication**: the first document of each digest is kept.
- **The byte cap** (`max_bytes`): documents are taken in digest order (a fixed
  pseudo-random order, so a cap samples all sources evenly) while the bytes taken so far
  are under the cap.
- **Cross-domain de-duplication**: a digest kept by an earlier domain (spec order, or
  already in the pool) is dropped (`merge_mix.decontaminate` explains why).
- **The split**: a document is held out when the last 32 bits of its digest, read as a
  uniform draw, fall under `data.heldout_fraction` (`is_heldout`); a held-out document is
  ``test`` or ``search`` by the 32 bits before those (`heldout_role`). Documents with no
  piece of at least `data.min_doc_bytes` are dropped; held-out documents past
  `data.heldout_max_documents` or `data.heldout_max_bytes` (digest order) train instead.

Documents are cut at line boundaries into pieces of at most `data.max_doc_bytes`
(`cut_pieces`); a held-out document keeps its first `data.heldout_max_pieces` pieces.
Within a split, documents are numbered in digest order: the token shards list them in
that order.

`read_domain`, `split_domain` and `build_domain` do the same on a small domain held in
memory (tests, benchmarks).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from merge_mix.config import DataSpec, DomainSpec
from merge_mix.errors import MergeMixError

SPLITS = ("train", "search", "test")
"""A pool's splits: components train on ``train``; searches select on ``search``; final
verdicts and `validate` judge on ``test``. Held-out documents are in exactly one of the
last two."""
SPLIT_CODE = {"train": 0, "search": 1, "test": 2}
DROPPED = -1

DOC_DTYPE = np.dtype([("digest", "S64"), ("bytes", "<i8"), ("piece_bytes", "<i8")])
"""One row per document read: hex SHA-256, UTF-8 size, bytes of its kept pieces (0 when
no piece reaches `min_doc_bytes`)."""


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def is_heldout(digest: str, fraction: float) -> bool:
    """Deterministic split: the last 32 bits of the content hash as a uniform draw (the
    leading bits order documents for the byte cap, so they must not decide the split)."""
    return int(digest[-8:], 16) / 2**32 < fraction


def heldout_role(digest: str, test_fraction: float) -> str:
    """``test`` or ``search`` for a held-out document: the 32 bits before the last ones,
    independent of the held-out draw."""
    return "test" if int(digest[-16:-8], 16) / 2**32 < test_fraction else "search"


def cut_pieces(text: str, max_bytes: int) -> list[str]:
    """Cut a document at line boundaries into pieces of at most `max_bytes` UTF-8 bytes.
    A single line longer than that is cut at a character boundary."""
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        n = len(line.encode("utf-8"))
        while n > max_bytes:
            if current:
                pieces.append("".join(current))
                current, size = [], 0
            head = line.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
            pieces.append(head)
            line = line[len(head) :]
            n = len(line.encode("utf-8"))
        if size + n > max_bytes and current:
            pieces.append("".join(current))
            current, size = [], 0
        current.append(line)
        size += n
    if current:
        pieces.append("".join(current))
    return pieces


def document_pieces(text: str, data: DataSpec) -> list[str]:
    """The pieces of a document that are kept: cut, those under `min_doc_bytes` dropped."""
    return [
        p
        for p in cut_pieces(text, data.max_doc_bytes)
        if len(p.strip().encode("utf-8")) >= data.min_doc_bytes
    ]


def doc_info(texts: Iterable[str], data: DataSpec) -> np.ndarray:
    """`DOC_DTYPE` rows of `texts` (the work of the first pass, run in workers)."""
    rows = []
    for text in texts:
        raw = text.encode("utf-8")
        if len(raw) <= data.max_doc_bytes:
            # One piece, the text itself (`cut_pieces` cuts nothing): skip its line loop.
            kept = len(text.strip().encode("utf-8")) >= data.min_doc_bytes
            piece_bytes = len(raw) if kept else 0
        else:
            piece_bytes = sum(len(p.encode("utf-8")) for p in document_pieces(text, data))
        rows.append((hashlib.sha256(raw).hexdigest(), len(raw), piece_bytes))
    return np.array(rows, dtype=DOC_DTYPE)


def split_of(digest: str, data: DataSpec, held: int, held_bytes: int) -> str:
    """``train``, ``search`` or ``test`` for a document with pieces, `held` documents with
    `held_bytes` bytes of pieces having been held out before it (digest order)."""
    if (
        is_heldout(digest, data.heldout_fraction)
        and (data.heldout_max_documents is None or held < data.heldout_max_documents)
        and (data.heldout_max_bytes is None or held_bytes < data.heldout_max_bytes)
    ):
        return heldout_role(digest, data.test_fraction)
    return "train"


def trim_heldout(pieces: list[str], data: DataSpec) -> tuple[list[str], int]:
    """A held-out document's first `heldout_max_pieces` pieces, and how many were cut."""
    cap = data.heldout_max_pieces
    if cap is not None and len(pieces) > cap:
        return pieces[:cap], len(pieces) - cap
    return pieces, 0


# In-memory versions for small domains (tests, benchmarks).


@dataclass
class DomainCorpus:
    """A domain's text, split by document and cut into pieces: each split is a list of
    documents, each document a list of pieces."""

    name: str
    splits: dict[str, list[list[str]]] = field(
        default_factory=lambda: {split: [] for split in SPLITS}
    )
    digests: list[str] = field(default_factory=list)
    """SHA-256 of every document kept (all splits), for cross-domain de-duplication."""
    stats: dict[str, Any] = field(default_factory=dict)

    def pieces(self, split: str) -> list[str]:
        return [p for doc in self.splits[split] for p in doc]


def read_domain(domain: DomainSpec, where: str) -> tuple[dict[str, str], dict]:
    """A small domain's documents by SHA-256 in memory, de-duplicated and capped as the
    streaming stage does. The stats include ``skipped``: files skipped, by reason."""
    from merge_mix.data.sources import SKIP_REASONS, domain_documents

    skipped = dict.fromkeys(SKIP_REASONS, 0)
    docs: dict[str, str] = {}
    n_read = 0
    for text in domain_documents(domain, where, skipped):
        n_read += 1
        docs.setdefault(text_hash(text), text)
    kept: dict[str, str] = {}
    total = 0
    for digest in sorted(docs):
        if domain.max_bytes is not None and total >= domain.max_bytes:
            break
        kept[digest] = docs[digest]
        total += len(docs[digest].encode("utf-8"))
    stats = {
        "documents_read": n_read,
        "duplicates_removed": n_read - len(docs),
        "documents_kept": len(kept),
        "skipped": skipped,
    }
    return kept, stats


def split_domain(
    name: str, docs: dict[str, str], data: DataSpec, stats: dict[str, Any] | None = None
) -> DomainCorpus:
    """Split documents (by SHA-256) into train / search / test and cut them into pieces:
    the rules of `merge_mix.data.scan.plan_domain` on texts held in memory."""
    corpus = DomainCorpus(name=name, stats=dict(stats or {}))
    held = held_bytes = trimmed = 0
    for digest in sorted(docs):
        pieces = document_pieces(docs[digest], data)
        if not pieces:
            continue
        split = split_of(digest, data, held, held_bytes)
        if split != "train":
            held += 1
            held_bytes += sum(len(p.encode("utf-8")) for p in pieces)
            pieces, cut = trim_heldout(pieces, data)
            trimmed += cut
        corpus.splits[split].append(pieces)
        corpus.digests.append(digest)
    corpus.stats["heldout_pieces_trimmed"] = trimmed
    return corpus


def check_corpus(corpus: DomainCorpus, where: str) -> None:
    """Every split must keep some text; fills in the split counts of `corpus.stats`."""
    for split in SPLITS:
        docs = [d for d in corpus.splits[split] if d]
        corpus.splits[split] = docs
        check_split(len(docs), split, where)
        corpus.stats[f"{split}_documents"] = len(docs)
        corpus.stats[f"{split}_pieces"] = sum(len(d) for d in docs)
        corpus.stats[f"{split}_bytes"] = sum(len(p.encode("utf-8")) for d in docs for p in d)


def check_split(n_documents: int, split: str, where: str) -> None:
    """Refuse a domain left with no document in `split`."""
    if not n_documents:
        hint = "add documents" if split == "train" else "add documents or raise"
        hint += "" if split == "train" else " data.heldout_fraction"
        raise MergeMixError(
            f"{where}: no {split} text left after splitting and de-duplication ({hint})"
        )


def build_domain(domain: DomainSpec, data: DataSpec, where: str) -> DomainCorpus:
    """Read, de-duplicate, cap, split and cut one small domain in memory (no cross-domain
    de-duplication or decontamination: `merge_mix.data.prepare` does those for a pool)."""
    docs, stats = read_domain(domain, where)
    corpus = split_domain(domain.name, docs, data, stats)
    check_corpus(corpus, where)
    return corpus
