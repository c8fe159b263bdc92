"""The streaming data stage (`merge_mix.data`): readers, splits from digests, workers,
resume after an interrupt, and no domain held in memory whole."""

from __future__ import annotations

import csv
import itertools
import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from conftest import write_spec

from merge_mix.config import SourceSpec, load_spec
from merge_mix.errors import MergeMixError

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TEXTS = [f"document {i}\n" + "word " * (i + 3) for i in range(7)]


def _source(kind: str, location: Path, **extra) -> SourceSpec:
    return SourceSpec(kind=kind, location=str(location), **extra)


def _stream(src: SourceSpec) -> list[str]:
    from merge_mix.data.sources import source_documents

    docs = source_documents(src, "src")
    assert iter(docs) is docs  # a generator, not a list
    return list(docs)


def test_every_source_kind_streams_its_documents_in_order(tmp_path):
    rows = [{"text": t, "id": i} for i, t in enumerate(TEXTS)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "a.json").write_text(json.dumps(rows))
    with (tmp_path / "a.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "id"])
        writer.writeheader()
        writer.writerows(rows)
    for i, t in enumerate(TEXTS):
        (tmp_path / f"f{i}.txt").write_text(t)

    import pyarrow as pa
    import pyarrow.parquet as pq

    # Three row groups: the reader goes through them one batch at a time.
    pq.write_table(pa.table({"text": TEXTS, "id": list(range(7))}), tmp_path / "a.parquet", 3)
    from datasets import Dataset

    Dataset.from_dict({"text": TEXTS}).save_to_disk(str(tmp_path / "hf"))

    for kind, path in [
        ("jsonl", "a.jsonl"),
        ("json", "a.json"),
        ("csv", "a.csv"),
        ("parquet", "a.parquet"),
        ("hf_disk", "hf"),
        ("files", "f*.txt"),
    ]:
        assert _stream(_source(kind, tmp_path / path)) == TEXTS, kind


def test_readers_read_lazily(tmp_path, monkeypatch):
    from merge_mix.data.sources import source_documents

    # A broken line after the first two records: never parsed when only two are taken.
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n{broken\n"
    )
    src = _source("jsonl", tmp_path / "a.jsonl")
    assert list(itertools.islice(source_documents(src, "src"), 2)) == ["one", "two"]
    with pytest.raises(MergeMixError, match="a.jsonl:3: not valid JSON"):
        list(source_documents(src, "src"))

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": TEXTS}), tmp_path / "a.parquet", 2)

    def whole(*args, **kwargs):
        raise AssertionError("parquet read whole")

    monkeypatch.setattr(pq, "read_table", whole)
    assert _stream(_source("parquet", tmp_path / "a.parquet")) == TEXTS


def test_a_json_source_is_parsed_one_record_at_a_time(tmp_path, monkeypatch):
    import merge_mix.data.sources as sources

    monkeypatch.setattr(sources, "JSON_CHUNK", 5)  # every value crosses a chunk's end
    records = [{"id": 12345678, "text": t, "more": [1.5, None, True]} for t in TEXTS]
    (tmp_path / "list.json").write_text(json.dumps(records, indent=2))
    column = {"meta": {"n": 7}, "text": TEXTS, "ids": list(range(7))}
    (tmp_path / "column.json").write_text(json.dumps(column))
    for name in ("list.json", "column.json"):
        assert _stream(_source("json", tmp_path / name)) == TEXTS, name
    # A broken record after the first two: never parsed when only two are taken.
    (tmp_path / "broken.json").write_text(
        '[\n{"text": "one"},\n{"text": "two"},\n{"text": oops}\n]'
    )
    src = _source("json", tmp_path / "broken.json")
    assert list(itertools.islice(sources.source_documents(src, "src"), 2)) == ["one", "two"]
    with pytest.raises(MergeMixError, match=r"broken.json: not valid JSON \(line 4\)"):
        list(sources.source_documents(src, "src"))
    (tmp_path / "other.json").write_text('{"body": ["a"]}')
    with pytest.raises(MergeMixError, match="expected a list of records or a column 'text'"):
        list(sources.source_documents(_source("json", tmp_path / "other.json"), "src"))


def _spec_dict(root: Path, output: str = "pool") -> dict:
    root.mkdir(parents=True, exist_ok=True)
    return {
        "name": "d",
        "output_dir": output,
        "seed": 0,
        "domains": {
            "code": {
                "sources": [{"files": str(STDLIB / sub / "*.py")} for sub in ("json", "importlib")],
                "max_bytes": 60_000,
            },
            "mail": {"sources": [{"files": str(STDLIB / "email" / "*.py")}], "max_bytes": 90_000},
        },
        "data": {"heldout_fraction": 0.5, "max_doc_bytes": 1024},
        "tokenizer": {"vocab_size": 300, "sample_bytes": 40_000},
    }


def _prepare(root: Path, workers: int, output: str = "pool"):
    from merge_mix.pool_build import _prepare_data

    spec = load_spec(write_spec(root, _spec_dict(root, output)))
    spec.output_dir.mkdir(parents=True, exist_ok=True)
    _prepare_data(spec, spec.output_dir, workers=workers)
    return spec.output_dir / "data"


def _files(data_dir: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(data_dir)): p.read_bytes()
        for p in sorted(data_dir.rglob("*"))
        if p.is_file() and p.name != "data.json"
    }


def test_one_and_two_workers_write_identical_shards(tmp_path):
    one = _prepare(tmp_path / "one", 1)
    two = _prepare(tmp_path / "two", 2)
    assert _files(one) == _files(two)
    a, b = (json.loads((d / "data.json").read_text())["domains"] for d in (one, two))
    for d in a:
        a[d].pop("sources_hash"), b[d].pop("sources_hash")
    assert a == b
    assert "code/train.tokens" in _files(one)


def test_streaming_plan_splits_like_the_in_memory_rules(tmp_path):
    from merge_mix.data.prepare import scan_domain
    from merge_mix.data.scan import plan_domain
    from merge_mix.data.split import build_domain

    raw = _spec_dict(tmp_path)
    raw["data"]["heldout_max_bytes"] = 20_000  # a cap on held-out bytes that bites
    spec = load_spec(write_spec(tmp_path, raw))
    domain = spec.domains[1]  # capped by max_bytes
    corpus = build_domain(domain, spec.data, "d")
    held = [
        sum(len(p.encode()) for p in doc) for s in ("search", "test") for doc in corpus.splits[s]
    ]
    assert sum(held) - max(held) < 20_000 <= sum(held)  # drawn while under the cap
    plan = scan_domain(domain, spec.data, "d", tmp_path / "plan", workers=1)
    plan_domain(plan, domain.max_bytes, spec.data)
    assert list(plan.digests()) == corpus.digests
    for split in ("train", "search", "test"):
        assert plan.count(split) == len(corpus.splits[split])
    assert plan.stats["documents_kept"] == corpus.stats["documents_kept"]
    assert plan.stats["documents_kept"] < plan.stats["documents_read"]


def test_small_groups_and_route_files_change_nothing(tmp_path, monkeypatch):
    """The first pass's decisions and the piece index are sorted one file at a time:
    many small files give the same shards as one."""
    import merge_mix.data.prepare as prepare
    import merge_mix.data.scan as scan
    from merge_mix.data.shards import ShardWriter

    reference = _prepare(tmp_path / "ref", 1)
    monkeypatch.setattr(scan, "ROUTE_CHUNK", 3)
    monkeypatch.setattr(prepare, "GROUP_BYTES", 3000)
    groups = []
    real = ShardWriter.__init__

    def recorded(self, *args, **kwargs):
        real(self, *args, **kwargs)
        groups.append(len(self.groups))

    monkeypatch.setattr(ShardWriter, "__init__", recorded)
    small = _prepare(tmp_path / "small", 1)
    assert max(groups) > 1
    assert _files(small) == _files(reference)


def test_shard_writer_orders_pieces_by_document_from_any_arrival_order(tmp_path):
    from merge_mix.data.shards import ShardWriter

    # Document rank -> its pieces' tokens (known answer: ranks in order, pieces in order).
    pieces = {
        r: [[100 * r + 10 * j + t for t in range(r % 3 + 1)] for j in range(2)] for r in range(6)
    }

    def batch(keys):
        tokens, rows, pos = [], [], 0
        for r, j in keys:
            toks = pieces[r][j]
            tokens += [1, *toks, 2]
            rows.append((r + 10, j, pos, len(toks), 7))  # ranks need not start at 0
            pos += len(toks) + 2
        return np.array(tokens, np.uint16), np.array(rows, np.int64)

    arrival = [
        [(4, 1), (0, 0)],
        [(5, 0), (2, 1), (2, 0)],
        [(0, 1), (1, 0), (1, 1)],
        [(3, 0), (3, 1), (4, 0), (5, 1)],
    ]
    in_order = [[(r, j) for r in range(6) for j in range(2)][k : k + 5] for k in (0, 5, 10)]
    out = {}
    for name, groups, batches in [
        ("one group", None, arrival),
        ("groups", [0, 12, 14], arrival),
        ("in order", [0, 12, 14], in_order),  # the part file is kept as it is
    ]:
        writer = ShardWriter(tmp_path / name, "train", np.uint16, groups)
        for keys in batches:
            writer.add(*batch(keys))
        assert writer.in_order == (batches is in_order)
        counts = writer.finish()
        d = tmp_path / name
        out[name] = (np.fromfile(d / "train.tokens", np.uint16), np.load(d / "train.index.npy"))
        assert not list(d.glob("*.part*"))
    expected = [t for r in range(6) for j in range(2) for t in [1, *pieces[r][j], 2]]
    tokens, index = out["groups"]
    assert tokens.tolist() == expected
    assert index[:, 3].tolist() == [r for r in range(6) for _ in range(2)]
    assert [tokens[s : s + n].tolist() for s, n, _, _ in index] == [
        pieces[r][j] for r in range(6) for j in range(2)
    ]
    assert counts == {"documents": 6, "pieces": 12, "tokens": 24, "stream_tokens": 48, "bytes": 84}
    for name in ("one group", "in order"):
        assert all(np.array_equal(a, b) for a, b in zip(out[name], out["groups"], strict=True))


def test_an_interrupted_domain_is_redone_and_a_done_one_is_not(tmp_path, monkeypatch):
    import merge_mix.data.prepare as prepare
    from merge_mix.data.shards import ShardWriter

    reference = _prepare(tmp_path / "ref", 1)
    calls = {"tokenize": 0}
    real_add, real_tokenize = ShardWriter.add, prepare.tokenize_batch

    def counted(batch):
        calls["tokenize"] += 1
        return real_tokenize(batch)

    def interrupt(writer, tokens, rows):
        if writer.out_dir.name == "mail":
            real_add(writer, tokens, rows)  # half a shard on disk...
            raise KeyboardInterrupt

        real_add(writer, tokens, rows)

    monkeypatch.setattr(prepare, "tokenize_batch", counted)
    monkeypatch.setattr(ShardWriter, "add", interrupt)
    root = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        _prepare(root, 1)
    data_dir = root / "pool" / "data"
    assert (data_dir / "code" / "train.done.json").is_file()
    assert not (data_dir / "mail" / "train.done.json").exists()  # ...never counted as done
    assert not (data_dir / "mail" / "train.tokens").exists()
    assert not (data_dir / "data.json").exists()

    monkeypatch.setattr(ShardWriter, "add", real_add)
    calls["tokenize"] = 0
    _prepare(root, 1)
    assert calls["tokenize"] == 1  # only "mail" is tokenized again (one batch)
    assert not list(data_dir.rglob("*.part")) and not list(data_dir.rglob("*.tmp"))
    assert _files(data_dir) == _files(reference)


class _Tracked(str):
    """A document that counts how many of its kind are alive."""

    alive = 0
    most = 0

    def __new__(cls, text):
        obj = super().__new__(cls, text)
        cls.alive += 1
        cls.most = max(cls.most, cls.alive)
        return obj

    def __del__(self):
        type(self).alive -= 1


def test_a_domain_is_never_held_in_memory_whole(tmp_path, monkeypatch):
    import merge_mix.data.prepare as prepare
    import merge_mix.data.workers as workers

    docs = tmp_path / "many.jsonl"
    lines = [
        json.dumps({"text": f"doc {i}\n" + f"line {i} of words and more words\n" * 40})
        for i in range(400)
    ]
    docs.write_text("\n".join(lines) + "\n")
    real = prepare.domain_documents

    def tracked(*args, **kwargs):
        for text in real(*args, **kwargs):
            yield _Tracked(text)

    monkeypatch.setattr(prepare, "domain_documents", tracked)
    monkeypatch.setattr(workers, "BATCH_BYTES", 8_000)  # about 6 documents a batch
    spec = _spec_dict(tmp_path)
    spec["domains"] = {"many": {"sources": [{"jsonl": str(docs)}]}}
    spec["data"]["heldout_max_documents"] = 10
    from merge_mix.pool_build import _prepare_data

    s = load_spec(write_spec(tmp_path, spec))
    s.output_dir.mkdir(parents=True)
    _prepare_data(s, s.output_dir, workers=1)
    data = json.loads((s.output_dir / "data" / "data.json").read_text())
    assert data["domains"]["many"]["corpus"]["documents_read"] == 400
    assert data["domains"]["many"]["train"]["documents"] > 300
    # A batch in flight plus the held-out documents' pieces (new strings), never all 400.
    assert _Tracked.most <= 20


def test_a_source_that_changes_between_passes_is_one_error(tmp_path, monkeypatch):
    import merge_mix.data.prepare as prepare

    real = prepare.domain_documents
    calls = itertools.count()

    def changing(*args, **kwargs):
        late = next(calls) >= 2  # both scans read the original text, later passes do not
        for text in real(*args, **kwargs):
            yield text + "# edited\n" if late else text

    monkeypatch.setattr(prepare, "domain_documents", changing)
    with pytest.raises(MergeMixError, match=r"domains\.code: a source changed"):
        _prepare(tmp_path, 1)


def test_a_source_that_shrinks_between_passes_is_one_error(tmp_path, monkeypatch):
    import merge_mix.data.prepare as prepare

    real = prepare.domain_documents
    calls = itertools.count()

    def shrinking(*args, **kwargs):
        late = next(calls) >= 2  # later passes lose the source's last documents
        texts = list(real(*args, **kwargs))
        yield from texts[: len(texts) // 2] if late else texts

    monkeypatch.setattr(prepare, "domain_documents", shrinking)
    with pytest.raises(MergeMixError, match=r"domains\.code: a source changed"):
        _prepare(tmp_path, 1)


def test_spilled_shingles_are_the_sorted_union_and_cover_like_isin(tmp_path):
    from merge_mix.data.prepare import ShingleSpill, covered_by

    rng = np.random.default_rng(0)
    arrays = [np.unique(rng.integers(0, 2**64, 500, dtype=np.uint64)) for _ in range(6)]
    arrays.append(arrays[0][:100])  # repeats across batches
    spill = ShingleSpill(tmp_path / "parts", buckets=8)
    for a in arrays:
        spill.add(a)
    n = spill.finish(tmp_path / "s.npy")
    union = np.unique(np.concatenate(arrays))
    stored = np.load(tmp_path / "s.npy")
    assert n == len(union) and stored.dtype == np.uint64 and np.array_equal(stored, union)
    assert not (tmp_path / "parts").exists()
    probe = np.unique(np.concatenate([union[::7], rng.integers(0, 2**64, 50, dtype=np.uint64)]))
    assert np.array_equal(covered_by(probe, [tmp_path / "s.npy"]), np.isin(probe, union))


def test_a_large_spill_bucket_is_split_before_it_is_sorted(tmp_path, monkeypatch):
    import merge_mix.data.prepare as prepare
    from merge_mix.data.scan import BucketFiles

    monkeypatch.setattr(prepare, "BUCKET_BYTES", 64)  # 8 hashes
    splits = []
    real = BucketFiles.__init__

    def recorded(self, directory, *args, **kwargs):
        real(self, directory, *args, **kwargs)
        splits.append(Path(directory).relative_to(tmp_path / "parts").parts)

    monkeypatch.setattr(BucketFiles, "__init__", recorded)
    rng = np.random.default_rng(1)
    arrays = [np.unique(rng.integers(0, 2**64, 400, dtype=np.uint64)) for _ in range(3)]
    arrays += [arrays[1][::3], np.full(1, arrays[2][5])]  # repeats across batches
    spill = prepare.ShingleSpill(tmp_path / "parts", buckets=2)  # ~600 hashes a bucket
    for a in arrays:
        spill.add(a)
    n = spill.finish(tmp_path / "s.npy")
    union = np.unique(np.concatenate(arrays))
    assert n == len(union) and np.array_equal(np.load(tmp_path / "s.npy"), union)
    assert ("0.split",) in splits and ("1.split",) in splits  # each bucket split
    assert max(len(parts) for parts in splits) >= 2  # and some of their parts again


def test_large_uncapped_heldout_text_is_announced(tmp_path, monkeypatch, caplog):
    import merge_mix.data.prepare as prepare

    monkeypatch.setattr(prepare, "HELDOUT_WARN_BYTES", 50_000)
    with caplog.at_level("WARNING", logger="merge_mix.data.prepare"):
        _prepare(tmp_path, 1)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    # code (capped at 60 KB) holds ~54 KB held out, mail ~63 KB: both over 50,000 bytes.
    assert len(warned) == 2 and all("set data.heldout_max_bytes" in w for w in warned)


def test_a_pool_recorded_before_heldout_max_bytes_keeps_its_spec(
    tiny_spec_path, tiny_pool, tmp_path
):
    """Pools recorded before `data.heldout_max_bytes` existed are read as having its
    default: the same sources hashes, no "spec differs" error; another value is refused."""
    import shutil

    from merge_mix.config import DataSpec
    from merge_mix.pool_build import _check_same_spec

    assert "heldout_max_bytes" not in DataSpec().identity()
    assert DataSpec(heldout_max_bytes=5).identity()["heldout_max_bytes"] == 5
    spec = load_spec(tiny_spec_path)
    old = tmp_path / "pool"
    (old / "data").mkdir(parents=True)
    shutil.copy(tiny_pool / "data" / "data.json", old / "data" / "data.json")
    recorded = json.loads((tiny_pool / "spec.json").read_text())
    del recorded["frozen"]["data"]["heldout_max_bytes"]  # as an older merge-mix wrote it
    (old / "spec.json").write_text(json.dumps(recorded))
    _check_same_spec(spec, old)
    recorded["frozen"]["data"]["heldout_max_bytes"] = None
    (old / "spec.json").write_text(json.dumps(recorded))
    with pytest.raises(
        MergeMixError, match=r"data\.heldout_max_bytes differs .* \(None in the pool"
    ):
        _check_same_spec(spec, old)


def test_the_open_file_limit_is_raised_for_the_bucket_files():
    import subprocess
    import sys

    # A fresh process with macOS's default soft limit (256): the stage's 256 scan files,
    # up to 512 n-gram buckets and 256 index groups would not fit under it.
    code = (
        "import resource; from merge_mix.data.scan import allow_open_files, OPEN_FILES\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
        "allow_open_files()\n"
        "cap = OPEN_FILES if hard == resource.RLIM_INFINITY else min(OPEN_FILES, hard)\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0] == cap)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
