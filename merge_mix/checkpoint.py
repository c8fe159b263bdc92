"""Training checkpoints: weights, `optimizer.state_dict()` and the loop's counters as
safetensors + JSON, never pickles, written beside the previous checkpoint and swapped in.

``<workdir>/checkpoint/`` has one of two layouts (docs/pool-format.md):

- **full** (one process, DDP): ``model.safetensors``, ``optimizer.safetensors``,
  ``optimizer.json``, ``state.json``, written by rank 0;
- **sharded** (FSDP2): every rank writes the rows it holds of each parameter and of each
  AdamW moment, ``model.rank{r}.safetensors`` and ``optimizer.rank{r}.safetensors``, with no
  all-gather; rank 0 adds ``shards.json`` (the world size and, per tensor, its global shape,
  dtype and the rows ``[start, end)`` of dim 0 each rank holds), ``optimizer.json`` and
  ``state.json``.

Either layout loads at any world size: under FSDP each rank reads only the rows it holds now
(`safetensors.safe_open(...).get_slice`), one process reads them all. ``state.json`` is
written last: a directory without it is not a checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import torch

from merge_mix.artifacts import shareable
from merge_mix.errors import MergeMixError
from merge_mix.model import disk_full_error

CHECKPOINT = "checkpoint"
INDEX = "shards.json"
INDEX_VERSION = 1

Rows = tuple[int, int]


def _checkpoint_dir(workdir: Path) -> Path | None:
    for name in (CHECKPOINT, f"{CHECKPOINT}.old"):  # .old: killed between the two renames
        if (workdir / name / "state.json").is_file():
            return workdir / name
    return None


def rows_from_counts(counts: list[int]) -> list[Rows]:
    """The rows ``[start, end)`` each rank holds, from how many rows each holds (in rank
    order): ``[3, 2] -> [(0, 3), (3, 5)]``, ``[1, 0] -> [(0, 1), (1, 1)]``."""
    out, start = [], 0
    for n in counts:
        out.append((start, start + n))
        start += n
    return out


def overlaps(rows: list[Rows], start: int, end: int) -> list[tuple[int, int, int]]:
    """``(rank, lo, hi)`` for each rank whose rows meet ``[start, end)``: rows ``lo:hi`` of
    that rank's local tensor (local coordinates), in order, so their concatenation is
    rows ``start:end`` of the global tensor."""
    out = []
    for rank, (s, e) in enumerate(rows):
        lo, hi = max(start, s), min(end, e)
        if lo < hi:
            out.append((rank, lo - s, hi - s))
    return out


def _is_dtensor(t: torch.Tensor) -> bool:
    if not torch.distributed.is_available():  # torch builds without distributed support
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank stores: a DTensor's local shard, a plain tensor itself."""
    return t.to_local() if _is_dtensor(t) else t


def _param_names(model, optimizer) -> list[str]:
    """Parameter names in the optimizer's own numbering (param groups in order), which is
    how `optimizer.state_dict()` numbers its state."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for g in optimizer.param_groups for p in g["params"]]


def full_state(model, optimizer) -> tuple[dict, dict]:
    """(parameters by name, `optimizer.state_dict()` keyed by parameter name) of an
    unsharded model: the optimizer's numbers become names, which survive a change of
    code or sharding."""
    names = _param_names(model, optimizer)
    osd = optimizer.state_dict()
    named = {
        "state": {names[i]: st for i, st in osd["state"].items()},
        "param_groups": [
            {**g, "params": [names[i] for i in g["params"]]} for g in osd["param_groups"]
        ],
    }
    return {n: p.detach() for n, p in model.named_parameters()}, named


def save_checkpoint(
    model, optimizer, state: dict, workdir: Path, sharded: bool = False, rank: int = 0
) -> None:
    """Atomically replace `workdir/checkpoint` (written beside it as ``checkpoint.tmp``,
    then renamed) with the weights, `optimizer.state_dict()` and `state`.

    Unsharded, rank 0 writes the full layout (other ranks return). Under FSDP (`sharded`)
    every rank must call this: each writes its own shards, then rank 0 the index, and
    renames once every rank has finished. A failed write on any rank leaves the previous
    checkpoint in place."""
    tmp = workdir / f"{CHECKPOINT}.tmp"
    if sharded:
        import torch.distributed as dist

        rank = dist.get_rank()
        _save_sharded(model, optimizer, state, tmp)
    else:
        if rank != 0:
            return
        weights, osd = full_state(model, optimizer)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            _write_full(tmp, weights, osd, state)
        except BaseException:
            # A half-written checkpoint is never kept: the previous one (if any) stands.
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if rank == 0:
        _swap_in(tmp, workdir / CHECKPOINT)


def _swap_in(tmp: Path, final: Path) -> None:
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _save_tensors(tensors: dict, path: Path) -> None:
    """`safetensors.torch.save_file`; a full disk is an ``OSError(ENOSPC)`` naming `path`
    (safetensors reports it without an errno)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path))
    except SafetensorError as exc:
        full = disk_full_error(exc, path)
        if full is not None:
            raise full from exc
        raise


def _write_json(path: Path, payload) -> None:
    _write_text(path, json.dumps(payload, indent=1))


def _index_text(world: int, model: dict, optimizer: dict) -> str:
    """``shards.json``, one line per tensor."""
    parts = [f'"version": {INDEX_VERSION}', f'"world_size": {world}']
    for kind, entries in (("model", model), ("optimizer", optimizer)):
        body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in entries.items())
        parts.append(f'"{kind}": {{\n{body}\n }}')
    return "{\n " + ",\n ".join(parts) + "\n}\n"


def _write_text(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError as exc:
        # A failed write() carries no file name; say which file it was.
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


def _split_optimizer(osd: dict) -> tuple[dict, dict]:
    """(tensor states as ``<parameter>::<key>``, every other state value likewise)."""
    tensors, values = {}, {}
    for name, st in osd["state"].items():
        for key, value in st.items():
            (tensors if torch.is_tensor(value) else values)[f"{name}::{key}"] = value
    return tensors, values


def _write_full(tmp: Path, weights: dict, osd: dict, state: dict) -> None:
    """The full layout's files in `tmp`, ``state.json`` last."""
    _save_tensors(
        {n: t.detach().cpu().contiguous() for n, t in weights.items()}, tmp / "model.safetensors"
    )
    tensors, values = _split_optimizer(osd)
    _save_tensors(
        {k: t.detach().cpu().contiguous() for k, t in tensors.items()},
        tmp / "optimizer.safetensors",
    )
    _write_json(tmp / "optimizer.json", {"param_groups": osd["param_groups"], "values": values})
    _write_json(tmp / "state.json", state)
    shareable(tmp)


def _dim0_shard(name: str, t: torch.Tensor, rank: int, world: int) -> bool:
    """True for a DTensor sharded by FSDP2 (dim 0 over a one-dimensional mesh of all ranks,
    this rank at coordinate `rank`), False for a plain (replicated) tensor; anything else
    is refused."""
    from torch.distributed.tensor import Shard

    if not _is_dtensor(t):
        return False
    mesh = t.device_mesh
    if (
        mesh.ndim != 1
        or mesh.size() != world
        or list(mesh.get_coordinate() or ()) != [rank]
        or tuple(t.placements) != (Shard(0),)
    ):
        raise MergeMixError(
            f"{name}: sharded checkpoints hold FSDP2's dim-0 shards over all {world} ranks;"
            f" this tensor is placed {tuple(t.placements)} on a mesh of shape"
            f" {tuple(mesh.shape)}"
        )
    return True


def held_rows(params: list[tuple[str, torch.Tensor]]) -> dict[str, list[Rows] | None]:
    """For each sharded parameter, the rows ``[start, end)`` of dim 0 every rank holds,
    in rank order (None for a replicated one). Measured from each rank's local shape (one
    all-gather of row counts), not assumed, and checked to cover the tensor. Every rank
    must call this."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    sharded = [_dim0_shard(n, p, rank, world) for n, p in params]
    device = _local(params[0][1]).device
    counts = torch.tensor(
        [_local(p).shape[0] if s else 0 for (_, p), s in zip(params, sharded, strict=True)],
        dtype=torch.int64,
        device=device,
    )
    gathered = [torch.empty_like(counts) for _ in range(world)]
    dist.all_gather(gathered, counts)
    table = torch.stack(gathered).cpu().tolist()
    out: dict[str, list[Rows] | None] = {}
    for j, ((name, p), s) in enumerate(zip(params, sharded, strict=True)):
        if not s:
            out[name] = None
            continue
        rows = rows_from_counts([table[r][j] for r in range(world)])
        if rows[-1][1] != p.shape[0]:
            raise MergeMixError(
                f"{name}: the ranks' shards hold {rows[-1][1]} rows of {p.shape[0]}"
            )
        out[name] = rows
    return out


def _entry(t: torch.Tensor, rows: list[Rows] | None) -> dict:
    entry = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
    if rows is None:
        entry["replicated"] = True
    else:
        entry["rows"] = [list(r) for r in rows]
    return entry


def _save_sharded(model, optimizer, state: dict, tmp: Path) -> None:
    """Every rank writes ``model.rank{r}.safetensors`` and ``optimizer.rank{r}.safetensors``
    (its local shards; replicated tensors such as AdamW's ``step`` only in rank 0's file),
    then, after all ranks are done, rank 0 writes ``state.json``."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    params = list(model.named_parameters())
    rows = held_rows(params)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    error: Exception | None = None
    try:
        with torch.no_grad():
            model_index = {n: _entry(p, rows[n]) for n, p in params}
            shards = {
                n: _local(p).detach().cpu().contiguous()
                for n, p in params
                if rows[n] is not None or rank == 0
            }
            _save_tensors(shards, tmp / f"model.rank{rank}.safetensors")
            _, osd = full_state(model, optimizer)
            tensors, values = _split_optimizer(osd)
            by_name = dict(params)
            opt_index, shards = {}, {}
            for key, t in tensors.items():
                name = key.rpartition("::")[0]
                p = by_name[name]
                if _dim0_shard(key, t, rank, world):
                    if t.shape != p.shape or _local(t).shape != _local(p).shape:
                        raise MergeMixError(
                            f"{key}: optimizer state of shape {tuple(t.shape)} is not sharded"
                            f" like its parameter {tuple(p.shape)}"
                        )
                    opt_index[key] = _entry(t, rows[name])
                elif rank == 0:
                    # Not sharded (AdamW's step): the same on every rank, which all step
                    # every parameter, so rank 0's copy is the one kept.
                    opt_index[key] = _entry(t, None)
                else:
                    continue
                shards[key] = _local(t).detach().cpu().contiguous()
            _save_tensors(shards, tmp / f"optimizer.rank{rank}.safetensors")
            if rank == 0:
                _write_json(
                    tmp / "optimizer.json", {"param_groups": osd["param_groups"], "values": values}
                )
                _write_text(tmp / INDEX, _index_text(world, model_index, opt_index))
    except Exception as exc:
        error = exc
    failed = torch.tensor([int(error is not None)], device=_local(params[0][1]).device)
    dist.all_reduce(failed)  # also the barrier: every rank's shards are complete
    try:
        if int(failed) == 0 and rank == 0:
            _write_json(tmp / "state.json", state)
            shareable(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if int(failed):
        # A half-written checkpoint is never kept: the previous one (if any) stands.
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is not None:
            raise error
        raise MergeMixError(
            f"{tmp}: checkpoint not saved: {int(failed)} other rank(s) could not write their"
            " shards (see their error)"
        )


class SavedTensors(contextlib.ExitStack):
    """The tensors of one kind (``model`` or ``optimizer``) of a checkpoint in either
    layout, read by rows of dim 0 without reading other rows."""

    def __init__(self, path: Path, kind: str):
        super().__init__()
        self.path = path
        self._handles: dict[int, object] = {}
        index = path / INDEX
        if index.is_file():
            meta = json.loads(index.read_text())
            self.entries: dict[str, dict] = meta[kind]
            self.files = {
                r: path / f"{kind}.rank{r}.safetensors" for r in range(meta["world_size"])
            }
        else:
            self.files = {0: path / f"{kind}.safetensors"}
            f = self._handle(0)
            self.entries = {}
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                # One file holds every row; a scalar has no rows and is read whole.
                self.entries[key] = (
                    {"shape": shape, "rows": [[0, shape[0]]]} if shape else {"shape": shape}
                )

    def _handle(self, rank: int):
        from safetensors import safe_open

        if rank not in self._handles:
            self._handles[rank] = self.enter_context(
                safe_open(str(self.files[rank]), framework="pt")
            )
        return self._handles[rank]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def read(self, key: str, rows: Rows | None = None) -> torch.Tensor:
        """Rows ``[start, end)`` of dim 0 of tensor `key` (None: all of it), read from the
        files that hold them and nothing else."""
        entry = self.entries[key]
        if "rows" not in entry:  # replicated, or a scalar: in rank 0's file
            whole = self._handle(0).get_tensor(key)
            return whole if rows is None else whole[rows[0] : rows[1]]
        saved = [tuple(r) for r in entry["rows"]]
        start, end = rows if rows is not None else (0, entry["shape"][0])
        parts = overlaps(saved, start, end)
        if not parts:  # an empty shard: zero rows, with the saved dtype
            return self._handle(0).get_slice(key)[0:0]
        pieces = [self._handle(r).get_slice(key)[lo:hi] for r, lo, hi in parts]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def load_checkpoint(model, optimizer, workdir: Path, sharded: bool = False) -> dict | None:
    """Restore weights and optimizer state from `workdir`; None if there is no checkpoint.

    Reads either layout at any world size. Under FSDP (`sharded`; every rank calls this)
    each rank reads only the rows it holds. The optimizer state goes through
    `optimizer.load_state_dict`, which places each tensor as this run's optimizer needs it
    (on the parameter's device; AdamW's `step` on the CPU, or on the device for fused
    AdamW)."""
    path = _checkpoint_dir(workdir)
    if path is None:
        return None
    if not (path / "optimizer.json").is_file():
        raise MergeMixError(
            f"{path}: checkpoint from an older merge-mix (no optimizer.json); delete it to"
            " restart this member"
        )
    state = json.loads((path / "state.json").read_text())
    meta = json.loads((path / "optimizer.json").read_text())
    params = list(model.named_parameters())
    rows = held_rows(params) if sharded else {n: None for n, _ in params}
    rank = torch.distributed.get_rank() if sharded else 0
    by_name = dict(params)

    def mine(saved: SavedTensors, key: str, p: torch.Tensor, name: str) -> torch.Tensor:
        """This rank's part of saved tensor `key`, which belongs to parameter `name`."""
        if key not in saved.entries:
            raise MergeMixError(f"{path}: no tensor {key}; delete the checkpoint to restart")
        if saved.shape(key) != tuple(p.shape):
            raise MergeMixError(
                f"{path}: {key} has shape {saved.shape(key)}, this model's {name} has"
                f" {tuple(p.shape)}; delete the checkpoint to restart"
            )
        return saved.read(key, None if rows[name] is None else rows[name][rank])

    with (
        SavedTensors(path, "model") as weights,
        SavedTensors(path, "optimizer") as tensors,
        torch.no_grad(),
    ):
        for name, p in params:
            _local(p).copy_(mine(weights, name, p, name))
        saved_groups = meta["param_groups"]
        sizes = [len(g["params"]) for g in saved_groups]
        live_sizes = [len(g["params"]) for g in optimizer.param_groups]
        if sizes != live_sizes:
            raise MergeMixError(
                f"{path}: the checkpoint's optimizer has parameter groups of {sizes}"
                f" parameters, this run's {live_sizes}; delete it to restart"
            )
        fields: dict[str, dict[str, object]] = {}
        for key in [*tensors.entries, *meta["values"]]:
            saved_name, _, field_name = key.rpartition("::")
            fields.setdefault(saved_name, {})[field_name] = key
        names = _param_names(model, optimizer)
        # The saved parameter at position j of the saved groups is this run's j-th: the
        # numbering `optimizer.load_state_dict` itself relies on.
        saved_names = [n for g in saved_groups for n in g["params"]]
        osd_state = {}
        for j, (saved_name, name) in enumerate(zip(saved_names, names, strict=True)):
            p = by_name[name]
            st = {}
            for field_name, key in fields.get(saved_name, {}).items():
                if key in meta["values"]:
                    st[field_name] = meta["values"][key]
                elif tensors.shape(key) == tuple(p.shape) and p.ndim > 0:
                    st[field_name] = _like(p, mine(tensors, key, p, name))
                else:
                    st[field_name] = tensors.read(key)
            if st:
                osd_state[j] = st
    groups = []
    start = 0
    for saved, live in zip(saved_groups, optimizer.param_groups, strict=True):
        group = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}
        group["params"] = list(range(start, start + len(saved["params"])))
        start += len(saved["params"])
        # The implementation follows this run's device (fused AdamW only on CUDA), not
        # the one that wrote the checkpoint.
        for key in ("fused", "foreach", "capturable", "differentiable"):
            if key in live:
                group[key] = live[key]
        groups.append(group)
    optimizer.load_state_dict({"state": osd_state, "param_groups": groups})
    return state


def _like(p: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """`local` (this rank's rows of a tensor shaped like `p`) as `p` is held: a DTensor
    with `p`'s mesh and placements if `p` is one."""
    if not _is_dtensor(p):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local.to(_local(p).device),
        p.device_mesh,
        p.placements,
        run_check=False,
        shape=p.shape,
        stride=p.stride(),
    )
