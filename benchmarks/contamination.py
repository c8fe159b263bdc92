"""Contamination of a pool's held-out splits, before and after decontamination.

Every component trains on every domain (``general_share``), so held-out text that also
sits in any domain's training data is scored on text the model has seen. Pool format 2
removes it when the pool's data is prepared (`merge_mix.decontaminate`); this script
measures how much there was and checks that none is left.

- **before**: the spec's domains read again with `read_domain` + `split_domain` (within-
  domain exact de-duplication and the search/test split only: no cross-domain
  de-duplication, no near-duplicate removal, i.e. what pool format 1 kept, split in two).
- **after**: the built pool's held-out text (``data/<d>/{search,test}.jsonl``), its stored
  training shingles (``train.shingles.npy``) and document digests (``documents.sha256``).

Measured per domain and held-out split (documents, pieces, UTF-8 bytes):

- **exact cross-domain duplicates**: held-out documents whose SHA-256 is that of a document
  of another domain (any split). After: a held-out document is rebuilt by joining its
  pieces (exact when none of its pieces was dropped) and looked up in the other domains'
  ``documents.sha256``; the digest files must also be pairwise disjoint.
- **exact duplicate pieces**: held-out pieces whose text equals a piece of another domain
  (any split; after: the training pieces are decoded from the token shards).
- **near-duplicates**: each held-out piece's shingle coverage (share of its word
  ``data.shingle_words``-grams found in all domains' training text, `coverage`); pieces
  at >= ``data.near_duplicate_threshold`` are contaminated. Also the share of pieces at
  coverage >= 0.2, >= 0.5, >= 0.8 and == 1.0, and the maximum. Before, each contaminated
  piece is also attributed to its own domain's training text or another domain's.
- **search/test leaks**: test pieces whose exact text is also a search piece of any domain.

After, the stored training shingles are compared with the shingles of the decoded training
shards (they must be equal), and the pydoc topics held out before are listed with what
covers them (topics nest: the "compound" statement topic contains "if", "while", "for",
"try" and "with"; on some Python versions "else" is the very text of "if").

    .venv/bin/python benchmarks/contamination.py pools/demo.yaml --json benchmarks/results/contamination.json
    .venv/bin/python benchmarks/contamination.py pools/demo     # the spec from its manifest
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_header, write_json  # noqa: E402

HELDOUT = ("search", "test")
LEVELS = (0.2, 0.5, 0.8)


def resolve(arg: str):
    """(domains, data spec, pool directory) from a spec file or a pool directory."""
    from merge_mix.config import DataSpec, DomainSpec, SourceSpec, load_spec

    path = Path(arg)
    if path.is_file():
        spec = load_spec(path)
        return list(spec.domains), spec.data, Path(spec.output_dir)
    manifest = json.loads((path / "manifest.json").read_text())
    raw = manifest["spec"]
    domains = [
        DomainSpec(
            name=d["name"],
            sources=tuple(SourceSpec(**s) for s in d["sources"]),
            max_bytes=d["max_bytes"],
        )
        for d in raw["domains"]
    ]
    return domains, DataSpec(**raw["data"]), path


def sha(text: str) -> str:
    from merge_mix.corpus import text_hash

    return text_hash(text)


def distribution(cov: list[float], threshold: float) -> dict:
    c = np.asarray(cov, dtype=np.float64)
    n = max(len(c), 1)
    out = {f"share_ge_{level:g}": round(float((c >= level).sum()) / n, 4) for level in LEVELS}
    out["share_eq_1"] = round(float((c == 1.0).sum()) / n, 4)
    out[f"share_ge_threshold_{threshold:g}"] = round(float((c >= threshold).sum()) / n, 4)
    out["max_coverage"] = round(float(c.max()), 4) if len(c) else 0.0
    out["mean_coverage"] = round(float(c.mean()), 4) if len(c) else 0.0
    return out


def split_stats(
    docs: list[list[str]],
    exact_doc: list[bool],
    piece_cov: list[list[float]],
    piece_dup: list[list[bool]],
    threshold: float,
) -> dict:
    """Counts for one domain's held-out split: `docs` (pieces per document), whether each
    document is an exact cross-domain duplicate, each piece's coverage and whether each
    piece's text occurs in another domain."""

    def nbytes(p: str) -> int:
        return len(p.encode("utf-8"))

    flat_cov = [c for doc in piece_cov for c in doc]
    pieces = [(p, c, dup) for doc, cs, ds in zip(docs, piece_cov, piece_dup, strict=True)
              for p, c, dup in zip(doc, cs, ds, strict=True)]  # fmt: skip
    near = [(p, c) for p, c, _ in pieces if c >= threshold]
    return {
        "documents": len(docs),
        "pieces": len(pieces),
        "bytes": sum(nbytes(p) for p, _, _ in pieces),
        "exact_duplicate_documents": sum(exact_doc),
        "exact_duplicate_document_pieces": sum(
            len(d) for d, x in zip(docs, exact_doc, strict=True) if x
        ),
        "exact_duplicate_document_bytes": sum(
            nbytes(p) for d, x in zip(docs, exact_doc, strict=True) if x for p in d
        ),
        "exact_duplicate_pieces": sum(dup for _, _, dup in pieces),
        "near_duplicate_pieces": len(near),
        "near_duplicate_bytes": sum(nbytes(p) for p, _ in near),
        "near_duplicate_documents": sum(any(c >= threshold for c in cs) for cs in piece_cov),
        **distribution(flat_cov, threshold),
    }


# ---------------------------------------------------------------------------------------
# Before: the spec's domains read again, without cross-domain or near-duplicate removal


def measure_before(domains, data, shingle) -> tuple[dict, dict]:
    from merge_mix.corpus import heldout_role, is_heldout, read_domain, split_domain
    from merge_mix.decontaminate import coverage, union

    corpora, digests_by_split, all_digests = {}, {}, {}
    for d in domains:
        t = time.perf_counter()
        docs, _ = read_domain(d, f"domains.{d.name}")
        corpus = split_domain(d.name, docs, data)
        corpora[d.name] = corpus
        all_digests[d.name] = set(corpus.digests)
        # split_domain appends one digest per kept document, in the order of the splits.
        by_split = defaultdict(list)
        for h in corpus.digests:
            split = "train"
            if is_heldout(h, data.heldout_fraction):
                split = heldout_role(h, data.test_fraction)
            by_split[split].append(h)
        for split in ("train", *HELDOUT):
            assert len(by_split[split]) == len(corpus.splits[split]), (d.name, split)
        digests_by_split[d.name] = by_split
        print(f"  read {d.name}: {len(docs)} documents ({time.perf_counter() - t:.1f} s)")
    names = list(corpora)
    train_sh = {n: union(shingle(p) for p in corpora[n].pieces("train")) for n in names}
    seen = union(train_sh.values())
    piece_hashes = {
        n: {sha(p) for split in ("train", *HELDOUT) for p in corpora[n].pieces(split)}
        for n in names
    }
    search_hashes = {sha(p) for n in names for p in corpora[n].pieces("search")}
    out: dict = {}
    examples = []
    for n in names:
        others_digests = set().union(*(all_digests[m] for m in names if m != n))
        others_pieces = set().union(*(piece_hashes[m] for m in names if m != n))
        others_train = union(train_sh[m] for m in names if m != n)
        out[n] = {}
        for split in HELDOUT:
            docs = corpora[n].splits[split]
            exact = [h in others_digests for h in digests_by_split[n][split]]
            covs, dups = [], []
            own_only = other = 0
            for doc in docs:
                cs, ds = [], []
                for p in doc:
                    s = shingle(p)
                    c = coverage(s, seen)
                    cs.append(c)
                    ds.append(sha(p) in others_pieces)
                    if c >= data.near_duplicate_threshold:
                        if coverage(s, others_train) >= data.near_duplicate_threshold:
                            other += 1
                        else:
                            own_only += 1
                        examples.append((c, n, split, p))
                covs.append(cs)
                dups.append(ds)
            stats = split_stats(docs, exact, covs, dups, data.near_duplicate_threshold)
            stats["near_duplicate_pieces_by_other_domains"] = other
            stats["near_duplicate_pieces_by_own_domain_only"] = own_only
            if split == "test":
                stats["test_pieces_also_in_search"] = sum(
                    sha(p) in search_hashes for p in corpora[n].pieces("test")
                )
            out[n][split] = stats
    examples.sort(key=lambda x: -x[0])
    context = {
        "corpora": corpora,
        "train_shingles": train_sh,
        "digests": digests_by_split,
        "examples": examples,
    }
    return out, context


# ---------------------------------------------------------------------------------------
# After: the built pool


def read_heldout(path: Path) -> list[list[str]]:
    """A held-out split's pieces grouped by document number (jsonl order)."""
    docs: dict[int, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        docs.setdefault(rec["document"], []).append(rec["text"])
    return [docs[k] for k in sorted(docs)]


def decode_train(pool_dir: Path, domain: str, tokenizer) -> tuple[list[str], bool]:
    """The training pieces of a domain, decoded from its shard; and whether every decoded
    piece has the byte length the index records."""
    from merge_mix.tokens import Shard

    shard = Shard.open(pool_dir / "data" / domain, "train")
    ids = [shard.piece(i).tolist() for i in range(len(shard.index))]
    texts = tokenizer.batch_decode(ids, clean_up_tokenization_spaces=False)
    exact = all(
        len(t.encode("utf-8")) == int(n) for t, n in zip(texts, shard.index[:, 2], strict=True)
    )
    return texts, exact


def measure_after(pool_dir: Path, data, shingle) -> tuple[dict, dict]:
    from merge_mix.decontaminate import coverage, load_digests, union
    from merge_mix.errors import MergeMixError
    from merge_mix.pool import DIGESTS, FORMAT_VERSION, SHINGLES, old_format_message
    from merge_mix.tokens import load_tokenizer

    meta = json.loads((pool_dir / "data" / "data.json").read_text())
    version = meta.get("format_version", 1)
    if version < FORMAT_VERSION:
        raise MergeMixError(old_format_message(pool_dir, version))
    names = list(meta["domains"])
    data_dir = pool_dir / "data"
    tokenizer = load_tokenizer(pool_dir / "tokenizer")
    digests = {n: load_digests(data_dir / n / DIGESTS) for n in names}
    shared = sum(len(digests[a] & digests[b]) for i, a in enumerate(names) for b in names[i + 1 :])
    stored = {n: np.load(data_dir / n / SHINGLES) for n in names}
    seen = union(stored.values())
    train_text, decoded_exact, recomputed = {}, {}, {}
    for n in names:
        train_text[n], decoded_exact[n] = decode_train(pool_dir, n, tokenizer)
        recomputed[n] = union(shingle(p) for p in train_text[n])
    heldout = {n: {s: read_heldout(data_dir / n / f"{s}.jsonl") for s in HELDOUT} for n in names}
    piece_hashes = {
        n: {sha(p) for p in train_text[n]}
        | {sha(p) for s in HELDOUT for doc in heldout[n][s] for p in doc}
        for n in names
    }
    search_hashes = {sha(p) for n in names for doc in heldout[n]["search"] for p in doc}
    out: dict = {}
    for n in names:
        others_digests = set().union(*(digests[m] for m in names if m != n))
        others_pieces = set().union(*(piece_hashes[m] for m in names if m != n))
        out[n] = {}
        for split in HELDOUT:
            docs = heldout[n][split]
            rebuilt = [sha("".join(doc)) for doc in docs]
            exact = [h in others_digests for h in rebuilt]
            covs = [[coverage(shingle(p), seen) for p in doc] for doc in docs]
            dups = [[sha(p) in others_pieces for p in doc] for doc in docs]
            stats = split_stats(docs, exact, covs, dups, data.near_duplicate_threshold)
            stats["documents_rebuilt_exactly"] = sum(h in digests[n] for h in rebuilt)
            if split == "test":
                stats["test_pieces_also_in_search"] = sum(
                    sha(p) in search_hashes for doc in docs for p in doc
                )
            out[n][split] = stats
    checks = {
        "documents_sha256_shared_between_domains": shared,
        "stored_shingles_match_train_shards": {
            n: bool(np.array_equal(stored[n], recomputed[n])) for n in names
        },
        "train_shards_decode_exactly": decoded_exact,
        "recorded": {
            n: {
                k: meta["domains"][n]["corpus"][k]
                for k in (
                    "cross_domain_duplicates_removed",
                    "near_duplicate_heldout_pieces",
                    "near_duplicate_train_pieces",
                )
            }
            for n in names
        },
    }
    return out, {"checks": checks, "heldout": heldout}


# ---------------------------------------------------------------------------------------
# The pydoc topics: held-out topics and the training topics that cover them


def pydoc_examples(before_ctx, after_ctx, data, shingle) -> list[dict]:
    """One row per pydoc topic that was a held-out document before: its coverage by all
    training text, the training topics covering it at >= the threshold, and how many of its
    pieces the pool kept."""
    from merge_mix.decontaminate import coverage, union

    try:
        from pydoc_data.topics import topics
    except ImportError:
        return []
    all_train = union(before_ctx["train_shingles"].values())
    rows = []
    for name, by_split in before_ctx["digests"].items():
        train = set(by_split["train"])
        train_topics = {k: shingle(t) for k, t in topics.items() if sha(t) in train}
        for split in HELDOUT:
            held = set(by_split[split])
            for key, text in sorted(topics.items()):
                if sha(text) not in held:
                    continue
                s = shingle(text)
                cov = {j: round(coverage(s, sj), 3) for j, sj in train_topics.items()}
                covering = {
                    j: c
                    for j, c in sorted(cov.items(), key=lambda x: -x[1])
                    if c >= data.near_duplicate_threshold
                }
                pieces = [p for doc in before_ctx["corpora"][name].splits[split] for p in doc
                          if p in text]  # fmt: skip
                after = [p for doc in after_ctx["heldout"].get(name, {}).get(split, [])
                         for p in doc if p in text]  # fmt: skip
                same = sorted(j for j, t in topics.items() if t == text and j != key)
                rows.append(
                    {
                        "topic": key,
                        "same_text_as": same,
                        "domain": name,
                        "split": split,
                        "bytes": len(text.encode("utf-8")),
                        "coverage_before": round(coverage(s, all_train), 3),
                        "covered_by_training_topics": covering,
                        "pieces_before": len(pieces),
                        "pieces_after": len(after),
                    }
                )
    return rows


def pydoc_nesting(shingle, threshold: float) -> dict[str, dict[str, float]]:
    """Each pydoc topic's coverage by every other topic, where it is >= the threshold (a
    topic that is a section of another, or the same text under two names)."""
    from merge_mix.decontaminate import coverage

    try:
        from pydoc_data.topics import topics
    except ImportError:
        return {}
    sh = {k: shingle(t) for k, t in topics.items()}
    out = {}
    for k in sorted(topics):
        cov = {j: round(coverage(sh[k], sh[j]), 3) for j in sorted(topics) if j != k}
        cov = {j: c for j, c in cov.items() if c >= threshold}
        if cov:
            out[k] = cov
    return out


# ---------------------------------------------------------------------------------------


def totals(per_domain: dict) -> dict:
    keys = (
        "documents",
        "pieces",
        "bytes",
        "exact_duplicate_documents",
        "exact_duplicate_document_bytes",
        "exact_duplicate_pieces",
        "near_duplicate_pieces",
        "near_duplicate_bytes",
        "near_duplicate_pieces_by_other_domains",
        "near_duplicate_pieces_by_own_domain_only",
        "test_pieces_also_in_search",
    )
    out = {k: sum(s.get(k, 0) for d in per_domain.values() for s in d.values()) for k in keys}
    out["max_coverage"] = max(s["max_coverage"] for d in per_domain.values() for s in d.values())
    return out


def print_table(title: str, per_domain: dict, threshold: float) -> None:
    print(f"\n{title}")
    head = (
        f"{'domain':<8}{'split':<7}{'docs':>6}{'pieces':>7}{'KB':>7}{'xdup docs':>10}"
        f"{'xdup KB':>8}{'xdup pcs':>9}{f'>={threshold:g} pcs':>10}{f'>={threshold:g} KB':>9}"
        f"{'>=.2':>7}{'>=.5':>7}{'>=.8':>7}{'==1':>7}{'max':>7}{'t in s':>7}"
    )
    print(head)
    for d, splits in per_domain.items():
        for split, s in splits.items():
            print(
                f"{d:<8}{split:<7}{s['documents']:>6}{s['pieces']:>7}{s['bytes'] / 1e3:>7.0f}"
                f"{s['exact_duplicate_documents']:>10}"
                f"{s['exact_duplicate_document_bytes'] / 1e3:>8.1f}"
                f"{s['exact_duplicate_pieces']:>9}{s['near_duplicate_pieces']:>10}"
                f"{s['near_duplicate_bytes'] / 1e3:>9.1f}"
                f"{s['share_ge_0.2']:>7.1%}{s['share_ge_0.5']:>7.1%}{s['share_ge_0.8']:>7.1%}"
                f"{s['share_eq_1']:>7.1%}{s['max_coverage']:>7.3f}"
                f"{s.get('test_pieces_also_in_search', ''):>7}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "spec_or_pool", help="a pool spec YAML (its output_dir) or a pool directory"
    )
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    from merge_mix.decontaminate import Shingler

    header = print_header("contamination of held-out splits, before and after decontamination")
    t0 = time.perf_counter()
    domains, data, pool_dir = resolve(args.spec_or_pool)
    print(f"pool: {pool_dir}")
    print(
        f"data: heldout_fraction {data.heldout_fraction}, test_fraction {data.test_fraction},"
        f" near_duplicate_threshold {data.near_duplicate_threshold},"
        f" shingle_words {data.shingle_words}, max_doc_bytes {data.max_doc_bytes}"
    )
    shingle = Shingler(data.shingle_words)
    t = time.perf_counter()
    before, before_ctx = measure_before(domains, data, shingle)
    before_s = time.perf_counter() - t
    t = time.perf_counter()
    after, after_ctx = measure_after(pool_dir, data, shingle)
    after_s = time.perf_counter() - t
    examples = pydoc_examples(before_ctx, after_ctx, data, shingle)
    nesting = pydoc_nesting(shingle, data.near_duplicate_threshold)
    thr = data.near_duplicate_threshold
    print_table("BEFORE (read_domain + split_domain, no decontamination)", before, thr)
    print_table("AFTER (the built pool)", after, thr)
    print(
        "\nxdup: exact duplicate of another domain's document (docs, KB) or piece (pcs);"
        f" >={thr:g}: pieces whose {data.shingle_words}-word shingles are >= {thr:g} covered by"
        " all domains' training text; >=.2 ... ==1: share of pieces at that coverage;"
        " t in s: test pieces whose exact text is also a search piece"
    )
    tb, ta = totals(before), totals(after)
    print(
        f"\ntotal before: {tb['exact_duplicate_documents']} exact cross-domain duplicate held-out"
        f" documents ({tb['exact_duplicate_document_bytes']:,} bytes),"
        f" {tb['near_duplicate_pieces']} near-duplicate pieces"
        f" ({tb['near_duplicate_bytes']:,} of {tb['bytes']:,} held-out bytes;"
        f" {tb['near_duplicate_pieces_by_own_domain_only']} covered by their own domain's"
        f" training text alone, {tb['near_duplicate_pieces_by_other_domains']} by other"
        " domains')"
    )
    print(
        f"total after: {ta['exact_duplicate_documents']} exact duplicates,"
        f" {ta['near_duplicate_pieces']} near-duplicates, max coverage {ta['max_coverage']:.3f}"
    )
    checks = after_ctx["checks"]
    print(f"checks: {json.dumps(checks)}")
    print("\nmost covered held-out pieces before:")
    for c, n, split, p in before_ctx["examples"][:8]:
        print(f"  {c:.3f} {n}/{split}: {p.strip().splitlines()[0][:70]!r}")
    if examples:
        print(
            "\npydoc topics held out before: coverage by all training text, training topics"
            f" covering them at >= {thr:g}, pieces before -> after"
        )
        for r in examples:
            same = f" (= {', '.join(r['same_text_as'])})" if r["same_text_as"] else ""
            print(
                f"  {r['domain']}/{r['split']} {r['topic'] + same:<24} {r['coverage_before']:.3f}"
                f" {r['covered_by_training_topics']} {r['pieces_before']} -> {r['pieces_after']}"
            )
    if nesting:
        print(f"\npydoc topics covered >= {thr:g} by another topic (in any split):")
        print("  " + "; ".join(f"{k} in {', '.join(v)}" for k, v in nesting.items()))
    wall = time.perf_counter() - t0
    print(f"\nwall time {wall:.1f} s (before {before_s:.1f} s, after {after_s:.1f} s)")
    result = {
        **header,
        "pool": str(pool_dir),
        "data": {
            k: getattr(data, k)
            for k in (
                "heldout_fraction",
                "test_fraction",
                "near_duplicate_threshold",
                "shingle_words",
                "max_doc_bytes",
                "min_doc_bytes",
            )
        },
        "before": before,
        "after": after,
        "totals": {"before": tb, "after": ta},
        "checks": checks,
        "most_covered_before": [
            {"coverage": round(c, 4), "domain": n, "split": s, "first_line": p.strip()[:80]}
            for c, n, s, p in before_ctx["examples"][:20]
        ],
        "pydoc_topics": examples,
        "pydoc_nesting": nesting,
        "wall_time_s": round(wall, 1),
        "before_s": round(before_s, 1),
        "after_s": round(after_s, 1),
    }
    write_json(args.json, result)


if __name__ == "__main__":
    main()
