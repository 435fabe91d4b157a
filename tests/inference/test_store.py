"""Expert store: layout, manifest, lazy reads, checksums, errors naming the bad file, throttle, int8."""

from __future__ import annotations

import json

import pytest
import torch

from moekit.inference import ExpertStore, StoreError, build_expert_store
from moekit.inference.quantize import dequantize_int8, quantize_int8
from moekit.inference.store import MANIFEST, StorageThrottle


def test_manifest_and_expert_files(lm, store_dir):
    store = ExpertStore(store_dir)
    manifest = json.loads((store_dir / MANIFEST).read_text())
    assert manifest["model"]["type"] == "moekit.MoETransformerLM"
    assert store.num_layers == 3 and len(store.keys()) == 24
    layers = lm.moe_layers()
    assert [lay.module for lay in store.layers] == [name for name, _ in layers]
    total = 0
    for lay in store.layers:
        for e, f in enumerate(lay.experts):
            assert (store_dir / f.file).stat().st_size == f.file_bytes and len(f.sha256) == 64
            total += f.nbytes
            got = store.load_expert((lay.index, e))
            for name, w in layers[lay.index][1].experts.expert_parameters(e).items():
                assert torch.equal(got[name], w)
    assert store.expert_bytes == total == sum(p.numel() * 4 for _, m in layers for p in m.experts.parameters())
    assert store.bytes_read == sum(f.file_bytes for lay in store.layers for f in lay.experts)
    assert store.reads == 24
    assert store.usage is not None and len(store.usage) == 3


def test_resident_weights_exclude_experts(store_dir):
    resident = ExpertStore(store_dir).load_resident()
    assert not any("experts" in name for name in resident)
    assert "tok_embeddings.weight" in resident and "blocks.0.ffn.router.weight" in resident


def test_refuses_to_overwrite(lm, store_dir):
    with pytest.raises(StoreError, match="exists already"):
        build_expert_store(lm, store_dir)


@pytest.fixture
def fresh_store(lm, tmp_path):
    return build_expert_store(lm, tmp_path / "s").root


def test_missing_expert_file_is_named(fresh_store):
    path = fresh_store / "experts/l001/e0003.safetensors"
    path.unlink()
    with pytest.raises(StoreError, match=r"experts/l001/e0003\.safetensors is missing"):
        ExpertStore(fresh_store)


def test_truncated_expert_file_is_named(fresh_store):
    path = fresh_store / "experts/l000/e0005.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(StoreError, match=r"e0005\.safetensors is truncated"):
        ExpertStore(fresh_store)


def test_tampered_expert_file_is_named_on_first_read(fresh_store):
    path = fresh_store / "experts/l002/e0001.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # same size, one weight byte changed
    path.write_bytes(bytes(data))
    store = ExpertStore(fresh_store)  # sizes still match
    with pytest.raises(StoreError, match=r"e0001\.safetensors is corrupt or was modified"):
        store.load_expert((2, 1))
    with pytest.raises(StoreError, match=r"e0001\.safetensors"):
        store.verify()
    unchecked = ExpertStore(fresh_store, checksums="never")
    unchecked.load_expert((2, 1))  # opting out of checksums reads it


def test_tampered_resident_file_and_bad_manifest(fresh_store):
    res = fresh_store / "resident.safetensors"
    data = bytearray(res.read_bytes())
    data[-1] ^= 1
    res.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"resident\.safetensors is corrupt"):
        ExpertStore(fresh_store).load_resident()
    (fresh_store / MANIFEST).write_text("{not json")
    with pytest.raises(StoreError, match="manifest"):
        ExpertStore(fresh_store)
    with pytest.raises(StoreError, match="is missing"):
        ExpertStore(fresh_store / "nowhere")


def test_throttle_books_device_time_in_order():
    throttle = StorageThrottle(mbps=1.0)  # 1 byte per microsecond
    first = throttle.reserve(1_000_000)
    second = throttle.reserve(500_000)
    assert second - first == pytest.approx(0.5)  # queued behind the first read


def test_throttled_reads_and_page_cache_drop(store_dir):
    store = ExpertStore(store_dir, storage_mbps=10_000.0)
    assert store.drop_page_cache() == 25  # 24 experts + resident file
    store.load_expert((0, 0))
    assert store.reads == 1 and store.bytes_read == store.expert_file((0, 0)).file_bytes
    with pytest.raises(ValueError):
        StorageThrottle(0)


def test_int8_store(lm, tmp_path):
    store = build_expert_store(lm, tmp_path / "q", quantization="int8")
    fp32 = sum(p.numel() * 4 for _, m in lm.moe_layers() for p in m.experts.parameters())
    assert store.quantization == "int8"
    assert fp32 / 4 < store.expert_bytes < fp32 / 3.5  # int8 weights plus one float32 scale per row
    got = store.load_expert((1, 2))
    w = lm.moe_layers()[1][1].experts.expert_parameters(2)["down_proj"]
    deq = dequantize_int8(got["down_proj"], got["down_proj.scale"])
    assert (deq - w).abs().max() <= w.abs().amax(dim=1, keepdim=True).max() / 254 + 1e-6


def test_quantize_int8_per_channel():
    w = torch.randn(16, 8) * torch.logspace(-3, 1, 16)[:, None]  # rows of very different scales
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (16,)
    err = (dequantize_int8(q, scale) - w).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-7).all())  # half a step of its own row
