"""Training runs from a TOML (or, with pyyaml installed, YAML) file: ``moekit train CONFIG``.

Sections (all optional except that the model needs sizes you want; defaults are the dataclass defaults)::

    [run]    out_dir = "runs/moe", name = "moe", seed = 0, dense_baseline = false
    [data]   DataConfig fields (source = "kjv" or a path, vocab_size, val_every, ...)
    [model]  LMConfig fields; vocab_size may be left out (taken from the tokenizer)
    [model.router_options]  router constructor options
    [train]  TrainConfig fields

An unknown section or key, or a value of the wrong type, raises ValueError naming the file and the key
(``"demo.toml: [train] lr: expected a number, got 'fast' (str)"``), before anything is written.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moekit.models import LMConfig
from moekit.training.config import DataConfig, TrainConfig


@dataclass(frozen=True)
class RunSection:
    """Where and what to run."""

    out_dir: str = "moekit-run"
    name: str = "moe"
    seed: int = 0  # model initialisation (the data order is train.seed)
    dense_baseline: bool = False  # also train LMConfig.dense_baseline() with the same settings

    def __post_init__(self) -> None:
        if not isinstance(self.out_dir, str) or not self.out_dir:
            raise ValueError(f"RunSection.out_dir must be a non-empty string, got {self.out_dir!r}")
        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            raise ValueError(f"RunSection.name must be a non-empty name without '/', got {self.name!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"RunSection.seed must be an int >= 0, got {self.seed!r}")


@dataclass(frozen=True)
class RunConfig:
    """A parsed config file. ``model_vocab_given``: whether the file set ``model.vocab_size``."""

    run: RunSection
    data: DataConfig
    model: LMConfig
    train: TrainConfig
    path: str = ""
    model_vocab_given: bool = False
    raw: dict = field(default_factory=dict)


_CAPTIONS = {
    "loss_curves": "Loss vs steps and wall-clock",
    "routing_curves": "Routing statistics",
    "load_heatmap": "Expert load over training",
}
SECTIONS = {"run": RunSection, "data": DataConfig, "model": LMConfig, "train": TrainConfig}


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"config file {str(path)!r} is not valid UTF-8 (byte {exc.start})") from exc
    suffix = path.suffix.lower()
    if suffix == ".toml":
        import tomllib

        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"config file {str(path)!r} is not valid TOML: {exc}") from exc
    elif suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as exc:
            raise ValueError(
                f"config file {str(path)!r} is YAML, which needs pyyaml (pip install pyyaml); "
                "or write the config as TOML"
            ) from exc
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
        doc = {} if doc is None else doc
    else:
        raise ValueError(f"config file {str(path)!r}: unknown format {suffix!r} (use .toml, .yaml or .yml)")
    if not isinstance(doc, dict):
        raise ValueError(f"config file {str(path)!r} must hold a table / mapping at the top level")
    return doc


def _type_name(value: Any) -> str:
    return type(value).__name__


def _matches(value: Any, annotation: Any) -> bool:
    """Whether ``value`` fits ``annotation`` (int, float, str, bool, dict, list, X | None)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if annotation is dict or origin is dict:
        return isinstance(value, dict)
    if annotation in (list, tuple) or origin in (list, tuple):
        return isinstance(value, (list, tuple))
    return True  # unknown annotation: leave it to the dataclass validation


def _describe(annotation: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a table"}
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(a) for a in typing.get_args(annotation) if a is not type(None)]
        none = type(None) in typing.get_args(annotation)
        return " or ".join(parts) + (" (or omitted)" if none else "")
    if origin is dict:
        return "a table"
    return names.get(annotation, str(annotation))


def _section(path: Path, name: str, cls: type, values: Any) -> dict[str, Any]:
    """Check one section's keys and value types against ``cls``'s fields."""
    where = f"config file {str(path)!r}: [{name}]"
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a table, got {_type_name(values)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in fields:
            raise ValueError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(fields))})")
        if value is None:
            continue  # TOML has no null; YAML's null means "default / None" and the dataclass checks it
        if not _matches(value, hints[key]):
            raise ValueError(f"{where} {key}: expected {_describe(hints[key])}, got {value!r} ({_type_name(value)})")
    out = dict(values)
    for key, value in values.items():
        if isinstance(value, list):
            out[key] = tuple(value)
        if hints[key] is float or hints[key] == (float | None):
            if isinstance(value, int) and not isinstance(value, bool):
                out[key] = float(value)
    return out


def load_config(path: str | Path) -> RunConfig:
    """Parse and validate a config file into typed dataclasses (errors name the file and the key)."""
    path = Path(path)
    doc = _read(path)
    unknown = sorted(set(doc) - set(SECTIONS))
    if unknown:
        raise ValueError(f"config file {str(path)!r}: unknown section {unknown[0]!r} (known: {', '.join(SECTIONS)})")
    parsed = {name: _section(path, name, cls, doc.get(name, {})) for name, cls in SECTIONS.items()}
    built: dict[str, Any] = {}
    for name in ("run", "data", "train"):
        try:
            built[name] = SECTIONS[name](**parsed[name])
        except (ValueError, TypeError) as exc:
            raise ValueError(f"config file {str(path)!r}: [{name}] {exc}") from exc
    model_kw = dict(parsed["model"])
    vocab_given = "vocab_size" in model_kw
    model_kw.setdefault("vocab_size", built["data"].vocab_size)
    try:
        model = LMConfig(**model_kw)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"config file {str(path)!r}: [model] {exc}") from exc
    if model.max_seq_len < built["train"].block_size:
        raise ValueError(
            f"config file {str(path)!r}: [model] max_seq_len={model.max_seq_len} is smaller than "
            f"[train] block_size={built['train'].block_size}"
        )
    if built["train"].dynmoe_adapt_every and (model.router != "dynmoe" or not model.num_experts):
        raise ValueError(
            f"config file {str(path)!r}: [train] dynmoe_adapt_every={built['train'].dynmoe_adapt_every} needs "
            f'[model] router = "dynmoe" with num_experts > 0, got router={model.router!r}, '
            f"num_experts={model.num_experts}"
        )
    return RunConfig(built["run"], built["data"], model, built["train"], str(path), vocab_given, doc)


def train_from_config(
    path: str | Path,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool | None = None,
    overwrite: bool = False,
    data_source: str | Path | None = None,
) -> dict[str, Any]:
    """``moekit train CONFIG``: train the configured model (and its dense baseline if ``run.dense_baseline``),
    write metrics, checkpoints, plots and ``report.md`` to ``out_dir`` (default: ``run.out_dir``).

    ``resume=True`` continues from the latest checkpoints in that folder (the tokenizer saved there is
    reused); otherwise a folder holding checkpoints is refused unless ``overwrite=True``. Returns a JSON-able
    summary (also written as ``summary.json``). ``data_source`` (a UTF-8 text file or folder, or ``"kjv"``)
    replaces the config's ``[data] source``.
    """
    from dataclasses import replace

    from moekit.training._io import atomic_write_json
    from moekit.training.checkpoint import latest_checkpoint
    from moekit.training.plots import plot_loss_curves, plot_routing_curves
    from moekit.training.prepare import prepare_data
    from moekit.training.report import image_section, markdown_table, write_report
    from moekit.training.runs import routing_summary, train_run

    cfg = load_config(path)
    if data_source is not None:  # ``--data PATH`` overrides ``[data] source``
        cfg = replace(cfg, data=replace(cfg.data, source=str(data_source)))
    out = Path(out_dir) if out_dir is not None else Path(cfg.run.out_dir)
    data = prepare_data(cfg.data, cfg.train, out)
    model_cfg = cfg.model
    if not cfg.model_vocab_given:
        model_cfg = replace(model_cfg, vocab_size=data.vocab_size)
    elif model_cfg.vocab_size < data.vocab_size:
        raise ValueError(
            f"config file {str(path)!r}: [model] vocab_size={model_cfg.vocab_size} is smaller than the "
            f"tokenizer's {data.vocab_size}"
        )
    runs = {cfg.run.name: model_cfg}
    if cfg.run.dense_baseline:
        runs["dense"] = model_cfg.dense_baseline()
    if not resume and not overwrite:  # refuse before training anything, not half-way through
        for name in runs:
            if latest_checkpoint(out / name / "checkpoints") is not None:
                raise ValueError(
                    f"{str(out / name / 'checkpoints')!r} already holds checkpoints of an earlier run; "
                    "pass resume=True (--resume) to continue, overwrite=True (--overwrite) to replace them, "
                    "or choose another out_dir"
                )
    extra = {"config_file": str(Path(path).resolve()), "data_config": cfg.data.to_dict()}
    train_cfgs = {name: cfg.train for name in runs}
    if "dense" in runs:  # the dense baseline has no experts to add or remove
        train_cfgs["dense"] = replace(cfg.train, dynmoe_adapt_every=0)
    outcomes = {
        name: train_run(name, mc, train_cfgs[name], data, out / name, cfg.run.seed, progress, resume, extra, overwrite)
        for name, mc in runs.items()
    }
    files = {"loss_curves": str(plot_loss_curves({n: o.rows for n, o in outcomes.items()}, out / "loss.png"))}
    main = outcomes[cfg.run.name]
    if main.trainer.monitor is not None:
        files["routing_curves"] = str(plot_routing_curves(main.rows, out / "routing_curves.png"))
        files["load_heatmap"] = str(main.trainer.monitor.plot_load_heatmap(out / "load_heatmap.png"))
    summary = {
        "config": str(path),
        "out_dir": str(out),
        "runs": {n: {**o.result.to_dict(), "routing_summary": routing_summary(o.result)} for n, o in outcomes.items()},
        "files": files,
    }
    rows = [
        (
            n,
            o.result.steps,
            o.result.final_val_loss,
            o.result.tokens_per_s,
            o.result.param_counts.get("active"),
        )
        for n, o in outcomes.items()
    ]
    write_report(
        out / "report.md",
        f"moekit train {Path(path).name}",
        [
            markdown_table(["run", "steps", "val loss", "tokens/s", "active params"], rows),
            image_section("Plots", {_CAPTIONS[k]: v for k, v in files.items()}, out),
        ],
    )
    atomic_write_json(out / "summary.json", summary)
    return summary
