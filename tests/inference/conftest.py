"""A tiny MoE LM (3 MoE layers, 8 experts, k=2), its expert store and its routing on a fixed token stream."""

from __future__ import annotations

import pytest
import torch

from moekit.inference import build_expert_store, decode_stream, record_routing
from moekit.models import LMConfig, MoETransformerLM

PROMPT = 6


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny matmuls run fastest on one thread (and do not spin on a busy machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def lm() -> MoETransformerLM:
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, d_ff=64, num_experts=8, k=2, max_seq_len=64)
    model = MoETransformerLM(cfg).eval()
    with torch.no_grad():  # larger expert weights than the init, so that routing varies along the stream
        for _, layer in model.moe_layers():
            layer.experts.in_proj.mul_(20)
            layer.experts.down_proj.mul_(20)
    return model


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 64, (1, 30), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def reference(lm, ids):
    """(decode_stream result, routing record) of the resident model on ``ids``."""
    out = {}
    rec = record_routing(lm, lambda: out.setdefault("res", decode_stream(lm, ids, PROMPT)))
    return out["res"], rec


@pytest.fixture(scope="module")
def store_dir(lm, ids, tmp_path_factory):
    calib_ids = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(2))
    calib = record_routing(lm, lambda: decode_stream(lm, calib_ids, PROMPT))
    path = tmp_path_factory.mktemp("edge") / "store"
    build_expert_store(lm, path, usage=calib.usage)
    return path
