"""TrainConfig / DataConfig validation and the learning-rate schedule."""

from __future__ import annotations

import math

import pytest

from moekit.training.config import DataConfig, TrainConfig
from moekit.training.schedule import lr_at


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_steps", 0),
        ("max_steps", 2.5),
        ("batch_size", True),
        ("lr", 0.0),
        ("lr", "fast"),
        ("min_lr_ratio", 1.5),
        ("beta2", 1.0),
        ("grad_clip", -1.0),
        ("precision", "fp8"),
        ("keep_last", 0),
        ("max_seconds", math.inf),
    ],
)
def test_train_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
        TrainConfig(**{field: value})


def test_data_config_errors_name_the_field():
    with pytest.raises(ValueError, match="DataConfig.vocab_size"):
        DataConfig(vocab_size=10)
    with pytest.raises(ValueError, match="DataConfig.source"):
        DataConfig(source="")
    with pytest.raises(ValueError, match="unknown keys \\['bogus'\\]"):
        TrainConfig.from_dict({"bogus": 1})
    assert TrainConfig.from_dict(TrainConfig(lr=1e-3).to_dict()) == TrainConfig(lr=1e-3)


def test_warmup_then_cosine_to_floor():
    cfg = TrainConfig(max_steps=110, lr=1.0, min_lr_ratio=0.1, warmup_steps=10)
    lrs = [lr_at(s, cfg) for s in range(130)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warmup reaches the peak
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10], strict=False))
    assert lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:111], strict=False))  # monotone decay
    assert lrs[60] == pytest.approx(0.55)  # half way: the mean of peak and floor
    assert lrs[110] == pytest.approx(0.1) and lrs[129] == pytest.approx(0.1)  # held at the floor
    assert lr_at(0, TrainConfig(warmup_steps=0, lr=2.0, max_steps=10)) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="step"):
        lr_at(-1, cfg)
