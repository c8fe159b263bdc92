"""Shared fixtures: a real tiny pool, built once per test session from text that ships
with every Python (stdlib modules, the interpreter's C headers, pydoc topics), so the
tests are offline and give the same pool on every machine with the same Python."""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)  # identical reductions in every test, whatever the machine


def _prose_jsonl(path: Path) -> None:
    from pydoc_data.topics import topics

    with path.open("w") as fh:
        for key in sorted(topics):
            fh.write(json.dumps({"text": topics[key], "topic": key}) + "\n")


def tiny_spec_dict(root: Path, output: str = "pool") -> dict:
    """A 3-domain spec with a ~100k-parameter model that builds in seconds."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    include = Path(sysconfig.get_paths()["include"])
    root.mkdir(parents=True, exist_ok=True)
    prose = root / "prose.jsonl"
    if not prose.exists():
        _prose_jsonl(prose)
    return {
        "name": "tiny",
        "output_dir": output,
        "seed": 0,
        "domains": {
            "code": {
                "sources": [
                    {"files": str(stdlib / sub / "*.py")}
                    for sub in ("email", "json", "importlib", "logging", "urllib", "xml/dom")
                ],
                "max_bytes": 300_000,
            },
            "c": {"sources": [{"files": str(include / "*.h")}], "max_bytes": 200_000},
            "prose": {"sources": [{"jsonl": str(prose)}], "max_bytes": 400_000},
        },
        "data": {"heldout_fraction": 0.4, "max_doc_bytes": 2048},
        "tokenizer": {"vocab_size": 512, "sample_bytes": 150_000},
        "model": {
            "hidden_size": 48,
            "num_layers": 2,
            "num_heads": 2,
            "num_kv_heads": 2,
            "intermediate_size": 128,
            "seq_len": 64,
        },
        "training": {
            "base_tokens": 60_000,
            "component_tokens": 40_000,
            "batch_size": 8,
            "lr": 5e-3,
            "warmup_steps": 5,
            "eval_every": 0,
            "eval_tokens": 4096,
            "checkpoint_every": 10,
        },
    }


def write_spec(root: Path, spec: dict, name: str = "spec.yaml") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def tiny_spec_path(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    return write_spec(root, tiny_spec_dict(root))


@pytest.fixture(scope="session")
def tiny_pool(tiny_spec_path) -> Path:
    """The built tiny pool's directory (read-only for tests: copy it to change it)."""
    from merge_mix.config import load_spec
    from merge_mix.pool_build import build_pool

    spec = load_spec(tiny_spec_path)
    pool = build_pool(spec, show_progress=False)
    assert pool is not None
    return spec.output_dir
