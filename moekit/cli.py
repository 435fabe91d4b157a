"""The ``moekit`` command line: thin wrappers that parse options, call the library and print with rich.

Each command is one small function; heavy imports happen inside it, so ``moekit --help`` stays fast.
Top level: version, routers, demo, train, generate, compare-routers, convert; groups ``moekit index build|query``
and ``moekit bench <name>`` (layer, lm, hf, ep, edge, retrieval, tabular, hecto, tabmoe).
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
    quick: Annotated[
        bool,
        typer.Option("--quick", help="only the headline case (E=64, k=2, fp32), d_model 256, CPU time of one thread."),
    ] = False,
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
    data: Annotated[
        Path | None,
        typer.Option("--data", help="train on this UTF-8 text file or folder of them (overrides [data] source)."),
    ] = None,
    nproc: Annotated[
        int | None,
        typer.Option(
            "--nproc",
            help="train on N local processes with expert x data parallelism (runs torchrun --nproc-per-node N "
            "-m moekit.parallel.train_lm CONFIG).",
        ),
    ] = None,
) -> None:
    """Train from a config file (unknown keys are errors naming the key)."""
    from moekit.training import train_from_config

    if not config.is_file():
        raise typer.BadParameter(f"config file {config} does not exist")
    if nproc is not None and nproc < 1:
        raise typer.BadParameter(f"--nproc must be >= 1, got {nproc}")
    if data is not None and not data.exists():
        raise typer.BadParameter(f"--data {data} does not exist (expected a UTF-8 text file or a folder of them)")
    if nproc is not None and nproc > 1:
        if data is not None:
            raise typer.BadParameter("--data is not supported with --nproc > 1: set [data] source in the config")
        from moekit.parallel.train_lm import launch

        code = launch(config, nproc, out=out, resume=resume, overwrite=overwrite)
        if code:
            raise typer.Exit(code)
        return
    train_from_config(config, out_dir=out, resume=resume, overwrite=overwrite, data_source=data)


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
def generate(
    checkpoint: Annotated[
        Path, typer.Option("--checkpoint", help="checkpoint, run or demo output folder (e.g. ./moekit-demo).")
    ],
    prompt: Annotated[str, typer.Option("--prompt", help="text to continue.")],
    max_new_tokens: Annotated[
        int | None, typer.Option("--max-new-tokens", help="tokens to generate (default: 64, or what fits).")
    ] = None,
    temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy.")] = 0.8,
    top_p: Annotated[float, typer.Option("--top-p", help="nucleus sampling mass, in (0, 1].")] = 0.95,
    top_k: Annotated[int | None, typer.Option("--top-k", help="sample among the k most likely tokens.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="makes sampling reproducible.")] = None,
    stream: Annotated[bool, typer.Option("--stream/--no-stream", help="print tokens as they come.")] = True,
    memory_budget: Annotated[
        str | None,
        typer.Option("--memory-budget", help="run on the edge runtime: expert bytes in RAM, '25%' or '64MB'."),
    ] = None,
    cache: Annotated[
        str, typer.Option("--cache", help="edge expert cache: lru, lfu, committee, least-stale (or naive).")
    ] = "lru",
    prefetch: Annotated[bool, typer.Option("--prefetch", help="edge: load the next layer's experts ahead.")] = False,
    storage_mbps: Annotated[
        float | None, typer.Option("--storage-mbps", help="edge: emulate storage of this many MB/s.")
    ] = None,
    int8: Annotated[bool, typer.Option("--int8", help="edge: int8 per-channel experts (not bit-exact).")] = False,
    threads: ThreadsOpt = None,
) -> None:
    """Continue a prompt with a trained LM checkpoint; with --memory-budget its experts stay on disk."""
    import sys

    import torch

    from moekit.inference.serve import GenerateError, GenerateOptions, run_generate
    from moekit.inference.store import StoreError
    from moekit.training.checkpoint import CheckpointError

    started = [False]

    def write(text: str) -> None:
        if not started[0]:  # the prompt goes out with the first new text, not before errors
            started[0] = True
            text = prompt + text
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        options = GenerateOptions(
            prompt=prompt,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            memory_budget=memory_budget,
            cache=cache,
            prefetch=prefetch,
            storage_mbps=storage_mbps,
            int8=int8,
        )
        if threads is not None:
            torch.set_num_threads(threads)
        result = run_generate(checkpoint, options, write if stream else None)
    except GenerateError as err:
        raise typer.BadParameter(str(err), param_hint=f"'{err.param}'" if err.param else None) from None
    except (CheckpointError, StoreError) as err:
        raise typer.BadParameter(str(err), param_hint="'--checkpoint'") from None
    except ValueError as err:  # e.g. an unreadable tokenizer.json, named in the message
        raise typer.BadParameter(str(err), param_hint="'--checkpoint'") from None
    write(("" if stream else result.text) + "\n")
    console = _console()
    console.print(
        f"[dim]{len(result.token_ids)} tokens in {result.seconds:.2f}s ({result.tokens_per_s:.1f} tok/s) from "
        f"{result.checkpoint}[/]"
    )
    if result.edge is not None:
        _print_edge_telemetry(console, result.edge, result.store)


def _print_edge_telemetry(console: Console, s: dict, store: str | None) -> None:
    from moekit.inference.budget import format_bytes

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.1%}"

    table = Table(title="edge runtime", show_header=False)
    table.add_row("cache / budget", f"{s['cache']}, {format_bytes(s['budget_bytes'])} ({s['budget_share']:.0%})")
    table.add_row("hit rate", f"{pct(s['hit_rate'])} ({s['hits']} of {s['accesses']} expert uses)")
    table.add_row("hit rate per layer", " ".join(pct(h) for h in s["hit_rate_per_layer"]))
    table.add_row("bytes read", f"{format_bytes(s['bytes_read'])} in {s['read_seconds']:.2f}s")
    table.add_row("prefetch recall / precision", f"{pct(s['prefetch_recall'])} / {pct(s['prefetch_precision'])}")
    table.add_row("tokens/s", "-" if s["tokens_per_s"] is None else f"{s['tokens_per_s']:.1f}")
    table.add_row("peak resident expert bytes", format_bytes(s["peak_resident_expert_bytes"]))
    mbps = s["storage_mbps"]
    table.add_row("storage", "disk speed" if mbps is None else f"throttled to {mbps:g} MB/s")
    table.add_row("experts", "int8" if s["quantization"] else "float32 (same outputs as fully resident)")
    if store:
        table.add_row("store", store)
    console.print(table)


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
    docs: Annotated[Path, typer.Argument(help="a UTF-8 text file or a folder of them.")],
    out: Annotated[Path, typer.Option("--out", help="index folder to write (new, empty, or an index).")],
    embedder: Annotated[
        str, typer.Option("--embedder", help="minilm (bundled all-MiniLM-L6-v2, offline) or hashing.")
    ] = "minilm",
    learned_router: Annotated[
        bool, typer.Option("--learned-router", help="also train the learned router (query with -p).")
    ] = False,
) -> None:
    """Chunk, embed and cluster documents into document experts."""
    from moekit.retrieval.index import build_index

    try:
        experts = build_index(docs, out, embedder=embedder, learned_router=learned_router)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    _console().print(
        f"index written to {out}: {experts.num_documents} documents, {experts.num_chunks} chunks, "
        f"{experts.num_clusters} document experts"
    )


@index_app.command("query")
def index_query(
    index: Annotated[Path, typer.Argument(help="index folder.")],
    text: Annotated[str, typer.Argument(help="query text.")],
    k: Annotated[int, typer.Option("-k", help="results to return.")] = 10,
    m: Annotated[int | None, typer.Option("-m", help="clusters to probe (default: the index's).")] = None,
    p: Annotated[
        float | None, typer.Option("-p", help="learned-router probability mass to probe (needs --learned-router).")
    ] = None,
) -> None:
    """Route a query to its closest document experts and search inside them."""
    from moekit.retrieval.index import query_index

    if k < 1:
        raise typer.BadParameter(f"-k must be >= 1, got {k}")
    try:
        hits = query_index(index, text, k=k, m=m, p=p)
    except ValueError as err:  # IndexFormatError included: damaged or foreign folder
        raise typer.BadParameter(str(err)) from None
    table = Table("rank", "score", "document", "text")
    for i, hit in enumerate(hits, start=1):
        table.add_row(str(i), f"{hit.score:.3f}", f"{hit.doc}#{hit.chunk}", hit.text[:100])
    _console().print(table)


# ------------------------------------------------------------------------------------------ more benches
QuickOpt = Annotated[bool, typer.Option("--quick", help="the short version (about a minute or two).")]


@bench_app.command("lm")
def bench_lm(
    quick: QuickOpt = False, json_path: JsonOpt = None, threads: ThreadsOpt = None, tiny: TinyOpt = False
) -> None:
    """MoE vs dense LM of equal active parameters on the bundled corpus."""
    from moekit.bench.lm import run_lm_bench

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


@bench_app.command("hecto")
def bench_hecto(quick: QuickOpt = False, json_path: JsonOpt = None, tiny: TinyOpt = False) -> None:
    """Hecto: GRU + FFN experts behind one top-1 gate vs all-FFN, all-GRU and one GRU (verse -> Bible part)."""
    from moekit.bench.hecto import run_hecto_bench

    run_hecto_bench(quick=quick, json_path=json_path, tiny=_tiny(tiny), console=_console())


@bench_app.command("tabmoe")
def bench_tabmoe(quick: QuickOpt = False, json_path: JsonOpt = None, tiny: TinyOpt = False) -> None:
    """TabMoE: functional table-QA experts with a hard-EM router vs an oracle router and a generalist network."""
    from moekit.bench.tabmoe import run_tabmoe_bench

    run_tabmoe_bench(quick=quick, json_path=json_path, tiny=_tiny(tiny), console=_console())


def main() -> None:
    """Console-script entry point (``moekit = "moekit.cli:main"``)."""
    app()


if __name__ == "__main__":
    main()
