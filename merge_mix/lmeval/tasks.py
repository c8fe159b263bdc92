"""lm-eval tasks written from a pool's held-out data (``merge-mix make-tasks``).

`make_tasks` (``merge-mix make-tasks POOL --out eval_tasks``) writes to ``<out>/<pool>/``,
from the pool's HELD-OUT split (``search`` by default, or ``test``), never its training data:

- ``mm_<pool>_<domain>_ppl`` (``loglikelihood_rolling``; word_perplexity, byte_perplexity,
  bits_per_byte): one document per held-out piece, in index order, the original text the
  piece was tokenized from (kept in ``data/<domain>/<split>.jsonl``, not decoded from
  tokens, which loses text for tokenizers with an unknown token or a Metaspace prefix).
  Its first ``k`` documents are the pieces `merge_mix.evaluate` scores for a token budget,
  so ``--limit k`` gives lm-eval's bits_per_byte for our ``bpb``.
- ``mm_<pool>_<domain>_choice`` (``multiple_choice``; acc, acc_norm): which of ``n_choices``
  continuations follows a held-out passage. Items come in groups of ``n_choices`` passages
  from distinct documents of the domain that share one list of their true continuations,
  so a model that ignores the context scores exactly chance (``1 / n_choices``) on every
  whole group (``--limit`` a multiple of ``n_choices``) however it ranks the continuations.
- the group ``mm_<pool>`` (every task above) and the tags ``mm_<pool>_ppl``, ``mm_<pool>_choice``.

Each task is a YAML next to a JSONL file under ``data/``, loaded with ``dataset_path: json``
and absolute ``data_files`` (the tasks run from any working directory; the datasets cache
goes to ``.hf_cache/`` beside them). The files are staged under a name lm-eval does not
read and renamed into place; ``tasks.json``, written last, marks the directory complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from merge_mix.artifacts import file_lock, library_versions, read_json, write_json_atomic
from merge_mix.errors import MergeMixError

FORMAT = "merge-mix-lmeval-tasks"
# 2: perplexity documents are the stored original text of each piece.
FORMAT_VERSION = 2
TASKS_MANIFEST = "tasks.json"
# Multiple-choice passages: this much context (or the pool's seq_len minus the continuation).
CONTEXT_TOKENS = 64


# Task files


def sanitise(name: str) -> str:
    """A task-name-safe form of a pool or domain name: lowercase ``[a-z0-9_]``."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "x"


def task_names(pool_name: str, domains: Sequence[str]) -> dict[str, dict[str, str]]:
    """``{domain: {"ppl": name, "choice": name}}`` for a pool's tasks."""
    prefix = f"mm_{sanitise(pool_name)}"
    names = {d: {k: f"{prefix}_{sanitise(d)}_{k}" for k in ("ppl", "choice")} for d in domains}
    seen: dict[str, str] = {}
    for d in domains:
        other = seen.setdefault(names[d]["ppl"], d)
        if other != d:
            raise MergeMixError(
                f"domains {other!r} and {d!r} both become task {names[d]['ppl']!r};"
                " rename one of them"
            )
    return names


def group_name(pool_name: str) -> str:
    """The lm-eval group holding every task of a pool."""
    return f"mm_{sanitise(pool_name)}"


def _decode(tokenizer, ids: np.ndarray) -> str:
    return tokenizer.decode(
        [int(t) for t in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False
    )


def _piece_texts(path: Path, count: int) -> Iterator[str]:
    """The original text of a held-out split's pieces, in index order, from its jsonl."""
    if not path.is_file():
        raise MergeMixError(f"{path}: held-out text missing (pool incomplete?)")
    n = 0
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            n += 1
            yield json.loads(line)["text"]
    if n != count:
        raise MergeMixError(f"{path}: {n} pieces, but the shard's index has {count}")


def _ppl_rows(tokenizer, shard, texts_path: Path, max_docs: int) -> tuple[list[dict], int]:
    """The first `max_docs` non-empty held-out pieces (the evaluator's order) with their
    original text, and how many of them the tokens do not decode back to (informational:
    a tokenizer with an unknown token or a Metaspace prefix loses text when decoding)."""
    rows, inexact = [], 0
    texts = _piece_texts(texts_path, len(shard.index))
    for i, text in enumerate(texts):
        if len(rows) >= max_docs:
            texts.close()
            break
        n_tokens, n_bytes = int(shard.index[i, 1]), int(shard.index[i, 2])
        if n_tokens == 0:  # the evaluator skips empty pieces too
            continue
        if len(text.encode("utf-8")) != n_bytes:
            raise MergeMixError(
                f"{texts_path}: piece {i} has {len(text.encode('utf-8'))} bytes, the index"
                f" {n_bytes}"
            )
        inexact += _decode(tokenizer, shard.piece(i)) != text
        rows.append({"text": text, "piece": i, "n_tokens": n_tokens, "n_bytes": n_bytes})
    return rows, inexact


def _choice_rows(
    tokenizer,
    shard,
    domain: str,
    max_docs: int,
    n_choices: int,
    context_tokens: int,
    continuation_tokens: int,
    seed: int,
) -> list[dict]:
    """Multiple-choice items in groups of `n_choices` passages from distinct held-out pieces.

    Each passage gives a context and its true continuation; the group's items share one
    shuffled list of the group's true continuations, each item's own being gold. A model
    that ignores the context therefore scores exactly chance over a group, whatever it
    thinks of each continuation on its own; only using the context lifts the score."""
    span = context_tokens + continuation_tokens
    pieces = {i: shard.piece(i) for i in range(len(shard.index)) if shard.index[i, 1] >= span}
    if len(pieces) < n_choices:
        raise MergeMixError(
            f"domain {domain!r}: {len(pieces)} held-out pieces of at least {span} tokens, fewer"
            f" than n_choices ({n_choices}); lower n_choices or give the domain more held-out data"
        )
    rng = np.random.default_rng([seed, zlib.crc32(domain.encode())])
    passages = [(i, s) for i in sorted(pieces) for s in range(0, len(pieces[i]) - span + 1, span)]
    queue = [passages[k] for k in rng.permutation(len(passages))]
    rows: list[dict] = []
    while len(rows) + n_choices <= max_docs:
        group: list[tuple[int, int]] = []
        for p in queue:
            if all(p[0] != q[0] for q in group):
                group.append(p)
                if len(group) == n_choices:
                    break
        if len(group) < n_choices:
            break
        queue = [p for p in queue if p not in group]
        contexts, golds = [], []
        for i, s in group:
            toks = pieces[i]
            contexts.append(_decode(tokenizer, toks[s : s + context_tokens]))
            whole = _decode(tokenizer, toks[s : s + span])
            # The continuation is the rest of the passage's text (decoding it alone would
            # drop a Metaspace word boundary); a cut inside a multi-byte character garbles
            # the context, so the passage is skipped.
            ok = whole.startswith(contexts[-1]) and len(whole) > len(contexts[-1])
            golds.append(whole[len(contexts[-1]) :] if ok else "\ufffd")
        if len(set(golds)) < n_choices or any("\ufffd" in g for g in golds):
            continue
        order = [int(j) for j in rng.permutation(n_choices)]
        choices = [golds[j] for j in order]
        for k, (i, s) in enumerate(group):
            rows.append(
                {
                    "context": contexts[k],
                    "choices": choices,
                    "gold": order.index(k),
                    "piece": i,
                    "offset": s,
                }
            )
    if not rows:
        raise MergeMixError(
            f"domain {domain!r}: no {n_choices} usable passages from distinct held-out pieces"
        )
    return rows


def _task_yaml(name: str, tag: str, data_file: Path, cache_dir: Path, kind: str, meta: dict):
    cfg: dict[str, Any] = {
        "task": name,
        "tag": [tag],
        "dataset_path": "json",
        "dataset_kwargs": {
            "data_files": {"test": str(data_file)},
            "cache_dir": str(cache_dir),
        },
        "test_split": "test",
    }
    if kind == "ppl":
        cfg |= {
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "text",
            "metric_list": [
                {"metric": m, "aggregation": agg, "higher_is_better": False}
                for m, agg in (
                    ("word_perplexity", "weighted_perplexity"),
                    ("byte_perplexity", "weighted_perplexity"),
                    ("bits_per_byte", "bits_per_byte"),
                )
            ],
        }
    else:
        cfg |= {
            "output_type": "multiple_choice",
            "doc_to_text": "context",
            "doc_to_choice": "choices",
            "doc_to_target": "gold",
            # Continuations are token-exact cuts: nothing goes between context and choice.
            "target_delimiter": "",
            "metric_list": [
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
            ],
        }
    cfg["metadata"] = {"version": 1.0, **meta}
    return cfg


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _write_yaml(path: Path, cfg: dict) -> None:
    import yaml

    path.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True), encoding="utf-8")


def _source_hash(pool, params: dict) -> str:
    """What the task files depend on: held-out data, tokenizer, parameters."""
    h = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    h.update((pool.data_dir / "data.json").read_bytes())
    h.update(json.dumps(pool.manifest.get("tokenizer", {}), sort_keys=True).encode())
    return h.hexdigest()


def make_tasks(
    pool_dir: str | Path,
    out_dir: str | Path = "eval_tasks",
    max_docs_per_domain: int = 200,
    n_choices: int = 4,
    seed: int = 0,
    continuation_tokens: int = 4,
    split: str = "search",
) -> list[str]:
    """Write lm-eval tasks built from POOL's held-out data and return their names.

    `split` is the held-out split the items come from: ``search`` (default; tasks a search
    objective may select on) or ``test`` (tasks for final judgement only; write them to
    another OUT, since the names are the same).

    Per domain: ``mm_<pool>_<domain>_ppl``, rolling perplexity (bits_per_byte,
    byte_perplexity, word_perplexity) on the first MAX_DOCS held-out pieces, and
    ``mm_<pool>_<domain>_choice``, multiple choice (acc, acc_norm; chance 1/N_CHOICES):
    which of N_CHOICES continuations (CONTINUATION_TOKENS tokens each) follows a held-out
    passage (up to 64 tokens), the others being the true continuations of passages from
    other documents of the same domain; at most MAX_DOCS items, deterministic given SEED.
    Also the group ``mm_<pool>`` with all of them and the tags ``mm_<pool>_ppl`` and
    ``mm_<pool>_choice``. Files go to ``OUT/<pool>/``; lm-eval finds them with
    ``--include_path OUT``. Unchanged tasks are not rewritten."""
    from merge_mix.pool import Pool
    from merge_mix.tokens import Shard, load_tokenizer

    if max_docs_per_domain < 1:
        raise MergeMixError(f"max_docs_per_domain: {max_docs_per_domain} is not a positive count")
    if n_choices < 2:
        raise MergeMixError(f"n_choices: {n_choices} is fewer than 2")
    if continuation_tokens < 1:
        raise MergeMixError(f"continuation_tokens: {continuation_tokens} is not a positive count")
    if split not in ("search", "test"):
        raise MergeMixError(f"split: must be 'search' or 'test', not {split!r}")
    pool = Pool.open(pool_dir)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    names = task_names(pool.name, pool.domains)
    group = group_name(pool.name)
    final = out_dir / sanitise(pool.name)
    continuation = continuation_tokens
    context = min(CONTEXT_TOKENS, pool.seq_len - continuation)
    if context < 1:
        raise MergeMixError(
            f"continuation_tokens: {continuation} leaves no context in the pool's seq_len"
            f" ({pool.seq_len})"
        )
    params = {
        "format_version": FORMAT_VERSION,
        "pool": str(Path(pool_dir).resolve()),
        "domains": pool.domains,
        "max_docs_per_domain": max_docs_per_domain,
        "n_choices": n_choices,
        "seed": seed,
        "context_tokens": context,
        "continuation_tokens": continuation,
        "split": split,
        "location": str(final),
    }
    source = _source_hash(pool, params)
    listed = [n for d in pool.domains for n in (names[d]["ppl"], names[d]["choice"])]
    with file_lock(out_dir / f".{final.name}.lock"):
        if (final / TASKS_MANIFEST).is_file():
            old = read_json(final / TASKS_MANIFEST)
            if old.get("source_hash") == source and all(
                (final / f"{n}.yaml").is_file() for n in old["tasks"]
            ):
                return list(old["tasks"])
        tokenizer = load_tokenizer(pool.tokenizer_dir)
        # Staged with YAMLs named *.yaml.partial, which lm-eval's indexer skips, then renamed
        # into place; under the lock, a leftover staging dir is from a killed run.
        staging = out_dir / f".{final.name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            (staging / "data").mkdir(parents=True)
            record: dict[str, Any] = {}
            for d in pool.domains:
                shard = Shard.open(pool.data_dir / d, split)
                ppl, inexact = _ppl_rows(
                    tokenizer, shard, pool.data_dir / d / f"{split}.jsonl", max_docs_per_domain
                )
                if not ppl:
                    raise MergeMixError(f"domain {d!r}: no non-empty held-out piece")
                mc = _choice_rows(
                    tokenizer, shard, d, max_docs_per_domain, n_choices, context, continuation, seed
                )
                meta = {"pool": pool.name, "domain": d}
                for kind, rows in (("ppl", ppl), ("choice", mc)):
                    name = names[d][kind]
                    _write_jsonl(staging / "data" / f"{name}.jsonl", rows)
                    cfg = _task_yaml(
                        name,
                        f"{group}_{kind}",
                        final / "data" / f"{name}.jsonl",
                        final / ".hf_cache",
                        kind,
                        meta,
                    )
                    _write_yaml(staging / f"{name}.yaml.partial", cfg)
                record[d] = {
                    "ppl": {"task": names[d]["ppl"], "docs": len(ppl), "inexact_text": inexact},
                    "choice": {"task": names[d]["choice"], "docs": len(mc)},
                }
            _write_yaml(
                staging / f"{group}.yaml.partial",
                {"group": group, "task": listed, "metadata": {"version": 1.0}},
            )
            if final.exists():
                (final / TASKS_MANIFEST).unlink(missing_ok=True)
                shutil.rmtree(final)
            staging.rename(final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        for name in [*listed, group]:
            (final / f"{name}.yaml.partial").rename(final / f"{name}.yaml")
        write_json_atomic(
            final / TASKS_MANIFEST,
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "pool_name": pool.name,
                "group": group,
                "tasks": listed,
                "domains": record,
                "params": params,
                "source_hash": source,
                "versions": library_versions(),
            },
        )
    return listed
