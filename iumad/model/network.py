"""The trainable network: frozen features in, reconstructed features and class logits out.

per modality: LayerNorm + Linear (C -> d), feature jitter during training (UniAD)
-> cross-modal fusion F_fu -> information bottleneck F_g -> FiLM by the class's text embedding
-> stack of VSS (Mamba) blocks on the token grid -> per-modality Linear (d -> C) reconstructions.
Class logits (cosine to text embeddings) come from F_fu, F_g (for L_IB) and the last decoder block
(object-class supervision of the decoder).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from iumad.config import ModelConfig
from iumad.model.fusion import Bottleneck, CrossModalFusion, TextAdaptor
from iumad.model.mamba import VSSBlock

MODALITIES = ("rgb", "geometry")


@dataclass
class NetOutput:
    recon: dict[str, torch.Tensor]  # (B, C, G, G) per input modality
    logits_fused: torch.Tensor  # (B, K)
    logits_bottleneck: torch.Tensor
    logits_decoder: torch.Tensor
    kl: torch.Tensor  # variational IB term (0 for the deterministic bottleneck)


def jitter(tokens: torch.Tensor, scale: float, prob: float) -> torch.Tensor:
    """UniAD feature jitter: add N(0, (scale * |token| / C)^2) noise to every token."""
    if scale <= 0 or torch.rand(()) > prob:
        return tokens
    norms = tokens.norm(dim=-1, keepdim=True) / tokens.shape[-1]
    return tokens + torch.randn_like(tokens) * norms * scale


class IUMADNet(nn.Module):
    def __init__(self, cfg: ModelConfig, in_channels: int, text_dim: int = 384) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.inp = nn.ModuleDict({m: nn.Sequential(nn.LayerNorm(in_channels), nn.Linear(in_channels, d))
                                  for m in MODALITIES})
        self.fusion = CrossModalFusion(d, cfg.heads)
        self.bottleneck = Bottleneck(d, cfg.bottleneck, cfg.dropout, cfg.variational)
        self.adaptor = TextAdaptor(d, text_dim)
        self.decoder = nn.ModuleList(
            VSSBlock(d, d_state=cfg.d_state, expand=cfg.expand, routes=cfg.routes) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(d)
        self.out = nn.ModuleDict({m: nn.Linear(d, in_channels) for m in MODALITIES})

    def encode(self, feats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Class-independent part: (F_fu, F_g, kl), tokens (B, L, d). F_fu also predicts the class."""
        _, _, h, w = next(iter(feats.values())).shape
        tokens = {}
        for m, f in feats.items():
            t = f.flatten(2).transpose(1, 2)
            if self.training:
                t = jitter(t, self.cfg.jitter_scale, self.cfg.jitter_prob)
            tokens[m] = self.inp[m](t)
        fused = self.fusion(tokens, (h, w))
        gated, kl = self.bottleneck(fused)
        return fused, gated, kl

    def decode(self, gated: torch.Tensor, text: torch.Tensor, hw: tuple[int, int],
               modalities: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Class-conditioned reconstruction: ({modality: (B, C, G, G)}, decoder tokens (B, L, d))."""
        b = gated.shape[0]
        x = self.adaptor.condition(gated, text).reshape(b, *hw, -1)
        for block in self.decoder:
            x = block(x)
        x = self.norm(x)
        recon = {m: self.out[m](x).permute(0, 3, 1, 2) for m in modalities}
        return recon, x.reshape(b, hw[0] * hw[1], -1)

    def forward(self, feats: dict[str, torch.Tensor], text: torch.Tensor, class_texts: torch.Tensor) -> NetOutput:
        """feats: (B, C, G, G) frozen features per present modality; text: (B, T) embedding of each
        sample's class; class_texts: (K, T) embeddings of all known classes."""
        _, _, h, w = next(iter(feats.values())).shape
        fused, gated, kl = self.encode(feats)
        recon, dec = self.decode(gated, text, (h, w), tuple(feats))
        return NetOutput(
            recon=recon,
            logits_fused=self.adaptor.logits(fused, class_texts),
            logits_bottleneck=self.adaptor.logits(gated, class_texts),
            logits_decoder=self.adaptor.logits(dec, class_texts),
            kl=kl,
        )


def reconstruction_loss(target: torch.Tensor, recon: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine distance, scale-free MSE) averaged over tokens; features are (B, C, G, G)."""
    cos = 1 - F.cosine_similarity(target, recon, dim=1).mean()
    mse = F.mse_loss(recon, target) / target.pow(2).mean().clamp_min(1e-8)
    return cos, mse


def anomaly_tokens(target: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Per-token 1 - cosine(original, reconstruction): (B, C, G, G) -> (B, G, G)."""
    return 1 - F.cosine_similarity(target, recon, dim=1)
