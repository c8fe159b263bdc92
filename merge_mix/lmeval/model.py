"""The ``merge-mix`` model type for lm-eval: a pool's components merged in memory.

lm-eval 0.4.13 (the pinned version) offers no way for an installed package to add a model
type to its own ``lm_eval`` command: model names resolve only against its built-in table and
classes already registered in the running process (docs/evaluation.md says what was
checked). So ``merge-mix lm-eval ARGS...`` (`run_lm_eval_cli`) runs lm-eval's command line
in this process with the type registered::

    merge-mix lm-eval --model merge-mix --model_args pool=pools/demo,weights=code:0.5,prose:0.5 \\
        --tasks mm_demo_code_ppl --include_path eval_tasks --output_path results

Results under ``--output_path`` go to a folder named after the pool and the mixture
(`run_name`, e.g. ``demo_weights_code=0.5_prose=0.5``), and the recorded ``device`` is the
one the model runs on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from merge_mix.errors import MergeMixError
from merge_mix.lmeval.score import hflm_bos_args, quiet_lm_eval
from merge_mix.lmeval.tasks import sanitise

logger = logging.getLogger(__name__)

MODEL_TYPE = "merge-mix"
# --model_args keys whose value is a NAME:VALUE list (commas there are not lm-eval's).
_ASSIGNMENT_KEYS = ("weights", "mixture")
_PAIR = re.compile(r"\s*[^=,:;]+:\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*")
# Longer run names are cut and given a hash (file names stop at 255 bytes).
_MAX_NAME = 120
_BATCH_SIZE = 16

_CLASSES: dict[str, type] = {}


def resolve_device(requested: str | None = None):
    """The torch device the ``merge-mix`` model type runs on for a requested device.

    None (or ``auto``): CUDA, then MPS, then CPU. A CUDA device on a machine without CUDA
    falls back to auto with a notice: lm-eval's command line asks for ``cuda:0`` unless
    told otherwise. A bare ``cuda`` gets the current device's index, so the device recorded
    with the results names the GPU."""
    import torch

    from merge_mix.model import pick_device

    if requested and str(requested).startswith("cuda") and not torch.cuda.is_available():
        logger.warning("device %s is not available; using auto", requested)
        requested = None
    device = pick_device(str(requested) if requested else "auto")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def run_name(
    pool_name: str,
    values: Mapping[str, float],
    kind: str = "weights",
    keep_base: Sequence[str] = (),
) -> str:
    """The name lm-eval gives the results folder of a ``merge-mix`` model: the pool, then
    ``weights`` or ``mixture`` (what the user gave) with each domain's value, e.g.
    ``demo_weights_code=0.5_c=0_prose=0.5``; ``keep_base`` patterns add a hash of them.
    Values keep 4 significant digits; a name over 120 characters is cut and ends with a
    hash of the exact values."""
    exact = json.dumps(
        {"values": {d: float(v) for d, v in values.items()}, "keep_base": list(keep_base)},
        sort_keys=True,
    )
    digest = hashlib.sha256(exact.encode()).hexdigest()[:8]
    pairs = "_".join(f"{sanitise(d)}={float(v):.4g}" for d, v in values.items())
    name = f"{sanitise(pool_name)}_{kind}_{pairs}"
    if keep_base:
        name += "_keep_base=" + hashlib.sha256("\n".join(keep_base).encode()).hexdigest()[:8]
    if len(name) > _MAX_NAME:
        name = f"{name[: _MAX_NAME - 9]}_{digest}"
    return name


def register_model_type() -> type:
    """Register the ``merge-mix`` lm-eval model type (idempotent) and return its class.

    ``--model merge-mix --model_args pool=PATH,weights=code:0.5;prose:0.5`` merges the
    pool's components in memory. Arguments: ``pool`` (required); ``weights`` (merge weights:
    ``uniform``, ``natural``, a domain, or ``NAME:VALUE`` pairs) or ``mixture`` (an effective
    data mixture, converted with the pool's general_share); ``keep_base`` (``;``-separated
    parameter-name patterns kept at the base); ``extrapolate``; ``stream``; ``device``;
    ``batch_size``; ``max_length`` (default: the pool's seq_len); ``verify`` (``cached`` or
    ``full``: how the pool's weights are checked against their sha256); ``model`` (the
    name of the results folder; default `run_name`); other HFLM arguments."""
    if MODEL_TYPE in _CLASSES:
        return _CLASSES[MODEL_TYPE]
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM

    class MergeMixLM(HFLM):
        """An HFLM over ``theta(w)``, merged in memory from a merge-mix pool."""

        def __init__(
            self,
            pool: str,
            weights: Any = None,
            mixture: Any = None,
            keep_base: str | Sequence[str] | None = None,
            extrapolate: bool = False,
            stream: bool = False,
            device: str | None = None,
            batch_size: int | str = _BATCH_SIZE,
            max_length: int | None = None,
            verify: str = "cached",
            model: str | None = None,
            **kwargs,
        ):
            from merge_mix.merge import effective_mixture, merger_for_pool, resolve_weights
            from merge_mix.pool import Pool
            from merge_mix.tokens import load_tokenizer

            opened = Pool.open(str(pool))
            stray = [k for k in kwargs if k in opened.domains]
            if stray:
                raise MergeMixError(
                    f"model_args: {stray[0]}={kwargs[stray[0]]} looks like a merge weight; write"
                    " weights=code:0.5,prose:0.5 (NAME:VALUE: `=` starts a new model argument)"
                )
            if weights is not None and mixture is not None:
                raise MergeMixError("model_args: give weights= or mixture=, not both")
            spec = mixture if mixture is not None else weights
            spec = "uniform" if spec is None else spec
            if not isinstance(spec, dict):
                spec = str(spec)
            if isinstance(keep_base, str):
                keep_base = [p for p in keep_base.replace(",", ";").split(";") if p.strip()]
            keep_base = tuple(keep_base or ())
            w = resolve_weights(
                spec,
                opened.domains,
                natural=opened.natural_mixture(),
                general_share=opened.general_share,
                general=opened.general_mixture(),
                as_mixture=mixture is not None,
                extrapolate=bool(extrapolate),
                notice=logger.warning,
            )
            torch_device = resolve_device(device)
            self.pool = opened
            self.merger = merger_for_pool(
                opened, torch_device, keep_base, bool(stream), str(verify)
            )
            self.merge_weights = dict(zip(opened.domains, map(float, w), strict=True))
            mix = effective_mixture(w, opened.general_share, opened.general_mixture())
            self.effective_mixture = dict(zip(opened.domains, map(float, mix), strict=True))
            if mixture is not None:
                named = run_name(opened.name, self.effective_mixture, "mixture", keep_base)
            else:
                named = run_name(opened.name, self.merge_weights, "weights", keep_base)
            self.run_name = str(model) if model else named
            merged = self.merger.merge(w)
            tokenizer = load_tokenizer(opened.tokenizer_dir)
            with quiet_lm_eval():
                super().__init__(
                    pretrained=merged,
                    tokenizer=tokenizer,
                    batch_size=batch_size,
                    max_length=int(max_length) if max_length else opened.seq_len,
                    **{**hflm_bos_args(tokenizer), **kwargs},
                )

        @classmethod
        def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
            # --model_args win over lm-eval's CLI-wide options (--device, --batch_size), which
            # would otherwise be passed twice.
            extra = {
                k: v
                for k, v in (additional_config or {}).items()
                if v is not None and k not in arg_dict
            }
            lm = cls(**arg_dict, **extra)
            # lm-eval names the --output_path folder after the `model` (or `pretrained`,
            # `path`, ...) entry of this same dict, which simple_evaluate reads after building
            # the model; without one it picks a random name.
            arg_dict.setdefault("model", lm.run_name)
            return lm

        @classmethod
        def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
            from lm_eval.utils import simple_parse_args_string

            return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

        def get_model_info(self) -> dict:
            return {
                "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(self.model.dtype),
                "pool": str(self.pool.path.resolve()),
                "merge_weights": self.merge_weights,
                "effective_mixture": self.effective_mixture,
            }

    register_model(MODEL_TYPE)(MergeMixLM)
    _CLASSES[MODEL_TYPE] = MergeMixLM
    return MergeMixLM


def _rewrite_assignments(value: str) -> str:
    """``pool=P,weights=code:0.5,prose:0.5`` -> ``pool=P,weights=code:0.5;prose:0.5``."""
    if value.lstrip().startswith("{"):  # lm-eval's JSON form needs nothing
        return value
    out: list[str] = []
    in_assignment = False
    for part in value.split(","):
        if out and in_assignment and _PAIR.fullmatch(part):
            out[-1] += ";" + part
            continue
        out.append(part)
        in_assignment = part.split("=", 1)[0].strip() in _ASSIGNMENT_KEYS
    return ",".join(out)


def rewrite_model_args(argv: Sequence[str]) -> list[str]:
    """Protect commas inside ``weights=``/``mixture=`` values of ``--model_args``/``-a``."""
    out: list[str] = []
    in_model_args = False
    for arg in argv:
        if arg in ("--model_args", "-a"):
            in_model_args = True
            out.append(arg)
        elif arg.startswith("--model_args="):
            in_model_args = False
            out.append("--model_args=" + _rewrite_assignments(arg.split("=", 1)[1]))
        elif in_model_args and not arg.startswith("-"):
            out.append(_rewrite_assignments(arg))
        else:
            in_model_args = False
            out.append(arg)
    return out


def _settle_run_args(args) -> None:
    """Give a ``merge-mix`` run lm-eval's ``--device`` and ``--batch_size`` values that are
    true of it, since lm-eval records them with the results: the device the model will
    run on (lm-eval's default ``cuda:0`` would be recorded on a CPU run) and our default
    batch size (lm-eval's is 1). Precedence as lm-eval's: command line, then ``--config``."""
    from lm_eval.config.evaluate_config import EvaluatorConfig
    from lm_eval.utils import simple_parse_args_string

    if getattr(args, "command", None) != "run":
        return
    config = EvaluatorConfig.load_yaml_config(args.config) if getattr(args, "config", None) else {}
    if (args.model or config.get("model")) != MODEL_TYPE:
        return
    model_args = args.model_args or config.get("model_args") or {}
    if isinstance(model_args, str):
        model_args = simple_parse_args_string(model_args)
    requested = model_args.get("device") or args.device or config.get("device")
    device = str(resolve_device(requested))
    args.device = device
    if isinstance(args.model_args, dict) and "device" in args.model_args:
        args.model_args["device"] = device
    if "batch_size" not in vars(args) and "batch_size" not in config:
        args.batch_size = str(model_args.get("batch_size", _BATCH_SIZE))


def run_lm_eval_cli(argv: Sequence[str]) -> int:
    """Run lm-eval's command line with the ``merge-mix`` model type; return its exit code.

    Every lm-eval option works (``--tasks``, ``--include_path``, ``--limit``,
    ``--output_path``, ``--log_samples``, ...). With ``--model merge-mix``, ``--model_args``
    takes ``pool=PATH`` and ``weights=NAME:VALUE,NAME:VALUE`` (or ``mixture=...``; the
    commas between pairs are kept), plus ``keep_base``, ``extrapolate``, ``stream``,
    ``device``, ``batch_size``, ``max_length``, ``model`` (the results folder's name).
    Example::

        merge-mix lm-eval --model merge-mix \\
            --model_args pool=pools/demo,weights=code:0.5,prose:0.5 \\
            --tasks mm_demo_code_ppl,mm_demo_code_choice --include_path eval_tasks

    Results under ``--output_path`` go to ``<pool>_weights_<domain>=<value>_...`` (or
    ``_mixture_``), and the recorded ``device`` is the one the model ran on. lm-eval's
    built-in tasks read their datasets from the datasets cache or the hub, as lm-eval's own
    CLI does (this wrapper does not turn the network off)."""
    register_model_type()
    # What lm-eval's `cli_evaluate` does, with the run's arguments settled in between.
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    saved = sys.argv
    sys.argv = ["lm-eval", *rewrite_model_args(list(argv))]
    try:
        setup_logging()
        parser = HarnessCLI()
        args = parser.parse_args()
        _settle_run_args(args)
        parser.execute(args)
    except SystemExit as exc:
        if exc.code is None:
            return 0
        if isinstance(exc.code, int):
            return exc.code
        print(exc.code, file=sys.stderr)
        return 1
    finally:
        sys.argv = saved
    return 0
