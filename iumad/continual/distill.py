"""Distillation from the previous model, so an incremental step does not overwrite what it knew.

Two terms, added to the training loss through `Detector.train(distill=...)`:
- reconstructions: on replayed samples of the classes the step does not learn, the new decoder's output
  is pulled towards the old decoder's (scale-free MSE); the classes being learned are left out (the old
  model never saw a new class, and an update is meant to change its class);
- class logits: on every sample, KL(old || new) between the softened class distributions over the old
  classes (Li & Hoiem's LwF), so the classifier that `auto` relies on keeps its old decisions.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from iumad.config import ContinualConfig
from iumad.model.network import IUMADNet, NetOutput


class Distiller:
    """Callable `(feats, text, out, y) -> loss` holding a frozen copy of the previous network."""

    def __init__(self, previous: IUMADNet, old_class_texts: torch.Tensor, cfg: ContinualConfig,
                 learning: list[int]) -> None:
        """`learning`: indices of the classes this step learns (their reconstructions are not distilled)."""
        self.teacher = copy.deepcopy(previous).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.old_texts = old_class_texts
        self.n_old = len(old_class_texts)
        self.learning = torch.tensor(learning, dtype=torch.long)
        self.cfg = cfg

    def __call__(self, feats: dict[str, torch.Tensor], text: torch.Tensor, out: NetOutput,
                 y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            fused, gated, _ = self.teacher.encode(feats)
            g = next(iter(feats.values())).shape[-1]
            old = ~torch.isin(y, self.learning)
            recon = self.teacher.decode(gated[old], text[old], (g, g), tuple(feats))[0] if old.any() else {}
            logits = self.teacher.adaptor.logits(fused, self.old_texts)
        loss = torch.zeros(())
        for m, target in recon.items():
            loss = loss + self.cfg.distill_weight * F.mse_loss(out.recon[m][old], target) / \
                target.pow(2).mean().clamp_min(1e-8)
        if self.n_old > 1:
            t = self.cfg.distill_temperature
            student = F.log_softmax(out.logits_fused[:, :self.n_old] / t, dim=-1)
            teacher = F.softmax(logits / t, dim=-1)
            loss = loss + self.cfg.distill_logit_weight * t * t * F.kl_div(student, teacher, reduction="batchmean")
        return loss
