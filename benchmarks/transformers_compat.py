"""Do pools and exports written with transformers 5.x load, and compute the same, in 4.x?

For each family of ``tests/test_families.py`` (Llama with rope_theta 500000 and a BOS-adding
byte-level BPE, Qwen2, Mistral, GPT-NeoX, GPT-2, Gemma, OLMo 2; tiny random bases saved
locally; a family whose model type the 4.x release does not know is reported as skipped),
this builds a two-domain pool with the installed merge-mix and transformers 5.x, exports a
50/50 merge, then, for the pool's base, one component and the export:

1. with transformers 5.x (this interpreter): `AutoModelForCausalLM` logits of fixed token
   ids and `AutoTokenizer` encodings of held-out text (with and without special tokens);
2. in a separate virtualenv with transformers 4.x (default 4.46.3, the lowest declared),
   the same, through the same Auto classes;

and compares them: the largest absolute logit difference, whether every encoding is
identical, and the rope base each version reads from ``config.json``.

The 4.x virtualenv (default ``/tmp/merge-mix-tf4``) gets transformers, tokenizers and
huggingface_hub of that era with ``pip install --no-deps``; everything else (torch, numpy,
safetensors, ...) is this interpreter's, reached through a ``.pth`` file placed after the
venv's own packages. Pools go to a scratch directory under /tmp, never ``pools/``.

    .venv/bin/python benchmarks/transformers_compat.py [--transformers 4.46.3] [--out FILE]

Exit status 0 when every check agrees (logits within 1e-5), 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import site
import subprocess
import sys
import tempfile
from pathlib import Path

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
# The 4.x stack installed into the scratch venv (tokenizers and huggingface_hub releases
# that transformers 4.46 accepts).
STACK = {
    "4.46.3": ["tokenizers==0.20.3", "huggingface_hub==0.26.5"],
    "4.47.1": ["tokenizers==0.21.0", "huggingface_hub==0.26.5"],  # the first with OLMo 2
}
TOLERANCE = 1e-5

# Runs inside either version: logits and encodings of every directory in a job file.
PROBE = r"""
import json, sys
import numpy as np, torch, transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(1)
job = json.load(open(sys.argv[1]))
out = {"transformers": transformers.__version__, "dirs": {}}
for key, d in job["dirs"].items():
    config = AutoConfig.from_pretrained(d, local_files_only=True)
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    if theta is None:
        theta = getattr(config, "rope_theta", None) or getattr(config, "rotary_emb_base", None)
    model = AutoModelForCausalLM.from_pretrained(
        d, local_files_only=True, torch_dtype=torch.float32
    ).eval()
    tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([job["ids"]])).logits[0].numpy()
    np.save(f"{job['out']}/{key}.npy", logits)
    out["dirs"][key] = {
        "rope_theta": theta,
        "tokenizer_class": type(tok).__name__,
        "bos_eos": [tok.bos_token_id, tok.eos_token_id],
        "plain": [tok(t, add_special_tokens=False)["input_ids"] for t in job["texts"]],
        "special": [tok(t)["input_ids"] for t in job["texts"]],
    }
json.dump(out, open(f"{job['out']}/probe.json", "w"))
"""


def _families():
    """`FAMILIES`, `make_family_base` and `family_spec` from tests/test_families.py."""
    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))
    return importlib.import_module("test_families")


def make_venv(path: Path, version: str) -> Path:
    """A venv at `path` with transformers `version` in front of this interpreter's packages."""
    python = path / "bin" / "python"
    marker = path / f".transformers-{version}"
    if marker.is_file():
        return python
    shutil.rmtree(path, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    packages = [f"transformers=={version}", *STACK.get(version, [])]
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", *packages], check=True)
    ours = subprocess.run(
        [str(python), "-c", "import site; print(site.getsitepackages()[0])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    # Appended after the venv's own site-packages: its transformers wins, torch comes from here.
    (Path(ours) / "zz_parent_packages.pth").write_text(site.getsitepackages()[0] + "\n")
    marker.write_text("")
    return python


def build(family, root: Path) -> dict[str, str]:
    """A tiny pool from `family`'s base and a 50/50 export: the directories to compare."""
    import numpy as np

    from merge_mix.config import load_spec
    from merge_mix.export import export_proxy
    from merge_mix.merge import merger_for_pool
    from merge_mix.pool import Pool
    from merge_mix.pool_build import build_pool

    fam = _families()
    base = fam.make_family_base(family, root / "pretrained")
    spec = fam.family_spec(root, base, root / "pool")
    (root / "spec.yaml").write_text(json.dumps(spec))
    build_pool(load_spec(root / "spec.yaml"), show_progress=False)
    pool = Pool.open(root / "pool")
    export_proxy(pool, merger_for_pool(pool), np.array([0.5, 0.5]), root / "export", force=True)
    return {
        "base": str(pool.base_dir),
        "component": str(pool.component_dir(pool.domains[0])),
        "export": str(root / "export"),
    }


def model_types(python: str) -> set[str]:
    """The model types (``config.json``'s ``model_type``) that `python`'s transformers knows."""
    code = (
        "import json; from transformers.models.auto.configuration_auto import"
        " CONFIG_MAPPING_NAMES as m; print(json.dumps(sorted(m)))"
    )
    run = subprocess.run([python, "-c", code], check=True, capture_output=True, text=True)
    return set(json.loads(run.stdout))


def probe(python: str, dirs: dict[str, str], ids: list[int], texts: list[str], out: Path):
    import numpy as np

    out.mkdir(parents=True, exist_ok=True)
    job = out / "job.json"
    job.write_text(json.dumps({"dirs": dirs, "ids": ids, "texts": texts, "out": str(out)}))
    script = out / "probe.py"
    script.write_text(PROBE)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    subprocess.run([python, str(script), str(job)], check=True, env=env, capture_output=True)
    result = json.loads((out / "probe.json").read_text())
    logits = {k: np.load(out / f"{k}.npy") for k in dirs}
    return result, logits


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transformers", default="4.46.3", help="the 4.x release to check")
    parser.add_argument("--venv", type=Path, default=Path("/tmp/merge-mix-tf4"))
    parser.add_argument("--families", default="", help="comma-separated subset (default all)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    parser.add_argument(
        "--library-tests",
        action="store_true",
        help="also run tests/test_families.py (all but its lm-eval test) under the 4.x venv",
    )
    args = parser.parse_args()

    import numpy as np
    import transformers

    from merge_mix.model import quiet_transformers
    from merge_mix.tokens import load_tokenizer, special_ids

    quiet_transformers()
    python = make_venv(args.venv, args.transformers)
    fam = _families()
    wanted = [f for f in fam.FAMILIES if not args.families or f.name in args.families.split(",")]
    scratch = Path(tempfile.mkdtemp(prefix="merge-mix-compat-"))
    rows, ok = [], True
    known = model_types(str(python))
    try:
        for family in wanted:
            if family.name not in known:  # e.g. OLMo 2, added in transformers 4.47
                why = f"model type {family.name!r} is not in transformers {args.transformers}"
                rows.append({"family": family.name, "skipped": why})
                print(f"{family.name:9s} skipped: {why}", flush=True)
                continue
            root = scratch / family.name
            dirs = build(family, root)
            tok = load_tokenizer(dirs["export"])
            texts = [
                json.loads(line)["text"]
                for line in (root / "pool/data/prose/search.jsonl").open().readlines()[:3]
            ]
            bos = special_ids(tok)[0]
            ids = [bos, *tok(texts[0], add_special_tokens=False)["input_ids"][:63]]
            new, new_logits = probe(sys.executable, dirs, ids, texts, root / "v5")
            old, old_logits = probe(str(python), dirs, ids, texts, root / "v4")
            for key in dirs:
                a, b = new["dirs"][key], old["dirs"][key]
                diff = float(np.abs(new_logits[key] - old_logits[key]).max())
                same_tokens = a["plain"] == b["plain"] and a["special"] == b["special"]
                row = {
                    "family": family.name,
                    "directory": key,
                    "max_abs_logit_diff": diff,
                    "encodings_identical": same_tokens and a["bos_eos"] == b["bos_eos"],
                    "rope_theta": [a["rope_theta"], b["rope_theta"]],
                    "tokenizer_class": [a["tokenizer_class"], b["tokenizer_class"]],
                }
                good = diff <= TOLERANCE and row["encodings_identical"]
                good = good and a["rope_theta"] == b["rope_theta"]
                row["ok"] = good
                ok &= good
                rows.append(row)
                print(
                    f"{family.name:9s} {key:9s} max|dlogit|={diff:.2e}"
                    f" encodings={'same' if row['encodings_identical'] else 'DIFFER'}"
                    f" rope={a['rope_theta']}/{b['rope_theta']}"
                    f" {'ok' if good else 'MISMATCH'}",
                    flush=True,
                )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    library = None
    if args.library_tests:
        # merge-mix itself on 4.x: pool building from each family's base, merging, export.
        # Not lm-eval: this venv's huggingface_hub is too old for the `datasets` it shares.
        run = subprocess.run(
            [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider",
             str(ROOT / "tests/test_families.py"), "-k", "not lm_eval"],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
        )  # fmt: skip
        library = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr
        ok &= run.returncode == 0
        print(f"merge-mix tests under transformers {args.transformers}: {library}")
    record = {
        "library_tests": library,
        "command": " ".join([os.path.relpath(sys.executable), *sys.argv]),
        "machine": f"{platform.machine()} {platform.system()} python {platform.python_version()}",
        "new": transformers.__version__,
        "old": args.transformers,
        "tolerance": TOLERANCE,
        "all_ok": ok,
        "rows": rows,
    }
    print(f"transformers {transformers.__version__} vs {args.transformers}: "
          f"{'all agree' if ok else 'MISMATCH'}")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
