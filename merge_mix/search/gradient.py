"""Gradient search: optimise the merge weights directly, through the merged model.

``theta(w) = (1 - sum w) theta_base + sum_i w_i theta_i`` is linear in ``w``, so the
held-out loss of the merged model is differentiable in ``w``. We evaluate the model with
`torch.func.functional_call` on parameters built from ``w`` and let autograd carry the
loss back to the weights, then step on the simplex by mirror descent (exponentiated
gradient: ``w <- w * exp(-lr * g)``, renormalised) or by Adam on softmax logits.

Only the differentiable part of the objective is optimised: held-out ``loss``, ``bpb``
and ``ppl`` terms (mean/max/min over domains) and held-out constraints as a penalty.
lm-eval terms are not differentiable and are left to the final scoring. The gradient
is taken on a *training slice* of the held-out data (pieces after the scorer's scoring
budget), and the result is scored by the scorer on its own slice, so the reported number
is not fitted to the data it was optimised on.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from merge_mix.errors import MergeMixError
from merge_mix.evaluate import HeldoutSet
from merge_mix.objective import Objective


@dataclass(frozen=True)
class GradientConfig:
    """Settings of the gradient search."""

    steps: int = 12
    """Optimizer steps; each is one forward and backward pass over the training slice."""
    lr: float = 2.0
    """Step size: of the exponentiated-gradient update (mirror) or of Adam (softmax)."""
    method: str = "mirror"
    """"mirror" (exponentiated gradient on the simplex) or "softmax" (Adam on logits)."""
    train_tokens: int = 16_384
    """Held-out tokens per domain, after the scoring slice, used for gradients (as many as
    the default scoring budget: a small slice is a noisy picture of a domain)."""
    min_weight: float = 1e-4
    """Floor that keeps mirror descent from freezing a weight at exactly zero."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise MergeMixError("gradient.steps: must be >= 1")
        if not self.lr > 0:
            raise MergeMixError("gradient.lr: must be > 0")
        if self.method not in ("mirror", "softmax"):
            raise MergeMixError("gradient.method: must be 'mirror' or 'softmax'")
        if self.train_tokens < 1:
            raise MergeMixError("gradient.train_tokens: must be >= 1")


@dataclass
class GradientResult:
    """The optimised weights and how the optimisation went."""

    weights: np.ndarray
    history: list[dict] = field(default_factory=list)
    evaluations: int = 0
    wall_time_s: float = 0.0
    training_slice: HeldoutSet | None = None
    """The held-out windows the gradients were taken on (disjoint from the scoring ones)."""


def _training_slice(scorer, tokens: int):
    """Windows of held-out pieces after the scoring budget, per domain."""
    from merge_mix.evaluate import build_windows
    from merge_mix.tokens import Shard

    out = {}
    for d in scorer.domains:
        scoring = scorer.heldout.windows[d]
        first = len(scoring.piece_end)
        shard = Shard.open(scorer.pool.data_dir / d, "heldout")
        if first >= len(shard.index):
            raise MergeMixError(
                f"gradient search: domain {d!r} has no held-out pieces left after the scoring"
                f" budget ({scorer.heldout_tokens} tokens); lower --heldout-tokens"
            )
        out[d] = build_windows(shard, scorer.pool.bos_id, scorer.pool.seq_len, tokens, first)
    return out


def _differentiable_objective(objective: Objective, domains: list[str], baseline):
    """A torch function of per-domain {loss, bpb, ppl} tensors mirroring
    `Objective.evaluate` for its held-out terms and constraints."""
    terms = [t for t in objective.terms if t.source == "heldout"]
    if not terms:
        raise MergeMixError("gradient search: the objective has no held-out terms to differentiate")
    reducers = {"mean": torch.mean, "max": torch.amax, "min": torch.amin}

    def names(item) -> list[str]:
        if item.name != "*":
            return [item.name]
        return [d for d in domains if d not in getattr(item, "exclude", ())]

    def value(metrics: dict[str, torch.Tensor]) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64)
        for t in terms:
            stacked = torch.stack([metrics[f"heldout/{n}/{t.metric}"] for n in names(t)])
            total = total + t.weight * t.sign * reducers[t.reduce](stacked)
        for c in objective.constraints:
            if c.source != "heldout":
                continue
            for n in names(c):
                key = f"heldout/{n}/{c.metric}"
                ratio = metrics[key] / float(baseline[key])
                excess = (
                    ratio - (1 + c.tolerance)
                    if c.direction == "minimize"
                    else ((1 - c.tolerance) - ratio)
                )
                total = total + objective.penalty * torch.relu(excess)
        return total

    return value


def gradient_search(
    scorer,
    objective: Objective,
    config: GradientConfig | None = None,
    init: np.ndarray | None = None,
    baseline: dict[str, float] | None = None,
    progress=None,
) -> GradientResult:
    """Optimise `objective`'s held-out part over the simplex; return the final weights.

    `init` defaults to the uniform mixture; `baseline` (the baseline mixture's metrics) is
    needed when the objective has held-out constraints. `progress(step, value, weights)`
    is called after every step."""
    from torch.func import functional_call

    config = config or GradientConfig()
    if objective.constraints and baseline is None:
        raise MergeMixError("gradient search: constraints need the baseline's metrics")
    started = time.perf_counter()
    domains = scorer.domains
    k = len(domains)
    slices = _training_slice(scorer, config.train_tokens)
    target = _differentiable_objective(objective, domains, baseline)
    model = scorer.merger.model
    device = scorer.device
    w0 = np.full(k, 1.0 / k) if init is None else np.asarray(init, dtype=np.float64)
    w0 = np.clip(w0, config.min_weight, None)
    w0 = w0 / w0.sum()
    logits = torch.tensor(np.log(w0), dtype=torch.float64, requires_grad=True)
    adam = torch.optim.Adam([logits], lr=config.lr) if config.method == "softmax" else None
    history: list[dict] = []
    model.eval()

    def loss_at(w: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        params = scorer.differentiable_params(w.to(torch.float32))
        metrics: dict[str, torch.Tensor] = {}
        for d, win in slices.items():
            n_windows, n_tokens, n_bytes = win.prefix(None)
            nll = torch.zeros((), dtype=torch.float64)
            for lo in range(0, n_windows, scorer.batch_size):
                ids = win.input_ids[lo : lo + scorer.batch_size].to(device)
                lab = win.labels[lo : lo + scorer.batch_size].to(device)
                logits_out = functional_call(model, params, (ids,)).logits
                nll = (
                    nll
                    + torch.nn.functional.cross_entropy(
                        logits_out.float().reshape(-1, logits_out.shape[-1]),
                        lab.reshape(-1),
                        reduction="sum",
                    )
                    .double()
                    .cpu()
                )
            loss = nll / n_tokens
            metrics[f"heldout/{d}/loss"] = loss
            metrics[f"heldout/{d}/bpb"] = nll / (n_bytes * math.log(2))
            metrics[f"heldout/{d}/ppl"] = torch.exp(loss)
        return target(metrics), {k_: float(v.detach()) for k_, v in metrics.items()}

    for step in range(config.steps):
        w = torch.softmax(logits, dim=0)
        value, _ = loss_at(w)
        if logits.grad is not None:
            logits.grad = None
        value.backward()
        with torch.no_grad():
            if adam is not None:
                adam.step()
            else:
                # Gradient w.r.t. w, recovered from d/dlogits = w * (g - <w, g>): the
                # exponentiated-gradient step is a step of size lr on the logits along -g.
                g_logits = logits.grad
                wv = w.detach()
                g = g_logits / wv.clamp_min(1e-12)
                g = g - (wv * g).sum()
                new = wv * torch.exp(-config.lr * g)
                new = new.clamp_min(config.min_weight)
                new = new / new.sum()
                logits.copy_(torch.log(new))
        wv = torch.softmax(logits.detach(), dim=0).numpy()
        history.append(
            {"step": step + 1, "objective_train": float(value.detach()), "weights": wv.tolist()}
        )
        if progress is not None:
            progress(step + 1, float(value.detach()), wv)
    weights = torch.softmax(logits.detach(), dim=0).numpy().astype(np.float64)
    return GradientResult(
        weights=weights,
        history=history,
        evaluations=config.steps,
        wall_time_s=time.perf_counter() - started,
        training_slice=HeldoutSet(slices, config.train_tokens),
    )
