"""Cross-modal fusion, the information bottleneck, and the text-conditioned adaptor.

Fusion: each modality's tokens attend to a pooled grid of the other modality's tokens (784 queries to
196 keys at 224 px: a quarter of the cost of full cross-attention, which on a 2-core CPU would cost more
than the decoder); the two enriched streams are averaged into F_fu. A class with one modality passes its
tokens through the same norm and projection, so F_fu has the same scale either way.

Bottleneck (IB-IUMAD / DMIB): F_g = Linear -> ReLU -> Dropout -> Linear (F_fu). The IB loss
L_IB = KL( P(Y|F_fu).detach() || P(Y|F_g) ) keeps in F_g what identifies the object class. The
variational form (mu, log-variance, reparameterised sample, beta * KL to N(0, I)) is an ablation option.

Text adaptor: the class's sentence embedding gives a per-channel scale and shift (FiLM) on the tokens,
and classification is cosine similarity between pooled tokens and projected text embeddings, so a new
class adds an embedding, never classifier weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CrossModalFusion(nn.Module):
    """(B, L, d) rgb and/or geometry tokens on an HxW grid -> fused (B, L, d)."""

    def __init__(self, dim: int, heads: int = 4, pool: int = 2) -> None:
        super().__init__()
        self.pool = pool
        self.norm_q = nn.ModuleDict({m: nn.LayerNorm(dim) for m in ("rgb", "geometry")})
        self.norm_kv = nn.ModuleDict({m: nn.LayerNorm(dim) for m in ("rgb", "geometry")})
        self.attn = nn.ModuleDict({m: nn.MultiheadAttention(dim, heads, batch_first=True)
                                   for m in ("rgb", "geometry")})
        self.out = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))

    def _pooled(self, tokens: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        b, _, d = tokens.shape
        grid = tokens.transpose(1, 2).reshape(b, d, *hw)
        return F.avg_pool2d(grid, self.pool, ceil_mode=True).flatten(2).transpose(1, 2)

    def forward(self, tokens: dict[str, torch.Tensor], hw: tuple[int, int]) -> torch.Tensor:
        if not tokens:
            raise ValueError("fusion needs at least one modality")
        streams = []
        for m, t in tokens.items():
            other = [o for o in tokens if o != m]
            if other:
                kv = self.norm_kv[other[0]](self._pooled(tokens[other[0]], hw))
                t = t + self.attn[m](self.norm_q[m](t), kv, kv, need_weights=False)[0]
            streams.append(t)
        return self.out(torch.stack(streams).mean(0))


class Bottleneck(nn.Module):
    """F_fu -> F_g; deterministic (Linear-ReLU-Dropout-Linear) or variational (returns a KL term)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.1, variational: bool = False) -> None:
        super().__init__()
        self.variational = variational
        self.encode = nn.Linear(dim, 2 * hidden if variational else hidden)
        self.drop = nn.Dropout(dropout)
        self.decode = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (F_g, kl) where kl is 0 for the deterministic form."""
        h = self.encode(x)
        if not self.variational:
            return self.decode(self.drop(F.relu(h))), x.new_zeros(())
        mu, logvar = h.chunk(2, dim=-1)
        logvar = logvar.clamp(-8, 8)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(-1).mean()
        return self.decode(self.drop(z)), kl


class TextAdaptor(nn.Module):
    """Class text embedding -> FiLM (scale, shift) on tokens, and a cosine classifier over classes."""

    def __init__(self, dim: int, text_dim: int = 384, proj: int = 128, temperature: float = 0.07) -> None:
        super().__init__()
        self.film = nn.Sequential(nn.Linear(text_dim, dim), nn.SiLU(), nn.Linear(dim, 2 * dim))
        nn.init.normal_(self.film[-1].weight, std=1e-3)  # starts close to the identity,
        nn.init.zeros_(self.film[-1].bias)  # yet gradients reach the first layer from step one
        self.text_proj = nn.Linear(text_dim, proj)
        self.token_proj = nn.Linear(dim, proj)
        self.log_scale = nn.Parameter(torch.tensor(float(-torch.log(torch.tensor(temperature)))))

    def condition(self, tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """tokens (B, L, d), text (B, text_dim) -> tokens * (1 + gamma) + beta."""
        gamma, beta = self.film(text).unsqueeze(1).chunk(2, dim=-1)
        return tokens * (1 + gamma) + beta

    def logits(self, tokens: torch.Tensor, class_texts: torch.Tensor) -> torch.Tensor:
        """Mean-pooled tokens (B, L, d) vs every class's text (K, text_dim) -> (B, K) scaled cosines."""
        img = F.normalize(self.token_proj(tokens.mean(1)), dim=-1)
        txt = F.normalize(self.text_proj(class_texts), dim=-1)
        return self.log_scale.clamp(max=4.6).exp() * img @ txt.t()


def ib_loss(logits_fused: torch.Tensor, logits_bottleneck: torch.Tensor) -> torch.Tensor:
    """L_IB = KL( P(Y|F_fu) detached || P(Y|F_g) ), batch mean."""
    target = F.log_softmax(logits_fused.detach(), dim=-1)
    return F.kl_div(F.log_softmax(logits_bottleneck, dim=-1), target, log_target=True, reduction="batchmean")
