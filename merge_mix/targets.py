"""Target sets: evaluation-only text a mixture is searched for, never trained on.

A target set is data the user cares about that is not one of the pool's training domains
(RegMix's held-out web set, DoReMi's validation set). It is declared like a domain, in a
spec's ``targets:`` section (``name: {sources: [...], max_bytes: N}``) or added to a built
pool with ``merge-mix pool add-target``, and prepared after the domains:

- read as a stream and de-duplicated and capped like a domain (`merge_mix.data.split`);
  its kept documents are then held in memory (a target set is held-out text);
- documents held by any training domain (same SHA-256) are dropped, and so are pieces whose
  word n-grams are covered by the pool's training text at `data.near_duplicate_threshold`
  or more: the rule held-out pieces follow (`merge_mix.decontaminate`). A domain added
  later protects the existing target pieces as it protects held-out pieces;
- every document is held out: split into ``search`` and ``test`` by content hash
  (`merge_mix.data.split.heldout_role`, the domains' rule), cut into pieces, pieces under
  `data.min_doc_bytes` dropped, at most `data.heldout_max_pieces` per document;
- tokenized with the pool's tokenizer into ``data/targets/<name>/{search,test}.*`` (the
  domains' shard format, with the jsonl text), recorded in ``data/data.json`` under
  ``targets`` and listed in the manifest (``targets``).

The evaluator scores them on the same split as the domains, as
``target/<name>/{loss,ppl,bpb}`` (`merge_mix.evaluate`); objectives name them (preset
``target-set:NAME``, or a term ``{source: target, metric: loss, name: NAME}``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from merge_mix.artifacts import read_json, write_json_atomic
from merge_mix.config import DataSpec, DomainSpec, PoolSpec
from merge_mix.data.split import cut_pieces, heldout_role
from merge_mix.decontaminate import Shingler, coverage, separate_splits, union
from merge_mix.errors import MergeMixError
from merge_mix.evaluate import TARGETS_DIR

SPLITS = ("search", "test")


def target_dir(data_dir: Path, name: str) -> Path:
    """Where a target set's shards live: ``data/targets/<name>``."""
    return Path(data_dir) / TARGETS_DIR / name


def sources_hash(target: DomainSpec) -> str:
    """Stable hash of a target set's sources and cap (a changed source is a new set)."""
    blob = json.dumps(
        {"sources": [s.identity() for s in target.sources], "max_bytes": target.max_bytes},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def split_target(
    docs: dict[str, str], data: DataSpec, train_digests: set[str], train_shingles: np.ndarray
) -> tuple[dict[str, list[list[str]]], dict[str, int]]:
    """A target set's documents (by SHA-256) as search/test documents of pieces, with the
    training documents and near-duplicates of training text removed. Returns the splits
    and what was removed."""
    shingle = Shingler(data.shingle_words)
    splits: dict[str, list[list[str]]] = {s: [] for s in SPLITS}
    stats = {"training_duplicates_removed": 0, "near_duplicate_pieces": 0, "pieces_trimmed": 0}
    for digest in sorted(docs):
        if digest in train_digests:
            stats["training_duplicates_removed"] += 1
            continue
        pieces = [
            p
            for p in cut_pieces(docs[digest], data.max_doc_bytes)
            if len(p.strip().encode("utf-8")) >= data.min_doc_bytes
        ]
        if data.heldout_max_pieces is not None and len(pieces) > data.heldout_max_pieces:
            stats["pieces_trimmed"] += len(pieces) - data.heldout_max_pieces
            pieces = pieces[: data.heldout_max_pieces]
        kept = [
            p
            for p in pieces
            if coverage(shingle(p), train_shingles) < data.near_duplicate_threshold
        ]
        stats["near_duplicate_pieces"] += len(pieces) - len(kept)
        if kept:
            splits[heldout_role(digest, data.test_fraction)].append(kept)
    return splits, stats


def prepare_targets(spec: PoolSpec, pool_dir: Path, data: dict) -> dict:
    """Prepare every target set of `spec` not yet in `data` (the pool's ``data.json``,
    updated and written); refuses a target whose sources changed since it was prepared.
    Needs the domains' data and the tokenizer on disk."""
    from merge_mix.data.shards import write_shard
    from merge_mix.data.tokenizer import load_tokenizer
    from merge_mix.pool import SHINGLES

    data_dir = Path(pool_dir) / "data"
    done = data.setdefault("targets", {})
    todo = []
    for t in spec.targets:
        where = f"{spec.spec_path}: targets.{t.name}"
        if t.name in data["domains"]:
            raise MergeMixError(f"{where}: a domain of pool {pool_dir} has that name")
        if t.name not in done:
            todo.append(t)
        elif done[t.name]["sources_hash"] != sources_hash(t):
            raise MergeMixError(
                f"{where}.sources: differ from those the pool's target set was prepared with;"
                " use a new target name"
            )
    if not todo:
        if not done:
            del data["targets"]
        return data
    from merge_mix.data.prepare import covered_by, heldout_texts, pool_digests, read_kept

    domains = list(data["domains"])
    shingle_paths = [data_dir / d / SHINGLES for d in domains]
    tokenizer = load_tokenizer(Path(pool_dir) / "tokenizer")
    for t in todo:
        where = f"{spec.spec_path}: targets.{t.name}"
        docs, stats = read_kept(t, spec.data, where)
        digests = np.array(sorted(docs), dtype="S64")
        train_digests = {
            d.decode()
            for chunk in pool_digests(data_dir, domains)
            for d in chunk[np.isin(chunk, digests)]
        }
        # The training n-grams these documents could meet, not the whole training set.
        mine = union(
            Shingler(spec.data.shingle_words)(p)
            for text in docs.values()
            for p in cut_pieces(text, spec.data.max_doc_bytes)
        )
        train_shingles = mine[covered_by(mine, shingle_paths)]
        splits, removed = split_target(docs, spec.data, train_digests, train_shingles)
        stats.update(removed)
        # Selection and judgement on disjoint text, across every held-out set of the pool.
        earlier = {split: heldout_texts(data_dir, data, split) for split in SPLITS}
        apart = separate_splits(
            {t.name: splits},
            spec.data.near_duplicate_threshold,
            spec.data.shingle_words,
            earlier["search"],
            earlier["test"],
        )
        stats.update(apart[t.name])
        for split in SPLITS:
            if not splits[split]:
                raise MergeMixError(
                    f"{where}: no {split} text left after de-duplication against the"
                    " training data and the other split (add documents)"
                )
        out = target_dir(data_dir, t.name)
        entry = {"sources_hash": sources_hash(t), "corpus": stats}
        for split in SPLITS:
            entry[split] = write_shard(tokenizer, splits[split], out, split, keep_text=True)
        done[t.name] = entry
    write_json_atomic(data_dir / "data.json", data)
    return data


def target_texts(data_dir: Path, data: dict, splits: tuple[str, ...] = SPLITS) -> list[str]:
    """Every piece of text of the pool's target sets (in `splits`): held-out text that
    training pieces of a domain added later must not cover."""
    out = []
    for name in data.get("targets", {}):
        for split in splits:
            path = target_dir(data_dir, name) / f"{split}.jsonl"
            out += [json.loads(line)["text"] for line in path.read_text("utf-8").splitlines()]
    return out


def add_target(pool_dir: Path, target: DomainSpec) -> dict:
    """Add a target set to a built pool (``merge-mix pool add-target``): prepare it and
    rewrite the manifest. Returns its ``data.json`` entry."""
    import dataclasses

    from merge_mix.artifacts import file_lock
    from merge_mix.config import check_target_names
    from merge_mix.pool import recorded_spec, write_manifest

    pool_dir = Path(pool_dir)
    spec = recorded_spec(pool_dir)
    if target.name in [t.name for t in spec.targets]:
        raise MergeMixError(f"{pool_dir}: target set {target.name!r} is already in the pool")
    check_target_names((target,), spec.domain_names, str(pool_dir))
    spec = dataclasses.replace(spec, targets=(*spec.targets, target))
    with file_lock(pool_dir / ".prepare.lock"):
        data = read_json(pool_dir / "data" / "data.json")
        data = prepare_targets(spec, pool_dir, data)
    write_manifest(spec, pool_dir)
    return data["targets"][target.name]
