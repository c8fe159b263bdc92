"""Domain corpora: read each domain's sources, de-duplicate, split train/held-out.

Documents come from local files only (never a hub). A document's split (train, or held
out and then ``search`` or ``test``) is decided by the SHA-256 of its text, so the split is
deterministic and independent of source order, and exact duplicates are removed before
splitting so no document is in two splits. Long documents are then cut at line boundaries
into pieces of at most `data.max_doc_bytes`. Held-out pieces that repeat training text
(of any domain) are removed afterwards by `merge_mix.decontaminate`.

The built-in corpora read text that ships with every Python installation that has
merge-mix installed: the interpreter's own files (found with `sysconfig`) and the files of
the installed distributions merge-mix depends on (its requirement closure, read from the
installed metadata; optional extras excluded). Packages that merge-mix does not need are
never read, so two machines with the same dependency versions build the same corpora.

- ``python-stdlib``: the standard library's ``.py`` source.
- ``c-headers``: C and C++ headers from the interpreter's include directory and the
  dependencies (torch ships many).
- ``config-files``: YAML, TOML, JSON, INI and CFG files from the dependencies and the stdlib.
- ``prose``: package descriptions (``METADATA``), licence texts, Markdown/reST/text
  documentation of the dependencies and the stdlib, and Python's documentation topics
  (``pydoc_data``).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import logging
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merge_mix.config import DataSpec, DomainSpec, SourceSpec
from merge_mix.errors import MergeMixError

# Built-in corpora skip files above this size: a single huge JSON or header would
# otherwise fill a whole capped domain.
_BUILTIN_MAX_FILE_BYTES = 256_000
_SKIP_DIRS = {"__pycache__", ".git", "node_modules"}
SKIP_REASONS = ("not_utf8", "binary", "too_large")
"""Why a file is skipped: it does not decode (as UTF-8, or as the source's `encoding`), it
holds a NUL byte, or it is larger than the source's cap."""
_REASON_TEXT = {
    "not_utf8": "not UTF-8 text",
    "binary": "binary (NUL bytes)",
    "too_large": "too large",
}
logger = logging.getLogger(__name__)


SPLITS = ("train", "search", "test")
"""A pool's splits: components train on ``train``; searches select on ``search``; final
verdicts and `validate` judge on ``test``. Held-out documents are in exactly one of the
last two."""


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


@functools.lru_cache(maxsize=1)
def dependency_files() -> list[Path]:
    """Every file of the installed distributions in merge-mix's requirement closure
    (merge-mix itself excluded), sorted. Falls back to everything in site-packages when
    merge-mix is not installed as a distribution (running from a bare source tree)."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    try:
        distribution("merge-mix")
    except PackageNotFoundError:
        paths = sysconfig.get_paths()
        roots = {Path(paths[k]).resolve() for k in ("purelib", "platlib")}
        return sorted(p for r in roots if r.is_dir() for p in r.rglob("*") if p.is_file())
    seen: set[tuple[str, frozenset[str]]] = set()
    stack: list[tuple[str, frozenset[str]]] = [("merge-mix", frozenset())]
    files: set[Path] = set()
    while stack:
        name, extras = stack.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue  # an optional or platform-specific requirement that is not installed
        for text in dist.requires or []:
            req = Requirement(text)
            wanted = extras or {""}
            if req.marker is not None and not any(
                req.marker.evaluate({"extra": e}) for e in wanted
            ):
                continue
            stack.append((canonicalize_name(req.name), frozenset(req.extras)))
        if name != "merge-mix":
            files.update(Path(str(dist.locate_file(f))).resolve() for f in dist.files or [])
    return sorted(files)  # callers treat it as read-only (it is cached)


def _select(
    paths: list[Path],
    suffixes: tuple[str, ...],
    names: tuple[str, ...] = (),
    skipped: dict[str, int] | None = None,
) -> list[Path]:
    """Readable files among `paths` with one of `suffixes` (or a name prefix), sorted;
    those over `_BUILTIN_MAX_FILE_BYTES` are counted in ``skipped["too_large"]``."""
    found: set[Path] = set()
    for path in dict.fromkeys(paths):  # each file once, so it is counted once
        if any(part in _SKIP_DIRS for part in path.parts):
            continue
        name = path.name
        if name.endswith(suffixes) or (names and name.startswith(names)):
            try:
                if not path.is_file():
                    continue
                if path.stat().st_size <= _BUILTIN_MAX_FILE_BYTES:
                    found.add(path)
                elif skipped is not None:
                    skipped["too_large"] = skipped.get("too_large", 0) + 1
            except OSError:
                continue
    return sorted(found)


def _walk(
    roots: list[Path], suffixes: tuple[str, ...], skipped: dict[str, int] | None = None
) -> list[Path]:
    """Files under `roots` (the interpreter's own directories) with one of `suffixes`."""
    found = [p for root in roots if root.is_dir() for p in root.rglob("*")]
    return _select(found, suffixes, skipped=skipped)


def _read_text(
    path: Path, skipped: dict[str, int] | None = None, encoding: str | None = None
) -> str | None:
    """The file's text, or None (counted in `skipped` by reason) if it holds a NUL byte or
    does not decode as `encoding` (UTF-8 when None). Unreadable files are None too."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    reason = None
    if b"\x00" in data:
        reason = "binary"
    else:
        try:
            return data.decode(encoding or "utf-8")
        except UnicodeDecodeError:
            reason = "not_utf8"
    if skipped is not None:
        skipped[reason] = skipped.get(reason, 0) + 1
    return None


def _metadata_body(text: str) -> str:
    """The long description of a METADATA file: everything after the header block."""
    _, sep, body = text.partition("\n\n")
    return body if sep else ""


def _stdlib_files(stdlib: Path) -> list[Path]:
    """The standard library's own files: site-packages below it belongs to packages."""
    return [
        p
        for p in stdlib.rglob("*")
        if p.is_file() and "site-packages" not in p.parts and "dist-packages" not in p.parts
    ]


def _builtin_documents(name: str, skipped: dict[str, int]) -> Iterator[str]:
    paths = sysconfig.get_paths()
    stdlib = Path(paths["stdlib"]).resolve()
    if name == "python-stdlib":
        chosen = _select(_stdlib_files(stdlib), (".py",), skipped=skipped)
    elif name == "c-headers":
        include = Path(paths["include"]).resolve()
        chosen = _walk([include], (".h",), skipped) + _select(
            dependency_files(), (".h", ".hpp", ".hh", ".cuh"), skipped=skipped
        )
    elif name == "config-files":
        suffixes = (".yaml", ".yml", ".toml", ".json", ".cfg", ".ini")
        chosen = _select(dependency_files() + _stdlib_files(stdlib), suffixes, skipped=skipped)
    elif name == "prose":
        deps = dependency_files()
        for p in _select(deps, ("METADATA",), skipped=skipped):
            text = _read_text(p, skipped)
            if text is not None:
                yield _metadata_body(text)
        licence_names = ("LICENSE", "LICENCE", "COPYING", "NOTICE", "AUTHORS")
        chosen = _select(
            deps + _stdlib_files(stdlib), (".md", ".rst", ".txt"), licence_names, skipped
        )
        chosen = [p for p in chosen if p.suffix not in (".py", ".pyc", ".so")]
        for p in chosen:
            text = _read_text(p, skipped)
            if text is not None:
                yield text
        try:
            from pydoc_data.topics import topics
        except ImportError:
            topics = {}
        for key in sorted(topics):
            yield topics[key]
        return
    else:  # config.py refuses unknown names; this guards programmatic use.
        raise MergeMixError(f"unknown built-in corpus {name!r}")
    for p in chosen:
        text = _read_text(p, skipped)
        if text is not None:
            yield text


def _records_text(records: Iterator[dict], src: SourceSpec, where: str) -> Iterator[str]:
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or src.text_field not in rec:
            raise MergeMixError(f"{where}: record {i} has no text field {src.text_field!r}")
        value = rec[src.text_field]
        if value is None:
            continue
        if not isinstance(value, str):
            raise MergeMixError(f"{where}: record {i}: field {src.text_field!r} is not text")
        yield value


def _jsonl_records(path: Path, encoding: str) -> Iterator[dict]:
    with path.open(encoding=encoding) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                raise MergeMixError(f"{path}:{lineno}: not valid JSON") from None


def skipped_sentence(counts: dict[str, int]) -> str:
    """``5 files skipped: 3 not UTF-8 text, 2 too large`` (reasons with a zero count left
    out); empty when nothing was skipped."""
    total = sum(counts.values())
    if not total:
        return ""
    parts = [f"{counts[r]} {_REASON_TEXT[r]}" for r in SKIP_REASONS if counts.get(r)]
    return f"{total} files skipped: {', '.join(parts)}"


def source_documents(
    src: SourceSpec, where: str, skipped: dict[str, int] | None = None
) -> list[str]:
    """All documents of one source, in a stable order. Fails if the source is empty.

    Files of a ``files`` or built-in source that do not decode (UTF-8, or the source's
    `encoding`), hold a NUL byte or are too large are skipped; their numbers by reason (of
    `SKIP_REASONS`) are added to `skipped` and logged in one warning for the source."""
    docs: list[str]
    counts: dict[str, int] = {}
    encoding = src.encoding or "utf-8"
    if src.kind == "builtin":
        docs = list(_builtin_documents(src.location, counts))
    elif src.kind == "files":
        import glob

        matches = sorted(
            Path(p) for p in glob.glob(src.location, recursive=True) if Path(p).is_file()
        )
        if not matches:
            raise MergeMixError(f"{where}: glob {src.location!r} matched no files")
        docs = []
        for p in matches:
            if src.max_file_bytes is not None and p.stat().st_size > src.max_file_bytes:
                counts["too_large"] = counts.get("too_large", 0) + 1
                continue
            text = _read_text(p, counts, src.encoding)
            if text is not None:
                docs.append(text)
        if not docs:
            raise MergeMixError(
                f"{where}: glob {src.location!r} matched {len(matches)} files, and"
                f" {skipped_sentence(counts)}; no documents left"
            )
    else:
        path = Path(src.location)
        if not path.exists():
            raise MergeMixError(f"{where}: {path} does not exist")
        try:
            if src.kind == "jsonl":
                docs = list(_records_text(_jsonl_records(path, encoding), src, str(path)))
            elif src.kind == "json":
                try:
                    data = json.loads(path.read_text(encoding=encoding))
                except json.JSONDecodeError as exc:
                    raise MergeMixError(f"{path}: not valid JSON (line {exc.lineno})") from None
                if isinstance(data, dict) and isinstance(data.get(src.text_field), list):
                    data = [{src.text_field: t} for t in data[src.text_field]]
                if not isinstance(data, list):
                    raise MergeMixError(
                        f"{path}: expected a list of records or a column {src.text_field!r}"
                    )
                docs = list(_records_text(iter(data), src, str(path)))
            elif src.kind == "csv":
                with path.open(encoding=encoding, newline="") as fh:
                    reader = csv.DictReader(fh)
                    if reader.fieldnames is None or src.text_field not in reader.fieldnames:
                        raise MergeMixError(f"{path}: no column {src.text_field!r}")
                    docs = list(_records_text(iter(reader), src, str(path)))
            elif src.kind == "parquet":
                try:
                    import pyarrow.parquet as pq
                except ImportError:
                    raise MergeMixError(
                        f"{where}: reading parquet needs pyarrow (pip install 'merge-mix[parquet]')"
                    ) from None
                schema = pq.read_schema(path)
                if src.text_field not in schema.names:
                    raise MergeMixError(f"{path}: no column {src.text_field!r}")
                column = pq.read_table(path, columns=[src.text_field]).column(0).to_pylist()
                docs = [t for t in column if isinstance(t, str)]
            elif src.kind == "hf_disk":
                docs = _hf_disk_documents(path, src, where)
            else:
                raise MergeMixError(f"{where}: unknown source kind {src.kind!r}")
        except UnicodeDecodeError:
            hint = "" if src.encoding else " (set the source's encoding, e.g. encoding: latin-1)"
            raise MergeMixError(f"{path}: not {encoding} text{hint}") from None
    if counts:
        logger.warning("%s: %s", where, skipped_sentence(counts))
    if skipped is not None:
        for reason, n in counts.items():
            skipped[reason] = skipped.get(reason, 0) + n
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise MergeMixError(f"{where}: source {src.kind}={src.location!r} has no documents")
    return docs


def _hf_disk_documents(path: Path, src: SourceSpec, where: str) -> list[str]:
    from datasets import Dataset, DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise MergeMixError(
            f"{where}: {path} is not a datasets.save_to_disk directory ({exc})"
        ) from None
    if isinstance(ds, DatasetDict):
        if src.split is None:
            if len(ds) != 1:
                raise MergeMixError(
                    f"{where}.split: {path} has splits {', '.join(ds)}; name one with 'split'"
                )
            ds = next(iter(ds.values()))
        elif src.split not in ds:
            raise MergeMixError(f"{where}.split: {path} has no split {src.split!r}")
        else:
            ds = ds[src.split]
    assert isinstance(ds, Dataset)
    if src.text_field not in ds.column_names:
        raise MergeMixError(f"{where}: {path} has no column {src.text_field!r}")
    return [t for t in ds[src.text_field] if isinstance(t, str)]


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


def read_domain(domain: DomainSpec, where: str) -> tuple[dict[str, str], dict]:
    """A domain's documents by SHA-256, exact duplicates removed and `max_bytes` applied
    in hash order (a fixed pseudo-random order, so a cap samples all sources evenly).
    The stats include ``skipped``: files skipped, by reason of `SKIP_REASONS`."""
    docs: dict[str, str] = {}
    n_read = 0
    skipped = dict.fromkeys(SKIP_REASONS, 0)
    for i, src in enumerate(domain.sources):
        for text in source_documents(src, f"{where}.sources[{i}]", skipped):
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
    """Split documents into train / search / test by content hash and cut them into pieces
    (pieces under `data.min_doc_bytes` dropped). Held-out documents past
    `data.heldout_max_documents` (in hash order) train instead; a held-out document keeps
    its first `data.heldout_max_pieces` pieces, and the rest of it is neither trained on nor
    scored."""
    corpus = DomainCorpus(name=name, stats=dict(stats or {}))
    held = trimmed = 0
    for digest in sorted(docs):
        pieces = [
            p
            for p in cut_pieces(docs[digest], data.max_doc_bytes)
            if len(p.strip().encode("utf-8")) >= data.min_doc_bytes
        ]
        if not pieces:
            continue
        split = "train"
        if is_heldout(digest, data.heldout_fraction) and (
            data.heldout_max_documents is None or held < data.heldout_max_documents
        ):
            split = heldout_role(digest, data.test_fraction)
            held += 1
            if data.heldout_max_pieces is not None and len(pieces) > data.heldout_max_pieces:
                trimmed += len(pieces) - data.heldout_max_pieces
                pieces = pieces[: data.heldout_max_pieces]
        corpus.splits[split].append(pieces)
        corpus.digests.append(digest)
    corpus.stats["heldout_pieces_trimmed"] = trimmed
    return corpus


def check_corpus(corpus: DomainCorpus, where: str) -> None:
    """Every split must keep some text; fills in the split counts of `corpus.stats`."""
    for split in SPLITS:
        docs = [d for d in corpus.splits[split] if d]
        corpus.splits[split] = docs
        if not docs:
            hint = "add documents" if split == "train" else "add documents or raise"
            hint += "" if split == "train" else " data.heldout_fraction"
            raise MergeMixError(
                f"{where}: no {split} text left after splitting and de-duplication ({hint})"
            )
        corpus.stats[f"{split}_documents"] = len(docs)
        corpus.stats[f"{split}_pieces"] = sum(len(d) for d in docs)
        corpus.stats[f"{split}_bytes"] = sum(len(p.encode("utf-8")) for d in docs for p in d)


def build_domain(domain: DomainSpec, data: DataSpec, where: str) -> DomainCorpus:
    """Read, de-duplicate, cap, split and cut one domain on its own (no cross-domain
    de-duplication or decontamination: `merge_mix.decontaminate` does those for a pool)."""
    docs, stats = read_domain(domain, where)
    corpus = split_domain(domain.name, docs, data, stats)
    check_corpus(corpus, where)
    return corpus
