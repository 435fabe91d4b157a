"""RoMA: routing manifold alignment by fine-tuning only the routers of a pretrained MoE LM.

Loss per batch: ``task_loss + lam * mean_i sum_j W_ij ||r_i - r_j||^2`` where ``r_i`` is sample i's routing
representation (per MoE layer, the router's softmax probabilities averaged over the sample's real tokens,
layers concatenated) and j runs over i's ``k`` nearest *successful* neighbours (training samples the
pretrained model gets right) in an embedding space of the inputs (e.g. MiniLM), ``W_ij`` a softmax of their
cosine similarities. The neighbours' ``r_j`` are recomputed with the current routers at the start of every
epoch and held fixed within it.

The task here is classification by next-token prediction: the logits at a sample's last real position,
restricted to ``label_ids``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.models import LMOutput, MoETransformerLM


def router_parameter_names(model: MoETransformerLM) -> list[str]:
    """Names (as in ``named_parameters``) of every MoE layer's router parameters."""
    names = []
    for layer_name, layer in model.moe_layers():
        names += [f"{layer_name}.router.{n}" for n, _ in layer.router.named_parameters()]
    if not names:
        raise ValueError("the model has no MoE router parameters (is it dense?)")
    return names


def freeze_all_but_routers(model: MoETransformerLM) -> list[torch.nn.Parameter]:
    """Set ``requires_grad`` on router parameters only; returns them."""
    keep = set(router_parameter_names(model))
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)
        if name in keep:
            params.append(p)
    return params


def changed_non_router_parameters(model: MoETransformerLM, before: dict[str, Tensor]) -> list[str]:
    """Names of parameters other than routers whose values differ from the ``before`` snapshot (a
    ``{name: tensor}`` copy of ``named_parameters``); RoMA must leave this list empty."""
    routers = set(router_parameter_names(model))
    return [n for n, p in model.named_parameters() if n not in routers and not torch.equal(p.detach(), before[n])]


@dataclass(frozen=True)
class ClassificationData:
    """Padded samples: ``ids`` (n, L) int64, ``mask`` (n, L) bool (True = real; right-padded), ``labels``."""

    ids: Tensor
    mask: Tensor
    labels: Tensor

    @classmethod
    def from_token_lists(cls, seqs: list[list[int]], labels: list[int], max_len: int, pad_id: int = 0):
        n = len(seqs)
        if n == 0:
            raise ValueError("no samples")
        L = max(1, min(max_len, max(len(s) for s in seqs)))
        ids = torch.full((n, L), pad_id, dtype=torch.long)
        mask = torch.zeros(n, L, dtype=torch.bool)
        for i, s in enumerate(seqs):
            s = s[-L:] if len(s) > L else s  # keep the end: the label is predicted after the last token
            if not s:
                raise ValueError(f"sample {i} is empty")
            ids[i, : len(s)] = torch.as_tensor(s)
            mask[i, : len(s)] = True
        return cls(ids, mask, torch.as_tensor(labels, dtype=torch.long))

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, idx: Tensor) -> ClassificationData:
        return ClassificationData(self.ids[idx], self.mask[idx], self.labels[idx])


def forward_task(
    model: MoETransformerLM, data: ClassificationData, label_ids: Tensor
) -> tuple[Tensor, Tensor, LMOutput]:
    """(label logits (n, num_labels), routing representations (n, F), the LM output)."""
    out = model(data.ids, attention_mask=data.mask)
    last = data.mask.sum(1) - 1  # (n,)
    logits = out.logits[torch.arange(len(data)), last][:, label_ids]  # (n, num_labels)
    return logits, routing_representation(out, data.mask), out


def routing_representation(out: LMOutput, mask: Tensor) -> Tensor:
    """(B, n_moe * E): per MoE layer, mean router probabilities over each sample's real tokens."""
    seg = mask.reshape(-1).nonzero().squeeze(1) // mask.shape[1]  # (T,) sample of each real token
    counts = mask.sum(1, keepdim=True).clamp_min(1)  # (B, 1)
    feats = []
    for mo in out.moe_outputs:
        if mo.router_logits is None:
            raise ValueError("routing_representation needs routers that return logits")
        probs = mo.router_logits.float().softmax(-1)  # (T, E)
        sums = probs.new_zeros(mask.shape[0], probs.shape[1]).index_add(0, seg, probs)  # (B, E)
        feats.append(sums / counts)
    return torch.cat(feats, dim=1)


def successful_neighbors(
    emb: np.ndarray, success: np.ndarray, k: int, tau: float = 0.1
) -> tuple[np.ndarray, np.ndarray]:
    """For each sample, its ``k`` most similar successful samples (self excluded) by cosine of ``emb`` (n, d):
    (n, k) indices and (n, k) weights (softmax of cosine / tau; rows sum to 1)."""
    pool = np.nonzero(success)[0]
    if len(pool) < 2:
        raise ValueError("RoMA needs at least two successful samples to use as neighbours")
    k = min(k, len(pool) - 1)
    x = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    sims = x @ x[pool].T  # (n, |pool|)
    sims[pool, np.arange(len(pool))] = -np.inf  # a sample is not its own neighbour
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    s = np.take_along_axis(sims, top, axis=1)
    w = torch.from_numpy(s / tau).softmax(-1).numpy()
    return pool[top], w.astype(np.float32)


def roma_penalty(r: Tensor, r_nb: Tensor, w: Tensor) -> Tensor:
    """mean_i sum_j w_ij ||r_i - r_nb_ij||^2 for r (B, F), r_nb (B, k, F), w (B, k)."""
    return (w * (r[:, None, :] - r_nb).pow(2).sum(-1)).sum(-1).mean()


@dataclass(frozen=True)
class RouterTuneConfig:
    epochs: int = 6
    batch_size: int = 32
    lr: float = 3e-3
    lam: float = 0.0  # 0 = plain router-only tuning; > 0 = RoMA
    k: int = 5
    tau: float = 0.1
    seed: int = 0


@torch.no_grad()
def predict(model: MoETransformerLM, data: ClassificationData, label_ids: Tensor, batch: int = 64) -> Tensor:
    """(n,) predicted label index."""
    model.eval()
    preds = [
        forward_task(model, data.subset(torch.arange(s, min(s + batch, len(data)))), label_ids)[0].argmax(-1)
        for s in range(0, len(data), batch)
    ]
    return torch.cat(preds)


@torch.no_grad()
def routing_table(model: MoETransformerLM, data: ClassificationData, label_ids: Tensor, batch: int = 64) -> Tensor:
    """(n, F) routing representations with the current routers."""
    model.eval()
    return torch.cat(
        [
            forward_task(model, data.subset(torch.arange(s, min(s + batch, len(data)))), label_ids)[1]
            for s in range(0, len(data), batch)
        ]
    )


def tune_routers(
    model: MoETransformerLM,
    data: ClassificationData,
    label_ids: Tensor,
    config: RouterTuneConfig,
    emb: np.ndarray | None = None,
    success: np.ndarray | None = None,
) -> dict[str, list[float]]:
    """Fine-tune only the routers on ``data`` (cross-entropy over ``label_ids``, + RoMA when ``lam > 0``,
    which needs the input embeddings ``emb`` (n, d)). ``success`` (n,) bool marks the samples usable as
    neighbours (default: those the model classifies correctly before tuning). Other parameters keep
    ``requires_grad=False`` after and are checked unchanged (RuntimeError otherwise). Returns per-epoch mean
    task and RoMA losses."""
    params = freeze_all_but_routers(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(config.seed)
    nb_idx = nb_w = None
    if config.lam > 0:
        if emb is None or emb.shape[0] != len(data):
            raise ValueError("RoMA (lam > 0) needs one input embedding per training sample")
        if success is None:
            success = (predict(model, data, label_ids) == data.labels).numpy()
        nb_idx, nb_w = successful_neighbors(emb, success, config.k, config.tau)
        nb_idx, nb_w = torch.from_numpy(nb_idx), torch.from_numpy(nb_w)
    history: dict[str, list[float]] = {"task": [], "roma": []}
    for _ in range(config.epochs):
        table = routing_table(model, data, label_ids) if nb_idx is not None else None  # (n, F), fixed this epoch
        model.train()
        perm = torch.randperm(len(data), generator=gen)
        tot_task = tot_roma = 0.0
        for s in range(0, len(data), config.batch_size):
            i = perm[s : s + config.batch_size]
            logits, r, _ = forward_task(model, data.subset(i), label_ids)
            task = F.cross_entropy(logits.float(), data.labels[i])
            loss = task
            if table is not None:
                reg = roma_penalty(r, table[nb_idx[i]], nb_w[i])
                loss = loss + config.lam * reg
                tot_roma += float(reg.detach()) * len(i)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot_task += float(task.detach()) * len(i)
        history["task"].append(tot_task / len(data))
        history["roma"].append(tot_roma / len(data))
    model.eval()
    changed = changed_non_router_parameters(model, before)
    if changed:  # guards the method's premise (e.g. an optimizer or hook touching frozen weights)
        raise RuntimeError(f"router-only tuning changed non-router parameters: {changed[:5]}")
    return history
