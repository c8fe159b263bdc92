"""Mixture proxies: a pool, a resident merged model and its evaluators, scoring weights.

`ProxyScorer` is what `merge-mix eval` and `merge-mix search` use: it keeps the pool's
components (as stacked deltas) and the held-out scoring windows resident for its whole
life, and `score(weights)` merges in place and evaluates. It satisfies the search
engine's scorer protocol.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from merge_mix.errors import MergeMixError
from merge_mix.evaluate import HeldoutSet
from merge_mix.merge import effective_mixture, merger_for_pool, resolve_weights
from merge_mix.model import pick_device
from merge_mix.pool import Pool

DEFAULT_HELDOUT_TOKENS = None
"""The default scoring budget: every piece of the split (a cap is the user's choice)."""


class ProxyScorer:
    """Scores mixture weights by merging the pool's components and evaluating the proxy.

    Evaluation runs in fp32 by default (`precision`), also on GPUs, so proxy scores are
    comparable across machines and with lm-eval's; "auto" uses bf16 autocast on CUDA.
    The pool's weights are checked against their recorded sha256 first (`verify`:
    ``cached`` or ``full``, see `Pool.weight_problems`)."""

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
        lmeval_tasks: list[str] | None = None,
        lmeval_include: Path | None = None,
        lmeval_limit: int | None = None,
        calibration=None,
        verify: str = "cached",
    ):
        self.pool = pool if isinstance(pool, Pool) else Pool.open(pool)
        if not self.pool.manifest.get("complete"):
            import click

            click.echo(
                f"warning: {self.pool.path}: pool is incomplete; using its finished components"
                f" {', '.join(self.pool.domains)} (missing: {', '.join(self.pool.manifest['missing'])})",
                err=True,
            )
        self.device = pick_device(device)
        self.precision = precision
        self.batch_size = batch_size
        self.domains = self.pool.domains
        self.merger = merger_for_pool(self.pool, self.device, keep_base, stream, verify)
        if split not in ("search", "test"):
            raise MergeMixError(f"split: must be 'search' or 'test', not {split!r}")
        self.heldout = HeldoutSet.from_pool_data(
            self.pool.data_dir,
            self.domains,
            self.pool.bos_id,
            self.pool.seq_len,
            heldout_tokens,
            split,
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
        """Held-out metrics, and the lm-eval tasks' if any, of any model on this device
        (a merged proxy, or a reference model for validation): the same evaluators, windows
        and settings for both. No calibration. The per-document sums behind the held-out
        metrics are kept in `last_documents` (for paired comparisons)."""
        from merge_mix.evaluate import document_scores, metrics_from_documents

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
                self.pool.data_dir, self.domains, self.pool.bos_id, self.pool.seq_len, None, "test"
            )
        return self._test

    def document_scores(self, weights: np.ndarray, split: str = "test"):
        """Per-document held-out sums of the proxy for `weights` on `split` (the whole test
        split, or this scorer's search set): what paired comparisons resample."""
        from merge_mix.evaluate import document_scores

        heldout = self.test_set() if split == "test" else self.heldout
        if heldout.split != split:
            raise MergeMixError(f"this scorer reads the {self.split} split, not {split!r}")
        model = self.merger.merge(np.asarray(weights, dtype=np.float64))
        return document_scores(model, heldout, self.device, self.precision, self.batch_size)

    def differentiable_params(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """``theta(w)`` as tensors that carry gradients to `weights` (for
        `torch.func.functional_call`); needs resident components (not streaming)."""
        m = self.merger
        if m.stream:
            raise MergeMixError("gradient search needs resident components (not --stream)")
        coef = m.coefficients(weights.to(torch.float32))
        params = {}
        for name, p in m.params.items():
            if name in m.stacks:
                params[name] = (coef @ m.stacks[name]).view_as(p)
            else:
                params[name] = p.detach()
        return params
