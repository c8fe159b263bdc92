"""The command line: `--json` on every command that prints results (stdout is exactly one
JSON document with the facts of the text output), and options that repeat the default of a
config field or a stage function's keyword, checked against their source."""

from __future__ import annotations

import dataclasses
import inspect
import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from merge_mix.cli import main

STDLIB = Path(sysconfig.get_paths()["stdlib"])
DOMAINS = ["code", "c", "prose"]


def _run(*args: str) -> dict:
    """Run `merge-mix ARGS`; the one JSON document its stdout holds."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # fails on anything but exactly one JSON document


def _copy_pool(tiny_pool: Path, dest: Path) -> Path:
    shutil.copytree(tiny_pool, dest)
    shutil.rmtree(dest / "work", ignore_errors=True)
    return dest


# ---------------------------------------------------------------------------------------
# --json


def test_pool_show_json_has_the_tables_facts(tiny_pool):
    out = _run("pool", "show", tiny_pool, "--json")
    manifest = json.loads((tiny_pool / "manifest.json").read_text())
    assert out["pool"] == "tiny" and out["complete"] is True and out["damaged"] == {}
    assert out["components"] == 3 and list(out["domains"]) == DOMAINS
    assert out["parameters"] == manifest["model"]["parameters"]
    for d in DOMAINS:
        row, data = out["domains"][d], manifest["data"][d]
        assert row["train_tokens"] == data["train"]["tokens"] > 0
        assert row["test"] == {k: data["test"][k] for k in ("tokens", "documents")}
        assert row["component"]["tokens_seen"] == manifest["components"][d]["tokens_seen"]
        assert row["component"]["imported"] is False
    base_code = manifest["base"]["heldout"]["code"]["loss"]
    assert out["heldout_loss"]["base"]["code"] == base_code
    assert set(out["heldout_loss"]) == {"base", *DOMAINS}
    # The same numbers the table prints.
    table = CliRunner().invoke(main, ["pool", "show", str(tiny_pool)]).stdout
    assert f"{base_code:.4f}" in table and f"{row['train_tokens']:,}" in table


def test_export_json_names_what_it_wrote(tiny_pool, tmp_path):
    out = _run("export", tiny_pool, tmp_path / "proxy", "--weights", "code=0.5,c=0.25,prose=0.25",
               "--device", "cpu", "--json")  # fmt: skip
    assert Path(out["path"]) == tmp_path / "proxy"
    assert Path(out["mergekit_config"]).is_file()
    assert out["merge_weights"] == {"code": 0.5, "c": 0.25, "prose": 0.25}
    assert sum(out["effective_mixture"].values()) == pytest.approx(1.0)
    record = json.loads((tmp_path / "proxy" / "merge_mix_export.json").read_text())
    assert out["sha256"] == record["sha256"] and len(out["sha256"]) == 64


@pytest.fixture(scope="module")
def searched(tiny_pool, tmp_path_factory):
    """`search --json` on the tiny pool, progress bars on (they go to stderr)."""
    run = tmp_path_factory.mktemp("cli-search") / "run"
    args = ["search", str(tiny_pool), "--run-dir", str(run), "--n-trials", "4"]
    args += ["--heldout-tokens", "600", "--gradient-steps", "1", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return run, result


def test_search_json_is_the_summary(searched):
    run, result = searched
    out = json.loads(result.stdout)
    best = json.loads((run / "best.json").read_text())
    assert out["best"]["number"] == best["number"]
    assert out["best"]["merge_weights"] == best["merge_weights"]
    assert out["domains"] == DOMAINS
    assert out["n_trials"] == len((run / "trials.jsonl").read_text().splitlines())
    verdict = json.loads((run / "verdict.json").read_text())
    assert out["verdict"]["sentence"] == verdict["sentence"]
    gradient = json.loads((run / "gradient.json").read_text())
    assert out["gradient"]["objective"] == gradient["objective"]
    assert Path(out["report_html"]).is_file()
    assert "search [main]" in result.stderr  # the progress bar, kept off stdout


def test_report_json_is_the_headline_and_files(searched):
    run, _ = searched
    out = _run("report", run, "--json")
    text = CliRunner().invoke(main, ["report", str(run)]).stdout
    assert text.splitlines()[0] == out["headline"]
    verdict = json.loads((run / "verdict.json").read_text())
    assert out["verdict"] == verdict["verdict"]
    assert out["beats_uniform"] == (verdict["verdict"] == "better")
    assert Path(out["html"]) == run / "report.html" and Path(out["markdown"]).is_file()
    assert {Path(p).name for p in out["plots"]} >= {"objective_over_trials.png"}


def test_eval_json_stdout_is_one_document(tiny_pool):
    out = _run("eval", tiny_pool, "--weights", "uniform", "--weights", "code",
               "--heldout-tokens", "600", "--device", "cpu", "--json")  # fmt: skip
    assert [m["name"] for m in out["mixtures"]] == ["uniform", "code"]
    assert out["mixtures"][1]["merge_weights"] == {"code": 1.0, "c": 0.0, "prose": 0.0}
    assert (
        out["mixtures"][1]["mean_loss_vs_first"]["lo"]
        < out["mixtures"][1]["mean_loss_vs_first"]["hi"]
    )


def test_make_tasks_and_plan_json(tiny_pool, tmp_path):
    out = _run("make-tasks", tiny_pool, "--out", tmp_path / "tasks", "--max-docs", "5", "--json")
    assert out["split"] == "search"
    assert out["tasks"][:2] == ["mm_tiny_code_ppl", "mm_tiny_code_choice"]
    assert len(out["tasks"]) == 6
    assert all((tmp_path / "tasks" / "tiny" / f"{t}.yaml").is_file() for t in out["tasks"])
    plan = _run("plan", tiny_pool, "--out", tmp_path / "recipes", "--json")
    assert list(plan["recipes"]) == DOMAINS
    recipe = json.loads(Path(plan["recipes"]["c"]).read_text())
    assert recipe["domain"] == "c"


def test_pool_import_and_add_target_json(tiny_pool, tmp_path):
    pool = _copy_pool(tiny_pool, tmp_path / "pool")
    original = json.loads((tiny_pool / "components" / "c" / "component.json").read_text())
    ext = tmp_path / "trained-c"
    shutil.copytree(tiny_pool / "components" / "c", ext)
    (ext / "component.json").unlink()
    mixture = ",".join(f"{d}={v}" for d, v in original["training_mixture"].items())
    out = _run("pool", "import", pool, "--domain", "c", "--model", ext, "--mixture", mixture,
               "--tokens", original["tokens_seen"], "--replace", "--json")  # fmt: skip
    assert out["role"] == "component" and out["name"] == "c"
    assert out["sha256"] == original["sha256"]  # the same bytes
    assert out["pool"]["domains"]["c"]["component"]["imported"] is True

    out = _run("pool", "add-target", pool, "mail", "--source", STDLIB / "smtplib.py",
               "--source", STDLIB / "imaplib.py", "--json")  # fmt: skip
    data = json.loads((pool / "data" / "data.json").read_text())["targets"]["mail"]
    assert out["target_set"] == "mail"
    assert out["search"] == data["search"] and out["test"] == data["test"]
    assert out["search"]["documents"] + out["test"]["documents"] >= 2


def test_train_components_json_is_the_pool(tiny_pool, tiny_spec_path, tmp_path):
    pool = _copy_pool(tiny_pool, tmp_path / "pool")
    raw = yaml.safe_load(tiny_spec_path.read_text())
    raw["output_dir"] = str(pool)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    out = _run("train-components", spec, "--quiet", "--json")
    assert out == _run("pool", "show", pool, "--json")
    assert out["complete"] is True


def test_validate_json_is_validation_json(tiny_pool, tmp_path):
    pool = _copy_pool(tiny_pool, tmp_path / "pool")
    out = _run("validate", pool, "-n", "4", "--reference-tokens", "2048", "--seeds", "1",
               "--n-boot", "100", "--heldout-tokens", "600", "--device", "cpu", "--json")  # fmt: skip
    written = json.loads((pool / "validation" / "validation.json").read_text())
    assert out == written
    assert [m["label"] for m in out["mixtures"]][:2] == ["uniform", "natural"]


def test_python_dash_m_runs_the_cli():
    done = subprocess.run(
        [sys.executable, "-m", "merge_mix.cli", "--version"], capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout.strip() == "merge-mix, version 0.1.0"


# ---------------------------------------------------------------------------------------
# One source for defaults: options against the dataclasses and stage functions they feed


def _params(*path: str, args: tuple[str, ...] = ()) -> dict:
    """The values `merge-mix PATH ARGS` hands its command when no option is given."""
    command = main
    for name in path:
        command = command.commands[name]
    return command.make_context(" ".join(path), list(args)).params


def _field_defaults(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls)}


def _keyword_defaults(fn) -> dict:
    return {
        name: p.default
        for name, p in inspect.signature(fn).parameters.items()
        if p.default is not inspect.Parameter.empty and name != "self"
    }


def _same(a, b) -> bool:
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return list(a) == list(b)
    if isinstance(a, Path) or isinstance(b, Path):
        return str(a) == str(b)
    return a == b


NOT_AN_OPTION = object()


def _check(source_defaults: dict, params: dict, mapping: dict) -> None:
    """`mapping`: source name -> option parameter name, ("not", param) for an inverted flag,
    or (NOT_AN_OPTION, reason). Every source name must be in it."""
    assert set(mapping) == set(source_defaults), "a field without an option or a reason"
    for name, option in mapping.items():
        if isinstance(option, tuple) and option[0] is NOT_AN_OPTION:
            continue
        if isinstance(option, tuple) and option[0] == "not":
            value = not params[option[1]]
        else:
            value = params[option]
        if option == "tasks":
            value = [t for t in value.split(",") if t]
        assert _same(value, source_defaults[name]), (name, value, source_defaults[name])


def _no(reason: str) -> tuple:
    return (NOT_AN_OPTION, reason)


SEARCH_ARGS = ("POOL", "--run-dir", "RUN")
SCORER = {  # ProxyScorer keyword -> option, shared by eval and search
    "device": "device",
    "heldout_tokens": "heldout_tokens",
    "keep_base": "keep_base",
    "stream": "stream",
    "stack_dtype": "stack_dtype",
    "stack_device": "stack_device",
    "lmeval_tasks": _no("--tasks, a comma-separated string"),
    "lmeval_include": "include_path",
    "lmeval_limit": "limit",
    "verify": "verify",
    "precision": _no("fp32 everywhere, so proxy scores compare across machines"),
    "batch_size": _no("a throughput knob with no effect on scores"),
    "calibration": _no("built from the pool by --calibrated"),
    "notice": _no("the CLI's stderr"),
}


def test_search_options_match_search_config():
    from merge_mix.search.config import SAMPLERS, SearchConfig

    params = _params("search", args=SEARCH_ARGS)
    mapping = {
        "sampler": "sampler",
        "n_trials": "n_trials",
        "worker": "worker",
        "seed": "seed",
        "storage": "storage",
        "budget_tokens": "heldout_tokens",
        "grid_step": "grid_step",
        "temperature": "temperature",
        "train_tokens": "train_tokens",
        "max_epochs": "max_epochs",
        "caps": "caps",
        "halving": "halving",
        "eta": "eta",
        "rungs": "rungs",
        "halving_verify": "halving_verify",
        "surrogate": "surrogate",
        "progress": ("not", "quiet"),
        "study_name": _no("one study per run directory or storage"),
        "strength": _no("a sampler internal; a YAML config can set it"),
        "min_weight": _no("a sampler internal (DeMix's value)"),
        "dedup_tol": _no("a sampler internal"),
        "surrogate_candidates": _no("a surrogate internal"),
        "top_k": _no("a surrogate internal"),
        "folds": _no("a surrogate internal"),
    }
    _check(_field_defaults(SearchConfig), params, mapping)
    sampler = next(p for p in main.commands["search"].params if p.name == "sampler")
    assert set(sampler.type.choices) == set(SAMPLERS)


def test_search_options_match_gradient_config_and_the_scorer():
    from merge_mix.proxy import ProxyScorer
    from merge_mix.search.gradient import GradientConfig

    params = _params("search", args=SEARCH_ARGS)
    mapping = {
        "steps": "gradient_steps",
        "method": "gradient_method",
        "lr": _no("tuned with the method; see docs/search.md"),
        "train_tokens": _no("the gradient's training slice; a fixed internal"),
        "min_weight": _no("a mirror-descent internal"),
    }
    _check(_field_defaults(GradientConfig), params, mapping)
    scorer = {k: v for k, v in _keyword_defaults(ProxyScorer.__init__).items()}
    _check(scorer, params, {**SCORER, "split": _no("search scores the search split")})


def test_eval_options_match_the_scorer():
    from merge_mix.merge import STACK_DTYPES
    from merge_mix.proxy import ProxyScorer

    _check(
        _keyword_defaults(ProxyScorer.__init__),
        _params("eval", args=("POOL",)),
        {**SCORER, "split": "split"},
    )
    stack_dtype = next(p for p in main.commands["eval"].params if p.name == "stack_dtype")
    assert set(stack_dtype.type.choices) == {"auto", *STACK_DTYPES}


def test_validate_options_match_validate():
    from merge_mix.validate import validate

    mapping = {
        "mixtures": "mixtures",
        "run_dir": "run_dir",
        "n_references": "n_references",
        "seed": "seed",
        "heldout_tokens": "heldout_tokens",
        "device": "device",
        "keep_base": "keep_base",
        "n_boot": "n_boot",
        "show_progress": ("not", "quiet"),
        "out_dir": "out",
        "reference_tokens": "reference_tokens",
        "top_picks": "top_picks",
        "step_callback": _no("a test hook"),
        "lmeval_tasks": "tasks",
        "lmeval_include": "include_path",
        "lmeval_limit": "limit",
        "objective": "objective",
        "seeds": "seeds",
        "seed_mixtures": "seed_mixtures",
        "verify": "verify",
    }
    _check(_keyword_defaults(validate), _params("validate", args=("POOL",)), mapping)


def test_make_tasks_and_import_options_match_their_functions(tmp_path):
    from merge_mix.lmeval import make_tasks
    from merge_mix.pool_import import import_model

    mapping = {
        "out_dir": "out",
        "max_docs_per_domain": "max_docs",
        "n_choices": "n_choices",
        "seed": "seed",
        "continuation_tokens": "continuation_tokens",
        "split": "split",
    }
    _check(_keyword_defaults(make_tasks), _params("make-tasks", args=("POOL",)), mapping)
    args = ("POOL", "--model", "M", "--mixture", "code=1", "--tokens", "1")
    mapping = {k: k for k in ("domain", "role", "seed", "replace", "device", "wall_time_s")}
    _check(_keyword_defaults(import_model), _params("pool", "import", args=args), mapping)


def test_help_shows_every_non_empty_default():
    """Options with a default show it in --help, so the help text says what is used."""
    commands = [(n, c) for n, c in main.commands.items() if not isinstance(c, click.Group)]
    commands += [(f"pool {n}", c) for n, c in main.commands["pool"].commands.items()]
    for name, command in commands:
        for p in command.params:
            if not isinstance(p, click.Option) or p.is_flag or p.multiple:
                continue
            # Unset defaults are a sentinel object in click 8.3: only real values count.
            shown = isinstance(p.default, (int, float, str, Path)) and p.default != ""
            if shown and not p.show_default:
                pytest.fail(f"{name} {p.opts[0]}: default {p.default!r} not shown in --help")
