"""Training: the loop (AdamW, warmup + cosine, clipping, accumulation, bf16 autocast, exact resume), safe
checkpoints, metrics and plots, expert-specialization reports, and the runs built on them: ``moekit demo``,
``moekit train CONFIG``, ``moekit compare-routers`` and the LM benchmark.

    data = prepare_data(DataConfig(), TrainConfig())
    trainer = Trainer(MoETransformerLM(cfg), TrainConfig(), data.sampler, data.val_batches, out_dir="run")
    result = trainer.train(resume=True)
"""

from moekit.training.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    load_lm_checkpoint,
    save_checkpoint,
)
from moekit.training.config import DataConfig, TrainConfig
from moekit.training.metrics import MetricsLogger, read_metrics
from moekit.training.prepare import PreparedData, prepare_data
from moekit.training.schedule import lr_at
from moekit.training.trainer import Trainer, TrainResult, build_optimizer


def run_demo(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201
    """See `moekit.training.demo.run_demo` (imported lazily: it pulls in plotting)."""
    from moekit.training.demo import run_demo as _run

    return _run(*args, **kwargs)


def run_compare_routers(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201
    """See `moekit.training.compare_routers.run_compare_routers`."""
    from moekit.training.compare_routers import run_compare_routers as _run

    return _run(*args, **kwargs)


def train_from_config(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201
    """See `moekit.training.config_file.train_from_config`."""
    from moekit.training.config_file import train_from_config as _run

    return _run(*args, **kwargs)


__all__ = [
    "CheckpointError",
    "DataConfig",
    "MetricsLogger",
    "PreparedData",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "build_optimizer",
    "latest_checkpoint",
    "load_checkpoint",
    "load_lm_checkpoint",
    "lr_at",
    "prepare_data",
    "read_metrics",
    "run_compare_routers",
    "run_demo",
    "save_checkpoint",
    "train_from_config",
]
