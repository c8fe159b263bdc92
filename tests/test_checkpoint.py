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
    from safetensors.torch import load_file

    # Each state is stored under its own parameter's name (a norm weight's moment is 1-D).
    saved = load_file(str(tmp_path / "checkpoint" / "optimizer.safetensors"))
    for n, p in model.named_parameters():
        assert saved[f"{n}::exp_avg"].shape == p.shape, n

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


def test_rows_of_uneven_shards_are_read_only_from_the_ranks_that_hold_them(tmp_path):
    from safetensors.torch import save_file

    from merge_mix.checkpoint import SavedTensors, overlaps, rows_from_counts

    # FSDP2 gives rank r rows [r*ceil(n/W), min((r+1)*ceil(n/W), n)): 5 rows over 2 ranks
    # are 3 + 2, 1 row over 2 ranks leaves rank 1 an empty shard.
    assert rows_from_counts([3, 2]) == [(0, 3), (3, 5)]
    assert rows_from_counts([1, 0]) == [(0, 1), (1, 1)]
    five, one = [(0, 3), (3, 5)], [(0, 1), (1, 1)]
    assert overlaps(five, 0, 5) == [(0, 0, 3), (1, 0, 2)]
    assert overlaps(five, 2, 4) == [(0, 2, 3), (1, 0, 1)]  # rows 2 and 3: one from each
    assert overlaps(five, 3, 5) == [(1, 0, 2)]
    assert overlaps(one, 0, 1) == [(0, 0, 1)]
    assert overlaps(one, 1, 1) == []

    w = torch.arange(10.0).reshape(5, 2)
    b = torch.tensor([[1.0, 2.0, 3.0]])
    save_file(
        {"w": w[:3], "b": b[:1], "s": torch.tensor(4.0)}, str(tmp_path / "model.rank0.safetensors")
    )
    save_file({"w": w[3:], "b": b[1:]}, str(tmp_path / "model.rank1.safetensors"))
    entry = {"dtype": "float32"}
    index = {
        "version": 1,
        "world_size": 2,
        "model": {
            "w": {**entry, "shape": [5, 2], "rows": [[0, 3], [3, 5]]},
            "b": {**entry, "shape": [1, 3], "rows": [[0, 1], [1, 1]]},
            "s": {**entry, "shape": [], "replicated": True},
        },
    }
    (tmp_path / "shards.json").write_text(json.dumps(index))
    with SavedTensors(tmp_path, "model") as saved:
        assert torch.equal(saved.read("w"), w)  # one process: all rows
        # 3 ranks: ceil(5/3) = 2 rows each, the last one 1.
        three = [saved.read("w", rows) for rows in [(0, 2), (2, 4), (4, 5)]]
        assert [t.tolist() for t in three] == [w[:2].tolist(), w[2:4].tolist(), w[4:].tolist()]
        assert torch.equal(saved.read("b"), b)
        empty = saved.read("b", (1, 1))
        assert empty.shape == (0, 3) and empty.dtype == torch.float32
        assert saved.read("s").item() == 4.0
    (tmp_path / "model.rank0.safetensors").unlink()  # rows 3-4 need rank 1's file only
    with SavedTensors(tmp_path, "model") as saved:
        assert torch.equal(saved.read("w", (3, 5)), w[3:])


@pytest.fixture
def one_rank_group(tmp_path):
    """A gloo process group of one rank in this process, for FSDP2 without torchrun."""
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_sharded_checkpoint_round_trips_and_a_failed_write_keeps_the_previous_one(
    one_rank_group, tmp_path, monkeypatch
):
    import errno

    from safetensors import SafetensorError
    from torch.distributed.fsdp import fully_shard

    model = fully_shard(torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 1)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(2, 3)).sum().backward()
    optimizer.step()
    save_checkpoint(model, optimizer, {"step": 1}, tmp_path, sharded=True)
    path = tmp_path / "checkpoint"
    assert sorted(p.name for p in path.iterdir()) == [
        "model.rank0.safetensors",
        "optimizer.json",
        "optimizer.rank0.safetensors",
        "shards.json",
        "state.json",
    ]
    index = json.loads((path / "shards.json").read_text())
    assert index["model"]["0.weight"] == {"shape": [5, 3], "dtype": "float32", "rows": [[0, 5]]}

    def full(tensors, filename, metadata=None):
        raise SafetensorError("IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr("safetensors.torch.save_file", full)
    with pytest.raises(OSError) as info:
        save_checkpoint(model, optimizer, {"step": 2}, tmp_path, sharded=True)
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == str(tmp_path / "checkpoint.tmp" / "model.rank0.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "store"]
    monkeypatch.undo()

    want = {n: p.full_tensor() for n, p in model.named_parameters()}
    moments = {n: optimizer.state[p]["exp_avg"].full_tensor() for n, p in model.named_parameters()}
    plain = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 1))  # one process
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=0.1)
    assert load_checkpoint(plain, plain_opt, tmp_path) == {"step": 1}
    for n, p in plain.named_parameters():
        assert torch.equal(p, want[n]), n
        assert torch.equal(plain_opt.state[p]["exp_avg"], moments[n]), n
        assert plain_opt.state[p]["step"].item() == 1.0

    # The plain model's full checkpoint, loaded back into a sharded model.
    save_checkpoint(plain, plain_opt, {"step": 1}, tmp_path / "full")
    again = fully_shard(torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 1)))
    again_opt = torch.optim.AdamW(again.parameters(), lr=0.1)
    assert load_checkpoint(again, again_opt, tmp_path / "full", sharded=True) == {"step": 1}
    for n, p in again.named_parameters():
        assert torch.equal(p.full_tensor(), want[n]), n
        moment = again_opt.state[p]["exp_avg"]
        assert moment.placements == p.placements and torch.equal(moment.full_tensor(), moments[n])


def test_only_fsdp2_dim0_shards_are_written(one_rank_group, tmp_path):
    from torch.distributed.tensor import Replicate, distribute_tensor, init_device_mesh

    from merge_mix.errors import MergeMixError

    model = torch.nn.Linear(3, 5)
    mesh = init_device_mesh("cpu", (1,))
    model.weight = torch.nn.Parameter(distribute_tensor(model.weight.data, mesh, [Replicate()]))
    optimizer = torch.optim.AdamW([model.weight])
    with pytest.raises(MergeMixError, match="weight: sharded checkpoints hold FSDP2's dim-0"):
        save_checkpoint(model, optimizer, {"step": 0}, tmp_path, sharded=True)
