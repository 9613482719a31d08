"""Training the network on cached frozen features (one incremental step, or the joint setting).

Loss per batch: the prediction loss of every task the batch's modalities give (mapping directions,
masked reconstruction on the hidden tokens), the decoder's and F_fu's class cross-entropy and L_IB
when there are several classes, beta * KL for the variational bottleneck, and the distillation term a
caller passes. Under torchrun each rank trains its share of every batch inside DistributedDataParallel.
"""

from __future__ import annotations

import math
import random
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from iumad.config import Config, ModelConfig
from iumad.model.features import SampleFeatures
from iumad.model.fusion import ib_loss
from iumad.model.network import PARTITIONS, IUMADNet, NetOutput, partition_masks, prediction_loss, tasks_for
from iumad.progress import ProgressFn, no_progress

DistillFn = Callable[[dict[str, torch.Tensor], torch.Tensor, NetOutput, torch.Tensor], torch.Tensor]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def network_loss(net_out: NetOutput, feats: dict[str, torch.Tensor], y: torch.Tensor, cfg: Config,
                 n_classes: int) -> torch.Tensor:
    """The loss of one batch's output, without distillation."""
    lc = cfg.loss
    loss = torch.zeros((), device=y.device)
    for task, pred in net_out.predicted.items():
        target = task.split(">")[1]
        loss = loss + prediction_loss(feats[target], pred, net_out.hidden[task], lc.cosine, lc.mse,
                                      net_out.log_scale.get(task))
    if n_classes > 1:
        loss = loss + lc.cls * (F.cross_entropy(net_out.logits_decoder, y) + F.cross_entropy(net_out.logits_fused, y))
        loss = loss + lc.ib * ib_loss(net_out.logits_fused, net_out.logits_bottleneck)
    if cfg.model.variational:
        loss = loss + cfg.model.beta * net_out.kl
    return loss


def crop(feats: dict[str, torch.Tensor], size: int, gen: random.Random) -> dict[str, torch.Tensor]:
    """One random size x size window of the token grid, the same for every modality and sample of the
    batch (0, or a size not below the grid: the whole grid). A decoder pass costs in proportion to its
    tokens, so crops buy more optimisation steps per second; inference always sees the whole grid."""
    h, w = next(iter(feats.values())).shape[-2:]
    if size <= 0 or (size >= h and size >= w):
        return feats
    top, left = gen.randrange(max(1, h - size + 1)), gen.randrange(max(1, w - size + 1))
    return {m: f[..., top:top + size, left:left + size] for m, f in feats.items()}


def hidden_parts(feats: dict[str, torch.Tensor], parts: Sequence[int], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The tokens each sample's masked reconstructions hide: partition `parts[i]` of sample i."""
    first = next(iter(feats.values()))
    masks = partition_masks(tuple(first.shape[-2:]), cfg.mask_block)[torch.tensor(list(parts))].to(first.device)
    return {t: masks for t in tasks_for(tuple(feats), cfg.mapping) if t.split(">")[0] == t.split(">")[1]}


def train_network(net: IUMADNet, items: Sequence[tuple[int, SampleFeatures]], class_texts: torch.Tensor,
                  cfg: Config, epochs: int | None = None, progress: ProgressFn = no_progress,
                  distill: DistillFn | None = None) -> list[float]:
    """Optimise `net` on (class index, features) pairs; returns the mean loss of each epoch (the loss
    curve a step records). Batches hold one modality set each."""
    seed_everything(cfg.train.seed)
    epochs = cfg.train.epochs if epochs is None else epochs
    groups: dict[tuple[str, ...], list[tuple[int, SampleFeatures]]] = {}
    for k, s in items:
        groups.setdefault(s.modalities, []).append((k, s))
    world, rank = _world()
    model = net
    dev = net.device
    class_texts = class_texts.to(dev)
    if world > 1:  # each rank trains its share of every batch; DDP averages the gradients
        model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None,
                                                          find_unused_parameters=True)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    bs = cfg.train.batch_size
    steps_per_epoch = sum(math.ceil(len(g) / bs) for g in groups.values())
    total = max(1, epochs * steps_per_epoch)
    if total >= 4:  # one-cycle warm-up over >= 2 steps (its phases need that), else a constant rate
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.train.lr, total_steps=total,
                                                    pct_start=min(0.5, max(0.1, 2 / total)))
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    gen = random.Random(cfg.train.seed)
    n_classes = len(class_texts)
    losses: list[float] = []
    net.train()
    progress("train", 0, epochs)  # the stage's clock starts before the first epoch, not after it
    for epoch in range(epochs):
        batches = []
        for mods, group in groups.items():
            order = list(range(len(group)))
            gen.shuffle(order)
            batches += [(mods, [group[i] for i in order[j:j + bs]]) for j in range(0, len(order), bs)]
        gen.shuffle(batches)
        running = 0.0
        for mods, batch in batches:
            parts = [gen.randrange(PARTITIONS) for _ in batch]  # drawn for the whole batch: rank-invariant
            if world > 1:
                batch, parts = batch[rank::world] or batch[:1], parts[rank::world] or parts[:1]
            y = torch.tensor([c for c, _ in batch], device=dev)
            feats = crop({m: torch.from_numpy(np.stack([s.features[m] for _, s in batch])).to(dev).float()
                          for m in mods}, cfg.train.crop, gen)
            text = class_texts[y]
            out = model(feats, text, class_texts, hidden_parts(feats, parts, cfg.model))
            loss = network_loss(out, feats, y, cfg, n_classes)
            if n_classes <= 1 and world > 1:  # DDP waits for a gradient of every output it saw
                loss = loss + 0 * (out.logits_decoder.sum() + out.logits_fused.sum() + out.logits_bottleneck.sum())
            if distill is not None:
                loss = loss + distill(feats, text, out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            running += float(loss.detach())
        losses.append(running / max(1, len(batches)))
        progress("train", epoch + 1, epochs, f"loss {losses[-1]:.4f}")
    net.eval()
    return losses
