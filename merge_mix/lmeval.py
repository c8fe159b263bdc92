"""lm-evaluation-harness integration: tasks made from a pool's held-out data, scoring an
in-memory (merged) model, and a ``merge-mix`` model type for lm-eval's own command line.

Tasks (`make_tasks`, ``merge-mix make-tasks POOL --out eval_tasks``) are written to
``<out>/<pool>/`` from the pool's HELD-OUT shards, never its training data:

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

BOS: lm-eval's ``HFLM`` is built with ``add_bos_token=False`` and
``prefix_token_id=<the pool's BOS>`` (`hflm_bos_args`), so texts are encoded without the
tokenizer's own special tokens and a rolling document is scored as ``BOS t_0 ... t_n``,
exactly as the pool's shards hold it and `merge_mix.evaluate` scores it, whether or not the
tokenizer adds BOS itself (left to lm-eval's default, a tokenizer that adds BOS would give
``BOS BOS t_0 ...``). Multiple-choice contexts are encoded without BOS. A stock
``--model hf`` run on an export reproduces our numbers with the same two arguments.

Scoring (`evaluate_tasks`) wraps the caller's model object in lm-eval's ``HFLM`` without
copying, moving or recasting it, and never puts lm-eval's response cache in front of it:
that cache is keyed on requests, never on weights, so it would return the previous
merge's scores. Only the weight-independent part (task configs and their datasets) is kept
between calls.

``merge-mix lm-eval ARGS...`` (`run_lm_eval_cli`) is lm-eval's CLI with the ``merge-mix``
model type registered::

    merge-mix lm-eval --model merge-mix --model_args pool=pools/demo,weights=code:0.5,prose:0.5 \\
        --tasks mm_demo_code_ppl --include_path eval_tasks
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
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
MODEL_TYPE = "merge-mix"
# Multiple-choice passages: this much context (or the pool's seq_len minus the continuation).
CONTEXT_TOKENS = 64
# --model_args keys whose value is a NAME:VALUE list (commas there are not lm-eval's).
_ASSIGNMENT_KEYS = ("weights", "mixture")
_PAIR = re.compile(r"\s*[^=,:;]+:\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*")


# ---------------------------------------------------------------------------------------
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


def hflm_bos_args(tokenizer) -> dict[str, Any]:
    """The ``HFLM`` arguments that make lm-eval put exactly the pool's BOS (the tokenizer's
    BOS, else its EOS) before a scored text and encode texts without special tokens, as the
    pool's shards do for every kind of tokenizer."""
    from merge_mix.tokens import special_ids

    return {"add_bos_token": False, "prefix_token_id": special_ids(tokenizer)[0]}


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


# ---------------------------------------------------------------------------------------
# Scoring an in-memory model


# (include paths, task names, task-file signature) -> lm-eval's loaded task dict
_TASK_CACHE: dict[tuple, dict] = {}


def _include_paths(include_path) -> list[Path]:
    if include_path is None:
        return []
    raw = include_path if isinstance(include_path, (list, tuple)) else [include_path]
    paths = [Path(p).resolve() for p in raw]
    for p in paths:
        if not p.is_dir():
            raise MergeMixError(
                f"{p}: lm-eval task directory not found (write tasks with `merge-mix make-tasks`)"
            )
    return paths


def _signature(paths: list[Path]) -> tuple:
    """Task files and their modification times: regenerated tasks invalidate the cache."""
    return tuple((str(f), f.stat().st_mtime_ns) for p in paths for f in sorted(p.glob("**/*.yaml")))


@contextlib.contextmanager
def _quiet(logger_name: str = "lm_eval") -> Iterator[None]:
    """Mute lm-eval's per-call warnings (an HFLM built from a model object, metric
    defaults): expected here, and a search would repeat them for every mixture."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


_NETWORK = {"allowed": False}
_OFFLINE_VARIABLES = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


def allow_network(allowed: bool = True) -> None:
    """Let lm-eval tasks download their datasets for the rest of this process (the CLI's
    ``--allow-network``). Off by default: tasks read local files and the datasets cache
    only (``HF_DATASETS_OFFLINE=1``, ``HF_HUB_OFFLINE=1`` while tasks load)."""
    _NETWORK["allowed"] = bool(allowed)


@contextlib.contextmanager
def _network(allowed: bool) -> Iterator[None]:
    """Offline (or, when `allowed`, online) Hugging Face datasets and hub while inside:
    the environment variables and the flags the libraries read them into at import."""
    import datasets.config
    import huggingface_hub.constants

    saved_env = {k: os.environ.get(k) for k in _OFFLINE_VARIABLES}
    flags = [(datasets.config, n) for n in _OFFLINE_VARIABLES if hasattr(datasets.config, n)]
    flags.append((huggingface_hub.constants, "HF_HUB_OFFLINE"))
    saved_flags = [(mod, n, getattr(mod, n)) for mod, n in flags]
    for k in _OFFLINE_VARIABLES:
        if allowed:
            os.environ.pop(k, None)
        else:
            os.environ[k] = "1"
    for mod, n in flags:
        setattr(mod, n, not allowed)
    try:
        yield
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for mod, n, v in saved_flags:
            setattr(mod, n, v)


def _load_tasks(tasks: Sequence[str], include_path) -> dict:
    """lm-eval's loaded task dict for `tasks`, built once per task set and task files.

    Tasks are looked up under `include_path` first, then among lm-eval's built-in tasks;
    datasets load offline (local files and the datasets cache) unless `allow_network`."""
    from lm_eval.tasks import TaskManager

    paths = _include_paths(include_path)
    key = (tuple(map(str, paths)), tuple(tasks), _signature(paths), _NETWORK["allowed"])
    if key not in _TASK_CACHE:
        manager = TaskManager(include_path=[str(p) for p in paths], include_defaults=False)
        builtin = [name for name in tasks if name not in set(manager.all_tasks)]
        if builtin:
            # Indexing lm-eval's own task files takes seconds: only when a task needs it.
            with _quiet():
                manager = TaskManager(include_path=[str(p) for p in paths], include_defaults=True)
            for name in builtin:
                if name not in set(manager.all_tasks):
                    where = ", ".join(map(str, paths)) or "no include path"
                    raise MergeMixError(
                        f"lm-eval task {name!r} not found in {where} nor among lm-eval's"
                        " built-in tasks (write ours with `merge-mix make-tasks`)"
                    )
        import datasets

        bars = not datasets.are_progress_bars_disabled()
        datasets.disable_progress_bars()
        try:
            with _quiet(), _network(_NETWORK["allowed"]):
                loaded = manager.load(list(tasks))
        except ValueError as exc:  # e.g. a group and one of its members both named
            raise MergeMixError(f"lm-eval tasks {','.join(tasks)}: {exc}") from None
        except Exception as exc:
            if not builtin:
                raise
            # A built-in task whose dataset is neither cached nor reachable.
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            hint = (
                "it is not in the local datasets cache (network is off); run once with"
                " --allow-network to download it, or vendor it as a local task"
                " (docs/evaluation.md)"
                if not _NETWORK["allowed"]
                else "its download failed"
            )
            raise MergeMixError(
                f"lm-eval task(s) {', '.join(builtin)}: dataset not available: {hint}"
                f" ({type(exc).__name__}: {first})"
            ) from None
        finally:
            if bars:
                datasets.enable_progress_bars()
        # What simple_evaluate does to each task before evaluating (zero-shot by default).
        for task in loaded["tasks"].values():
            if task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=1234)
        _TASK_CACHE.clear()  # a search uses one task set at a time
        _TASK_CACHE[key] = loaded
    return _TASK_CACHE[key]


def metric_directions(tasks: Sequence[str], include_path) -> dict[str, bool]:
    """Whether higher is better, per ``lmeval/<task>/<metric>`` key that `evaluate_tasks` can
    return for `tasks`, from each task's own ``higher_is_better``. A group's aggregated metric
    gets its members' direction when they all agree on it."""
    loaded = _load_tasks(list(tasks), include_path)
    out: dict[str, bool] = {}
    by_metric: dict[str, set[bool]] = {}
    for name, task in loaded["tasks"].items():
        for metric, higher in (task.higher_is_better() or {}).items():
            if isinstance(higher, bool):
                out[f"lmeval/{name}/{metric}"] = higher
                by_metric.setdefault(metric, set()).add(higher)
    for name in dict.fromkeys([*loaded.get("groups", {}), *loaded.get("group_map", {})]):
        for metric, flags in by_metric.items():
            if len(flags) == 1:
                out.setdefault(f"lmeval/{name}/{metric}", next(iter(flags)))
    return out


def task_sizes(tasks: Sequence[str], include_path, limit: int | float | None = None) -> dict:
    """Documents each task of `tasks` evaluates under lm-eval's `limit` (the first N, or a
    fraction if < 1), by task name."""
    loaded = _load_tasks(list(tasks), include_path)
    out = {}
    for name, task in loaded["tasks"].items():
        n = len(task.eval_docs)
        if limit is not None:
            n = min(n, math.ceil(n * limit) if limit < 1 else int(limit))
        out[name] = n
    return out


@contextlib.contextmanager
def _no_request_progress_bars() -> Iterator[None]:
    """lm-eval draws a bar per task while building requests; a search would print hundreds."""
    import functools

    import lm_eval.api.task as task_module

    saved = task_module.tqdm
    task_module.tqdm = functools.partial(saved, disable=True)
    try:
        yield
    finally:
        task_module.tqdm = saved


_CLASSES: dict[str, type] = {}


def _hflm_class():
    """HFLM without per-batch progress bars (a search scores hundreds of mixtures)."""
    if "quiet" not in _CLASSES:
        from lm_eval.models.huggingface import HFLM

        class QuietHFLM(HFLM):
            def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
                return super()._loglikelihood_tokens(
                    requests, disable_tqdm=True, override_bs=override_bs
                )

            def loglikelihood_rolling(self, requests, disable_tqdm=False):
                return super().loglikelihood_rolling(requests, disable_tqdm=True)

            def loglikelihood(self, requests, disable_tqdm=False):
                return super().loglikelihood(requests, disable_tqdm=True)

        _CLASSES["quiet"] = QuietHFLM
    return _CLASSES["quiet"]


def flatten_results(results: dict) -> dict[str, float]:
    """lm-eval's ``results["results"]`` as ``lmeval/<task>/<metric>`` -> float (the
    ``,none`` filter suffix dropped, other filters kept; stderr entries skipped)."""
    out: dict[str, float] = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            out[f"lmeval/{task}/{metric if filt == 'none' else key}"] = float(value)
    return out


def evaluate_tasks(
    model,
    tokenizer,
    tasks: Sequence[str],
    include_path: str | Path | Sequence[str | Path] | None = None,
    limit: int | float | None = None,
    max_length: int | None = None,
    device=None,
    batch_size: int = 16,
) -> dict[str, float]:
    """Score an in-memory causal LM on lm-eval `tasks` found under `include_path`.

    Returns ``lmeval/<task>/<metric>`` -> value. The model object is used as is (never
    copied, moved or cast; `device`, if given, must be where it already lives), so a caller
    can merge new weights into it in place and call again: nothing model-dependent is
    cached (lm-eval's response cache stays off), only the tasks and their datasets.
    `limit` is lm-eval's: the first N documents of each task (or a fraction if < 1)."""
    import torch
    from lm_eval.evaluator import evaluate

    tasks = list(tasks)
    if not tasks:
        raise MergeMixError("lm-eval: no tasks given")
    loaded = _load_tasks(tasks, include_path)
    if device is not None:
        where = next(model.parameters()).device
        if torch.device(device).type != where.type:
            raise MergeMixError(f"device: the model is on {where}, not {device}")
    with _quiet(), _no_request_progress_bars():
        lm = _hflm_class()(
            pretrained=model,
            tokenizer=tokenizer,
            max_length=max_length,
            batch_size=batch_size,
            **hflm_bos_args(tokenizer),
        )
        # lm-eval's `evaluate`, which `simple_evaluate` calls after building the model and
        # tasks: the rest of simple_evaluate re-seeds the global generators and collects
        # environment info (subprocesses, ~0.4 s) on every call.
        results = evaluate(
            lm=lm,
            task_dict=loaded,
            limit=limit,
            cache_requests=False,
            bootstrap_iters=0,
            log_samples=False,
        )
    return flatten_results(results or {})


# ---------------------------------------------------------------------------------------
# The `merge-mix` model type for lm-eval's CLI


def register_model_type() -> type:
    """Register the ``merge-mix`` lm-eval model type (idempotent) and return its class.

    ``--model merge-mix --model_args pool=PATH,weights=code:0.5;prose:0.5`` merges the
    pool's components in memory. Arguments: ``pool`` (required); ``weights`` (merge weights:
    ``uniform``, ``natural``, a domain, or ``NAME:VALUE`` pairs) or ``mixture`` (an effective
    data mixture, converted with the pool's general_share); ``keep_base`` (``;``-separated
    parameter-name patterns kept at the base); ``extrapolate``; ``stream``; ``device``;
    ``batch_size``; ``max_length`` (default: the pool's seq_len); ``verify`` (``cached`` or
    ``full``: how the pool's weights are checked against their sha256); other HFLM arguments."""
    if "merge-mix" in _CLASSES:
        return _CLASSES["merge-mix"]
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM

    class MergeMixLM(HFLM):
        """An HFLM over ``theta(w)``, merged in memory from a merge-mix pool."""

        def __init__(
            self,
            pool: str,
            weights: Any = None,
            mixture: Any = None,
            keep_base: str | Sequence[str] | None = None,
            extrapolate: bool = False,
            stream: bool = False,
            device: str | None = None,
            batch_size: int | str = 16,
            max_length: int | None = None,
            verify: str = "cached",
            **kwargs,
        ):
            from merge_mix.merge import effective_mixture, merger_for_pool, resolve_weights
            from merge_mix.model import pick_device
            from merge_mix.pool import Pool
            from merge_mix.tokens import load_tokenizer

            opened = Pool.open(str(pool))
            stray = [k for k in kwargs if k in opened.domains]
            if stray:
                raise MergeMixError(
                    f"model_args: {stray[0]}={kwargs[stray[0]]} looks like a merge weight; write"
                    " weights=code:0.5,prose:0.5 (NAME:VALUE: `=` starts a new model argument)"
                )
            if weights is not None and mixture is not None:
                raise MergeMixError("model_args: give weights= or mixture=, not both")
            spec = mixture if mixture is not None else weights
            spec = "uniform" if spec is None else spec
            if not isinstance(spec, dict):
                spec = str(spec)
            if isinstance(keep_base, str):
                keep_base = [p for p in keep_base.replace(",", ";").split(";") if p.strip()]
            w = resolve_weights(
                spec,
                opened.domains,
                natural=opened.natural_mixture(),
                general_share=opened.general_share,
                general=opened.general_mixture(),
                as_mixture=mixture is not None,
                extrapolate=bool(extrapolate),
                notice=lambda msg: print(msg, file=sys.stderr),
            )
            import torch

            if device and str(device).startswith("cuda") and not torch.cuda.is_available():
                # lm-eval's CLI passes cuda:0 unless told otherwise; HFLM falls back too.
                print(f"note: device {device} is not available; using auto", file=sys.stderr)
                device = None
            torch_device = pick_device(str(device) if device else "auto")
            self.pool = opened
            self.merger = merger_for_pool(
                opened, torch_device, tuple(keep_base or ()), bool(stream), str(verify)
            )
            self.merge_weights = dict(zip(opened.domains, map(float, w), strict=True))
            mix = effective_mixture(w, opened.general_share, opened.general_mixture())
            self.effective_mixture = dict(zip(opened.domains, map(float, mix), strict=True))
            model = self.merger.merge(w)
            tokenizer = load_tokenizer(opened.tokenizer_dir)
            with _quiet():
                super().__init__(
                    pretrained=model,
                    tokenizer=tokenizer,
                    batch_size=batch_size,
                    max_length=int(max_length) if max_length else opened.seq_len,
                    **{**hflm_bos_args(tokenizer), **kwargs},
                )

        @classmethod
        def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
            # --model_args win over lm-eval's CLI-wide options (--device, --batch_size), which
            # would otherwise be passed twice.
            extra = {
                k: v
                for k, v in (additional_config or {}).items()
                if v is not None and k not in arg_dict
            }
            return cls(**arg_dict, **extra)

        @classmethod
        def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
            from lm_eval.utils import simple_parse_args_string

            return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

        def get_model_info(self) -> dict:
            return {
                "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(self.model.dtype),
                "pool": str(self.pool.path.resolve()),
                "merge_weights": self.merge_weights,
                "effective_mixture": self.effective_mixture,
            }

    register_model(MODEL_TYPE)(MergeMixLM)
    _CLASSES["merge-mix"] = MergeMixLM
    return MergeMixLM


def _rewrite_assignments(value: str) -> str:
    """``pool=P,weights=code:0.5,prose:0.5`` -> ``pool=P,weights=code:0.5;prose:0.5``."""
    if value.lstrip().startswith("{"):  # lm-eval's JSON form needs nothing
        return value
    out: list[str] = []
    in_assignment = False
    for part in value.split(","):
        if out and in_assignment and _PAIR.fullmatch(part):
            out[-1] += ";" + part
            continue
        out.append(part)
        in_assignment = part.split("=", 1)[0].strip() in _ASSIGNMENT_KEYS
    return ",".join(out)


def rewrite_model_args(argv: Sequence[str]) -> list[str]:
    """Protect commas inside ``weights=``/``mixture=`` values of ``--model_args``/``-a``."""
    out: list[str] = []
    in_model_args = False
    for arg in argv:
        if arg in ("--model_args", "-a"):
            in_model_args = True
            out.append(arg)
        elif arg.startswith("--model_args="):
            in_model_args = False
            out.append("--model_args=" + _rewrite_assignments(arg.split("=", 1)[1]))
        elif in_model_args and not arg.startswith("-"):
            out.append(_rewrite_assignments(arg))
        else:
            in_model_args = False
            out.append(arg)
    return out


def run_lm_eval_cli(argv: Sequence[str]) -> int:
    """Run lm-eval's command line with the ``merge-mix`` model type; return its exit code.

    Every lm-eval option works (``--tasks``, ``--include_path``, ``--limit``,
    ``--output_path``, ``--log_samples``, ...). With ``--model merge-mix``, ``--model_args``
    takes ``pool=PATH`` and ``weights=NAME:VALUE,NAME:VALUE`` (or ``mixture=...``; the
    commas between pairs are kept), plus ``keep_base``, ``extrapolate``, ``stream``,
    ``device``, ``batch_size``, ``max_length``. Example::

        merge-mix lm-eval --model merge-mix \\
            --model_args pool=pools/demo,weights=code:0.5,prose:0.5 \\
            --tasks mm_demo_code_ppl,mm_demo_code_choice --include_path eval_tasks

    lm-eval's built-in tasks read their datasets from the datasets cache or the hub, as
    lm-eval's own CLI does (this wrapper does not turn the network off)."""
    register_model_type()
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *rewrite_model_args(list(argv))]
    try:
        cli_evaluate()
    except SystemExit as exc:
        if exc.code is None:
            return 0
        if isinstance(exc.code, int):
            return exc.code
        print(exc.code, file=sys.stderr)
        return 1
    finally:
        sys.argv = saved
    return 0
