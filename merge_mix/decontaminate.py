"""Keep held-out text out of training: cross-domain exact duplicates and near-duplicates.

Every component trains on every domain (through `general_share`), so a held-out document
of one domain that also sits in another domain's training data would be scored on text
the model has seen. Two checks run over the whole pool when its data is prepared:

- **Exact duplicates across domains.** A document (by SHA-256 of its text) that occurs in
  several domains is kept in the first one, in spec order, and dropped from the others.
  Domains added to a grown pool never take a document an existing domain already has.
- **Near-duplicates.** Each text is reduced to its set of word n-grams ("shingles",
  `data.shingle_words` whitespace-separated words, hashed to 64 bits). A held-out piece is
  dropped when at least `data.near_duplicate_threshold` of its shingles occur anywhere in
  the training text of any domain (a piece shorter than n words is one shingle). When a
  domain is added to a grown pool, its training pieces that would push an existing
  held-out piece over the threshold are dropped instead, so existing splits (and every
  score recorded on them) stay as they are.

Hashes are stable across processes (BLAKE2b of each word, combined polynomially), so the
training shingles stored per domain (``data/<domain>/train.shingles.npy``) serve later
growth. What was removed is recorded per domain in ``data.json`` (``decontamination``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

_MULT = np.uint64(1_099_511_628_211)  # FNV prime: any odd 64-bit constant mixes well


class Shingler:
    """Word n-gram hashes of texts; caches word hashes across calls."""

    def __init__(self, n: int):
        self.n = n
        self._words: dict[str, int] = {}

    def _word(self, word: str) -> int:
        h = self._words.get(word)
        if h is None:
            digest = hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest()
            h = self._words[word] = int.from_bytes(digest, "little")
        return h

    def __call__(self, text: str) -> np.ndarray:
        """The sorted unique shingle hashes of `text` (uint64; empty for blank text)."""
        words = text.split()
        if not words:
            return np.zeros(0, dtype=np.uint64)
        ids = np.fromiter((self._word(w) for w in words), dtype=np.uint64, count=len(words))
        m = max(1, len(ids) - self.n + 1)
        h = np.zeros(m, dtype=np.uint64)
        for j in range(min(self.n, len(ids))):
            h = h * _MULT + ids[j : j + m]
        return np.unique(h)


def union(arrays: Iterable[np.ndarray]) -> np.ndarray:
    arrays = [a for a in arrays if len(a)]
    return np.unique(np.concatenate(arrays)) if arrays else np.zeros(0, dtype=np.uint64)


def coverage(shingles: np.ndarray, seen: np.ndarray) -> float:
    """Share of `shingles` present in the sorted array `seen`."""
    if len(shingles) == 0:
        return 0.0
    return float(np.isin(shingles, seen, assume_unique=True).mean())


def drop_cross_domain_duplicates(
    docs: Mapping[str, dict[str, str]], earlier: set[str]
) -> dict[str, int]:
    """Remove, in place, each domain's documents already held by an earlier domain (spec
    order) or by `earlier` (digests of domains already in the pool). Returns the number
    removed per domain."""
    seen = set(earlier)
    removed = {}
    for name, by_digest in docs.items():
        dupes = [d for d in by_digest if d in seen]
        for d in dupes:
            del by_digest[d]
        seen.update(by_digest)
        removed[name] = len(dupes)
    return removed


def decontaminate(
    corpora: Mapping[str, object],
    threshold: float,
    shingle_words: int,
    earlier_train: np.ndarray | None = None,
    earlier_heldout: Iterable[str] = (),
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, int]]]:
    """Drop near-duplicate held-out pieces of new domains (`corpora`, name ->
    `DomainCorpus`, edited in place) against all training text (theirs and
    `earlier_train`, the stored shingles of domains already in the pool); drop new
    training pieces that would contaminate `earlier_heldout` (the pool's existing held-out
    pieces). Returns each new domain's training shingles (to store) and what was removed."""
    shingle = Shingler(shingle_words)
    report: dict[str, dict[str, int]] = {
        name: {"near_duplicate_heldout_pieces": 0, "near_duplicate_train_pieces": 0}
        for name in corpora
    }
    # Shingles of every new training piece, kept per piece for the growth check below.
    train_shingles: dict[str, list[list[np.ndarray]]] = {
        name: [[shingle(p) for p in doc] for doc in c.splits["train"]]
        for name, c in corpora.items()
    }
    old = earlier_train if earlier_train is not None else np.zeros(0, dtype=np.uint64)
    existing = [shingle(p) for p in earlier_heldout]
    if existing:
        # Growth: an existing held-out piece must not become contaminated by new domains.
        for name, c in corpora.items():
            new = _remaining(train_shingles[name])
            for s_old in existing:
                if coverage(s_old, union([old, new])) < threshold:
                    continue
                if coverage(s_old, old) >= threshold:
                    continue  # contaminated before this growth; its scores are recorded
                _protect(c, train_shingles[name], s_old, old, threshold, report[name])
                new = _remaining(train_shingles[name])
    seen = union([old, *(s for docs in train_shingles.values() for doc in docs for s in doc)])
    for name, c in corpora.items():
        for split in ("search", "test"):
            kept_docs = []
            for doc in c.splits[split]:
                kept = [p for p in doc if coverage(shingle(p), seen) < threshold]
                report[name]["near_duplicate_heldout_pieces"] += len(doc) - len(kept)
                if kept:
                    kept_docs.append(kept)
            c.splits[split] = kept_docs
    per_domain = {
        name: union(s for doc in docs for s in doc) for name, docs in train_shingles.items()
    }
    return per_domain, report


def _protect(corpus, shingles, s_old, old, threshold, report) -> None:
    """Drop the new training pieces that overlap `s_old` most until the existing held-out
    piece's coverage by all training text stays under the threshold."""
    overlaps = []
    for i, doc in enumerate(shingles):
        for j, s in enumerate(doc):
            n = int(np.isin(s_old, s, assume_unique=True).sum())
            if n:
                overlaps.append((n, i, j))
    overlaps.sort(reverse=True)
    covered = np.isin(s_old, old, assume_unique=True)
    for _, i, j in overlaps:
        covered_now = covered | np.isin(s_old, _remaining(shingles), assume_unique=True)
        if covered_now.mean() < threshold:
            break
        corpus.splits["train"][i][j] = None
        shingles[i][j] = np.zeros(0, dtype=np.uint64)
        report["near_duplicate_train_pieces"] += 1
    corpus.splits["train"] = [[p for p in doc if p is not None] for doc in corpus.splits["train"]]
    for doc in shingles:
        doc[:] = [s for s in doc if len(s)]


def _remaining(shingles: list[list[np.ndarray]]) -> np.ndarray:
    return union(s for doc in shingles for s in doc)


def load_digests(path: Path) -> set[str]:
    """The document digests stored for a domain (``documents.sha256``, one per line)."""
    if not path.is_file():
        return set()
    return {line for line in path.read_text().split() if line}
