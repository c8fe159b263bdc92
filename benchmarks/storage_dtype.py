"""bf16 storage against fp32 storage: what merging a pool whose files are bf16
(``training.storage_dtype: bfloat16``) changes, against the same pool stored in fp32.

    python benchmarks/storage_dtype.py POOL [--bf16-pool POOL] [--json PATH]
    python benchmarks/storage_dtype.py --small [--json PATH]    # builds the tiny pool twice

POOL is stored in fp32. At a set of mixtures (uniform, each component alone, seeded
Dirichlet draws) it reports:

- **rounding**: POOL's base and components rounded to bf16 (written to a temporary
  directory), merged from a bf16 stack with fp32 accumulation, against POOL merged from
  its fp32 files: largest absolute weight difference, relative L2 difference of all merged
  weights, and the held-out loss difference per domain (the whole search split);
- **accumulation**: that bf16 merge against the same formula in float64 on the same bf16
  tensors (what fp32 accumulation adds);
- **built** (``--bf16-pool``, or ``--small``): a pool built from the same spec with
  ``storage_dtype: bfloat16`` (its components were trained from the rounded base, so this
  includes how training from it differs) against POOL, weights and losses as above, and
  whether the mixtures rank the same by mean loss.

Plus each pool's weight-file bytes and resident stack bytes. ``--small`` builds the tiny
test pool in fp32 and in bf16 in a temporary directory (about a minute on 2 busy cores).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_header, tiny_pool_spec, write_json  # noqa: E402


def mixtures(k: int, draws: int, seed: int) -> dict[str, np.ndarray]:
    out = {"uniform": np.full(k, 1.0 / k)}
    for i in range(k):
        out[f"one-hot {i}"] = np.eye(k)[i]
    rng = np.random.default_rng(seed)
    for j in range(draws):
        out[f"dirichlet {j}"] = rng.dirichlet(np.ones(k))
    return out


def rounded_copy(pool, root: Path) -> tuple[Path, dict[str, Path]]:
    """The pool's base and components with every tensor rounded to bf16, as model
    directories (config.json + model.safetensors) under `root`."""
    import shutil

    from safetensors.torch import load_file, save_file

    def convert(src: Path, dst: Path) -> Path:
        dst.mkdir(parents=True)
        shutil.copyfile(src / "config.json", dst / "config.json")
        for f in sorted(src.glob("*.safetensors")):
            tensors = {k: v.to(torch.bfloat16) for k, v in load_file(str(f)).items()}
            save_file(tensors, str(dst / f.name), metadata={"format": "pt"})
        return dst

    base = convert(pool.base_dir, root / "base")
    return base, {d: convert(pool.component_dir(d), root / d) for d in pool.domains}


def weight_error(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict:
    diff_sq = ref_sq = 0.0
    worst = 0.0
    for name, r in ref.items():
        d = got[name].double() - r.double()
        worst = max(worst, float(d.abs().max()))
        diff_sq += float((d * d).sum())
        ref_sq += float((r.double() ** 2).sum())
    return {"max_abs": worst, "rel_l2": math.sqrt(diff_sq / ref_sq)}


def losses(model, heldout) -> dict[str, float]:
    from merge_mix.evaluate import heldout_metrics

    metrics = heldout_metrics(model, heldout, "cpu", "fp32")
    return {d: metrics[f"heldout/{d}/loss"] for d in heldout.domains}


def float64_merge_error(merger, weights: np.ndarray, files: dict) -> float:
    """Largest |merged - (theta_base + sum w_i (theta_i - theta_base))| with the right side
    in float64 on the bf16 tensors the merger stacked."""
    worst = 0.0
    for name, p in merger.params.items():
        if name not in merger.stacks:
            continue
        key = merger.file_keys[name]
        base = files["base"][key].double()
        ref = base + sum(
            w * (files[d][key].double() - base)
            for w, d in zip(weights, merger.domains, strict=True)
        )
        worst = max(worst, float((p.detach().double() - ref).abs().max()))
    return worst


def weight_files(pool) -> int:
    """Bytes of the base's and the components' safetensors files."""
    members = [pool.base_dir, *(pool.component_dir(d) for d in pool.domains)]
    return sum(f.stat().st_size for d in members for f in d.glob("*.safetensors"))


def max_loss_diff(rows, key: str) -> float:
    return max(abs(x) for r in rows for x in r[key]["loss_diff"].values())


def ranks(x: list[float]) -> np.ndarray:
    return np.argsort(np.argsort(np.asarray(x)))


def compare(pool_dir: Path, bf16_dir: Path | None, draws: int, seed: int) -> dict:
    from safetensors.torch import load_file

    from merge_mix.evaluate import HeldoutSet
    from merge_mix.merge import Merger, merger_for_pool
    from merge_mix.pool import Pool

    pool = Pool.open(pool_dir)
    heldout = HeldoutSet.from_pool_data(
        pool.data_dir, pool.domains, pool.bos_id, pool.seq_len, None, "search"
    )
    print(
        f"pool: {pool.path} ({len(pool.domains)} components, {sum(heldout.tokens().values()):,} search tokens)"
    )
    fp32 = merger_for_pool(pool, stack_dtype="fp32")
    with tempfile.TemporaryDirectory(prefix="storage_dtype_") as tmp:
        base, comps = rounded_copy(pool, Path(tmp))
        rounded = Merger(base, comps)  # stack_dtype "auto": the files are bf16
        files = {"base": load_file(str(base / "model.safetensors"))}
        files |= {d: load_file(str(p / "model.safetensors")) for d, p in comps.items()}
        built = merger_for_pool(Pool.open(bf16_dir)) if bf16_dir is not None else None
        out: dict = {
            "pool": str(pool.path),
            "search_tokens": sum(heldout.tokens().values()),
            "stack_bytes": {
                "fp32": sum(s.nbytes for s in fp32.stacks.values()),
                "bf16": sum(s.nbytes for s in rounded.stacks.values()),
            },
            "rounded_stack_dtype": rounded.stack_dtype,
            "mixtures": {},
        }
        if built is not None:
            assert built.stack_dtype == "bf16", "--bf16-pool: its files are not bf16"
            out["weight_file_bytes"] = {
                "fp32": weight_files(pool),
                "bf16": weight_files(Pool.open(bf16_dir)),
            }
        for label, w in mixtures(len(pool.domains), draws, seed).items():
            ref = {n: t.clone() for n, t in fp32.merge(w).state_dict().items()}
            ref_loss = losses(fp32.model, heldout)
            got = rounded.merge(w).state_dict()
            row = {
                "weights": [round(float(x), 6) for x in w],
                "fp32_loss": ref_loss,
                "rounding": weight_error(got, ref),
                "accumulation_max_abs": float64_merge_error(rounded, w, files),
            }
            row["rounding"]["loss_diff"] = {
                d: v - ref_loss[d] for d, v in losses(rounded.model, heldout).items()
            }
            if built is not None:
                row["built"] = weight_error(built.merge(w).state_dict(), ref)
                row["built"]["loss_diff"] = {
                    d: v - ref_loss[d] for d, v in losses(built.model, heldout).items()
                }
            out["mixtures"][label] = row
            print(
                f"  {label:12s} rounding: max |dw| {row['rounding']['max_abs']:.2e}, rel L2"
                f" {row['rounding']['rel_l2']:.2e}, max |dloss|"
                f" {max(map(abs, row['rounding']['loss_diff'].values())):.2e}; fp32"
                f" accumulation vs float64 {row['accumulation_max_abs']:.2e}"
                + (
                    f"; built: rel L2 {row['built']['rel_l2']:.2e}, max |dloss|"
                    f" {max(map(abs, row['built']['loss_diff'].values())):.2e}"
                    if built is not None
                    else ""
                )
            )
    rows = out["mixtures"].values()
    summary = {
        "rounding_max_abs": max(r["rounding"]["max_abs"] for r in rows),
        "rounding_rel_l2": max(r["rounding"]["rel_l2"] for r in rows),
        "rounding_max_loss_diff": max_loss_diff(rows, "rounding"),
        "accumulation_max_abs": max(r["accumulation_max_abs"] for r in rows),
    }
    if built is not None:
        mean_fp32 = [float(np.mean(list(r["fp32_loss"].values()))) for r in rows]
        mean_bf16 = [
            m + float(np.mean(list(r["built"]["loss_diff"].values())))
            for m, r in zip(mean_fp32, rows, strict=True)
        ]
        a, b = ranks(mean_fp32), ranks(mean_bf16)
        n = len(a)
        summary |= {
            "built_rel_l2": max(r["built"]["rel_l2"] for r in rows),
            "built_max_loss_diff": max_loss_diff(rows, "built"),
            "built_spearman_mean_loss": 1 - 6 * float(((a - b) ** 2).sum()) / (n * (n * n - 1)),
            "built_same_best_mixture": int(np.argmin(mean_fp32)) == int(np.argmin(mean_bf16)),
        }
    out["summary"] = summary
    print("summary:")
    for key, value in summary.items():
        print(f"  {key}: {value:.3g}" if isinstance(value, float) else f"  {key}: {value}")
    for key in ("stack_bytes", "weight_file_bytes"):
        if key in out:
            print(f"  {key}: fp32 {out[key]['fp32']:,}, bf16 {out[key]['bf16']:,}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pool", nargs="?", type=Path, help="a pool stored in fp32")
    ap.add_argument("--bf16-pool", type=Path, help="the same spec built with bfloat16 storage")
    ap.add_argument("--small", action="store_true", help="build the tiny pool twice and compare")
    ap.add_argument("--draws", type=int, default=3, help="Dirichlet mixtures (default 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write every figure to this JSON file")
    args = ap.parse_args()
    if (args.pool is None) == (not args.small):
        ap.error("give POOL or --small")
    torch.set_num_threads(1)
    header = print_header("bf16 storage against fp32 storage")
    if args.small:
        from merge_mix.config import load_spec
        from merge_mix.pool_build import build_pool

        with tempfile.TemporaryDirectory(prefix="storage_dtype_pools_") as tmp:
            root = Path(tmp)
            for name, dtype in (("fp32", "float32"), ("bf16", "bfloat16")):
                build_pool(load_spec(tiny_pool_spec(root, name, dtype)), show_progress=False)
            result = compare(root / "fp32", root / "bf16", args.draws, args.seed)
    else:
        result = compare(args.pool, args.bf16_pool, args.draws, args.seed)
    write_json(args.json, {**header, **result})


if __name__ == "__main__":
    main()
