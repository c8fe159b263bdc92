"""Components trained elsewhere: `merge-mix plan` writes the recipe, the plain-torch example
(docs/examples/train_component.py) trains from it, `merge-mix pool import` checks the result
against the base and brings it into the pool, where it merges like any other component."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_spec_dict, write_spec
from safetensors.torch import load_file, save_file

from merge_mix.cli import main
from merge_mix.errors import MergeMixError
from merge_mix.pool_import import check_tensors, import_model

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "train_component.py"
CODE_MIX = "code=0.666667,c=0.166667,prose=0.166667"


def _copy_pool(tiny_pool: Path, dest: Path) -> Path:
    shutil.copytree(tiny_pool, dest)
    shutil.rmtree(dest / "work", ignore_errors=True)
    return dest


@pytest.fixture(scope="module")
def pool_copy(tiny_pool, tmp_path_factory) -> Path:
    """A copy of the tiny pool that refused imports may not change."""
    return _copy_pool(tiny_pool, tmp_path_factory.mktemp("imports") / "pool")


def _component_copy(tiny_pool: Path, dest: Path, domain: str = "code") -> Path:
    """A component's directory outside the pool, as an external trainer would leave it."""
    shutil.copytree(tiny_pool / "components" / domain, dest)
    (dest / "component.json").unlink()
    return dest


def _eval(pool: Path, *weights: str) -> list[dict]:
    """`merge-mix eval --json`'s metrics per mixture (2048 search-split tokens per domain)."""
    args = ["eval", str(pool), "--json", "--heldout-tokens", "2048"]
    for w in weights:
        args += ["--weights", w]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return [row["metrics"] for row in json.loads(result.stdout)["mixtures"]]


def _load_example():
    spec = importlib.util.spec_from_file_location("train_component", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_example(recipe: Path, out: Path, *extra: str, nproc: int = 1, port: int = 0):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    if nproc == 1:
        cmd = [sys.executable, str(EXAMPLE), str(recipe), "--out", str(out), *extra]
    else:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(port),
            str(EXAMPLE), str(recipe), "--out", str(out), *extra,
        ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


# ---------------------------------------------------------------------------------------
# pool import


def test_reimported_component_merges_bit_for_bit_and_is_never_retrained(
    tiny_pool, tiny_spec_path, tmp_path
):
    from merge_mix.config import load_spec
    from merge_mix.pool import recorded_spec, write_manifest
    from merge_mix.pool_build import build_pool

    pool = _copy_pool(tiny_pool, tmp_path / "pool")
    original = json.loads((tiny_pool / "components" / "code" / "component.json").read_text())
    ext = _component_copy(tiny_pool, tmp_path / "trained-code")
    (pool / "components" / "code" / "component.json").unlink()
    assert write_manifest(recorded_spec(pool), pool)["missing"] == ["code"]

    result = CliRunner().invoke(
        main,
        ["pool", "import", str(pool), "--domain", "code", "--model", str(ext)]
        + ["--mixture", CODE_MIX, "--tokens", str(original["tokens_seen"])],
    )
    assert result.exit_code == 0, result.output
    assert "imported (trained elsewhere, `merge-mix pool import`): code" in result.output
    manifest = json.loads((pool / "manifest.json").read_text())
    assert manifest["complete"] and manifest["missing"] == []
    record = manifest["components"]["code"]
    # The same bytes: the same sha256 as when train-components wrote them.
    assert record["imported"] and record["sha256"] == original["sha256"]
    assert record["training_mixture"] == original["training_mixture"]
    assert record["provenance"]["source"] == str(ext.resolve())
    assert record["provenance"]["declared_tokens"] == original["tokens_seen"]
    assert "tokenizer.json equal" in record["provenance"]["tokenizer_check"]
    # Scored like a trained component, on the same search-split tokens: the same losses.
    assert record["heldout"] == original["heldout"]
    assert _eval(pool, "code", "uniform") == _eval(tiny_pool, "code", "uniform")

    # train-components on the spec skips it (its sha256 matches) and leaves it as it is.
    record_path = pool / "components" / "code" / "component.json"
    before = record_path.read_text()
    spec_dict = tiny_spec_dict(tiny_spec_path.parent, output=str(pool))
    spec_path = write_spec(tmp_path, spec_dict)
    assert build_pool(load_spec(spec_path), show_progress=False) is not None
    assert record_path.read_text() == before
    # ...and refuses to retrain it over damaged weights: it names the way back instead.
    weights = pool / "components" / "code" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(MergeMixError, match="imported component's weights do not match"):
        build_pool(load_spec(spec_path), show_progress=False)


def test_an_imported_reference_is_the_one_validate_looks_up(pool_copy, tiny_pool, tmp_path):
    from merge_mix.pool import Pool
    from merge_mix.validate.references import reference_id, verified_record

    ext = _component_copy(tiny_pool, tmp_path / "ref")
    result = import_model(pool_copy, ext, CODE_MIX, 40_000, role="reference")
    pool = Pool.open(pool_copy)
    mixture = np.array([2 / 3, 1 / 6, 1 / 6])
    ref_id = reference_id(pool, mixture, 40_000)
    assert result.name == ref_id
    record = verified_record(pool, ref_id)
    assert record is not None and record["imported"] and record["resumed_from_step"] == 0
    # The code component's mixture is one-hot merge weights on code.
    assert record["merge_weights"] == pytest.approx({"code": 1.0, "c": 0.0, "prose": 0.0}, abs=1e-5)
    shutil.rmtree(result.path)


def _variant(tiny_pool: Path, tmp_path: Path, change) -> Path:
    """A copy of the code component, with `change(dir)` applied."""
    model = _component_copy(tiny_pool, tmp_path / "variant")
    change(model)
    return model


def _edit_config(key, value):
    def change(model: Path):
        config = json.loads((model / "config.json").read_text())
        config[key] = value
        (model / "config.json").write_text(json.dumps(config))

    return change


def _edit_tensors(fn):
    def change(model: Path):
        tensors = fn(load_file(str(model / "model.safetensors")))
        save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})

    return change


def _swap_two_tokens(model: Path):
    tok = json.loads((model / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (model / "tokenizer.json").write_text(json.dumps(tok))


def _pickles_only(model: Path):
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(b"not loaded")


REFUSED = {
    "config": (_edit_config("rms_norm_eps", 1e-3), r"config.json: rms_norm_eps is 0.001"),
    "model_type": (_edit_config("model_type", "mistral"), r"model_type 'mistral'"),
    "shape": (
        _edit_tensors(lambda t: {**t, "model.norm.weight": t["model.norm.weight"][:-1]}),
        r"tensor model.norm.weight has shape \[47\], the pool's base has \[48\]",
    ),
    "dtype": (
        _edit_tensors(lambda t: {k: v.to(torch.bfloat16) for k, v in t.items()}),
        r"tensor \S+ is BF16, the pool's base stores F32",
    ),
    "missing": (
        _edit_tensors(lambda t: {k: v for k, v in t.items() if k != "model.norm.weight"}),
        r"tensor model.norm.weight is missing",
    ),
    "extra": (
        _edit_tensors(lambda t: {**t, "extra.weight": torch.zeros(2)}),
        r"tensor extra.weight is not in the pool's base",
    ),
    "tokenizer": (_swap_two_tokens, r"its tokenizer differs from the pool's \(tokenizer.json"),
    "pickles": (_pickles_only, r"no .safetensors weights \(pytorch_model.bin are pickles"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_model_unlike_the_base_is_refused_naming_what_differs(
    case, pool_copy, tiny_pool, tmp_path
):
    change, message = REFUSED[case]
    model = _variant(tiny_pool, tmp_path, change)
    before = (pool_copy / "manifest.json").read_text()
    result = CliRunner().invoke(
        main,
        ["pool", "import", str(pool_copy), "--domain", "code", "--model", str(model)]
        + ["--mixture", CODE_MIX, "--tokens", "40448", "--replace"],
    )
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert re.search(message, result.stderr), result.stderr
    # Nothing written: no staging directory, the same manifest.
    assert not (pool_copy / "components" / "code.tmp").exists()
    assert (pool_copy / "manifest.json").read_text() == before


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mixture": "code=0.5,c=0.25,prose=0.25"}, r"--mixture: code=0.5, but the pool's 'code'"),
        ({"mixture": "code=0.7,c=0.2"}, r"--mixture: shares sum to 0.9, not 1"),
        ({"mixture": "code=0.6,web=0.4"}, r"--mixture: 'web' is not a domain"),
        ({"domain": "web"}, r"--domain: 'web' is not a domain"),
        ({"replace": False}, r"already holds a finished component \(trained by train-comp"),
        ({"role": "reference"}, r"--domain: a reference has no domain"),
    ],
)
def test_declarations_are_checked(kwargs, message, pool_copy, tiny_pool, tmp_path):
    model = _component_copy(tiny_pool, tmp_path / "m")
    args = {"mixture": CODE_MIX, "tokens": 40448, "domain": "code", "replace": True, **kwargs}
    with pytest.raises(MergeMixError, match=message):
        import_model(pool_copy, model, **args)


def test_a_tied_alias_may_be_saved_or_not(tiny_pool, tmp_path):
    # A trainer that saves lm_head.weight beside the embeddings it is tied to is accepted.
    def add_alias(t):
        return {**t, "lm_head.weight": t["model.embed_tokens.weight"].clone()}

    model = _variant(tiny_pool, tmp_path, _edit_tensors(add_alias))
    base = tiny_pool / "base"
    assert check_tensors(base, model) == check_tensors(base, tiny_pool / "components" / "c") + 1


# ---------------------------------------------------------------------------------------
# plan and the example trainer


def test_plan_is_the_recipe_train_components_followed(tiny_pool, tiny_spec_path, tmp_path):
    result = CliRunner().invoke(main, ["plan", str(tiny_spec_path), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    recipe = json.loads((tmp_path / "r" / "code.json").read_text())
    record = json.loads((tiny_pool / "components" / "code" / "component.json").read_text())
    assert recipe["pool"] == str(tiny_pool.resolve())
    assert (
        recipe["base_sha256"]
        == json.loads((tiny_pool / "manifest.json").read_text())["base"]["sha256"]
    )
    for d, p in record["training_mixture"].items():
        assert recipe["mixture"][d] == pytest.approx(p, abs=1e-6)
    t = recipe["training"]
    assert t["total_steps"] == record["steps"] and t["tokens_trained"] == record["tokens_seen"]
    assert recipe["seed"] == 1  # spec seed 0 * 1000 + 1 + index of 'code'
    assert f"--tokens {record['tokens_seen']}" in recipe["import_command"]
    # The shards read with numpy alone, as the recipe documents them.
    data = recipe["data"]
    for d, shard in data["shards"].items():
        tokens = np.memmap(shard["tokens"], dtype=np.dtype(data["token_dtype"]), mode="r")
        index = np.load(shard["index"], allow_pickle=False)
        assert index.dtype == np.int64 and index.shape == (shard["pieces"], 4)
        start, n = index[:, 0], index[:, 1]
        assert (tokens[start - 1] == data["bos_id"]).all(), d
        assert (tokens[start + n] == data["eos_id"]).all(), d
        assert int(n.sum()) == shard["train_tokens"] and len(tokens) == shard["stream_tokens"]


def test_the_example_samples_what_merge_mix_samples(tiny_pool, tmp_path):
    from merge_mix.tokens import MixtureSampler, Shard

    CliRunner().invoke(main, ["plan", str(tiny_pool), "--out", str(tmp_path), "--only", "c"])
    recipe = json.loads((tmp_path / "c.json").read_text())
    example = _load_example()
    mine = example.Sampler(
        example.open_streams(recipe), recipe["mixture"], recipe["training"]["seq_len"], 2
    )
    streams = {d: Shard.open(tiny_pool / "data" / d, "train").tokens for d in recipe["mixture"]}
    theirs = MixtureSampler(streams, recipe["mixture"], recipe["training"]["seq_len"], 2)
    for step, micro in [(0, 0), (5, 0), (78, 1)]:
        assert np.array_equal(mine.batch(step, micro, 8), theirs.batch(step, micro, 8)[0])
    spec = tiny_spec_dict(tmp_path)["training"]
    for step in range(0, 80, 7):  # the example's schedule is train.py's
        from merge_mix.config import TrainingSpec
        from merge_mix.train import lr_at

        ts = TrainingSpec(**{k: v for k, v in spec.items()})
        assert example.lr_at(step, 79, recipe["training"]["schedule"]) == pytest.approx(
            lr_at(step, 79, ts), rel=1e-12
        )


def test_a_few_steps_of_the_example_import_and_merge(pool_copy, tmp_path):
    CliRunner().invoke(main, ["plan", str(pool_copy), "--out", str(tmp_path), "--only", "prose"])
    out = _run_example(tmp_path / "prose.json", tmp_path / "trained", "--max-steps", "3")
    command = out.strip().splitlines()[-1].split()
    assert command[:3] == ["merge-mix", "pool", "import"] and "--tokens" in command
    assert command[command.index("--tokens") + 1] == str(3 * 8 * 64)
    result = CliRunner().invoke(main, [*command[1:], "--replace"])
    assert result.exit_code == 0, result.output
    assert "warning: --tokens 1,536 differs from the pool's budget" in result.output
    record = json.loads((pool_copy / "components" / "prose" / "component.json").read_text())
    assert record["imported"] and record["tokens_seen"] == 1536 and record["seed"] == 3
    # The example's bytes, hashed in the pool; three warmup steps move the model a little.
    from merge_mix.model import weights_sha256

    assert record["sha256"] == weights_sha256(tmp_path / "trained")
    manifest = json.loads((pool_copy / "manifest.json").read_text())
    assert manifest["complete"]
    base = manifest["base"]["heldout"]["prose"]["loss"]
    assert 0 < abs(record["heldout"]["prose"]["loss"] - base) < 0.1
    prose = _eval(pool_copy, "prose")[0]["heldout/prose/loss"]
    assert prose == pytest.approx(record["heldout"]["prose"]["loss"], abs=0.1)


@pytest.mark.slow
def test_the_example_reproduces_a_component_bit_for_bit_and_it_searches(tiny_pool, tmp_path):
    """The full recipe, trained by the plain-torch example in its own process, gives the
    very bytes train-components wrote: the recipe is complete."""
    pool = _copy_pool(tiny_pool, tmp_path / "pool")
    original = json.loads((tiny_pool / "components" / "code" / "component.json").read_text())
    CliRunner().invoke(main, ["plan", str(pool), "--out", str(tmp_path), "--only", "code"])
    out = _run_example(tmp_path / "code.json", tmp_path / "trained")
    command = out.strip().splitlines()[-1].split()
    result = CliRunner().invoke(main, [*command[1:], "--replace"])
    assert result.exit_code == 0, result.output
    record = json.loads((pool / "components" / "code" / "component.json").read_text())
    assert record["imported"] and record["sha256"] == original["sha256"]
    assert _eval(pool, "code") == _eval(tiny_pool, "code")
    run = tmp_path / "run"
    args = ["search", str(pool), "--run-dir", str(run), "--n-trials", "2"]
    args += ["--heldout-tokens", "600", "--gradient-steps", "1", "--quiet"]
    searched = CliRunner().invoke(main, args)
    assert searched.exit_code == 0, searched.output
    assert (run / "best.json").is_file()


@pytest.mark.slow
def test_the_example_under_torchrun_trains_what_one_process_trains(tiny_pool, tmp_path):
    CliRunner().invoke(main, ["plan", str(tiny_pool), "--out", str(tmp_path), "--only", "c"])
    recipe = tmp_path / "c.json"
    _run_example(recipe, tmp_path / "one", "--max-steps", "4")
    _run_example(recipe, tmp_path / "two", "--max-steps", "4", nproc=2, port=29531)
    one = load_file(str(tmp_path / "one" / "model.safetensors"))
    two = load_file(str(tmp_path / "two" / "model.safetensors"))
    assert sorted(one) == sorted(two)
    # Same global batches, gradients averaged over the two ranks: equal up to float rounding.
    worst = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert worst < 1e-5
    assert json.loads((tmp_path / "two" / "training_run.json").read_text())["world_size"] == 2
