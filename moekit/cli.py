"""The ``moekit`` command line: thin wrappers that parse options, call the library and print with rich.

Each command is one small function; heavy imports happen inside it, so ``moekit --help`` stays fast.
Groups: ``moekit bench <name>`` (layer now; lm, hf, edge, ep, retrieval, tabular later). Top-level commands
to come (demo, train, generate, convert, compare-routers) are added the same way: ``@app.command(...)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="moekit",
    help="Mixture-of-Experts end to end: routers, dispatch, training, edge inference, retrieval and tabular.",
    no_args_is_help=True,
    add_completion=False,
)
bench_app = typer.Typer(
    help="Benchmarks: print a table and write benchmarks/results/<name>.json.", no_args_is_help=True
)
app.add_typer(bench_app, name="bench")

#: Set to 1 to make ``moekit bench ...`` run its tiny test-sized cases (as the hidden ``--tiny`` option does).
TINY_ENV = "MOEKIT_BENCH_TINY"


def _console() -> Console:
    return Console()  # made per call so that redirected stdout (tests, pipes) is honoured


# ------------------------------------------------------------------------------------------ option checks
def _check_threads(value: int | None) -> int | None:
    if value is not None and value < 1:
        raise typer.BadParameter(f"must be a positive number of threads, got {value}")
    return value


def _check_json_path(value: Path | None) -> Path | None:
    if value is None:
        return None
    if value.is_dir():
        raise typer.BadParameter(f"{value} is a directory; give a file path such as {value / 'layer.json'}")
    if value.suffix.lower() != ".json":
        raise typer.BadParameter(f"must end in .json, got {value.name!r}")
    parent = value.parent if str(value.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise typer.BadParameter(f"{parent} is not a directory")
    return value


ThreadsOpt = Annotated[
    int | None,
    typer.Option("--threads", help="torch threads to use (default: torch's default).", callback=_check_threads),
]
JsonOpt = Annotated[
    Path | None,
    typer.Option("--json", help="also write the result to this .json file.", callback=_check_json_path),
]
TinyOpt = Annotated[bool, typer.Option("--tiny", hidden=True, help="test-sized cases (for the test suite).")]


def _tiny(flag: bool) -> bool:
    return flag or os.environ.get(TINY_ENV, "") not in ("", "0")


# ------------------------------------------------------------------------------------------ top level
@app.command()
def version() -> None:
    """Print the moekit, torch and transformers versions."""
    import torch

    import moekit

    try:
        import transformers

        hf = transformers.__version__
    except ImportError:
        hf = "not installed"
    _console().print(f"moekit {moekit.__version__} (torch {torch.__version__}, transformers {hf})")


@app.command()
def routers() -> None:
    """List the router names accepted by MoELayer(router=...)."""
    from moekit.routing.registry import ROUTERS, available_routers

    names = available_routers()
    table = Table(title=f"{len(names)} routers")
    table.add_column("name")
    table.add_column("note")
    for name in names:
        # An alias shares its factory with the router named after that factory (olmoe -> qwen).
        canonical = ROUTERS[name].__name__.lstrip("_")
        table.add_row(name, f"alias of {canonical}" if canonical != name and canonical in ROUTERS else "")
    _console().print(table)


# ------------------------------------------------------------------------------------------ bench
@bench_app.command("layer")
def bench_layer(
    quick: Annotated[bool, typer.Option("--quick", help="only the headline case (E=64, k=2, fp32).")] = False,
    json_path: JsonOpt = None,
    threads: ThreadsOpt = None,
    profile: Annotated[
        bool, typer.Option("--profile", help="also profile moekit's best backend (torch.profiler).")
    ] = False,
    tiny: TinyOpt = False,
) -> None:
    """Forward+backward of one MoE layer vs dense, a naive loop and Hugging Face blocks."""
    from moekit.bench.layer import run_layer_bench

    run_layer_bench(
        quick=quick,
        json_path=json_path,
        threads=threads,
        tiny=_tiny(tiny),
        profile=profile,
        console=_console(),
    )


# ------------------------------------------------------------------------------------------ LM: demo, train
@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="output folder.")] = Path("moekit-demo"),
    minutes: Annotated[float | None, typer.Option("--minutes", help="wall-clock budget (default 10).")] = None,
    smoke: Annotated[bool, typer.Option("--smoke", help="a few seconds, for tests.")] = False,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    threads: ThreadsOpt = None,
) -> None:
    """Train a small MoE LM and its dense baseline on the bundled KJV corpus; report, plots, sample."""
    from moekit.training import run_demo

    if minutes is not None and minutes <= 0:
        raise typer.BadParameter(f"--minutes must be > 0, got {minutes}")
    run_demo(out_dir=out, minutes=minutes, smoke=smoke, seed=seed, threads=threads)


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="TOML (or YAML) training config.")],
    out: Annotated[Path | None, typer.Option("--out", help="output folder (default: from config).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the latest checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite")] = False,
) -> None:
    """Train from a config file (unknown keys are errors naming the key)."""
    from moekit.training import train_from_config

    if not config.is_file():
        raise typer.BadParameter(f"config file {config} does not exist")
    train_from_config(config, out_dir=out, resume=resume, overwrite=overwrite)


@app.command("compare-routers")
def compare_routers(
    out: Annotated[Path, typer.Option("--out")] = Path("moekit-routers"),
    minutes: Annotated[float | None, typer.Option("--minutes")] = None,
    smoke: Annotated[bool, typer.Option("--smoke")] = False,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """The same small LM trained with each router on an equal budget: table and plot."""
    from moekit.training import run_compare_routers

    run_compare_routers(out_dir=out, minutes=minutes, smoke=smoke, seed=seed)


@app.command()
def convert(
    src: Annotated[Path, typer.Argument(help="checkpoint folder to read.")],
    dst: Annotated[Path, typer.Argument(help="folder to write.")],
    to: Annotated[str | None, typer.Option("--to", help="hf or moekit (default: the other format).")] = None,
) -> None:
    """Convert a checkpoint folder: Hugging Face <-> moekit."""
    from moekit.interop import convert as run

    if to not in (None, "hf", "moekit"):
        raise typer.BadParameter(f"--to must be 'hf' or 'moekit', got {to!r}")
    _console().print(f"wrote {run(src, dst, to=to)}")


# ------------------------------------------------------------------------------------------ retrieval index
index_app = typer.Typer(help="MODE document-expert indexes.", no_args_is_help=True)
app.add_typer(index_app, name="index")


@index_app.command("build")
def index_build(
    docs: Annotated[Path, typer.Argument(help="a text file or folder of documents.")],
    out: Annotated[Path, typer.Option("--out", help="index folder to write.")],
    embedder: Annotated[str, typer.Option("--embedder", help="minilm (bundled model) or hash.")] = "minilm",
) -> None:
    """Chunk, embed and cluster documents into document experts."""
    from moekit.retrieval.index import build_index

    build_index(docs, out, embedder=embedder)
    _console().print(f"index written to {out}")


@index_app.command("query")
def index_query(
    index: Annotated[Path, typer.Argument(help="index folder.")],
    text: Annotated[str, typer.Argument(help="query text.")],
    k: Annotated[int, typer.Option("-k", help="results to return.")] = 10,
) -> None:
    """Route a query to its closest document experts and search inside them."""
    from moekit.retrieval.index import query_index

    if k < 1:
        raise typer.BadParameter(f"-k must be >= 1, got {k}")
    table = Table("rank", "score", "text")
    for i, hit in enumerate(query_index(index, text, k=k), start=1):
        score = hit["score"] if isinstance(hit, dict) else getattr(hit, "score", "")
        body = hit["text"] if isinstance(hit, dict) else getattr(hit, "text", str(hit))
        table.add_row(str(i), f"{float(score):.3f}" if score != "" else "", str(body)[:100])
    _console().print(table)


# ------------------------------------------------------------------------------------------ more benches
QuickOpt = Annotated[bool, typer.Option("--quick", help="the short version (about a minute or two).")]


@bench_app.command("lm")
def bench_lm(
    quick: QuickOpt = False, json_path: JsonOpt = None, threads: ThreadsOpt = None, tiny: TinyOpt = False
) -> None:
    """MoE vs dense LM of equal active parameters on the bundled corpus."""
    from moekit.training import run_lm_bench

    run_lm_bench(quick=quick, json_path=json_path, threads=threads, tiny=_tiny(tiny), console=_console())


@bench_app.command("hf")
def bench_hf(
    quick: QuickOpt = False, json_path: JsonOpt = None, threads: ThreadsOpt = None, tiny: TinyOpt = False
) -> None:
    """Forward tokens/s: transformers' best experts_implementation vs the same model patched with moekit."""
    from moekit.bench.hf import run_hf_bench

    run_hf_bench(quick=quick, json_path=json_path, threads=threads, tiny=_tiny(tiny), console=_console())


@bench_app.command("ep")
def bench_ep(quick: QuickOpt = False, json_path: JsonOpt = None, tiny: TinyOpt = False) -> None:
    """Expert parallelism at EP=1, 2, 4 on CPU (spawns its own gloo ranks)."""
    from moekit.bench.ep import run_ep_bench

    run_ep_bench(quick=quick, json_path=json_path, tiny=_tiny(tiny), console=_console())


@bench_app.command("edge")
def bench_edge(quick: QuickOpt = False, json_path: JsonOpt = None, tiny: TinyOpt = False) -> None:
    """Edge runtime: tokens/s and hit rate per cache policy and memory budget, with storage throttles."""
    from moekit.bench.edge import run_edge_bench

    run_edge_bench(quick=quick, json_path=json_path, tiny=_tiny(tiny))


@bench_app.command("retrieval")
def bench_retrieval(quick: QuickOpt = False, json_path: JsonOpt = None, tiny: TinyOpt = False) -> None:
    """DocumentExperts vs exact, IVF and HNSW search: recall, scanned share, latency."""
    from moekit.bench.retrieval import run_retrieval_bench

    run_retrieval_bench(quick=quick, json_path=json_path, tiny=_tiny(tiny), console=_console())


@bench_app.command("tabular")
def bench_tabular(quick: QuickOpt = False, json_path: JsonOpt = None, tiny: TinyOpt = False) -> None:
    """MoEClassifier / MoERegressor vs linear, random forest, HistGradientBoosting and MLP (5-fold CV)."""
    from moekit.bench.tabular import run_tabular_bench

    run_tabular_bench(quick=quick, json_path=json_path, tiny=_tiny(tiny), console=_console())


def main() -> None:
    """Console-script entry point (``moekit = "moekit.cli:main"``)."""
    app()


if __name__ == "__main__":
    main()
