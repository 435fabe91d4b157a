"""A self-contained smoke launcher: the MoE LM on synthetic data with expert x data parallelism, under torchrun.

For real training (config file, the bundled corpus, the trainer's optimizer, schedule, metrics and
checkpoints) use ``moekit.parallel.train_lm`` (``moekit train CONFIG --nproc N``). This launcher needs no
data files; its checkpoints are ``moekit.parallel.checkpoint``'s per-shard files (weights and AdamW state,
no gathering).

    torchrun --standalone --nproc-per-node 4 -m moekit.parallel.launch --ep 2 --steps 50 --save ckpt/ep

Every rank builds the model from the same seed, shards the experts of each MoE layer over its EP group
(``--ep``, default: all ranks), checks that all ranks got the same configuration (an all-gather of its hash)
and trains on its own rows of a global batch that is a pure function of ``(seed, step)``: rank r takes rows
``[r * B, (r + 1) * B)`` of the ``W * B`` rows. The logged loss is the mean over the ranks, which is the loss
one process gets on the whole global batch (``train_lm(..., groups=None)``). Data: a synthetic first-order
Markov token stream (learnable, needs no files). ``--resume`` loads a checkpoint saved with any EP size
(weights and AdamW state).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from moekit.atomic_io import atomic_write_bytes
from moekit.models import LMConfig, MoETransformerLM
from moekit.parallel.checkpoint import load_checkpoint, save_checkpoint
from moekit.parallel.data_parallel import broadcast_replicated, clip_grad_norm_, global_mean, sync_gradients
from moekit.parallel.ep_layer import expert_parallel
from moekit.parallel.mesh import ParallelGroups, build_groups, check_consistent, init_distributed, shard_range

TINY_CONFIG = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, d_ff=128, num_experts=8, k=2, max_seq_len=64)


def synthetic_batch(step: int, seed: int, batch: int, seq_len: int, vocab: int) -> Tensor:
    """(batch, seq_len + 1) int64 tokens of a fixed random Markov chain (4 likely successors per token)."""
    table = torch.randint(0, vocab, (vocab, 4), generator=torch.Generator().manual_seed(seed))  # (V, 4)
    g = torch.Generator().manual_seed(seed * 1_000_003 + step + 1)
    tokens = torch.empty(batch, seq_len + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
    choice = torch.randint(0, 4, (batch, seq_len), generator=g)
    for t in range(seq_len):
        tokens[:, t + 1] = table[tokens[:, t], choice[:, t]]
    return tokens


def build_model(
    config: LMConfig,
    groups: ParallelGroups | None,
    seed: int,
    capacity_scope: str = "global",
    device: torch.device | str = "cpu",
) -> MoETransformerLM:
    """The LM from ``seed``; with ``groups``, its MoE layers sharded over the EP group, replicas in sync."""
    if groups is not None and config.num_experts:
        shard_range(config.num_experts, groups.ep_size, groups.ep_rank)  # a clear error before building
    torch.manual_seed(seed)
    model = MoETransformerLM(config).to(device)
    if groups is not None and groups.distributed:
        expert_parallel(model, groups, capacity_scope)
        broadcast_replicated(model, groups)
    return model


def make_optimizer(model: torch.nn.Module, lr: float = 3e-3) -> torch.optim.AdamW:
    """The launcher's optimizer: AdamW over all parameters, weight decay 0.01."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)


def train_lm(
    model: MoETransformerLM,
    groups: ParallelGroups | None,
    steps: int,
    batch_per_rank: int,
    seq_len: int,
    lr: float = 3e-3,
    seed: int = 0,
    max_grad_norm: float = 1.0,
    start_step: int = 0,
    log: Callable[[dict], None] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> list[float]:
    """Run ``steps`` AdamW steps (``optimizer``: default a fresh AdamW with ``lr``, weight decay 0.01);
    returns the global mean total loss (task + aux) of each step."""
    distributed = groups is not None and groups.distributed
    world, rank = (groups.world_size, groups.rank) if distributed else (1, 0)
    device = next(model.parameters()).device
    opt = optimizer if optimizer is not None else make_optimizer(model, lr)
    vocab = model.config.vocab_size
    losses = []
    model.train()
    for step in range(start_step, start_step + steps):
        t0 = time.perf_counter()
        tokens = synthetic_batch(step, seed, batch_per_rank * world, seq_len, vocab)
        tokens = tokens[rank * batch_per_rank : (rank + 1) * batch_per_rank].to(device)  # (B, L+1)
        out = model(tokens[:, :-1], targets=tokens[:, 1:])
        out.total_loss.backward()
        if distributed:
            sync_gradients(model, groups)
            norm = clip_grad_norm_(model, max_grad_norm, groups)
        else:
            norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm))
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.after_optimizer_step()
        total = out.total_loss.detach()
        loss = global_mean(total) if distributed else float(total)
        losses.append(loss)
        if log is not None:
            seconds = time.perf_counter() - t0
            tokens_per_s = world * tokens[:, :-1].numel() / seconds
            log({"step": step, "loss": loss, "grad_norm": norm, "tokens_per_s": tokens_per_s})
    return losses


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m moekit.parallel.launch", description=__doc__.split("\n\n")[0])
    p.add_argument("--ep", type=int, default=None, help="expert-parallel size (divides the world; default: all)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4, help="sequences per rank")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--config", type=Path, default=None, help="JSON file of LMConfig fields (default: tiny LM)")
    p.add_argument("--num-experts", type=int, default=None)
    p.add_argument("--capacity-factor", type=float, default=None)
    p.add_argument("--capacity-scope", choices=("global", "local"), default="global")
    p.add_argument("--save", type=Path, default=None, help="checkpoint directory written at the end")
    p.add_argument("--resume", type=Path, default=None, help="checkpoint directory to start from (any EP size)")
    p.add_argument("--log-json", type=Path, default=None, help="rank 0 writes the per-step log here")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a collective may wait for a peer")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    fields = dict(TINY_CONFIG) if args.config is None else json.loads(args.config.read_text())
    if args.num_experts is not None:
        fields["num_experts"] = args.num_experts
    if args.capacity_factor is not None:
        fields["capacity_factor"] = args.capacity_factor
    config = LMConfig.from_dict(fields)
    init_distributed(timeout_s=args.timeout)
    try:
        groups = build_groups(args.ep)
        run = {k: str(v) for k, v in vars(args).items() if k not in ("log_json", "timeout")}
        check_consistent({"config": config.to_dict(), "run": run})
        nccl = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        model = build_model(config, groups, args.seed, args.capacity_scope, device)
        opt = make_optimizer(model, args.lr)
        start = 0
        if args.resume is not None:  # weights and AdamW state, resharded to this EP size
            start = int(load_checkpoint(model, args.resume, optimizer=opt).get("step", 0))
        rank = dist.get_rank()
        records: list[dict] = []

        def log(record: dict) -> None:
            records.append(record)
            if rank == 0:
                print(
                    f"step {record['step']:5d}  loss {record['loss']:.4f}  "
                    f"grad_norm {record['grad_norm']:.3f}  tokens/s {record['tokens_per_s']:.0f}",
                    flush=True,
                )

        if rank == 0:
            per_rank = config.num_experts // groups.ep_size
            print(
                f"world {groups.world_size} = dp {groups.dp_size} x ep {groups.ep_size}; "
                f"LM: {config.n_layers} layers, d_model {config.d_model}, "
                f"{config.num_experts} experts ({per_rank} per rank), k={config.k}",
                flush=True,
            )
        train_lm(
            model,
            groups,
            args.steps,
            args.batch_size,
            args.seq_len,
            args.lr,
            args.seed,
            args.max_grad_norm,
            start,
            log,
            opt,
        )
        if args.save is not None:
            extra = {"config": config.to_dict(), "step": start + args.steps}
            save_checkpoint(model, args.save, groups, extra=extra, optimizer=opt)
            if rank == 0:
                print(f"saved {args.save}", flush=True)
        if rank == 0 and args.log_json is not None:
            atomic_write_bytes(args.log_json, json.dumps(records, indent=1).encode())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
