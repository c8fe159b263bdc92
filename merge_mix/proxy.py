"""Mixture proxies: a pool, a resident merged model and its evaluators, scoring weights.

`ProxyScorer` is what `merge-mix eval` and `merge-mix search` use: it keeps the pool's
components (as stacked deltas) and the held-out scoring windows resident for its whole
life, and `score(weights)` merges in place and evaluates. It satisfies the search
engine's scorer protocol.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from merge_mix.errors import MergeMixError
from merge_mix.evaluate import HeldoutSet
from merge_mix.merge import effective_mixture, merger_for_pool, resolve_weights
from merge_mix.model import pick_device
from merge_mix.pool import Pool

GIB = 1024**3

DEFAULT_HELDOUT_TOKENS = None
"""The default scoring budget: every piece of the split (a cap is the user's choice)."""


class ProxyScorer:
    """Scores mixture weights by merging the pool's components and evaluating the proxy.

    Evaluation runs in fp32 by default (`precision`), also on GPUs, so proxy scores are
    comparable across machines and with lm-eval's; "auto" uses bf16 autocast on CUDA.
    The pool's weights are checked against their recorded sha256 first (`verify`:
    ``cached`` or ``full``, see `Pool.weight_problems`).

    `stack_dtype` ``auto`` keeps the resident stack in bf16 when the pool's files are bf16
    and in fp32 otherwise. `stack_device` ``auto`` puts the stack on the scoring device
    when it fits there (`memory_plan`), else in host memory; or name a device."""

    def __init__(
        self,
        pool: Pool | str | Path,
        device: str = "auto",
        precision: str = "fp32",
        heldout_tokens: int | None = DEFAULT_HELDOUT_TOKENS,
        split: str = "search",
        keep_base: tuple[str, ...] = (),
        stream: bool = False,
        batch_size: int = 16,
        stack_dtype: str = "auto",
        stack_device: str = "auto",
        lmeval_tasks: list[str] | None = None,
        lmeval_include: Path | None = None,
        lmeval_limit: int | None = None,
        calibration=None,
        verify: str = "cached",
        notice=None,
    ):
        self.pool = pool if isinstance(pool, Pool) else Pool.open(pool)
        if not self.pool.manifest.get("complete"):
            logging.getLogger(__name__).warning(
                f"{self.pool.path}: pool is incomplete; using its finished components"
                f" {', '.join(self.pool.domains)} (missing: {', '.join(self.pool.manifest['missing'])})"
            )
        self.device = pick_device(device)
        self.precision = precision
        self.batch_size = batch_size
        self.domains = self.pool.domains
        self.targets = self.pool.targets
        """Target sets, scored alongside the domains on the same split (``target/<name>``)."""
        # The memory this scorer needs, checked before anything large is loaded (a one-line
        # error when it cannot fit), and announced to `notice` before the first scoring, so
        # that mistakes found before any scoring (weights, caps) stay one-line errors.
        self.memory = memory_plan(
            self.pool, self.device, stream, stack_dtype, keep_base, batch_size, stack_device
        )
        self.memory.check()
        self._notice = notice
        self.merger = merger_for_pool(
            self.pool,
            self.device,
            keep_base,
            stream,
            verify,
            stack_dtype=self.memory.stack_dtype,
            stack_device=self.memory.stack_device,
        )
        if split not in ("search", "test"):
            raise MergeMixError(f"split: must be 'search' or 'test', not {split!r}")
        self.heldout = HeldoutSet.from_pool_data(
            self.pool.data_dir,
            self.domains,
            self.pool.bos_id,
            self.pool.seq_len,
            heldout_tokens,
            split,
            self.targets,
        )
        self.heldout_tokens = heldout_tokens
        self.split = split
        self._test: HeldoutSet | None = None
        self.last_documents: dict = {}
        self.natural_mixture = self.pool.natural_mixture()
        self.available_tokens = self.pool.available_tokens()
        self.general = self.pool.general_mixture()
        self.general_share = self.pool.general_share
        self.lmeval_tasks = list(lmeval_tasks or [])
        self.lmeval_include = lmeval_include
        self.lmeval_limit = lmeval_limit
        if calibration is not None:
            calibration.check_scorer(heldout_tokens, split)
        self.calibration = calibration
        self._tokenizer = None
        self.last_cost_s = 0.0

    def weights(self, spec, as_mixture: bool = False, extrapolate: bool = False, notice=None):
        """User weights (preset, ``NAME=VALUE,...``, dict or array) as a checked vector."""
        return resolve_weights(
            spec,
            self.domains,
            natural=self.natural_mixture,
            general_share=self.general_share,
            general=self.general,
            as_mixture=as_mixture,
            extrapolate=extrapolate,
            notice=notice,
        )

    def effective_mixture(self, weights: np.ndarray) -> np.ndarray:
        return effective_mixture(weights, self.general_share, self.general)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from merge_mix.tokens import load_tokenizer

            self._tokenizer = load_tokenizer(self.pool.tokenizer_dir)
        return self._tokenizer

    def score(self, weights: np.ndarray, budget_tokens: int | None = None) -> dict[str, float]:
        """Merge `weights` in place and return every metric (see evaluate.py for names).

        `budget_tokens` scores only the first pieces of each domain of the search split, up
        to that many tokens (cheaper, noisier; never more than the set was built with).
        Calibrated metrics are added only at the full budget: the gaps were fitted there."""
        if budget_tokens is not None and self.heldout_tokens is not None:
            budget_tokens = min(budget_tokens, self.heldout_tokens)
        started = time.perf_counter()
        model = self.merger.merge(np.asarray(weights, dtype=np.float64))
        metrics = self.evaluate(model, budget_tokens)
        full = budget_tokens is None or self.heldout.tokens(budget_tokens) == self.heldout.tokens()
        if self.calibration is not None and full:
            metrics.update(self.calibration.apply(np.asarray(weights), metrics))
        self.last_cost_s = time.perf_counter() - started
        return metrics

    def evaluate(self, model, budget_tokens: int | None = None) -> dict[str, float]:
        """Held-out metrics (target sets' too), and the lm-eval tasks' if any, of any model on this device
        (a merged proxy, or a reference model for validation): the same evaluators, windows
        and settings for both. No calibration. The per-document sums behind the held-out
        metrics are kept in `last_documents` (for paired comparisons)."""
        from merge_mix.evaluate import document_scores, metrics_from_documents

        self._announce()
        self.last_documents = document_scores(
            model, self.heldout, self.device, self.precision, self.batch_size, budget_tokens
        )
        metrics = metrics_from_documents(self.last_documents)
        if self.lmeval_tasks:
            from merge_mix.lmeval import evaluate_tasks

            metrics.update(
                evaluate_tasks(
                    model,
                    self.tokenizer,
                    self.lmeval_tasks,
                    include_path=self.lmeval_include,
                    limit=self.lmeval_limit,
                    max_length=self.pool.seq_len,
                    device=self.device,
                    batch_size=self.batch_size,
                )
            )
        return metrics

    def test_set(self) -> HeldoutSet:
        """Every piece of the test split (built on first use): what verdicts are judged on."""
        if self.split == "test":
            return self.heldout
        if self._test is None:
            self._test = HeldoutSet.from_pool_data(
                self.pool.data_dir,
                self.domains,
                self.pool.bos_id,
                self.pool.seq_len,
                None,
                "test",
                self.targets,
            )
        return self._test

    def document_scores(self, weights: np.ndarray, split: str = "test"):
        """Per-document held-out sums of the proxy for `weights` on `split` (the whole test
        split, or this scorer's search set): what paired comparisons resample."""
        from merge_mix.evaluate import document_scores

        heldout = self.test_set() if split == "test" else self.heldout
        if heldout.split != split:
            raise MergeMixError(f"this scorer reads the {self.split} split, not {split!r}")
        self._announce()
        model = self.merger.merge(np.asarray(weights, dtype=np.float64))
        return document_scores(model, heldout, self.device, self.precision, self.batch_size)

    def _announce(self) -> None:
        """Tell `notice` (once) the memory plan: what is resident and the mode."""
        if self._notice is not None:
            self._notice(self.memory.describe())
            self._notice = None

    def differentiable_params(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """``theta(w)`` as tensors that carry gradients to `weights` (for
        `torch.func.functional_call`); needs resident components (not streaming)."""
        m = self.merger
        if m.stream:
            raise MergeMixError("gradient search needs resident components (not --stream)")
        # Computed where the stack lives; `.to` carries values (and gradients back) across
        # devices when the stack is in host memory and the model on the GPU.
        coef = m.coefficients(weights.to(m.stack_device, torch.float32))
        params = {}
        for name, p in m.params.items():
            if name in m.stacks and m.stacks[name].dtype != torch.float32:
                params[name] = _StackProduct.apply(coef, m.stacks[name]).view_as(p).to(p.device)
            elif name in m.stacks:
                params[name] = (coef @ m.stacks[name]).view_as(p).to(p.device)
            else:
                params[name] = p.detach()
        return params


class _StackProduct(torch.autograd.Function):
    """``coef @ stack`` for a bf16 stack, in fp32 a chunk of columns at a time both ways,
    keeping only the bf16 stack for the backward pass (no fp32 copy of it)."""

    @staticmethod
    def forward(ctx, coef, stack):
        from merge_mix.merge import combine

        ctx.save_for_backward(stack)
        out = torch.empty(stack.shape[1], dtype=torch.float32, device=stack.device)
        combine(coef.unsqueeze(0), stack, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (stack,) = ctx.saved_tensors
        g = torch.zeros(stack.shape[0], dtype=torch.float32, device=stack.device)
        step = 1 << 22
        for lo in range(0, stack.shape[1], step):
            g += stack[:, lo : lo + step].to(torch.float32) @ grad[lo : lo + step]
        return g, None


def stderr_notice(message: str) -> None:
    """Write one line to stderr (the CLI's `notice` for `ProxyScorer`)."""
    import click

    click.echo(message, err=True)


ACTIVATION_OVERHEAD = 1.35
"""Measured peak over the activation formula below while scoring a 104.6M-parameter Llama
(benchmarks/memory_scale.py: 752 MiB against 560 MiB; temporaries of the attention and MLP
kernels that the formula does not list)."""


@dataclass
class MemoryPlan:
    """What a scorer will hold in memory (bytes), the mode, and what the devices offer.

    - stack: ``(K + 1) x P_merged x bytes(stack dtype)`` resident (4 for fp32, 2 for bf16);
      streaming: one tensor's ``(K + 1)`` fp32 rows at a time;
    - model: the resident merged model, ``P x 4`` (fp32 weights);
    - activations: one evaluation batch of ``T = batch_size x seq_len`` tokens (no graph):
      about ``T x (4 h + 2 i + heads x seq_len) x 4`` for the widest layer plus the LM head
      on one chunk of positions, ``min(chunk, T) x V x 8``, times `ACTIVATION_OVERHEAD`
      (1.35, measured);
    - gradient: the gradient search's one batch with its graph, about
      ``T x layers x (12 h + 3 i + heads x seq_len) x 4`` plus one fp32 copy of the merged
      parameters and its gradient (``2 x P x 4``).
    Estimates: allocator overhead, the held-out windows and Python are not counted.

    The stack lives on the scoring device when everything fits there, else in host memory
    when the model and activations still fit on the device (`place_stack`)."""

    mode: str
    device: str
    stack: int
    model: int
    activations: int
    gradient: int
    available: int | None
    """Free bytes on the device (CUDA: `torch.cuda.mem_get_info`; CPU: MemAvailable of
    /proc/meminfo, or psutil); None when unknown (MPS, other systems)."""
    stack_device: str = ""
    """Where the resident stack lives: `device`, or ``cpu`` (host memory) when it does not
    fit on a GPU (or as the caller asked). Empty means `device`."""
    stack_dtype: str = "fp32"
    """The stack's dtype, ``fp32`` or ``bf16`` (``auto`` resolved)."""
    host_available: int | None = None
    """Free host bytes, when the stack is in host memory apart from the device."""

    def __post_init__(self) -> None:
        self.stack_device = self.stack_device or self.device

    @property
    def split(self) -> bool:
        """True when the stack lives in host memory and the model on another device."""
        return self.stack_device != self.device

    @property
    def needed(self) -> int:
        """What scoring needs on the device: model and evaluation activations, and the
        stack unless it is in host memory."""
        return self.model + self.activations + (0 if self.split else self.stack)

    def describe(self) -> str:
        """One line for stderr."""
        free = "unknown" if self.available is None else _size(self.available)
        if not self.split:
            return (
                f"memory: {self.mode} on {self.device}: stack {_size(self.stack)} + model"
                f" {_size(self.model)} + activations {_size(self.activations)} ="
                f" {_size(self.needed)} (gradient search adds {_size(self.gradient)});"
                f" available {free}"
            )
        host = "unknown" if self.host_available is None else _size(self.host_available)
        return (
            f"memory: {self.mode} on {self.stack_device}, model on {self.device}: stack"
            f" {_size(self.stack)} (available {host}); model {_size(self.model)} + activations"
            f" {_size(self.activations)} = {_size(self.needed)} on {self.device} (gradient"
            f" search adds {_size(self.gradient)}); available {free}"
        )

    def check(self) -> None:
        """A one-line `MergeMixError` when scoring cannot fit in the available memory."""
        hint = "" if self.mode == "streaming" else "; try --stack-dtype bf16 or --stream"
        if self.split and self.host_available is not None and self.stack > self.host_available:
            raise MergeMixError(
                f"memory: {self.mode} needs {_size(self.stack)} on {self.stack_device},"
                f" only {_size(self.host_available)} is available{hint}"
            )
        if self.available is not None and self.needed > self.available:
            raise MergeMixError(
                f"memory: {self.mode} needs {_size(self.needed)} on {self.device},"
                f" only {_size(self.available)} is available{hint}"
            )


def place_stack(
    device: torch.device,
    stack: int,
    on_device: int,
    available: int | None,
    host_available: int | None,
) -> str:
    """Where the resident stack goes: the scoring `device` when the stack plus what scoring
    needs there anyway (`on_device`: model and activations) fits in its `available` bytes
    (or nothing is known), else ``cpu`` when `device` is a GPU whose memory holds the rest
    and the host's `host_available` bytes hold the stack (merges then copy each merged
    tensor to the GPU, P x 4 bytes), else `device` (and `MemoryPlan.check` refuses it)."""
    if device.type != "cuda" or available is None or stack + on_device <= available:
        return str(device)
    host_fits = host_available is None or stack <= host_available
    if on_device <= available and host_fits:
        return "cpu"
    return str(device)


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 1024**2:.1f} MiB"


def available_memory(device: torch.device) -> int | None:
    """Free bytes on `device`: CUDA's free memory, the CPU's MemAvailable, else None."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def memory_plan(
    pool: Pool,
    device: torch.device | str,
    stream: bool = False,
    stack_dtype: str = "auto",
    keep_base: tuple[str, ...] = (),
    batch_size: int = 16,
    stack_device: str = "auto",
) -> MemoryPlan:
    """The memory a `ProxyScorer` over `pool` will need (see `MemoryPlan`), from the base's
    config and the weight files' headers only (nothing is loaded). `stack_dtype` ``auto``
    is resolved from the files (`merge_mix.merge.auto_stack_dtype`); `stack_device`
    ``auto`` is decided by `place_stack`, any other value is taken as given."""
    import fnmatch
    import json

    from safetensors import safe_open

    from merge_mix.evaluate import chunk_positions
    from merge_mix.merge import STACK_DTYPES, auto_stack_dtype, check_stack_dtype

    check_stack_dtype(stack_dtype)
    device = torch.device(device)
    cfg = json.loads((pool.base_dir / "config.json").read_text())
    sizes: dict[str, int] = {}
    for f in sorted(pool.base_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                sizes[key] = math.prod(fh.get_slice(key).get_shape())
    if cfg.get("tie_word_embeddings"):
        sizes.pop("lm_head.weight", None)
    total = sum(sizes.values())
    merged = [n for n in sizes if not any(fnmatch.fnmatch(n, p) for p in keep_base)]
    if stack_dtype == "auto":
        members = [pool.base_dir, *(pool.component_dir(d) for d in pool.domains)]
        stack_dtype = auto_stack_dtype(members, set(merged))
    rows = len(pool.domains) + 1
    if stream:
        mode = "streaming"
        stack = rows * max((sizes[n] for n in merged), default=0) * 4
    else:
        mode = f"resident {stack_dtype} stack"
        stack = rows * sum(sizes[n] for n in merged) * STACK_DTYPES[stack_dtype].itemsize
    h = int(cfg.get("hidden_size", 0))
    inter = int(cfg.get("intermediate_size", 4 * h))
    heads = int(cfg.get("num_attention_heads", 1))
    layers = int(cfg.get("num_hidden_layers", 1))
    vocab = int(cfg.get("vocab_size", 0))
    seq_len = int(pool.seq_len)
    tokens = batch_size * seq_len
    head = min(chunk_positions(vocab), tokens) * vocab * 8
    activations = (tokens * (4 * h + 2 * inter + heads * seq_len) * 4 + head) * ACTIVATION_OVERHEAD
    gradient = tokens * layers * (12 * h + 3 * inter + heads * seq_len) * 4 + head + 2 * total * 4
    available = available_memory(device)
    host_available = None
    if stream:
        where = str(device)
    elif stack_device == "auto":
        if device.type == "cuda":
            host_available = available_memory(torch.device("cpu"))
        where = place_stack(device, stack, total * 4 + activations, available, host_available)
    else:
        try:
            where = str(torch.device(stack_device))
        except RuntimeError:
            raise MergeMixError(f"stack_device: {stack_device!r} is not a torch device") from None
    if where != str(device) and host_available is None:
        host_available = available_memory(torch.device(where))
    return MemoryPlan(
        mode=mode,
        device=str(device),
        stack=int(stack),
        model=int(total * 4),
        activations=int(activations),
        gradient=int(gradient),
        available=available,
        stack_device=where,
        stack_dtype=stack_dtype,
        host_available=host_available,
    )
