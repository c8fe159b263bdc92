"""Checkpoints: `optimizer.state_dict()` without pickles, interrupts acted on at step
boundaries, and resume giving the weights of an uninterrupted run bit for bit (CPU)."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
import torch

from merge_mix.config import ModelSpec, TrainingSpec
from merge_mix.model import build_model
from merge_mix.tokens import MixtureSampler
from merge_mix.train import load_checkpoint, save_checkpoint, train_model

SEQ = 32
STEPS = 10


def tiny_model():
    spec = ModelSpec(
        hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=64, seq_len=SEQ
    )
    return build_model(spec, 64, 0, 1, seed=0)


def sampler():
    rng = np.random.default_rng(0)
    streams = {
        d: (np.tile(np.arange(k, k + 40), 300) + (rng.random(12000) < 0.1) * 7) % 64
        for k, d in ((0, "a"), (20, "b"))
    }
    return MixtureSampler(streams, {"a": 0.5, "b": 0.5}, SEQ, seed=3)


def spec(**kw) -> TrainingSpec:
    base = dict(batch_size=4, grad_accum=2, lr=5e-3, warmup_steps=2, eval_every=0)
    return TrainingSpec(**{**base, "checkpoint_every": 3, "device": "cpu", **kw})


def train(model, workdir, **kw):
    tokens = STEPS * 4 * 2 * SEQ
    s = spec(**kw)
    return train_model(
        model, sampler(), s, tokens, SEQ, workdir, torch.device("cpu"), show_progress=False
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    model = tiny_model()
    result = train(model, tmp_path_factory.mktemp("ref"))
    return model, result


def interrupt_at_forward(model, call: int, action):
    """Run `action` at the `call`-th forward pass (0-based) of `model`: inside a step."""
    calls = {"n": 0}

    def hook(module, args, kwargs):
        if calls["n"] == call:
            action()
        calls["n"] += 1

    return model.register_forward_pre_hook(hook, with_kwargs=True)


def assert_same_weights(a, b):
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), n


def test_checkpoint_round_trips_the_optimizer_state_dict_without_pickles(tmp_path):
    model = tiny_model()
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": 0.1},
            {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=1e-3,
        betas=(0.9, 0.95),
    )
    batch = torch.from_numpy(sampler().batch(0, 0, 4)[0])
    for _ in range(2):
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    save_checkpoint(model, opt, {"step": 2}, tmp_path)
    files = sorted(p.name for p in (tmp_path / "checkpoint").iterdir())
    assert files == ["model.safetensors", "optimizer.json", "optimizer.safetensors", "state.json"]

    fresh = tiny_model()
    fresh_opt = torch.optim.AdamW(
        [
            {"params": [p for p in fresh.parameters() if p.ndim > 1], "weight_decay": 0.5},
            {"params": [p for p in fresh.parameters() if p.ndim < 2], "weight_decay": 0.5},
        ],
        lr=1.0,
    )
    assert load_checkpoint(fresh, fresh_opt, tmp_path) == {"step": 2}
    assert_same_weights(model, fresh)
    want, got = opt.state_dict(), fresh_opt.state_dict()
    assert got["param_groups"] == want["param_groups"]  # weight decay per group, betas, lr
    assert got["state"].keys() == want["state"].keys()
    for i, st in want["state"].items():
        for key, value in st.items():
            assert torch.equal(got["state"][i][key], value), (i, key)
            assert got["state"][i][key].device == value.device


def test_interrupt_inside_a_step_saves_nothing_and_resumes_bit_identical(reference, tmp_path):
    ref_model, ref_result = reference
    model = tiny_model()

    def stop():
        raise KeyboardInterrupt

    # Forward pass 15 = step 8 (0-based 7), second micro-batch: mid-step, after the
    # step-6 checkpoint.
    interrupt_at_forward(model, 15, stop)
    with pytest.raises(KeyboardInterrupt):
        train(model, tmp_path)
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["step"] == 6
    resumed = tiny_model()
    result = train(resumed, tmp_path)
    assert result.history == ref_result.history
    assert_same_weights(resumed, ref_model)


def test_ctrl_c_during_a_step_finishes_the_step_then_saves(reference, tmp_path):
    ref_model, ref_result = reference
    model = tiny_model()
    before = signal.getsignal(signal.SIGINT)
    # Forward pass 8 = the first micro-batch of step 5: the step completes, then stops.
    interrupt_at_forward(model, 8, lambda: signal.raise_signal(signal.SIGINT))
    with pytest.raises(KeyboardInterrupt):
        train(model, tmp_path)
    assert signal.getsignal(signal.SIGINT) is before
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["step"] == 5
    resumed = tiny_model()
    result = train(resumed, tmp_path)
    assert result.history == ref_result.history
    assert_same_weights(resumed, ref_model)


def test_activation_checkpointing_trains_the_same_model(reference, tmp_path):
    ref_model, ref_result = reference
    model = tiny_model()
    layer = model.model.layers[0]
    seen = []
    layer.register_forward_pre_hook(lambda *a: seen.append(layer.gradient_checkpointing))
    result = train(model, tmp_path, activation_checkpointing=True)
    assert seen == [True] * (STEPS * 2)  # on for every micro-batch (forward hooks are not
    # run again by the recomputation, so they count each micro-batch once)
    assert [r["train_loss"] for r in result.history] == [
        r["train_loss"] for r in ref_result.history
    ]
    assert_same_weights(model, ref_model)
    assert not model.is_activation_checkpointing


def test_parallel_must_be_ddp_or_fsdp(tiny_spec_path, tmp_path):
    from conftest import tiny_spec_dict, write_spec

    from merge_mix.config import load_spec
    from merge_mix.errors import MergeMixError

    raw = tiny_spec_dict(tiny_spec_path.parent, output=str(tmp_path / "p"))
    raw["training"]["parallel"] = "zero3"
    with pytest.raises(MergeMixError, match="training.parallel: must be 'ddp' or 'fsdp'"):
        load_spec(write_spec(tmp_path, raw))
