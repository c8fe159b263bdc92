"""Gradient search: optimise the merge weights directly, through the merged model.

``theta(w) = (1 - sum w) theta_base + sum_i w_i theta_i`` is linear in ``w``, so the
held-out loss of the merged model is differentiable in ``w``. We evaluate the model with
`torch.func.functional_call` on parameters built from ``w`` and let autograd carry the
loss back to the weights, then step on the simplex by mirror descent (exponentiated
gradient: ``w <- w * exp(-lr * g)``, renormalised; `mirror_step`) or by Adam on softmax
logits. With caps on the data mixture (`merge_mix.search.simplex.Caps`), every iterate is
projected onto the capped simplex.

Only the differentiable part of the objective is optimised: held-out ``loss``, ``bpb``
and ``ppl`` terms (mean/max/min over domains) and held-out constraints as a penalty.
lm-eval terms are not differentiable and are left to the final scoring. The gradient
is taken on a *training slice*: the first `train_tokens` tokens of each domain's
``search`` split (whole pieces), on which any constraint's baseline is computed too, so
metrics and baseline are measured on the same text. The result is scored like every other
trial on the search split, and judged with the other picks on the ``test`` split
(`merge_mix.search.verdict`), which the gradient never sees.
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
from merge_mix.search.simplex import apply_caps


@dataclass(frozen=True)
class GradientConfig:
    """Settings of the gradient search."""

    steps: int = 12
    """Optimizer steps; each is one forward and backward pass over the training slice (and
    the last iterate costs one more forward pass)."""
    lr: float = 2.0
    """Step size: of the exponentiated-gradient update (mirror) or of Adam (softmax)."""
    method: str = "mirror"
    """"mirror" (exponentiated gradient on the simplex) or "softmax" (Adam on logits)."""
    train_tokens: int | None = 16_384
    """Tokens per domain of the search split (its first pieces) used for gradients; None
    uses the whole split. Each step costs a forward and backward pass over them."""
    min_weight: float = 1e-4
    """Floor that keeps mirror descent from freezing a weight at exactly zero."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise MergeMixError("gradient.steps: must be >= 1")
        if not self.lr > 0:
            raise MergeMixError("gradient.lr: must be > 0")
        if self.method not in ("mirror", "softmax"):
            raise MergeMixError("gradient.method: must be 'mirror' or 'softmax'")
        if self.train_tokens is not None and self.train_tokens < 1:
            raise MergeMixError("gradient.train_tokens: must be >= 1")


@dataclass
class GradientResult:
    """The optimised weights and how the optimisation went."""

    weights: np.ndarray
    """The iterate with the lowest objective on the training slice (inside the caps)."""
    history: list[dict] = field(default_factory=list)
    """Per iterate: `step` (0 = the start), `objective_train` on the slice, `weights`."""
    evaluations: int = 0
    """Passes over the training slice: `steps` forward and backward, one forward."""
    wall_time_s: float = 0.0
    training_slice: HeldoutSet | None = None
    """The held-out windows the gradients were taken on: the first pieces of the search
    split (the sampled trials are scored on the whole split, the verdict on test)."""


def training_slice(scorer, tokens: int | None) -> dict:
    """Windows of the first `tokens` tokens (whole pieces) of each domain's search split."""
    from merge_mix.evaluate import TARGET_PREFIX, TARGETS_DIR, build_windows
    from merge_mix.tokens import Shard

    dirs = {d: scorer.pool.data_dir / d for d in scorer.domains}
    for name in getattr(scorer, "targets", ()):
        dirs[TARGET_PREFIX + name] = scorer.pool.data_dir / TARGETS_DIR / name
    return {
        d: build_windows(
            Shard.open(path, "search"), scorer.pool.bos_id, scorer.pool.seq_len, tokens
        )
        for d, path in dirs.items()
    }


def _differentiable_objective(objective: Objective, domains: list[str], baseline):
    """A torch function of per-domain {loss, bpb, ppl} tensors mirroring
    `Objective.evaluate` for its held-out terms and constraints."""
    terms = [t for t in objective.terms if t.source in ("heldout", "target")]
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
            stacked = torch.stack([metrics[f"{t.source}/{n}/{t.metric}"] for n in names(t)])
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


def mirror_step(
    weights: np.ndarray,
    grad: np.ndarray,
    lr: float,
    min_weight: float = 0.0,
    caps: np.ndarray | None = None,
) -> np.ndarray:
    """One exponentiated-gradient step on the simplex, ``w <- w * exp(-lr * g)``
    renormalised, then floored at `min_weight` and projected onto the merge-weight `caps`
    by `apply_caps` (clip and hand the excess to the uncapped domains)."""
    w = np.asarray(weights, dtype=np.float64)
    g = np.asarray(grad, dtype=np.float64)
    # Centring g changes nothing after renormalisation but keeps exp() in range.
    new = w * np.exp(-lr * (g - np.dot(w, g)))
    new = np.maximum(new / new.sum(), min_weight)
    new = new / new.sum()
    return new if caps is None else apply_caps(new, caps)


class _Linearised(torch.autograd.Function):
    """A value computed elsewhere, with its gradient w.r.t. `weights` given (`jacobian`):
    lets per-batch gradients, accumulated without one graph for the whole slice, flow
    into the rest of the objective's graph."""

    @staticmethod
    def forward(ctx, weights, value, jacobian):
        ctx.save_for_backward(jacobian)
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        (jacobian,) = ctx.saved_tensors
        return grad * jacobian.to(grad.dtype), None, None


def _batch_nll(model, params: dict[str, torch.Tensor], ids, labels) -> torch.Tensor:
    """Summed negative log-likelihood (fp32) of one batch under `params`, with the LM head
    applied to a chunk of scored positions at a time when the architecture allows it."""
    from torch.func import functional_call

    from merge_mix.evaluate import chunk_positions, chunked_nll, head_parts

    scored = labels != -100
    chunk = chunk_positions(model.config.vocab_size)
    parts = head_parts(model)
    if parts is not None:
        base, head = parts
        prefix = model.base_model_prefix + "."
        base_params = {n[len(prefix) :]: t for n, t in params.items() if n.startswith(prefix)}
        head_names = {id(p): n for n, p in model.named_parameters()}
        weight = params[head_names[id(head.weight)]]
        bias = None if head.bias is None else params[head_names[id(head.bias)]]
        if len(base_params) + 1 + (bias is not None) >= len(params):
            hidden = functional_call(base, base_params, (ids,)).last_hidden_state
            return chunked_nll(
                hidden[scored],
                labels[scored],
                lambda h: torch.nn.functional.linear(h, weight, bias),
                chunk,
            ).sum()
    logits = functional_call(model, params, (ids,)).logits
    return chunked_nll(logits[scored], labels[scored], torch.nn.Identity(), chunk).sum()


def differentiable_metrics(scorer, slices: dict, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """Held-out ``loss``, ``bpb`` and ``ppl`` per domain of the model merged with `weights`
    on the windows `slices`, as float64 tensors that carry gradients to `weights` (through
    `scorer.differentiable_params`). Summed like `merge_mix.evaluate.heldout_metrics`.

    Batched by tokens like the evaluator (`token_batches`, ``scorer.batch_size x seq_len``
    tokens a batch), and backpropagated batch by batch: each batch's gradient w.r.t. the
    weights is taken as soon as its forward pass ends, so only one batch's activations are
    alive at a time, never a graph over the whole slice."""
    from merge_mix.evaluate import metric_prefix, token_batches, window_lengths

    model = scorer.merger.model
    model.eval()
    need_grad = torch.is_grad_enabled() and weights.requires_grad
    w32 = weights.detach().to(torch.float32).requires_grad_(need_grad)
    with torch.set_grad_enabled(need_grad):
        params = scorer.differentiable_params(w32)
    metrics: dict[str, torch.Tensor] = {}
    for d, win in slices.items():
        n_windows, n_tokens, n_bytes = win.prefix(None)
        lengths = window_lengths(win, n_windows)
        total = torch.zeros((), dtype=torch.float64)
        jacobian = torch.zeros(len(weights), dtype=torch.float64)
        for rows in token_batches(lengths, scorer.batch_size * win.input_ids.shape[1]):
            width = int(lengths[rows[0]])
            ids = win.input_ids[rows, :width].to(scorer.device)
            lab = win.labels[rows, :width].to(scorer.device)
            with torch.set_grad_enabled(need_grad):
                batch = _batch_nll(model, params, ids, lab)
            if need_grad:
                # Keeps only the small graph from w to the merged parameters between batches.
                (grad,) = torch.autograd.grad(batch, w32, retain_graph=True)
                jacobian += grad.double().cpu()
            total += batch.detach().double().cpu()
        nll = _Linearised.apply(weights, total, jacobian) if need_grad else total
        loss = nll / n_tokens
        prefix = metric_prefix(d)
        metrics[f"{prefix}/loss"] = loss
        metrics[f"{prefix}/bpb"] = nll / (n_bytes * math.log(2))
        metrics[f"{prefix}/ppl"] = torch.exp(loss)
    return metrics


def gradient_search(
    scorer,
    objective: Objective,
    config: GradientConfig | None = None,
    init: np.ndarray | None = None,
    progress=None,
    caps: np.ndarray | None = None,
) -> GradientResult:
    """Optimise `objective`'s held-out part over the simplex; return the final weights.

    `init` defaults to the uniform mixture. Held-out constraints compare with the
    objective's baseline mixture scored on the same training slice. `caps` (merge-weight
    caps, e.g. `SearchConfig.caps_for(scorer).weights`) bound every iterate: each step is
    projected onto the capped simplex, and so is the result.
    `progress(step, value, weights)` is called after every step."""
    from merge_mix.evaluate import heldout_metrics

    config = config or GradientConfig()
    started = time.perf_counter()
    domains = scorer.domains
    k = len(domains)
    slices = training_slice(scorer, config.train_tokens)
    baseline = None
    if objective.constraints:
        base_w = np.full(k, 1.0 / k)
        if objective.baseline == "natural":
            base_w = np.asarray(scorer.natural_mixture, dtype=np.float64)
        baseline = heldout_metrics(
            scorer.merger.merge(base_w),
            HeldoutSet(slices, config.train_tokens),
            scorer.device,
            scorer.precision,
            scorer.batch_size,
        )
    target = _differentiable_objective(objective, domains, baseline)

    def project(w: np.ndarray) -> np.ndarray:
        return w if caps is None else apply_caps(w, caps)

    w0 = np.full(k, 1.0 / k) if init is None else np.asarray(init, dtype=np.float64)
    w0 = np.clip(w0, config.min_weight, None)
    w0 = project(w0 / w0.sum())
    # log(0) for a domain capped at 0 would freeze it at 0 anyway; the floor keeps it finite.
    logits = torch.tensor(np.log(np.maximum(w0, 1e-300)), dtype=torch.float64, requires_grad=True)
    adam = torch.optim.Adam([logits], lr=config.lr) if config.method == "softmax" else None
    history: list[dict] = []
    for step in range(config.steps + 1):
        w = torch.softmax(logits, dim=0)
        wv = w.detach().numpy().copy()
        if step == config.steps:
            # The last iterate is scored too (forward only), so every candidate is measured.
            with torch.no_grad():
                value = target(differentiable_metrics(scorer, slices, w))
        else:
            value = target(differentiable_metrics(scorer, slices, w))
            logits.grad = None
            value.backward()
            with torch.no_grad():
                if adam is not None:
                    adam.step()
                    new = project(torch.softmax(logits, dim=0).numpy())
                else:
                    # Gradient w.r.t. w, recovered from d/dlogits = w * (g - <w, g>), up to
                    # a shared shift that the renormalised step ignores.
                    g = logits.grad.numpy() / np.maximum(wv, 1e-12)
                    new = mirror_step(wv, g, config.lr, config.min_weight, caps)
                logits.copy_(torch.from_numpy(np.log(np.maximum(new, 1e-300))))
        history.append(
            {"step": step, "objective_train": float(value.detach()), "weights": wv.tolist()}
        )
        if progress is not None and step > 0:
            progress(step, float(value.detach()), wv)
    # A step can overshoot (a constraint's penalty is steep): return the best iterate
    # measured on the training slice, not merely the last one.
    best = min(history, key=lambda h: (h["objective_train"], -h["step"]))
    weights = project(np.asarray(best["weights"], dtype=np.float64))
    return GradientResult(
        weights=weights,
        history=history,
        evaluations=config.steps + 1,
        wall_time_s=time.perf_counter() - started,
        training_slice=HeldoutSet(slices, config.train_tokens, "search"),
    )
