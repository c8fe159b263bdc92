"""Pools stored in bf16 (`training.storage_dtype: bfloat16`), merged in fp32; where the
resident stack lives (`memory_plan`'s placement, with fake free-memory figures)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_spec_dict, write_spec
from safetensors import safe_open
from safetensors.torch import load_file

from merge_mix.config import load_spec
from merge_mix.errors import MergeMixError
from merge_mix.merge import merger_for_pool
from merge_mix.pool import Pool
from merge_mix.pool_build import build_pool
from merge_mix.proxy import GIB, ProxyScorer, memory_plan

W = np.array([0.2, 0.5, 0.3])


@pytest.fixture(scope="module")
def bf16_pool(tmp_path_factory) -> Path:
    """The tiny test pool's spec with ``training.storage_dtype: bfloat16``."""
    root = tmp_path_factory.mktemp("bf16")
    spec = tiny_spec_dict(root)
    spec["training"]["storage_dtype"] = "bfloat16"
    built = build_pool(load_spec(write_spec(root, spec)), show_progress=False)
    assert built is not None
    return built.path


def stored(model_dir: Path) -> dict[str, torch.Tensor]:
    (f,) = model_dir.glob("*.safetensors")
    return load_file(str(f))


def tensor_bytes(path: Path) -> int:
    """A safetensors file's size less its header (an 8-byte length, then JSON)."""
    return path.stat().st_size - 8 - int.from_bytes(path.read_bytes()[:8], "little")


def test_storage_dtype_is_checked(tmp_path):
    spec = tiny_spec_dict(tmp_path)
    spec["training"]["storage_dtype"] = "float16"
    with pytest.raises(MergeMixError, match="training.storage_dtype: must be 'float32' or 'bf"):
        load_spec(write_spec(tmp_path, spec))


def test_a_bf16_pool_stores_every_member_in_bf16_at_half_the_size(bf16_pool, tiny_pool):
    members = ["base", *(f"components/{d}" for d in ("code", "c", "prose"))]
    for member in members:
        (f,) = (bf16_pool / member).glob("*.safetensors")
        with safe_open(str(f), framework="pt") as fh:
            assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {"BF16"}, member
        (g,) = (tiny_pool / member).glob("*.safetensors")
        assert 2 * tensor_bytes(f) == tensor_bytes(g), member
    # The same spec trains the same base: stored, it is the fp32 pool's base rounded.
    fp32, bf16 = stored(tiny_pool / "base"), stored(bf16_pool / "base")
    assert all(torch.equal(fp32[k].to(torch.bfloat16), bf16[k]) for k in fp32)


def test_recorded_losses_are_those_of_the_stored_weights(bf16_pool):
    from merge_mix.evaluate import HeldoutSet, heldout_metrics
    from merge_mix.model import load_model

    pool = Pool.open(bf16_pool)
    record = pool.manifest["components"]["code"]
    heldout = HeldoutSet.from_pool_data(
        pool.data_dir, pool.domains, pool.bos_id, pool.seq_len, record["heldout_tokens"]
    )
    metrics = heldout_metrics(load_model(pool.component_dir("code")), heldout)
    for d in pool.domains:
        assert record["heldout"][d]["loss"] == pytest.approx(metrics[f"heldout/{d}/loss"], abs=1e-6)


def test_bf16_pool_merges_in_fp32_from_a_bf16_stack(bf16_pool):
    pool = Pool.open(bf16_pool)
    merger = merger_for_pool(pool)  # stack_dtype "auto": the files are bf16
    assert merger.stack_dtype == "bf16"
    assert all(s.dtype == torch.bfloat16 for s in merger.stacks.values())
    n_params = sum(p.numel() for p in merger.model.parameters())
    assert sum(s.nbytes for s in merger.stacks.values()) == (len(pool.domains) + 1) * n_params * 2
    files = {"base": stored(pool.base_dir)} | {
        d: stored(pool.component_dir(d)) for d in pool.domains
    }

    # One-hot weights return the stored component exactly, widened to fp32.
    for i, d in enumerate(pool.domains):
        model = merger.merge(np.eye(len(pool.domains))[i])
        for name, p in model.named_parameters():
            assert p.dtype == torch.float32
            assert torch.equal(p.detach(), files[d][merger.file_keys[name]].float()), (d, name)

    # Any weights: theta_base + sum w_i (theta_i - theta_base) of the same bf16 tensors,
    # computed in float64. Measured: 9.5e-8 apart at most, on weights up to 1.2 (fp32
    # rounding of a sum of 4 terms).
    merged = {n: p.detach().double() for n, p in merger.merge(W).named_parameters()}
    for name, got in merged.items():
        key = merger.file_keys[name]
        base = files["base"][key].double()
        ref = base + sum(
            w * (files[d][key].double() - base) for w, d in zip(W, pool.domains, strict=True)
        )
        assert torch.allclose(got, ref, rtol=0, atol=1e-6), name

    # An fp32 stack of the same files, and the streaming merge, give the same numbers.
    for other in (merger_for_pool(pool, stack_dtype="fp32"), merger_for_pool(pool, stream=True)):
        for name, p in other.merge(W).named_parameters():
            assert torch.allclose(p.detach().double(), merged[name], rtol=0, atol=1e-7), name


def test_scorer_on_a_bf16_pool_plans_a_bf16_stack(bf16_pool, tiny_pool):
    lines: list[str] = []
    scorer = ProxyScorer(bf16_pool, heldout_tokens=200, notice=lines.append)
    plan = scorer.memory
    assert plan.stack_dtype == "bf16" and scorer.merger.stack_dtype == "bf16"
    assert plan.stack == sum(s.nbytes for s in scorer.merger.stacks.values())
    assert plan.stack * 2 == memory_plan(Pool.open(tiny_pool), "cpu").stack
    scorer.score(W)
    assert lines[0].startswith("memory: resident bf16 stack on cpu: stack ")


def test_pool_import_takes_a_bf16_component_into_a_bf16_pool_only(bf16_pool, tiny_pool, tmp_path):
    from merge_mix.pool import recorded_spec, write_manifest
    from merge_mix.pool_import import import_model

    pool = tmp_path / "pool"
    shutil.copytree(bf16_pool, pool, ignore=shutil.ignore_patterns("work"))
    original = json.loads((pool / "components" / "code" / "component.json").read_text())
    trained = tmp_path / "trained-code"
    shutil.copytree(bf16_pool / "components" / "code", trained)
    (trained / "component.json").unlink()
    (pool / "components" / "code" / "component.json").unlink()
    write_manifest(recorded_spec(pool), pool)

    fp32 = tmp_path / "fp32-code"
    shutil.copytree(tiny_pool / "components" / "code", fp32)
    refused = r"is F32, the pool's base stores BF16; .*model\.to\(torch\.bfloat16\)"
    with pytest.raises(MergeMixError, match=refused):
        import_model(pool, fp32, original["training_mixture"], 40_000, domain="code")

    result = import_model(pool, trained, original["training_mixture"], 40_000, domain="code")
    record = json.loads((result.path / "component.json").read_text())
    assert record["sha256"] == original["sha256"]
    merger = merger_for_pool(Pool.open(pool))
    model = merger.merge(np.eye(3)[0])
    files = stored(pool / "components" / "code")
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), files[merger.file_keys[name]].float()), name


def test_storage_dtype_is_frozen_and_old_pools_read_as_float32(tiny_pool, tmp_path):
    pool = tmp_path / "pool"
    shutil.copytree(tiny_pool, pool, ignore=shutil.ignore_patterns("work"))
    spec_path = tiny_pool.parent / "spec.yaml"
    spec = tiny_spec_dict(spec_path.parent, output=str(pool))
    # A pool written before the field existed has no storage_dtype in spec.json.
    record = json.loads((pool / "spec.json").read_text())
    del record["frozen"]["training"]["storage_dtype"]
    (pool / "spec.json").write_text(json.dumps(record))
    assert build_pool(load_spec(write_spec(tmp_path, spec)), show_progress=False) is not None
    spec["training"]["storage_dtype"] = "bfloat16"
    refused = r"training\.storage_dtype differs .*\('float32' in the pool, 'bfloat16' in the spec\)"
    with pytest.raises(MergeMixError, match=refused):
        build_pool(load_spec(write_spec(tmp_path, spec, "bf16.yaml")), show_progress=False)


# ---------------------------------------------------------------------------------------
# Where the resident stack lives


def test_stack_is_placed_on_the_gpu_when_it_fits_else_in_host_memory(tiny_pool, monkeypatch):
    from merge_mix import proxy

    pool = Pool.open(tiny_pool)
    free = {"cuda": 0, "cpu": 0}
    monkeypatch.setattr(proxy, "available_memory", lambda device: free[device.type])
    sizes = memory_plan(pool, "cpu")
    stack, rest = sizes.stack, sizes.model + sizes.activations

    def plan(**kw):
        return memory_plan(pool, "cuda:0", **kw)

    free.update(cuda=stack + rest, cpu=GIB)  # everything fits on the GPU
    p = plan()
    assert p.stack_device == "cuda:0" and not p.split and p.needed == stack + rest
    assert p.describe().startswith("memory: resident fp32 stack on cuda:0: stack ")
    p.check()

    free.update(cuda=stack + rest - 1)  # the stack does not fit beside the model: host
    p = plan()
    assert p.stack_device == "cpu" and p.split and p.needed == rest
    assert p.host_available == GIB
    assert p.describe().startswith("memory: resident fp32 stack on cpu, model on cuda:0: stack ")
    p.check()
    assert plan(stack_dtype="bf16").stack_device == "cuda:0"  # half the stack fits again

    free.update(cpu=stack - 1)  # nor in host memory: stays, and is refused
    p = plan()
    assert p.stack_device == "cuda:0"
    refused = r"^memory: resident fp32 stack needs .* on cuda:0, .*--stream$"
    with pytest.raises(MergeMixError, match=refused):
        p.check()

    free.update(cuda=rest - 1, cpu=GIB)  # not even the model fits on the GPU
    with pytest.raises(MergeMixError, match=r"on cuda:0, only"):
        plan().check()

    # Asked for, the host gets the stack; a stack too large for it is refused there.
    free.update(cuda=GIB, cpu=stack - 1)
    p = plan(stack_device="cpu")
    assert p.stack_device == "cpu" and p.needed == rest
    with pytest.raises(MergeMixError, match=r"^memory: resident fp32 stack needs .* on cpu, "):
        p.check()
    # A CPU scorer's stack is never moved; streaming has no stack to place.
    free.update(cpu=1000)
    assert memory_plan(pool, "cpu").stack_device == "cpu"
    assert plan(stream=True).stack_device == "cuda:0"
    with pytest.raises(MergeMixError, match="stack_device: 'gpu' is not a torch device"):
        plan(stack_device="gpu")
