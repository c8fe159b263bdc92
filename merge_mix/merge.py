"""Merging: turn mixture weights over a pool's components into one model, in memory.

The merge rule (task arithmetic from the shared base, DeMix/Berasi style)::

    theta(w) = theta_base + sum_i w_i (theta_i - theta_base)

With ``sum(w) = 1`` this is the weighted average of the components. Arithmetic is fp32
whatever the storage dtype. Parameters whose names match a `keep_base` pattern (e.g.
``*embed_tokens*``) stay at the base.

It is computed as ``(1 - sum(w)) * theta_base + sum_i w_i theta_i`` (the same number,
rearranged): coefficients of exactly 0 and 1 then return a component bit for bit.

`Merger` keeps one resident model and, by default, the base and the components resident
as one stacked fp32 matrix ``S[name]`` of shape ``(K + 1, numel)`` per tensor: a merge is
then one matrix-vector product per tensor written straight into the parameter,
``param = c @ S`` with ``c = (1 - sum(w), w_1, ..., w_K)``, a single pass over memory
with no file written per mixture. The stack lives on the model's device (the GPU when
the scorer runs there) unless the scorer's memory plan puts it in host memory
(`stack_device`), and is stored in fp32 or bf16 (half the memory; the merge still
accumulates in fp32, see docs/merging.md for the error). ``stack_dtype="auto"`` (the
default) picks bf16 when the pool's files are bf16 (``training.storage_dtype``), which a
bf16 stack holds exactly, and fp32 otherwise.
With ``stream=True`` nothing but the merged model is resident and each merge opens every
weight file once and reads every tensor once (which file holds which tensor is read from
the headers once, at start), for pools whose components do not fit in memory together.

Merge weights vs data mixture: a component trained on ``s * g + (1 - s) * e_i``
(``s`` = general_share, ``g`` = the general mix, ``e_i`` its domain) stands for that
data, so weights ``w`` stand for the effective data mixture
``r(w) = s * g + (1 - s) * w`` (for ``sum(w) = 1``). `mixture_to_weights` inverts it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import math
from pathlib import Path

import numpy as np
import torch

from merge_mix.errors import MergeMixError

STACK_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""Storage dtypes of the resident stack (`Merger(stack_dtype=...)`, ``--stack-dtype``);
merges accumulate in fp32 either way. ``auto`` picks one (`auto_stack_dtype`)."""

# Config keys that differ between identical architectures saved by different runs.
_CONFIG_IGNORE = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures"}


def effective_mixture(weights: np.ndarray, general_share: float, general: np.ndarray) -> np.ndarray:
    """The data mixture merge weights stand for: ``s * g + (1 - s) * w``."""
    return general_share * general + (1.0 - general_share) * np.asarray(weights, dtype=np.float64)


def mixture_to_weights(
    mixture: np.ndarray,
    general_share: float,
    general: np.ndarray,
    domains: list[str],
    extrapolate: bool = False,
) -> np.ndarray:
    """Merge weights whose effective mixture is `mixture`, or an error naming the domain
    whose share is below the floor every merge keeps (``general_share * g``), unless
    `extrapolate` allows the negative weights such a mixture needs."""
    floor = general_share * general
    w = (np.asarray(mixture, dtype=np.float64) - floor) / (1.0 - general_share)
    if extrapolate:
        return w
    for d, wi, r, f in zip(domains, w, mixture, floor, strict=True):
        if wi < -1e-9:
            raise MergeMixError(
                f"mixture: {d}={r:.4g} is below {f:.4g}, the share every merge keeps from the"
                f" components' general data (general_share x general mix); such a mixture"
                f" needs negative weights (--extrapolate)"
            )
    return np.clip(w, 0.0, None)


def parse_assignment(text: str, what: str = "weights") -> dict[str, float]:
    """Parse ``code=0.4,c=0.2`` (also ``:`` for ``=``, ``;`` or ``,`` between pairs).
    Names are NFC-normalised; a name given twice or a non-finite value is refused."""
    import unicodedata

    out: dict[str, float] = {}
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        sep = "=" if "=" in part else ":"
        name, _, value = part.partition(sep)
        if not _:
            raise MergeMixError(f"{what}: {part!r} is not NAME=VALUE")
        name = unicodedata.normalize("NFC", name.strip())
        if name in out:
            raise MergeMixError(f"{what}: {name!r} is given twice")
        try:
            out[name] = float(value)
        except ValueError:
            raise MergeMixError(f"{what}: {name}: {value!r} is not a number") from None
        if not math.isfinite(out[name]):
            raise MergeMixError(f"{what}: {name} is not a finite number ({value.strip()})")
    if not out:
        raise MergeMixError(f"{what}: empty")
    return out


def resolve_weights(
    spec: str | dict[str, float] | np.ndarray,
    domains: list[str],
    natural: np.ndarray | None = None,
    general_share: float = 0.0,
    general: np.ndarray | None = None,
    as_mixture: bool = False,
    extrapolate: bool = False,
    notice=None,
) -> np.ndarray:
    """Turn user weights into a checked vector aligned with `domains`.

    `spec` is a preset (``uniform``, ``natural``, or a domain name for its pure
    component), ``NAME=VALUE,...`` text, a dict or an array. With `as_mixture` the values
    are an effective data mixture and are converted to merge weights. Unnormalised
    weights are normalised (with a notice) unless `extrapolate`, which also allows
    negative weights."""
    what = "mixture" if as_mixture else "weights"
    k = len(domains)
    if isinstance(spec, str) and spec.strip() in ("uniform", "natural", *domains):
        name = spec.strip()
        if name == "uniform":
            w = np.full(k, 1.0 / k)
        elif name == "natural":
            if natural is None:
                raise MergeMixError(f"{what}: 'natural' needs the pool's token counts")
            w = np.asarray(natural, dtype=np.float64)
        else:
            w = np.eye(k)[domains.index(name)]
        if as_mixture:
            return mixture_to_weights(w, general_share, general, domains, extrapolate)
        return w
    if isinstance(spec, str):
        spec = parse_assignment(spec, what)
    if isinstance(spec, dict):
        unknown = [n for n in spec if n not in domains]
        if unknown:
            raise MergeMixError(
                f"{what}: {unknown[0]!r} is not a component of the pool (components:"
                f" {', '.join(domains)})"
            )
        w = np.array([float(spec.get(d, 0.0)) for d in domains])
    else:
        w = np.asarray(spec, dtype=np.float64).reshape(-1)
        if len(w) != k:
            raise MergeMixError(f"{what}: expected {k} values ({', '.join(domains)}), got {len(w)}")
    if not np.all(np.isfinite(w)):
        bad = domains[int(np.flatnonzero(~np.isfinite(w))[0])]
        raise MergeMixError(f"{what}: {bad} is not a finite number")
    if not extrapolate and (w < 0).any():
        bad = domains[int(np.flatnonzero(w < 0)[0])]
        raise MergeMixError(
            f"{what}: {bad}={w[domains.index(bad)]:g} is negative (--extrapolate allows it)"
        )
    with np.errstate(over="ignore"):
        total = w.sum()
    if not np.isfinite(total) or not np.isfinite(np.abs(w).sum()):
        given = ", ".join(f"{d}={x:g}" for d, x in zip(domains, w, strict=True))
        raise MergeMixError(f"{what}: the values overflow when summed ({given})")
    if np.all(w == 0) or (not extrapolate and total <= 0):
        raise MergeMixError(f"{what}: all zero")
    if not extrapolate and not math.isclose(total, 1.0, rel_tol=0, abs_tol=1e-6):
        if notice is not None:
            notice(f"note: {what} summed to {total:g}; normalised to 1")
        w = w / total
    if as_mixture:
        if not math.isclose(w.sum(), 1.0, abs_tol=1e-6):
            raise MergeMixError(f"{what}: a data mixture must sum to 1")
        return mixture_to_weights(w, general_share, general, domains, extrapolate)
    return w


def check_stack_dtype(stack_dtype: str) -> None:
    """A one-line error unless `stack_dtype` is ``auto`` or one of `STACK_DTYPES`."""
    if stack_dtype != "auto" and stack_dtype not in STACK_DTYPES:
        raise MergeMixError(
            f"stack_dtype: must be one of auto, {', '.join(STACK_DTYPES)}, not {stack_dtype!r}"
        )


def auto_stack_dtype(model_dirs, keys: set[str] | None = None) -> str:
    """What ``stack_dtype="auto"`` picks: ``bf16`` when every tensor (every one named in
    `keys`, if given) of every directory's safetensors files is stored as bf16, so that a
    bf16 stack holds the files' values exactly; ``fp32`` otherwise. Reads headers only."""
    from safetensors import safe_open

    for d in model_dirs:
        for f in sorted(Path(d).glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():
                    if keys is not None and key not in keys:
                        continue
                    if fh.get_slice(key).get_dtype() != "BF16":
                        return "fp32"
    return "bf16"


def _config_of(path: Path) -> dict:
    cfg = json.loads((path / "config.json").read_text())
    return {k: v for k, v in cfg.items() if k not in _CONFIG_IGNORE}


class Merger:
    """One resident model whose parameters are set to ``theta(w)`` by `merge(w)`."""

    def __init__(
        self,
        base_dir: Path,
        component_dirs: dict[str, Path],
        device: torch.device | str = "cpu",
        keep_base: tuple[str, ...] = (),
        stream: bool = False,
        stack_dtype: str = "auto",
        stack_device: torch.device | str | None = None,
    ):
        from safetensors import safe_open

        from merge_mix.model import load_model

        check_stack_dtype(stack_dtype)
        self.domains = list(component_dirs)
        self.device = torch.device(device)
        self.stack_device = self.device if stack_device is None else torch.device(stack_device)
        """Where the resident stack lives: the model's device, or the host when the stack
        does not fit there (the merged tensors are then copied to the model, P x 4 bytes
        per merge). Streaming merges stack one tensor at a time on the model's device."""
        self.stream = stream
        self.keep_base = tuple(keep_base)
        base_cfg = _config_of(base_dir)
        for d, path in component_dirs.items():
            if not (path / "config.json").is_file():
                raise MergeMixError(f"component {d!r}: {path} has no config.json")
            cfg = _config_of(path)
            if cfg != base_cfg:
                key = sorted(k for k in set(cfg) | set(base_cfg) if cfg.get(k) != base_cfg.get(k))[
                    0
                ]
                raise MergeMixError(
                    f"component {d!r}: config.{key} is {cfg.get(key)!r}, the base has"
                    f" {base_cfg.get(key)!r}; components must share the base's architecture"
                )
        self.model = load_model(base_dir, self.device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.params = dict(self.model.named_parameters())
        # Where each parameter is in the files (transformers 5 renames some on load).
        self.file_keys = checkpoint_keys(self.model, self.params)
        self._files = {"base": _tensor_files(base_dir)}
        for d, path in component_dirs.items():
            self._files[d] = _tensor_files(path)
        self._check_tensors(safe_open)
        self.merged_names = [
            n for n in self.params if not any(fnmatch.fnmatch(n, pat) for pat in self.keep_base)
        ]
        if stack_dtype == "auto":
            merged_keys = {self.file_keys[n] for n in self.merged_names}
            stack_dtype = auto_stack_dtype([base_dir, *component_dirs.values()], merged_keys)
        self.stack_dtype = stack_dtype
        self.stacks: dict[str, torch.Tensor] = {}
        """Per merged tensor, the ``(K + 1, numel)`` stack (base first), on `stack_device`,
        in `stack_dtype`."""
        if not stream:
            dtype = STACK_DTYPES[stack_dtype]
            with self._open_files() as handles:
                for name in self.merged_names:
                    rows = [self.params[name].detach().to(self.stack_device, dtype).reshape(-1)]
                    rows += [
                        self._get(handles, d, name).to(self.stack_device, dtype).reshape(-1)
                        for d in self.domains
                    ]
                    self.stacks[name] = torch.stack(rows)
        self.weights: np.ndarray | None = None
        self.sha256: dict[str, str] | None = None
        """Verified sha256 of the base's and each component's weights (`merger_for_pool`)."""

    def _check_tensors(self, safe_open) -> None:
        expected = {self.file_keys[n]: tuple(p.shape) for n, p in self.params.items()}
        # Which file holds each tensor, read once from the files' headers: merges then
        # open every file once and read every tensor once (`_open_files`, `_get`).
        self._location: dict[str, dict[str, Path]] = {}
        for who, files in self._files.items():
            found: dict[str, tuple[int, ...]] = {}
            where = self._location[who] = {}
            for f in files:
                with safe_open(str(f), framework="pt") as fh:
                    for key in fh.keys():
                        found[key] = tuple(fh.get_slice(key).get_shape())
                        where.setdefault(key, f)
            label = "base" if who == "base" else f"component {who!r}"
            for n, shape in expected.items():
                if n not in found:
                    raise MergeMixError(f"{label}: tensor {n} is missing")
                if found[n] != shape:
                    raise MergeMixError(
                        f"{label}: tensor {n} has shape {list(found[n])}, the base has {list(shape)}"
                    )
            extra = sorted(set(found) - set(expected) - _tied_aliases(self.model))
            if extra:
                raise MergeMixError(f"{label}: unexpected tensor {extra[0]}")

    @contextlib.contextmanager
    def _open_files(self):
        """Every weight file of the base and the components, each opened once, as
        ``{who: {path: handle}}``."""
        from safetensors import safe_open

        with contextlib.ExitStack() as stack:
            yield {
                who: {f: stack.enter_context(safe_open(str(f), framework="pt")) for f in files}
                for who, files in self._files.items()
            }

    def _get(self, handles: dict, who: str, name: str) -> torch.Tensor:
        """Parameter `name` of `who` as stored (its dtype, on the CPU), from the open file
        that holds it."""
        key = self.file_keys[name]
        return handles[who][self._location[who][key]].get_tensor(key)

    @torch.no_grad()
    def merge(self, weights: np.ndarray | torch.Tensor) -> torch.nn.Module:
        """Set the resident model to ``theta(weights)`` in place and return it."""
        where = self.device if self.stream else self.stack_device
        w = torch.as_tensor(np.asarray(weights, dtype=np.float32), device=where)
        if w.shape != (len(self.domains),):
            raise MergeMixError(
                f"weights: expected {len(self.domains)} values, got {tuple(w.shape)}"
            )
        if self.stream:
            self._merge_streaming(w)
        else:
            coef = self.coefficients(w).unsqueeze(0)
            for name in self.merged_names:
                combine(coef, self.stacks[name], self.params[name])
        self.weights = np.asarray(weights, dtype=np.float64)
        return self.model

    @staticmethod
    def coefficients(w: torch.Tensor) -> torch.Tensor:
        """``(1 - sum(w), w_1, ..., w_K)``: the base's and each component's coefficient."""
        return torch.cat([(1 - w.sum()).reshape(1), w])

    def _merge_streaming(self, w: torch.Tensor) -> None:
        # Each file opened once and each tensor read once per merge; one tensor's rows are
        # stacked at a time and combined exactly as the resident stack is (bit for bit).
        # The rows are copied into one preallocated buffer (not a list, then a stacked copy),
        # so a tensor costs (K + 1) fp32 rows once (benchmarks/memory_scale.py measured the
        # list-then-stack version at twice the plan).
        coef = self.coefficients(w).unsqueeze(0)
        members = ("base", *self.domains)
        with self._open_files() as handles:
            for name in self.merged_names:
                param = self.params[name]
                rows = torch.empty(
                    len(members), param.numel(), dtype=torch.float32, device=self.device
                )
                for i, who in enumerate(members):
                    rows[i].copy_(self._get(handles, who, name).reshape(-1))
                combine(coef, rows, param)
                del rows

    def state_dict_fp32(self) -> dict[str, torch.Tensor]:
        """The merged parameters as a plain dict (for export and comparisons)."""
        return {n: p.detach().to("cpu", torch.float32).clone() for n, p in self.params.items()}


# Columns combined at a time from a bf16 stack: bounds the fp32 copy of one tensor's rows.
_BF16_CHUNK = 1 << 22


def combine(coef: torch.Tensor, stack: torch.Tensor, param: torch.Tensor) -> None:
    """``param = coef @ stack`` accumulated in fp32 (``coef`` is ``(1, K + 1)`` fp32, on the
    stack's device), computed where the stack lives and copied to `param`'s device."""
    if stack.dtype != torch.float32:
        # A bf16 stack is widened per chunk of columns: fp32 arithmetic, bounded memory.
        out = torch.empty(1, stack.shape[1], dtype=torch.float32, device=stack.device)
        for lo in range(0, stack.shape[1], _BF16_CHUNK):
            hi = lo + _BF16_CHUNK
            torch.mm(coef, stack[:, lo:hi].to(torch.float32), out=out[:, lo:hi])
        param.copy_(out.view_as(param))
    elif param.dtype == torch.float32 and param.is_contiguous() and param.device == stack.device:
        torch.mm(coef, stack, out=param.view(1, -1))
    else:
        param.copy_((coef @ stack).view_as(param))


def _tensor_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise MergeMixError(f"{path}: no .safetensors weights")
    return files


def _tied_aliases(model) -> set[str]:
    """Names a tied model's files may hold that named_parameters() reports only once."""
    every = dict(model.named_parameters(remove_duplicate=False))
    keys = checkpoint_keys(model, every)
    return {keys[n] for n in every} - {keys[n] for n, _ in model.named_parameters()}


def checkpoint_keys(model, params: dict[str, torch.Tensor]) -> dict[str, str]:
    """The key each of `params` (name -> parameter of `model`) has in the model's
    safetensors files. transformers 5 renames some parameters on load and back on save
    (GPT-NeoX's ``embed_out`` is ``lm_head`` in memory); 4.x names them alike."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4.x
        return {n: n for n in params}
    reverted = revert_weight_conversion(model, dict(params))
    by_object = {id(t): k for k, t in reverted.items()}
    return {n: by_object.get(id(t), n) for n, t in params.items()}


def merger_for_pool(
    pool,
    device="cpu",
    keep_base: tuple[str, ...] = (),
    stream: bool = False,
    verify: str = "cached",
    stack_dtype: str = "auto",
    stack_device: torch.device | str | None = None,
):
    """A `Merger` over all of a pool's finished components, after checking the base's and
    every component's weights against their recorded sha256 (`Pool.verify`; `verify` is
    ``cached`` or ``full``). The verified hashes are kept in `Merger.sha256`."""
    hashes = pool.verify(verify)
    merger = Merger(
        pool.base_dir,
        {d: pool.component_dir(d) for d in pool.domains},
        device=device,
        keep_base=keep_base,
        stream=stream,
        stack_dtype=stack_dtype,
        stack_device=stack_device,
    )
    merger.sha256 = hashes
    return merger
