"""The pool spec: what `merge-mix train-components` builds, as typed, frozen objects.

A spec is a YAML file (`pools/demo.yaml` is the built-in default). `load_spec` parses it
into a `PoolSpec`; every mistake (unknown key, wrong type, missing source, bad value)
raises a `MergeMixError` whose one line names the file and the field, e.g.
``pools/x.yaml: training.lr: must be > 0``.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
import os
import types
import typing
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from merge_mix.errors import MergeMixError

SOURCE_KINDS = ("builtin", "files", "jsonl", "json", "parquet", "csv", "hf_disk")
BUILTIN_SOURCES = ("python-stdlib", "c-headers", "config-files", "prose", "pydoc-topics")
# Built-ins whose contents changed: 2 for prose, which held the pydoc topics until they
# became their own source (the demo's target set).
BUILTIN_REVISIONS = {"prose": 2}
STORAGE_DTYPES = ("float32", "bfloat16")
"""Dtypes a pool may save its weights in (`TrainingSpec.storage_dtype`)."""


@dataclass(frozen=True)
class SourceSpec:
    """One place a domain's documents come from."""

    kind: str
    """One of `SOURCE_KINDS`: a built-in on-disk corpus, a file glob, a data file, or a
    `datasets.save_to_disk` directory."""
    location: str
    """Built-in name, glob pattern or path (paths relative to the spec file)."""
    text_field: str = "text"
    """Field holding the text, for jsonl/json/parquet/csv/hf_disk sources."""
    split: str | None = None
    """Split to read from a `DatasetDict` saved with `save_to_disk`."""
    encoding: str | None = None
    """Text encoding of a files/jsonl/json/csv source (e.g. ``latin-1``). None: UTF-8, and
    files of a ``files`` source that are not UTF-8 are skipped and counted."""
    max_file_bytes: int | None = None
    """Files of a ``files`` source larger than this are skipped and counted. None: no cap."""

    def identity(self) -> dict[str, Any]:
        """The fields that decide what is read, for a pool's sources hash; the optional
        ones only when set, so pools built before they existed keep their hash."""
        fields = dataclasses.asdict(self)
        for key in ("encoding", "max_file_bytes"):
            if fields[key] is None:
                del fields[key]
        revision = BUILTIN_REVISIONS.get(self.location, 1) if self.kind == "builtin" else 1
        if revision > 1:  # a built-in whose contents changed is a different source
            fields["revision"] = revision
        return fields


@dataclass(frozen=True)
class DomainSpec:
    """A data domain: one component model is trained per domain."""

    name: str
    sources: tuple[SourceSpec, ...]
    """Where the documents come from; their union is the domain."""
    max_bytes: int | None = None
    """Cap on the domain's text (after de-duplication), taken in a fixed pseudo-random
    document order so the cap does not favour one source directory. None: no cap."""


@dataclass(frozen=True)
class DataSpec:
    """How documents become train and held-out splits."""

    heldout_fraction: float = 0.1
    """Share of documents (by content hash, so deterministic) kept for held-out scoring."""
    test_fraction: float = 0.5
    """Share of the held-out documents (by content hash, whole documents) in the ``test``
    split, which only final verdicts and `validate` read; the rest is the ``search``
    split, on which searches select mixtures."""
    heldout_max_documents: int | None = None
    """At most this many held-out documents per domain (the first drawn, in hash order);
    later drawn documents train instead. Bounds the scoring cost of domains made of many
    small documents."""
    heldout_max_bytes: int | None = 64 << 20
    """At most this many bytes of held-out pieces per domain (documents drawn in hash
    order while the bytes drawn before each are under it; later drawn documents train
    instead): a large domain's held-out text stays a few million tokens, enough for tight
    intervals, and within memory while it is decontaminated. None: no cap."""
    heldout_max_pieces: int | None = None
    """A held-out document keeps at most its first this many pieces (the rest of it is
    neither trained on nor scored), so a few long documents do not dominate a domain's
    held-out loss and the width of its interval."""
    near_duplicate_threshold: float = 0.5
    """A held-out piece is dropped when at least this share of its word n-grams
    (`shingle_words` words each) occurs anywhere in any domain's training text."""
    shingle_words: int = 8
    """Words per n-gram (shingle) in the near-duplicate check."""
    max_doc_bytes: int = 8192
    """Longer documents are cut at line boundaries into pieces of at most this size,
    so held-out scoring never sees one document dominate a domain."""
    min_doc_bytes: int = 64
    """Pieces shorter than this are dropped (boilerplate stubs, empty files)."""

    def identity(self) -> dict[str, Any]:
        """The fields that decide a domain's data, for hashes recorded in a pool: a field
        added after pools were first recorded is left out at its default, so those pools
        keep their hashes."""
        out = dataclasses.asdict(self)
        if out["heldout_max_bytes"] == DataSpec.heldout_max_bytes:
            del out["heldout_max_bytes"]
        return out


@dataclass(frozen=True)
class TokenizerSpec:
    """The pool's tokenizer: trained here, or a local Hugging Face tokenizer directory."""

    vocab_size: int = 4096
    """Byte-level BPE vocabulary size, special tokens included."""
    sample_bytes: int = 4_000_000
    """Bytes of training text, drawn evenly from all domains, used to train the BPE."""
    path: str | None = None
    """A local tokenizer directory (`AutoTokenizer` format) to use instead of training one."""


@dataclass(frozen=True)
class ModelSpec:
    """The model every pool member shares: a small Llama built here, or a local base."""

    pretrained: str | None = None
    """A local Hugging Face model directory (safetensors) to use as the base; when set,
    no base is trained and `tokenizer.path` defaults to the same directory."""
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 384
    seq_len: int = 256
    """Training sequence length and the context length of evaluation windows."""
    tie_embeddings: bool = True
    rope_theta: float = 10000.0


@dataclass(frozen=True)
class TrainingSpec:
    """Hyperparameters shared by the base and every component (identical by design)."""

    base_tokens: int = 2_000_000
    """Tokens the shared base is trained on (the all-domain mix); ignored with a pretrained base."""
    component_tokens: int = 1_000_000
    """Tokens each component is trained on, continued from the base."""
    batch_size: int = 16
    """Sequences per micro-batch, over all processes: under torchrun each of N ranks takes
    batch_size / N of them, so the recipe does not depend on the number of GPUs."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of `lr`."""
    warmup_steps: int = 20
    schedule: str = "cosine"
    """`cosine` (warmup, cosine decay) or `wsd` (warmup, stable, linear decay over the last
    `decay_fraction` of steps)."""
    decay_fraction: float = 0.2
    weight_decay: float = 0.1
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 100
    """Steps between held-out loss checks shown on the progress bar (0: never)."""
    eval_tokens: int = 16_384
    """Held-out tokens per domain for the periodic and final held-out losses."""
    checkpoint_every: int = 50
    """Steps between resumable checkpoints (0: none, except on Ctrl-C)."""
    device: str = "auto"
    """`auto` (cuda, then mps, then cpu), or a torch device string."""
    precision: str = "auto"
    """`auto` (bf16 autocast on CUDA, fp32 elsewhere), `fp32` or `bf16`."""
    parallel: str = "ddp"
    """Under torchrun: `ddp` (a full model and AdamW state on every rank) or `fsdp` (torch
    FSDP2 `fully_shard`: weights, gradients and AdamW state sharded over the ranks)."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass (less memory, about
    a third more compute); the result is the same."""
    storage_dtype: str = "float32"
    """Dtype of the weights the pool saves for its base and every component: `float32`, or
    `bfloat16` (half the disk; a merge's resident stack then follows it when its stack
    dtype is ``auto``). Training and merging compute in fp32 either way: a member's weights
    are rounded once, when it is saved, and its recorded held-out losses are those of the
    saved weights. Frozen with the pool."""


@dataclass(frozen=True)
class PoolSpec:
    """A whole pool: domains, data handling, tokenizer, model, training, output."""

    name: str
    domains: tuple[DomainSpec, ...]
    output_dir: Path
    """Where the pool is written (relative paths are relative to the spec file)."""
    spec_path: Path
    seed: int = 0
    general_share: float = 0.5
    """Share of each component's training mix drawn from the general (all-domain) mix;
    the rest is its own domain. 0.5 is the DeMix ablation's best."""
    general_mix: str = "uniform"
    """The all-domain mix: `uniform` over domains or `natural` (token proportions)."""
    max_epochs: float = 4.0
    """Refuse budgets that would repeat any domain's training data more than this."""
    data: DataSpec = field(default_factory=DataSpec)
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    targets: tuple[DomainSpec, ...] = ()
    """Target sets: evaluation-only data (sources and `max_bytes` as a domain's), scored
    and searched for but never trained on (`merge_mix.targets`)."""

    @property
    def domain_names(self) -> list[str]:
        return [d.name for d in self.domains]

    def section_hash(self, *names: str) -> str:
        """Stable hash of some top-level sections, to tell whether a pool on disk was
        built from the same settings."""
        blob = {n: _jsonable(getattr(self, n)) for n in names}
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(self)


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(x) for x in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _check(spec: PoolSpec, where: str) -> None:
    """All cross-field and range checks, in one place."""

    def fail(field_name: str, msg: str) -> None:
        raise MergeMixError(f"{where}: {field_name}: {msg}")

    if not spec.domains:
        fail("domains", "at least one domain is required")
    for d in spec.domains:
        if not d.name.replace("-", "").replace("_", "").isalnum() or d.name.startswith("-"):
            fail(f"domains.{d.name}", "domain names may use letters, digits, '-' and '_' only")
        if not d.sources:
            fail(f"domains.{d.name}.sources", "needs at least one source")
        if d.max_bytes is not None and d.max_bytes <= 0:
            fail(f"domains.{d.name}.max_bytes", "must be > 0")
    if not 0.0 <= spec.general_share < 1.0:
        fail("general_share", "must be in [0, 1)")
    if spec.general_mix not in ("uniform", "natural"):
        fail("general_mix", "must be 'uniform' or 'natural'")
    if spec.max_epochs <= 0:
        fail("max_epochs", "must be > 0")
    if not 0.0 < spec.data.heldout_fraction < 1.0:
        fail("data.heldout_fraction", "must be in (0, 1)")
    if not 0.0 < spec.data.test_fraction < 1.0:
        fail("data.test_fraction", "must be in (0, 1)")
    if spec.data.heldout_max_documents is not None and spec.data.heldout_max_documents < 2:
        fail("data.heldout_max_documents", "must be >= 2 (each held-out split needs documents)")
    if spec.data.heldout_max_bytes is not None and spec.data.heldout_max_bytes < 1:
        fail("data.heldout_max_bytes", "must be >= 1 (or null for no cap)")
    if spec.data.heldout_max_pieces is not None and spec.data.heldout_max_pieces < 1:
        fail("data.heldout_max_pieces", "must be >= 1")
    if not 0.0 < spec.data.near_duplicate_threshold <= 1.0:
        fail("data.near_duplicate_threshold", "must be in (0, 1]")
    if spec.data.shingle_words < 2:
        fail("data.shingle_words", "must be >= 2")
    if spec.data.max_doc_bytes < 256:
        fail("data.max_doc_bytes", "must be >= 256")
    if spec.tokenizer.path is None and spec.model.pretrained is None:
        if spec.tokenizer.vocab_size < 300:
            fail("tokenizer.vocab_size", "must be >= 300 (256 byte tokens plus merges)")
    m = spec.model
    if m.pretrained is None:
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(m, name) <= 0:
                fail(f"model.{name}", "must be > 0")
        if m.hidden_size % m.num_heads:
            fail("model.hidden_size", f"must be divisible by model.num_heads ({m.num_heads})")
        if m.num_heads % m.num_kv_heads:
            fail("model.num_kv_heads", f"must divide model.num_heads ({m.num_heads})")
    if m.seq_len < 8:
        fail("model.seq_len", "must be >= 8")
    t = spec.training
    for name in ("component_tokens", "batch_size", "grad_accum"):
        if getattr(t, name) <= 0:
            fail(f"training.{name}", "must be > 0")
    if m.pretrained is None and t.base_tokens <= 0:
        fail("training.base_tokens", "must be > 0 (or set model.pretrained)")
    if t.lr <= 0:
        fail("training.lr", "must be > 0")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        fail("training.min_lr_ratio", "must be in [0, 1]")
    if t.schedule not in ("cosine", "wsd"):
        fail("training.schedule", "must be 'cosine' or 'wsd'")
    if not 0.0 < t.decay_fraction <= 1.0:
        fail("training.decay_fraction", "must be in (0, 1]")
    if t.precision not in ("auto", "fp32", "bf16"):
        fail("training.precision", "must be 'auto', 'fp32' or 'bf16'")
    if t.parallel not in ("ddp", "fsdp"):
        fail("training.parallel", "must be 'ddp' or 'fsdp'")
    if not isinstance(t.activation_checkpointing, bool):
        fail("training.activation_checkpointing", "must be true or false")
    if t.storage_dtype not in STORAGE_DTYPES:
        fail("training.storage_dtype", f"must be {' or '.join(map(repr, STORAGE_DTYPES))}")
    for name in ("warmup_steps", "eval_every", "checkpoint_every", "eval_tokens"):
        if getattr(t, name) < 0:
            fail(f"training.{name}", "must be >= 0")


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Convert a YAML scalar to the annotated field type, or fail naming the field."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise MergeMixError(f"{where}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise MergeMixError(f"{where}: expected an integer, got {value!r}")
        try:
            as_float = float(str(value).replace("_", ""))
        except ValueError:
            raise MergeMixError(f"{where}: expected an integer, got {value!r}") from None
        if as_float != int(as_float):
            raise MergeMixError(f"{where}: expected an integer, got {value!r}")
        return int(as_float)
    if typ is float:
        if isinstance(value, bool):
            raise MergeMixError(f"{where}: expected a number, got {value!r}")
        try:
            return float(str(value).replace("_", ""))
        except ValueError:
            raise MergeMixError(f"{where}: expected a number, got {value!r}") from None
    if typ is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise MergeMixError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _section(cls: type, raw: Any, where: str) -> Any:
    """Build a flat dataclass from a mapping, refusing unknown keys."""
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise MergeMixError(f"{where}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise MergeMixError(
            f"{where}.{unknown[0]}: unknown key (known: {', '.join(sorted(known))})"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in raw.items()}
    return cls(**kwargs)


def _source(raw: Any, where: str, base_dir: Path) -> SourceSpec:
    if isinstance(raw, str):
        raw = {"files": raw}
    if not isinstance(raw, dict):
        raise MergeMixError(f"{where}: expected a mapping like {{files: 'docs/**/*.md'}}")
    kinds = [k for k in raw if k in SOURCE_KINDS]
    if len(kinds) != 1:
        raise MergeMixError(
            f"{where}: name exactly one source kind of {', '.join(SOURCE_KINDS)}"
            f" (got {', '.join(map(str, raw)) or 'none'})"
        )
    kind = kinds[0]
    optional = ("text_field", "split", "encoding", "max_file_bytes")
    extra = sorted(set(raw) - {kind, *optional})
    if extra:
        raise MergeMixError(
            f"{where}.{extra[0]}: unknown key (known: {kind}, {', '.join(optional)})"
        )
    location = raw[kind]
    if not isinstance(location, str) or not location.strip():
        raise MergeMixError(f"{where}.{kind}: must be a non-empty string")
    if kind == "builtin":
        if location not in BUILTIN_SOURCES:
            raise MergeMixError(
                f"{where}.builtin: unknown built-in corpus {location!r}"
                f" (known: {', '.join(BUILTIN_SOURCES)})"
            )
    else:
        expanded = Path(os.path.expandvars(os.path.expanduser(location)))
        location = str(expanded if expanded.is_absolute() else base_dir / expanded)
    text_field = _coerce(raw.get("text_field", "text"), str, f"{where}.text_field")
    split = raw.get("split")
    encoding = _coerce(raw.get("encoding"), str | None, f"{where}.encoding")
    if encoding is not None:
        if kind not in ("files", "jsonl", "json", "csv"):
            raise MergeMixError(
                f"{where}.encoding: only files, jsonl, json and csv sources are read as text"
            )
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise MergeMixError(f"{where}.encoding: unknown text encoding {encoding!r}") from None
    max_file_bytes = _coerce(raw.get("max_file_bytes"), int | None, f"{where}.max_file_bytes")
    if max_file_bytes is not None:
        if kind != "files":
            raise MergeMixError(f"{where}.max_file_bytes: only for files sources")
        if max_file_bytes <= 0:
            raise MergeMixError(f"{where}.max_file_bytes: must be > 0")
    return SourceSpec(
        kind=kind,
        location=location,
        text_field=text_field,
        split=None if split is None else str(split),
        encoding=encoding,
        max_file_bytes=max_file_bytes,
    )


def _domain_specs(raw: dict, where: str, base_dir: Path) -> tuple[DomainSpec, ...]:
    """Domains (or target sets) of a spec section: name -> {sources, max_bytes}."""
    domains: list[DomainSpec] = []
    for name, body in raw.items():
        # Names that look alike are one name: "café" typed two ways is one domain.
        name = unicodedata.normalize("NFC", str(name))
        dwhere = f"{where}.{name}"
        if name in [d.name for d in domains]:
            raise MergeMixError(
                f"{dwhere}: given twice (two names that are equal after Unicode NFC normalisation)"
            )
        if not isinstance(body, dict):
            raise MergeMixError(f"{dwhere}: expected a mapping with 'sources'")
        extra = sorted(set(body) - {"sources", "max_bytes"})
        if extra:
            raise MergeMixError(f"{dwhere}.{extra[0]}: unknown key (known: sources, max_bytes)")
        sources = body.get("sources")
        if not isinstance(sources, list) or not sources:
            raise MergeMixError(f"{dwhere}.sources: needs a non-empty list of sources")
        domains.append(
            DomainSpec(
                name=name,
                sources=tuple(
                    _source(s, f"{dwhere}.sources[{i}]", base_dir) for i, s in enumerate(sources)
                ),
                max_bytes=_coerce(body.get("max_bytes"), int | None, f"{dwhere}.max_bytes"),
            )
        )
    return tuple(domains)


def parse_source(raw: Any, where: str, base_dir: Path) -> SourceSpec:
    """One source as a spec lists it (a mapping like ``{jsonl: data.jsonl}``, or a glob
    string); relative paths are relative to `base_dir`."""
    return _source(raw, where, base_dir)


def check_target_names(targets: tuple[DomainSpec, ...], domains: list[str], where: str) -> None:
    """A target set's name must differ from every domain's and hold no '/'; no domain may
    be called ``targets`` (their data directory) once a pool has target sets."""
    for t in targets:
        if t.name in domains:
            raise MergeMixError(
                f"{where}: targets.{t.name}: also a domain's name; name the target set apart"
            )
        if "/" in t.name or not t.name.strip():
            raise MergeMixError(f"{where}: targets.{t.name}: a name must be non-empty, no '/'")
    if targets and "targets" in domains:
        raise MergeMixError(
            f"{where}: domains.targets: reserved for target sets' data (data/targets/)"
        )


def parse_spec(raw: Any, spec_path: Path) -> PoolSpec:
    """Turn the parsed YAML of a spec file into a checked `PoolSpec`."""
    where = str(spec_path)
    if not isinstance(raw, dict):
        raise MergeMixError(f"{where}: expected a YAML mapping at the top level")
    known = {f.name for f in dataclasses.fields(PoolSpec)} - {"spec_path"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise MergeMixError(
            f"{where}: {unknown[0]}: unknown key (known: {', '.join(sorted(known))})"
        )
    base_dir = spec_path.parent
    raw_domains = raw.get("domains")
    if not isinstance(raw_domains, dict) or not raw_domains:
        raise MergeMixError(f"{where}: domains: must map each domain name to its sources")
    domains = _domain_specs(raw_domains, f"{where}: domains", base_dir)
    raw_targets = raw.get("targets") or {}
    if not isinstance(raw_targets, dict):
        raise MergeMixError(f"{where}: targets: must map each target set's name to its sources")
    targets = _domain_specs(raw_targets, f"{where}: targets", base_dir)
    check_target_names(targets, [d.name for d in domains], where)
    name = _coerce(raw.get("name", spec_path.stem), str, f"{where}: name")
    out = Path(os.path.expandvars(os.path.expanduser(str(raw.get("output_dir", name)))))
    model = _section(ModelSpec, raw.get("model"), f"{where}: model")
    if model.pretrained is not None:
        p = Path(os.path.expandvars(os.path.expanduser(model.pretrained)))
        model = dataclasses.replace(model, pretrained=str(p if p.is_absolute() else base_dir / p))
    tok = _section(TokenizerSpec, raw.get("tokenizer"), f"{where}: tokenizer")
    if tok.path is not None:
        p = Path(os.path.expandvars(os.path.expanduser(tok.path)))
        tok = dataclasses.replace(tok, path=str(p if p.is_absolute() else base_dir / p))
    elif model.pretrained is not None:
        tok = dataclasses.replace(tok, path=model.pretrained)
    spec = PoolSpec(
        name=name,
        domains=domains,
        output_dir=out if out.is_absolute() else base_dir / out,
        spec_path=spec_path,
        seed=_coerce(raw.get("seed", 0), int, f"{where}: seed"),
        general_share=_coerce(raw.get("general_share", 0.5), float, f"{where}: general_share"),
        general_mix=_coerce(raw.get("general_mix", "uniform"), str, f"{where}: general_mix"),
        max_epochs=_coerce(raw.get("max_epochs", 4.0), float, f"{where}: max_epochs"),
        data=_section(DataSpec, raw.get("data"), f"{where}: data"),
        tokenizer=tok,
        model=model,
        training=_section(TrainingSpec, raw.get("training"), f"{where}: training"),
        targets=targets,
    )
    _check(spec, where)
    return spec


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a mapping key given twice (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` may be overridden by the mapping's own keys
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: the base class reports it
                break
            if duplicate:
                raise MergeMixError(
                    f"{self.name}: line {key_node.start_mark.line + 1}: duplicate key {key!r}"
                    " (YAML would keep only the last one)"
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: Path) -> Any:
    """Parse a YAML file safely, refusing duplicate keys; errors name the file and line."""
    text = path.read_text(encoding="utf-8")
    loader = _UniqueKeyLoader(text)
    loader.name = str(path)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        raise MergeMixError(f"{path}: not valid YAML{at}") from None
    finally:
        loader.dispose()


def load_spec(path: str | Path) -> PoolSpec:
    """Read and check a pool spec YAML file."""
    path = Path(path)
    if not path.is_file():
        raise MergeMixError(f"{path}: spec file not found")
    return parse_spec(load_yaml(path), path.resolve())


def builtin_spec_path(name: str = "demo") -> Path:
    """The spec shipped with the package (`pools/demo.yaml` in a checkout)."""
    checkout = Path(__file__).resolve().parent.parent / "pools" / f"{name}.yaml"
    if checkout.is_file():
        return checkout
    packaged = Path(__file__).resolve().parent / "specs" / f"{name}.yaml"
    if packaged.is_file():
        return packaged
    raise MergeMixError(f"no built-in pool spec named {name!r}")
