"""Scoring an in-memory (merged) model on lm-eval tasks, and lm-eval's task loading.

`evaluate_tasks` wraps the caller's model object in lm-eval's ``HFLM`` without copying,
moving or recasting it, and never puts lm-eval's response cache in front of it: that cache
is keyed on requests, never on weights, so it would return the previous merge's scores.
Only the weight-independent part (task configs and their datasets) is kept between calls.

BOS: ``HFLM`` is built with ``add_bos_token=False`` and ``prefix_token_id=<the pool's BOS>``
(`hflm_bos_args`), so texts are encoded without the tokenizer's own special tokens and a
rolling document is scored as ``BOS t_0 ... t_n``, exactly as the pool's shards hold it and
`merge_mix.evaluate` scores it, whether or not the tokenizer adds BOS itself (left to
lm-eval's default, a tokenizer that adds BOS would give ``BOS BOS t_0 ...``). Multiple-choice
contexts are encoded without BOS. A stock ``--model hf`` run on an export reproduces our
numbers with the same two arguments.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from merge_mix.errors import MergeMixError


def hflm_bos_args(tokenizer) -> dict[str, Any]:
    """The ``HFLM`` arguments that make lm-eval put exactly the pool's BOS (the tokenizer's
    BOS, else its EOS) before a scored text and encode texts without special tokens, as the
    pool's shards do for every kind of tokenizer."""
    from merge_mix.tokens import special_ids

    return {"add_bos_token": False, "prefix_token_id": special_ids(tokenizer)[0]}


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
def quiet_lm_eval(logger_name: str = "lm_eval") -> Iterator[None]:
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
            with quiet_lm_eval():
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
            with quiet_lm_eval(), _network(_NETWORK["allowed"]):
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
    with quiet_lm_eval(), _no_request_progress_bars():
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
