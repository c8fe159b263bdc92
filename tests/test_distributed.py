"""One component trained by two processes under torchrun (DDP, gloo on CPU)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import tiny_spec_dict, write_spec


@pytest.mark.slow
def test_torchrun_trains_one_component_with_the_same_recipe(tiny_spec_path, tiny_pool, tmp_path):
    pool_dir = tmp_path / "p"
    shutil.copytree(tiny_pool, pool_dir)
    single = json.loads((pool_dir / "components" / "code" / "component.json").read_text())
    shutil.rmtree(pool_dir / "components" / "code")
    spec = write_spec(tmp_path, tiny_spec_dict(tiny_spec_path.parent, output=str(pool_dir)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        "29517",
        "-m",
        "merge_mix.cli",
        "train-components",
        str(spec),
        "--only",
        "code",
        "--quiet",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    ddp = json.loads((pool_dir / "components" / "code" / "component.json").read_text())
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    assert ddp["steps"] == single["steps"] and ddp["tokens_seen"] == single["tokens_seen"]
    # Same global batches, gradients averaged over ranks: the same model up to float rounding.
    for d, losses in single["heldout"].items():
        assert ddp["heldout"][d]["loss"] == pytest.approx(losses["loss"], abs=2e-3), d


def test_torchrun_without_only_is_refused(tiny_spec_path, tmp_path, monkeypatch):
    from merge_mix.config import load_spec
    from merge_mix.errors import MergeMixError
    from merge_mix.pool import build_pool

    monkeypatch.setenv("WORLD_SIZE", "2")
    spec = load_spec(
        write_spec(tmp_path, tiny_spec_dict(tiny_spec_path.parent, output=str(tmp_path / "p")))
    )
    with pytest.raises(MergeMixError, match="--only DOMAIN"):
        build_pool(spec, show_progress=False)
