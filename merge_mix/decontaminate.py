"""Keep held-out text out of training: cross-domain exact duplicates and near-duplicates.

Every component trains on every domain (through `general_share`), so a held-out piece of
one domain whose text sits in any domain's training data would be scored on text the
model has seen. Two checks run over the whole pool when its data is prepared:

- **Exact duplicates across domains.** A document (by SHA-256 of its text) that occurs in
  several domains is kept in the first one, in spec order, and dropped from the others, so
  each document is trained on and scored under one domain only. (The split is by content
  hash with pool-wide fractions, so a shared document lands in the same split everywhere;
  a domain's `heldout_max_documents` cap can move it to train in one domain only, which
  this removal also prevents.) Domains added to a grown pool never take a document an
  existing domain already has.
- **Near-duplicates.** Each text is reduced to its set of word n-grams ("shingles",
  `data.shingle_words` whitespace-separated words, hashed to 64 bits). A held-out piece is
  dropped when at least `data.near_duplicate_threshold` of its shingles occur anywhere in
  the training text of any domain (a piece shorter than n words is one shingle). When a
  domain is added to a grown pool, its training pieces that would push an existing
  held-out piece over the threshold are dropped instead, so existing splits (and every
  score recorded on them) stay as they are; several new domains are checked together.

- **Search and test apart.** The search split selects mixtures and the test split judges
  them, so the two must not share text either: documents that nest inside each other (a
  section also published alone) would otherwise be selected on and judged on at once. A
  new search piece at least `data.near_duplicate_threshold` covered by test text (any
  domain's or target set's) is dropped; then a new test piece at least that much covered
  by the remaining search text is dropped. Test text wins because the verdicts read it.
  When a pool grows, an existing test piece is never dropped: new search pieces that
  would cover it past the threshold are dropped instead (`separate_splits`).

Hashes are stable across processes (BLAKE2b of each word, combined polynomially), so the
training shingles stored per domain (``data/<domain>/train.shingles.npy``) serve later
growth. What was removed is recorded per domain in ``data.json`` (``corpus``:
``cross_domain_duplicates_removed``, ``near_duplicate_heldout_pieces``,
``near_duplicate_train_pieces``, ``search_pieces_in_test``, ``test_pieces_in_search``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

_MULT = np.uint64(1_099_511_628_211)  # FNV prime: any odd 64-bit constant mixes well
SPLIT_NAMES = ("search", "test")


class Shingler:
    """Word n-gram hashes of texts; caches word hashes across calls (at most
    `max_cached` words, so a stream of many distinct words keeps bounded memory)."""

    def __init__(self, n: int, max_cached: int = 1_000_000):
        self.n = n
        self.max_cached = max_cached
        self._words: dict[str, int] = {}

    def _word(self, word: str) -> int:
        h = self._words.get(word)
        if h is None:
            digest = hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest()
            h = self._words[word] = int.from_bytes(digest, "little")
        return h

    def __call__(self, text: str) -> np.ndarray:
        """The sorted unique shingle hashes of `text` (uint64; empty for blank text)."""
        return np.unique(self.hashes(text))

    def hashes(self, text: str) -> np.ndarray:
        """The shingle hashes of `text` in text order, repeats included (a union of many
        texts needs one `np.unique` over all of them, not one per text)."""
        words = text.split()
        if not words:
            return np.zeros(0, dtype=np.uint64)
        cache = self._words
        if len(cache) > self.max_cached:
            cache.clear()
        for w in set(words).difference(cache):
            self._word(w)
        ids = np.fromiter(map(cache.__getitem__, words), dtype=np.uint64, count=len(words))
        m = max(1, len(ids) - self.n + 1)
        h = np.zeros(m, dtype=np.uint64)
        for j in range(min(self.n, len(ids))):
            h = h * _MULT + ids[j : j + m]
        return h


def union(arrays: Iterable[np.ndarray]) -> np.ndarray:
    """The sorted unique shingles of several arrays."""
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
        # Growth: an existing held-out piece must not become contaminated by the new domains,
        # alone or together.
        new = _remaining(train_shingles)
        for s_old in existing:
            if coverage(s_old, union([old, new])) < threshold:
                continue
            if coverage(s_old, old) >= threshold:
                continue  # contaminated before this growth; its scores are recorded
            _protect(corpora, train_shingles, s_old, old, threshold, report)
            new = _remaining(train_shingles)
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


def separate_splits(
    splits: Mapping[str, dict[str, list[list[str]]]],
    threshold: float,
    shingle_words: int,
    earlier_search: Iterable[str] = (),
    earlier_test: Iterable[str] = (),
) -> dict[str, dict[str, int]]:
    """Keep search and test text apart: edit, in place, the ``search`` and ``test``
    documents (lists of pieces) of each new domain or target set in `splits` so that no
    search piece is `threshold` covered by test text and no test piece by search text,
    counting the pool's existing held-out pieces (`earlier_search`, `earlier_test`), which
    are kept as they are. Returns the pieces removed per name."""
    shingle = Shingler(shingle_words)
    report = {name: {"search_pieces_in_test": 0, "test_pieces_in_search": 0} for name in splits}
    new = {
        name: {split: [[shingle(p) for p in doc] for doc in s[split]] for split in SPLIT_NAMES}
        for name, s in splits.items()
    }
    old_search = union(shingle(p) for p in earlier_search)
    old_test = [shingle(p) for p in earlier_test]

    def pieces(split):
        return [s for docs in new.values() for doc in docs[split] for s in doc if s is not None]

    def drop(name, split, i, j, key):
        new[name][split][i][j] = None
        report[name][key] += 1

    test_seen = union([*old_test, *pieces("test")])
    for name, docs in new.items():
        for i, doc in enumerate(docs["search"]):
            for j, s in enumerate(doc):
                if coverage(s, test_seen) >= threshold:
                    drop(name, "search", i, j, "search_pieces_in_test")
    for s_old in old_test:  # growth: existing test text stays as it was judged
        if coverage(s_old, old_search) >= threshold:
            continue  # covered before this growth
        while coverage(s_old, union([old_search, *pieces("search")])) >= threshold:
            name, i, j = max(
                (
                    (int(np.isin(s_old, s, assume_unique=True).sum()), name, i, j)
                    for name, docs in new.items()
                    for i, doc in enumerate(docs["search"])
                    for j, s in enumerate(doc)
                    if s is not None
                ),
                key=lambda x: x[0],  # the first of equal overlaps: deterministic
            )[1:]
            drop(name, "search", i, j, "search_pieces_in_test")
    search_seen = union([old_search, *pieces("search")])
    for name, docs in new.items():
        for i, doc in enumerate(docs["test"]):
            for j, s in enumerate(doc):
                if coverage(s, search_seen) >= threshold:
                    drop(name, "test", i, j, "test_pieces_in_search")
    for name, docs in new.items():
        for split in SPLIT_NAMES:
            kept = [
                [p for p, s in zip(doc, sh, strict=True) if s is not None]
                for doc, sh in zip(splits[name][split], docs[split], strict=True)
            ]
            splits[name][split] = [doc for doc in kept if doc]
    return report


def _protect(corpora, shingles, s_old, old, threshold, report) -> None:
    """Drop the new training pieces (of any new domain) that overlap `s_old` most until the
    existing held-out piece's coverage by all training text is under the threshold."""
    overlaps = []
    for name, docs in shingles.items():
        for i, doc in enumerate(docs):
            for j, s in enumerate(doc):
                n = int(np.isin(s_old, s, assume_unique=True).sum())
                if n:
                    overlaps.append((n, name, i, j))
    overlaps.sort(key=lambda x: (-x[0], x[1], x[2], x[3]))
    covered = np.isin(s_old, old, assume_unique=True)
    for _, name, i, j in overlaps:
        covered_now = covered | np.isin(s_old, _remaining(shingles), assume_unique=True)
        if covered_now.mean() < threshold:
            break
        corpora[name].splits["train"][i][j] = None
        shingles[name][i][j] = np.zeros(0, dtype=np.uint64)
        report[name]["near_duplicate_train_pieces"] += 1
    for name, docs in shingles.items():
        train = corpora[name].splits["train"]
        corpora[name].splits["train"] = [[p for p in doc if p is not None] for doc in train]
        for doc in docs:
            doc[:] = [s for s in doc if len(s)]


def _remaining(shingles: dict[str, list[list[np.ndarray]]]) -> np.ndarray:
    return union(s for docs in shingles.values() for doc in docs for s in doc)


def load_digests(path: Path) -> set[str]:
    """The document digests stored for a domain (``documents.sha256``, one per line)."""
    if not path.is_file():
        return set()
    return {line for line in path.read_text().split() if line}
