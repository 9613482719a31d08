"""Distillation from the previous model, so an incremental step does not overwrite what it knew.

Two terms, added to the training loss through `Detector.train(distill=...)`:
- predictions: on replayed samples of the classes the step does not learn, the new network's predicted
  features (mapping, and reconstruction with the same hidden tokens) are pulled towards the old
  network's (scale-free MSE), and so is its predicted expected error (MSE of the log); the classes
  being learned are left out (the old model never saw a new class, and an update is meant to change
  its class);
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
        dev = self.teacher.device
        self.old_texts = old_class_texts.to(dev)
        self.n_old = len(old_class_texts)
        self.learning = torch.tensor(learning, dtype=torch.long, device=dev)
        self.cfg = cfg

    def __call__(self, feats: dict[str, torch.Tensor], text: torch.Tensor, out: NetOutput,
                 y: torch.Tensor) -> torch.Tensor:
        old = ~torch.isin(y, self.learning)
        with torch.no_grad():
            tokens = self.teacher.tokens(feats)
            logits = self.teacher.fused_logits(tokens, self.old_texts)
            if old.any():
                tokens = {m: t[old] for m, t in tokens.items()}
                targets = {task: self.teacher.predict(tokens, task, text[old], out.hidden[task][old])
                           for task in out.predicted}
            else:
                targets = {}
        loss = torch.zeros((), device=y.device)
        for task, teacher in targets.items():
            target = teacher.prediction
            loss = loss + self.cfg.distill_weight * F.mse_loss(out.predicted[task][old], target) / \
                target.pow(2).mean().clamp_min(1e-8)
            if teacher.log_scale is not None:  # the expected error that old classes' scores are divided by
                loss = loss + self.cfg.distill_weight * F.mse_loss(out.log_scale[task][old], teacher.log_scale)
        if self.n_old > 1:
            t = self.cfg.distill_temperature
            student = F.log_softmax(out.logits_fused[:, :self.n_old] / t, dim=-1)
            teacher = F.softmax(logits / t, dim=-1)
            loss = loss + self.cfg.distill_logit_weight * t * t * F.kl_div(student, teacher, reduction="batchmean")
        return loss
