"""Expert parallelism over torch.distributed: sharded experts, uneven all-to-all, EP x DP meshes,
resharding checkpoints, and an all-to-all cost model. See docs/parallel.md.

The LM trainer under torchrun lives in ``moekit.parallel.train_lm`` (``DistributedTrainer``), its
trainer-format checkpoints with gathered optimizer state in ``moekit.parallel.consolidate``; both import
``moekit.training`` and are not imported here."""

from moekit.parallel.all_to_all import all_reduce_sum, all_to_all, comm_stats
from moekit.parallel.checkpoint import CheckpointError, load_checkpoint, read_manifest, save_checkpoint
from moekit.parallel.cost_model import EPCost, bytes_from_splits, ep_cost, worked_examples
from moekit.parallel.data_parallel import (
    broadcast_replicated,
    clip_grad_norm_,
    split_parameters,
    sync_gradients,
)
from moekit.parallel.ep_layer import ExpertParallelMoELayer, expert_parallel, global_param_counts
from moekit.parallel.mesh import (
    ConfigMismatchError,
    DistributedError,
    ParallelGroups,
    build_groups,
    check_consistent,
    init_distributed,
    shard_range,
)

__all__ = [
    "CheckpointError",
    "ConfigMismatchError",
    "DistributedError",
    "EPCost",
    "ExpertParallelMoELayer",
    "ParallelGroups",
    "all_reduce_sum",
    "all_to_all",
    "broadcast_replicated",
    "build_groups",
    "bytes_from_splits",
    "check_consistent",
    "clip_grad_norm_",
    "comm_stats",
    "ep_cost",
    "expert_parallel",
    "global_param_counts",
    "init_distributed",
    "load_checkpoint",
    "read_manifest",
    "save_checkpoint",
    "shard_range",
    "split_parameters",
    "sync_gradients",
    "worked_examples",
]
