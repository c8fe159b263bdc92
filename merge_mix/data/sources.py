"""Reading a domain's sources as streams of documents (local files only, never a hub).

Every reader yields one document (a ``str``) at a time and holds at most one record
batch: ``jsonl`` and ``csv`` line by line, ``parquet`` by row groups (pyarrow), a
``datasets`` directory (``hf_disk``) in batches of `BATCH_ROWS` rows, a ``files`` glob one
file at a time (the matching paths are listed and sorted, their contents read lazily),
the built-in corpora one file at a time, a ``json`` source (one JSON document: a list of
records, or an object with a column of texts) one record at a time. The order is stable,
so reading a source twice yields the same documents in the same order (the data stage
reads each source more than once: `merge_mix.data.prepare`). Blank documents are skipped.

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
  documentation of the dependencies and the stdlib.
- ``pydoc-topics``: Python's documentation topics (``pydoc_data``, what ``help("if")``
  shows): the language reference's prose with code examples. Not in any other built-in,
  so the demo uses it as a target set (text the components never train on).
"""

from __future__ import annotations

import csv
import functools
import glob
import json
import logging
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from merge_mix.config import DomainSpec, SourceSpec
from merge_mix.errors import MergeMixError

BATCH_ROWS = 1024
"""Rows per batch read from a parquet file or a ``datasets`` directory."""
JSON_CHUNK = 1 << 20
"""Characters read at a time from a ``json`` source."""
_DECODER = json.JSONDecoder()
logger = logging.getLogger(__name__)

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
        return
    elif name == "pydoc-topics":
        try:
            from pydoc_data.topics import topics
        except ImportError:  # some distributions package the docs apart
            raise MergeMixError(
                "built-in corpus 'pydoc-topics': this Python has no pydoc_data module"
            ) from None
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


class JsonStream:
    """A JSON text read in `JSON_CHUNK` pieces, parsed one value at a time."""

    def __init__(self, fh, path: Path):
        self.fh, self.path = fh, path
        self.buf, self.pos, self.lines, self.eof = "", 0, 1, False

    def _more(self) -> bool:
        if self.eof:
            return False
        chunk = self.fh.read(JSON_CHUNK)
        if self.pos > JSON_CHUNK:  # drop what was parsed
            self.lines += self.buf.count("\n", 0, self.pos)
            self.buf, self.pos = self.buf[self.pos :], 0
        self.buf += chunk
        self.eof = not chunk
        return bool(chunk)

    def fail(self, what: str = "not valid JSON") -> MergeMixError:
        line = self.lines + self.buf.count("\n", 0, self.pos)
        return MergeMixError(f"{self.path}: {what} (line {line})")

    def peek(self) -> str:
        """The next character that is not white space ("" at the end)."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf) or not self._more():
                return self.buf[self.pos : self.pos + 1]

    def expect(self, chars: str) -> str:
        c = self.peek()
        if not c or c not in chars:
            raise self.fail()
        self.pos += 1
        return c

    def value(self) -> Any:
        """The next JSON value, read whole."""
        self.peek()
        while True:
            try:
                value, end = _DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError:
                if self._more():
                    continue
                raise self.fail() from None
            if end < len(self.buf) or self.eof or not self._more():
                self.pos = end  # (a number cut at the chunk's end reads on)
                return value

    def items(self) -> Iterator[Any]:
        """The values of the array that starts here, one at a time."""
        self.expect("[")
        if self.peek() == "]":
            self.pos += 1
            return
        while True:
            yield self.value()
            if self.expect(",]") == "]":
                return


def _json_records(stream: JsonStream, src: SourceSpec) -> Iterator[dict]:
    """Records of a ``json`` source: a list of records, or an object whose `text_field` is
    a list of texts (other keys are read past), without reading the file whole."""
    field = src.text_field
    if stream.peek() == "[":
        yield from stream.items()
    elif stream.peek() == "{":
        stream.pos += 1
        found = False
        while stream.peek() != "}":
            key = stream.value()
            stream.expect(":")
            if key == field and stream.peek() == "[":
                found = True
                yield from ({field: t} for t in stream.items())
            else:
                stream.value()
            if stream.expect(",}") == "}":
                break
        else:
            stream.pos += 1
        if not found:
            raise stream.fail(f"expected a list of records or a column {field!r}")
    else:
        raise stream.fail(f"expected a list of records or a column {field!r}")
    if stream.peek():
        raise stream.fail("extra data after the JSON document")


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
    src: SourceSpec, where: str, skipped: dict[str, int] | None = None, warn: bool = True
) -> Iterator[str]:
    """The documents of one source, one at a time, in a stable order; blank ones skipped.
    Fails (when the stream ends) if the source had none.

    Files of a ``files`` or built-in source that do not decode (UTF-8, or the source's
    `encoding`), hold a NUL byte or are too large are skipped; their numbers by reason (of
    `SKIP_REASONS`) are added to `skipped` and, with `warn`, logged in one warning for the
    source once it has been read."""
    counts: dict[str, int] = {}
    n = 0
    for text in _raw_documents(src, where, counts):
        if text.strip():
            n += 1
            yield text
    if counts and warn:
        logger.warning("%s: %s", where, skipped_sentence(counts))
    if skipped is not None:
        for reason, k in counts.items():
            skipped[reason] = skipped.get(reason, 0) + k
    if not n:
        raise MergeMixError(f"{where}: source {src.kind}={src.location!r} has no documents")


def domain_documents(
    domain: DomainSpec, where: str, skipped: dict[str, int] | None = None, warn: bool = True
) -> Iterator[str]:
    """Every source of `domain` in order, as one stream (see `source_documents`)."""
    for i, src in enumerate(domain.sources):
        yield from source_documents(src, f"{where}.sources[{i}]", skipped, warn)


def _raw_documents(src: SourceSpec, where: str, counts: dict[str, int]) -> Iterator[str]:
    encoding = src.encoding or "utf-8"
    if src.kind == "builtin":
        yield from _builtin_documents(src.location, counts)
        return
    if src.kind == "files":
        matches = sorted(
            Path(p) for p in glob.iglob(src.location, recursive=True) if Path(p).is_file()
        )
        if not matches:
            raise MergeMixError(f"{where}: glob {src.location!r} matched no files")
        n = 0
        for p in matches:
            if src.max_file_bytes is not None and p.stat().st_size > src.max_file_bytes:
                counts["too_large"] = counts.get("too_large", 0) + 1
                continue
            text = _read_text(p, counts, src.encoding)
            if text is not None:
                n += 1
                yield text
        if not n:
            raise MergeMixError(
                f"{where}: glob {src.location!r} matched {len(matches)} files, and"
                f" {skipped_sentence(counts)}; no documents left"
            )
        return
    path = Path(src.location)
    if not path.exists():
        raise MergeMixError(f"{where}: {path} does not exist")
    try:
        if src.kind == "jsonl":
            yield from _records_text(_jsonl_records(path, encoding), src, str(path))
        elif src.kind == "json":
            with path.open(encoding=encoding) as fh:
                yield from _records_text(_json_records(JsonStream(fh, path), src), src, str(path))
        elif src.kind == "csv":
            with path.open(encoding=encoding, newline="") as fh:
                reader = csv.DictReader(fh)
                if reader.fieldnames is None or src.text_field not in reader.fieldnames:
                    raise MergeMixError(f"{path}: no column {src.text_field!r}")
                yield from _records_text(iter(reader), src, str(path))
        elif src.kind == "parquet":
            yield from _parquet_documents(path, src, where)
        elif src.kind == "hf_disk":
            yield from _hf_disk_documents(path, src, where)
        else:
            raise MergeMixError(f"{where}: unknown source kind {src.kind!r}")
    except UnicodeDecodeError:
        hint = "" if src.encoding else " (set the source's encoding, e.g. encoding: latin-1)"
        raise MergeMixError(f"{path}: not {encoding} text{hint}") from None


def _parquet_documents(path: Path, src: SourceSpec, where: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MergeMixError(
            f"{where}: reading parquet needs pyarrow (pip install 'merge-mix[parquet]')"
        ) from None
    pf = pq.ParquetFile(path)
    if src.text_field not in pf.schema_arrow.names:
        raise MergeMixError(f"{path}: no column {src.text_field!r}")
    for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=[src.text_field]):
        for t in batch.column(0).to_pylist():
            if isinstance(t, str):
                yield t


def _hf_disk_documents(path: Path, src: SourceSpec, where: str) -> Iterator[str]:
    from datasets import Dataset, DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))  # memory-mapped Arrow files: nothing read yet
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
    column = ds.select_columns([src.text_field])
    for batch in column.iter(batch_size=BATCH_ROWS):
        for t in batch[src.text_field]:
            if isinstance(t, str):
                yield t
