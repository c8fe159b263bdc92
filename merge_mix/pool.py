"""A pool on disk: one shared base and one component per domain, read through its manifest.

`Pool` opens a pool, checks its format and verifies its members' weights against their
recorded sha256; `recorded_spec` rebuilds the spec it was built with; `write_manifest`
rebuilds ``manifest.json`` from the stage records (called by `merge_mix.pool_build`,
`merge_mix.pool_import` and `merge_mix.targets`); `format_pool_table` is `merge-mix pool
show`. Building and growing a pool is `merge_mix.pool_build`. See docs/pool-format.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from merge_mix.artifacts import file_lock, library_versions, read_json, write_json_atomic
from merge_mix.config import PoolSpec
from merge_mix.errors import MergeMixError

FORMAT = "merge-mix-pool"
# 2: held-out documents split into `search` and `test` (data/<d>/{search,test}.*),
# piece indexes carry document numbers, cross-domain de-duplication and decontamination.
FORMAT_VERSION = 2
HELDOUT_SPLITS = ("search", "test")
SHINGLES = "train.shingles.npy"
DIGESTS = "documents.sha256"
MANIFEST = "manifest.json"
VERIFIED = ".verified.json"
"""The verification cache: per pool member, the recorded sha256 and the (name, size,
mtime_ns, inode) of each weights file when that sha256 was last checked."""
VERIFY_MODES = ("cached", "full")


# ---------------------------------------------------------------------------------------
# Reading a pool


def old_format_message(pool_dir: Path, version: int) -> str:
    return (
        f"{pool_dir}: pool format {version} has one held-out slice, not the search/test"
        " splits and decontamination this merge-mix needs; rebuild it into a new output_dir"
        " with `merge-mix train-components SPEC` (`merge-mix demo` after"
        " `make clean-demo` for the demo pool)"
    )


@dataclass
class Pool:
    """A pool on disk, read through its manifest."""

    path: Path
    manifest: dict[str, Any]

    @classmethod
    def open(
        cls, path: str | Path, require_complete: bool = False, allow_empty: bool = False
    ) -> Pool:
        path = Path(path)
        if not path.is_dir():
            raise MergeMixError(f"{path}: pool directory not found")
        mpath = path / MANIFEST
        if not mpath.is_file():
            raise MergeMixError(
                f"{path}: pool is incomplete: no {MANIFEST} (its build was interrupted;"
                " run `merge-mix train-components` on its spec again to resume)"
            )
        try:
            manifest = read_json(mpath)
        except (json.JSONDecodeError, OSError) as exc:
            raise MergeMixError(f"{mpath}: unreadable manifest ({exc})") from None
        if manifest.get("format") != FORMAT:
            raise MergeMixError(f"{mpath}: not a merge-mix pool manifest")
        if manifest.get("format_version", 0) > FORMAT_VERSION:
            raise MergeMixError(
                f"{mpath}: pool format {manifest['format_version']} is newer than this"
                f" merge-mix reads ({FORMAT_VERSION}); upgrade merge-mix"
            )
        if manifest.get("format_version", 0) < FORMAT_VERSION:
            raise MergeMixError(old_format_message(path, manifest.get("format_version", 0)))
        pool = cls(path=path, manifest=manifest)
        for who, rel in pool._member_paths().items():
            resolve_inside(path, rel, f"{mpath}: {who}.path")
        if require_complete and not manifest.get("complete"):
            missing = ", ".join(manifest.get("missing", [])) or "?"
            raise MergeMixError(f"{path}: pool is incomplete: missing components {missing}")
        if not pool.domains and not allow_empty:
            raise MergeMixError(f"{path}: pool has no finished components yet")
        return pool

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def domains(self) -> list[str]:
        """Domains that have a finished component, in spec order."""
        return list(self.manifest["components"])

    @property
    def targets(self) -> list[str]:
        """The pool's target sets (evaluation-only data, `merge_mix.targets`)."""
        return list(self.manifest.get("targets", {}))

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / "tokenizer"

    @property
    def data_dir(self) -> Path:
        return self.path / "data"

    @property
    def base_dir(self) -> Path:
        return self.path / self.manifest["base"]["path"]

    def component_dir(self, domain: str) -> Path:
        return self.path / self.manifest["components"][domain]["path"]

    def _member_paths(self) -> dict[str, str]:
        paths = {"base": self.manifest["base"]["path"]}
        paths.update({f"components.{d}": c["path"] for d, c in self.manifest["components"].items()})
        return paths

    def members(self) -> dict[str, tuple[Path, str | None]]:
        """Base and components: their directory and the sha256 their record holds."""
        out = {"base": (self.base_dir, self.manifest["base"].get("sha256"))}
        for d, c in self.manifest["components"].items():
            out[d] = (self.component_dir(d), c.get("sha256"))
        return out

    def weight_problems(self, mode: str = "cached") -> tuple[dict[str, str], dict[str, str]]:
        """Check every member's weights against its recorded sha256.

        Returns ``(problems, hashes)``: a one-line problem per damaged or missing member,
        and the verified sha256 of the others. ``cached`` skips hashing a member whose
        files (name, size, mtime_ns, inode) are as they were when last verified (cache in
        ``POOL/.verified.json``); ``full`` hashes every file."""
        from merge_mix.model import weights_sha256

        if mode not in VERIFY_MODES:
            raise MergeMixError(f"--verify: {mode!r} is not one of {', '.join(VERIFY_MODES)}")
        cache_path = self.path / VERIFIED
        try:
            cache = read_json(cache_path) if mode == "cached" else {}
        except (OSError, json.JSONDecodeError):
            cache = {}
        cache = cache if isinstance(cache, dict) else {}
        problems: dict[str, str] = {}
        hashes: dict[str, str] = {}
        changed = False
        for who, (model_dir, recorded) in self.members().items():
            files = sorted(model_dir.glob("*.safetensors")) if model_dir.is_dir() else []
            if not files:
                problems[who] = f"{model_dir}: missing (no .safetensors weights)"
                continue
            if not recorded:
                problems[who] = f"{model_dir}: no sha256 recorded in {self.path / MANIFEST}"
                continue
            state = [[f.name, *_file_state(f)] for f in files]
            key = str(model_dir.relative_to(self.path))
            entry = cache.get(key)
            if entry == {"sha256": recorded, "files": state}:
                hashes[who] = recorded
                continue
            if weights_sha256(model_dir) != recorded:
                name = files[0] if len(files) == 1 else f"{model_dir}/*.safetensors"
                problems[who] = (
                    f"{name}: weights do not match the sha256 recorded in {self.path / MANIFEST}"
                    " (changed, truncated or damaged since training; rebuild the pool with"
                    " `merge-mix train-components` on its spec)"
                )
                cache.pop(key, None)
                continue
            hashes[who] = recorded
            cache[key] = {"sha256": recorded, "files": state}
            changed = True
        if changed:
            # Only a cache: a read-only or full pool is still read, just re-hashed next time.
            with contextlib.suppress(OSError):
                write_json_atomic(cache_path, cache)
        return problems, hashes

    def verify(self, mode: str = "cached") -> dict[str, str]:
        """Raise a one-line `MergeMixError` naming the first damaged or missing weights
        file; return each member's verified sha256 (``base`` and the domains)."""
        problems, hashes = self.weight_problems(mode)
        if problems:
            raise MergeMixError(next(iter(problems.values())))
        return hashes

    @property
    def seq_len(self) -> int:
        return int(self.manifest["model"]["seq_len"])

    @property
    def bos_id(self) -> int:
        return int(self.manifest["tokenizer"]["bos_id"])

    @property
    def general_share(self) -> float:
        return float(self.manifest["general_share"])

    def general_mixture(self) -> np.ndarray:
        """The all-domain mix every component saw `general_share` of, over `domains`."""
        g = self.manifest["general_mixture"]
        return np.array([g.get(d, 0.0) for d in self.domains], dtype=np.float64)

    def natural_mixture(self) -> np.ndarray:
        """Training-token proportions of the component domains."""
        t = self.available_tokens()
        return t / t.sum()

    def available_tokens(self) -> np.ndarray:
        return np.array(
            [self.manifest["data"][d]["train"]["tokens"] for d in self.domains], dtype=np.float64
        )


def _file_state(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def resolve_inside(root: Path, rel: str | Path, where: str) -> Path:
    """``root / rel`` with symlinks resolved, or a one-line error naming `where` when it
    leaves `root`: a manifest or record never points a pool at files outside it."""
    top = Path(root).resolve()
    path = (Path(root) / rel).resolve()
    if path != top and top not in path.parents:
        raise MergeMixError(
            f"{where}: {str(rel)!r} resolves to {path}, outside the pool {top}; refusing it"
        )
    return path


# ---------------------------------------------------------------------------------------
# A pool's recipes and spec


def component_mixture(
    domain: str, general: dict[str, float], general_share: float
) -> dict[str, float]:
    """The data mixture the component of `domain` trains on: ``general_share`` of the
    general mix plus the rest on its own domain (what `merge-mix plan` hands out and
    `merge-mix pool import` checks a declared mixture against)."""
    mix = {d: general_share * p for d, p in general.items()}
    mix[domain] = mix.get(domain, 0.0) + (1.0 - general_share)
    return {d: p for d, p in mix.items() if p > 0}


def recorded_spec(pool_dir: Path) -> PoolSpec:
    """The spec a pool was last built with, rebuilt from its manifest (``output_dir`` is
    `pool_dir`, wherever the pool was built or copied): what `write_manifest` needs when a
    pool changes without a spec file at hand (`merge-mix pool import`)."""
    from merge_mix.config import (
        DataSpec,
        DomainSpec,
        ModelSpec,
        SourceSpec,
        TokenizerSpec,
        TrainingSpec,
    )

    raw = read_json(Path(pool_dir) / MANIFEST)["spec"]

    def section(cls, values):
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def domain_specs(entries) -> tuple[DomainSpec, ...]:
        return tuple(
            DomainSpec(
                name=d["name"],
                sources=tuple(section(SourceSpec, s) for s in d["sources"]),
                max_bytes=d.get("max_bytes"),
            )
            for d in entries
        )

    domains = domain_specs(raw["domains"])
    return PoolSpec(
        name=raw["name"],
        domains=domains,
        output_dir=Path(pool_dir),
        spec_path=Path(raw["spec_path"]),
        seed=raw["seed"],
        general_share=raw["general_share"],
        general_mix=raw["general_mix"],
        max_epochs=raw["max_epochs"],
        data=section(DataSpec, raw["data"]),
        tokenizer=section(TokenizerSpec, raw["tokenizer"]),
        model=section(ModelSpec, raw["model"]),
        training=section(TrainingSpec, raw["training"]),
        targets=domain_specs(raw.get("targets", [])),
    )


# ---------------------------------------------------------------------------------------
# Writing the manifest


def write_manifest(spec: PoolSpec, pool_dir: Path) -> dict:
    """Rebuild manifest.json from the stage records on disk (under the pool lock)."""
    with file_lock(pool_dir / ".lock"):
        data = read_json(pool_dir / "data" / "data.json")
        base = read_json(pool_dir / "base" / "base.json")
        components = {}
        for d in spec.domain_names:
            p = pool_dir / "components" / d / "component.json"
            if p.is_file():
                components[d] = read_json(p)
        # Domains from the pool's spec record that this spec does not list (never the case
        # after the build's `_check_same_spec`) would be dropped here, so keep every
        # recorded component.
        tok = read_json(pool_dir / "tokenizer" / "merge_mix_tokenizer.json")
        missing = [d for d in spec.domain_names if d not in components]
        general = {d: p for d, p in base["general_mixture"].items()}
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": spec.name,
            "complete": not missing,
            "missing": missing,
            "general_share": spec.general_share,
            "general_mixture": general,
            "tokenizer": tok,
            "model": {
                "architecture": (
                    read_json(pool_dir / "base" / "config.json").get("architectures") or ["?"]
                )[0],
                "seq_len": spec.model.seq_len,
                "parameters": base["parameters"],
            },
            "data": {d: data["domains"][d] for d in data["domains"]},
            "targets": data.get("targets", {}),
            "base": {k: v for k, v in base.items() if k != "history"},
            "components": {
                d: {k: v for k, v in c.items() if k != "history"} for d, c in components.items()
            },
            "spec": spec.to_dict(),
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": library_versions(),
        }
        write_json_atomic(pool_dir / MANIFEST, manifest)
    return manifest


# ---------------------------------------------------------------------------------------
# Inspecting a pool


def format_pool_table(pool_dir: Path) -> str:
    """`merge-mix pool show`: a pool's domains, budgets, epochs and held-out losses."""
    pool = Pool.open(pool_dir, allow_empty=True)
    m = pool.manifest
    lines = []
    state = "complete" if m["complete"] else f"INCOMPLETE (missing: {', '.join(m['missing'])})"
    problems, _ = pool.weight_problems("cached")
    if problems:
        damaged = f"DAMAGED ({len(problems)} of {len(pool.members())} members unusable)"
        state = damaged if m["complete"] else f"{state}; {damaged}"
    params = m["model"]["parameters"]
    lines.append(
        f"pool {m['name']} at {pool_dir}: {state}; {len(pool.domains)} components,"
        f" {params / 1e6:.2f}M parameters each, general_share {m['general_share']:g}"
    )
    all_domains = list(m["data"])
    lines.append("")
    header = f"{'domain':<14}{'train tok':>11}{'search tok (docs)':>20}{'test tok (docs)':>20}"
    lines.append(header + f"{'comp tok':>11}{'epochs own':>12}")
    for d in all_domains:
        c = m["components"].get(d)
        held = "".join(
            f"{m['data'][d][s]['tokens']:>12,} ({m['data'][d][s]['documents']:>5,})"
            for s in HELDOUT_SPLITS
        )
        lines.append(
            f"{d:<14}{m['data'][d]['train']['tokens']:>11,}{held}"
            + (
                f"{c['tokens_seen']:>11,}{c['epochs'].get(d, 0):>12.2f}"
                if c
                else f"{'-':>11}{'-':>12}"
            )
        )
    for t, entry in m.get("targets", {}).items():  # evaluation only: no train split
        held = "".join(
            f"{entry[s]['tokens']:>12,} ({entry[s]['documents']:>5,})" for s in HELDOUT_SPLITS
        )
        lines.append(f"{t:<14}{'target set':>11}{held}{'-':>11}{'-':>12}")
    lines.append("")
    lines.append(
        "held-out loss (nats/token) on the search split, first training.eval_tokens tokens"
        " per domain; rows: model, columns: evaluated domain"
    )
    lines.append(f"{'model':<14}" + "".join(f"{d:>12}" for d in all_domains))
    rows = [("base", m["base"])] + [(f"{d}", c) for d, c in m["components"].items()]
    for name, rec in rows:
        cells = []
        for d in all_domains:
            v = rec["heldout"].get(d, {}).get("loss")
            mark = (
                "*" if name == d and v is not None and v < m["base"]["heldout"][d]["loss"] else " "
            )
            cells.append(f"{v:>11.4f}{mark}" if v is not None else f"{'-':>11} ")
        lines.append(f"{name:<14}" + "".join(cells))
    lines.append("* component beats the base on its own domain")
    imported = [d for d, c in m["components"].items() if c.get("imported")]
    if imported:
        lines.append(
            f"imported (trained elsewhere, `merge-mix pool import`): {', '.join(imported)}"
        )
    if problems:
        lines.append("")
        lines += [f"DAMAGED {who}: {msg}" for who, msg in problems.items()]
    return "\n".join(lines)
