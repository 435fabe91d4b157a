"""`moekit generate`: a tiny trained checkpoint (demo layout), greedy and sampled decoding, the edge runtime
under a memory budget giving the same tokens, streaming, and clear errors."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from typer.testing import CliRunner

from moekit.cli import app
from moekit.inference.serve import (
    GenerateError,
    GenerateOptions,
    TextStream,
    find_checkpoint,
    load_lm,
    run_generate,
    store_dir_for,
)
from moekit.models import LMConfig
from moekit.models.generate import next_token_probs, sample_next_token
from moekit.training.checkpoint import CheckpointError
from moekit.training.config import DataConfig, TrainConfig
from moekit.training.prepare import prepare_data
from moekit.training.runs import train_run

runner = CliRunner()
TEXT = (
    "In the beginning God created the heaven and the earth. And the earth was without form, and void. "
    "And God said, Let there be light: and there was light. And God saw the light, that it was good.\n"
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one torch thread avoids OpenMP waits (20x faster here)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """A `moekit demo`-like folder: OUT/tokenizer.json, OUT/moe/checkpoints and OUT/dense/checkpoints."""
    out = tmp_path_factory.mktemp("gen") / "demo"
    src = out.parent / "corpus.txt"
    src.write_text(TEXT * 40, encoding="utf-8")
    train = TrainConfig(max_steps=2, batch_size=2, block_size=16, warmup_steps=1, eval_every=0, checkpoint_every=1)
    data = prepare_data(DataConfig(source=str(src), vocab_size=300, lines_per_chapter=4, val_every=2), train, out)
    cfg = LMConfig(
        vocab_size=data.vocab_size, d_model=32, n_layers=2, n_heads=2, d_ff=32, num_experts=8, k=2, max_seq_len=64
    )
    train_run("moe", cfg, train, data, out / "moe", progress=False)
    train_run("dense", cfg.dense_baseline(), train, data, out / "dense", progress=False)
    return out


def _gen(demo_dir, **kw):
    kw = {"prompt": "And God said,", "max_new_tokens": 12, "temperature": 0.0, **kw}
    return run_generate(demo_dir, GenerateOptions(**kw))


# ------------------------------------------------------------------------------------------------ loading


def test_finds_the_latest_moe_checkpoint(demo_dir):
    ckpt = find_checkpoint(demo_dir)
    assert ckpt == demo_dir / "moe" / "checkpoints" / "step_000002"  # not the dense baseline, not step 1
    assert find_checkpoint(demo_dir / "moe") == ckpt == find_checkpoint(ckpt)
    assert find_checkpoint(demo_dir / "moe" / "checkpoints" / "step_000001").name == "step_000001"
    loaded = load_lm(demo_dir)
    assert loaded.step == 2 and loaded.model.config.num_experts == 8 and not loaded.model.training


def test_greedy_equals_a_plain_argmax_loop(demo_dir):
    res = _gen(demo_dir)
    loaded = load_lm(demo_dir)
    idx = torch.tensor([loaded.tokenizer.encode("And God said,")])
    with torch.no_grad():
        for _ in range(12):
            idx = torch.cat([idx, loaded.model(idx).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert res.token_ids == idx[0, -12:].tolist()
    assert res.text == loaded.tokenizer.decode(res.token_ids) and res.edge is None


# ------------------------------------------------------------------------------------------------ edge runtime


@pytest.mark.parametrize(
    "cache,prefetch,budget",
    [("lru", False, "min"), ("committee", True, "30%"), ("least-stale", True, "min"), ("lfu", False, "100%")],
)
def test_budget_gives_the_same_greedy_tokens(demo_dir, cache, prefetch, budget):
    plain = _gen(demo_dir)
    if budget == "min":  # exactly one layer's k largest experts: every call swaps
        from moekit.inference import ExpertStore, min_call_bytes

        _gen(demo_dir, memory_budget="100%")  # builds the store
        store = ExpertStore(next(find_checkpoint(demo_dir).parent.glob("expert-store-*[0-9a-f]")))
        budget = str(min_call_bytes(store))
    edge = _gen(demo_dir, memory_budget=budget, cache=cache, prefetch=prefetch)
    assert edge.token_ids == plain.token_ids and edge.text == plain.text
    s = edge.edge
    assert s["peak_resident_expert_bytes"] <= s["budget_bytes"]
    assert s["accesses"] > 0 and 0 <= s["hit_rate"] <= 1 and s["cache"] == cache.replace("-", "_")
    if budget != "100%":
        assert s["bytes_read"] > 0
    if prefetch:
        assert s["prefetch_recall"] is not None


def test_cli_streams_and_prints_telemetry(demo_dir):
    args = ["generate", "--checkpoint", str(demo_dir), "--prompt", "And God said,", "--temperature", "0"]
    plain = runner.invoke(app, [*args, "--max-new-tokens", "10"], terminal_width=200)
    assert plain.exit_code == 0, plain.output
    edge = runner.invoke(
        app,
        [*args, "--max-new-tokens", "10", "--memory-budget", "25%", "--cache", "committee", "--prefetch"],
        terminal_width=200,
    )
    assert edge.exit_code == 0, edge.output
    text = plain.output.splitlines()[0]
    assert text.startswith("And God said,") and edge.output.splitlines()[0] == text
    for label in ("hit rate", "bytes read", "prefetch recall", "tokens/s", "peak resident expert bytes"):
        assert label in edge.output
    quiet = runner.invoke(app, [*args, "--max-new-tokens", "10", "--no-stream"], terminal_width=200)
    assert quiet.exit_code == 0 and quiet.output.splitlines()[0] == text


def test_int8_runs_under_budget(demo_dir):
    res = _gen(demo_dir, memory_budget="50%", int8=True)
    assert res.edge["quantization"] == "int8" and res.store.endswith("-int8") and len(res.token_ids) == 12


# ------------------------------------------------------------------------------------------------ sampling


def test_sampling_is_reproducible_by_seed(demo_dir):
    a = _gen(demo_dir, temperature=1.5, top_p=1.0, seed=7, max_new_tokens=20)
    b = _gen(demo_dir, temperature=1.5, top_p=1.0, seed=7, max_new_tokens=20)
    c = _gen(demo_dir, temperature=1.5, top_p=1.0, seed=8, max_new_tokens=20)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids
    edge = _gen(demo_dir, temperature=1.5, top_p=1.0, seed=7, max_new_tokens=20, memory_budget="30%")
    assert edge.token_ids == a.token_ids  # same logits, same generator: same draws
    greedy = _gen(demo_dir)
    assert _gen(demo_dir, temperature=1.0, top_k=1, seed=3).token_ids == greedy.token_ids


def test_temperature_top_p_top_k_against_hand_computation():
    p = [0.5, 0.3, 0.15, 0.05]
    logits = torch.tensor([[math.log(x) for x in p]])
    # top_p 0.7: 0.5 < 0.7 keeps token 1; the mass before token 2 is 0.8 >= 0.7, so 2 and 3 go
    got = next_token_probs(logits, 1.0, top_p=0.7)[0].tolist()
    assert got == pytest.approx([0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0])
    # temperature 2: p_i^(1/2) renormalised; top_k 3 then drops the last one
    roots = [math.sqrt(x) for x in p]
    assert next_token_probs(logits, 2.0)[0].tolist() == pytest.approx([r / sum(roots) for r in roots])
    head = sum(roots[:3])
    assert next_token_probs(logits, 2.0, top_k=3)[0].tolist() == pytest.approx([r / head for r in roots[:3]] + [0])
    # temperature 0.5: p_i^2 / 0.365 = 0.685, 0.247, 0.062, 0.007; top_p 0.9 keeps two (mass before the third
    # is 0.932), renormalised: 0.25 / 0.34 and 0.09 / 0.34
    assert next_token_probs(logits, 0.5, top_p=0.9)[0].tolist() == pytest.approx([0.25 / 0.34, 0.09 / 0.34, 0, 0])
    # draws follow that distribution: 4000 seeded draws within 4 standard deviations
    gen = torch.Generator().manual_seed(0)
    draws = sample_next_token(logits.expand(4000, 4), 1.0, 0.7, gen)  # (4000,) one draw per row
    assert set(draws.tolist()) <= {0, 1}
    share = float((draws == 0).float().mean())
    assert abs(share - 0.625) < 4 * math.sqrt(0.625 * 0.375 / 4000)


def test_text_stream_never_splits_a_character(demo_dir):
    tok = load_lm(demo_dir, weights=False).tokenizer
    ids = tok.encode("light é ü — 光")
    pieces: list[str] = []
    stream = TextStream(tok, pieces.append)
    for i in ids:
        stream(i)
    assert stream.flush() == "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in piece for piece in pieces)


# ------------------------------------------------------------------------------------------------ errors


def _err(args: list[str]) -> str:
    result = runner.invoke(app, ["generate", *args], terminal_width=300)
    assert result.exit_code == 2, result.output
    return " ".join(result.output.replace("│", " ").split())


def test_bad_options_are_clear(demo_dir, tmp_path):
    base = ["--checkpoint", str(demo_dir), "--prompt", "And"]
    assert "--temperature" in (out := _err([*base, "--temperature", "-1"])) and ">= 0" in out
    assert "--top-p" in (out := _err([*base, "--top-p", "0"])) and "(0, 1]" in out
    assert "--top-p" in _err([*base, "--top-p", "1.5"])
    assert "--top-k" in _err([*base, "--top-k", "0"])
    assert "--memory-budget" in (out := _err([*base, "--memory-budget", "lots"])) and "cannot parse" in out
    assert "--cache" in _err([*base, "--cache", "fifo"])
    out = _err([*base, "--memory-budget", "1KB"])
    assert "--memory-budget" in out and "too small" in out and "minimum is" in out
    assert "does not exist" in _err(["--checkpoint", str(tmp_path / "nope"), "--prompt", "x"])
    (tmp_path / "empty").mkdir()
    assert "no checkpoint found" in _err(["--checkpoint", str(tmp_path / "empty"), "--prompt", "x"])
    assert "--max-new-tokens" in _err([*base, "--max-new-tokens", "1000"])


def test_corrupt_checkpoint_names_the_file(demo_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(demo_dir, copy, ignore=shutil.ignore_patterns("expert-store-*"))
    weights = find_checkpoint(copy) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    out = _err(["--checkpoint", str(copy), "--prompt", "And"])
    assert "model.safetensors" in out and "corrupt" in out
    (copy / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        load_lm(copy)


def test_options_validate_in_the_library():
    with pytest.raises(GenerateError, match="0 = greedy"):
        GenerateOptions(prompt="x", temperature=-0.1)
    with pytest.raises(GenerateError, match="cannot prefetch"):
        GenerateOptions(prompt="x", cache="naive", prefetch=True)
    assert not GenerateOptions(prompt="x").edge and GenerateOptions(prompt="x", prefetch=True).edge


def test_tampered_expert_store_names_the_file(demo_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(demo_dir, copy)
    _gen(copy, memory_budget="100%", max_new_tokens=1)  # make sure the copy has its store
    store = store_dir_for(load_lm(copy, weights=False), int8=False)  # the store this checkpoint uses
    assert store.is_dir()
    for path in (store / "experts").rglob("*.safetensors"):  # every expert: whichever is read first is caught
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
    out = _err(["--checkpoint", str(copy), "--prompt", "And", "--memory-budget", "50%", "--temperature", "0"])
    assert "expert store file" in out and ".safetensors" in out and "corrupt" in out
