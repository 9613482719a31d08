"""The trainable network: frozen features in, predicted features and class logits out.

Every learned map comes from predicting a modality's frozen features without seeing them:
- mapping (a sample with both modalities): the geometry features are predicted from the RGB features
  and the RGB features from the geometry features (CFM, CVPR 2024; CMDR-IAD). A dent that looks normal
  in colour, or a flat stain, breaks the appearance / shape consistency;
- masked reconstruction (a modality that has no partner, or with mapping off): the tokens of one
  stride-2 sub-grid are replaced by a learned mask token and inpainted from the other three sub-grids
  (MAE / MRKD); at inference four passes hide each sub-grid once, so every token is scored by a
  prediction that never saw it. `model.masking: false` is the old identity-shortcut ablation.

Path of one prediction, source s -> target t:
LayerNorm + Linear (C -> d) of s -> [mask token] -> information bottleneck F_g -> + embedding of the
task (s -> t) -> FiLM by the class's text embedding -> decoder (VSS / Mamba blocks, or the plain conv
ablation) -> LayerNorm -> Linear (d -> C) for t.
The modalities are also fused by cross-attention into F_fu, which only predicts the class (it holds the
target's own tokens, so nothing is decoded from it); L_IB ties the bottleneck's class posterior to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from iumad.config import ModelConfig
from iumad.model.fusion import Bottleneck, CrossModalFusion, TextAdaptor
from iumad.model.mamba import VSSBlock

MODALITIES = ("rgb", "geometry")
TASKS = tuple(f"{s}>{t}" for s in MODALITIES for t in MODALITIES)  # "rgb>geometry", "rgb>rgb", ...
PARTITIONS = 4  # stride-2 sub-grids: each hidden once at inference


class TaskOutput(NamedTuple):
    """One prediction "s>t" of the network."""

    prediction: torch.Tensor  # (B, C, H, W) t's frozen features, predicted
    log_scale: torch.Tensor | None  # (B, H, W) log of the error to expect (None without model.uncertainty)
    decoder: torch.Tensor  # (B, L, d) last decoder tokens (object-class supervision)
    gated: torch.Tensor  # (B, L, d) bottleneck tokens F_g (L_IB)
    kl: torch.Tensor  # KL term of the variational bottleneck (0 otherwise)


@dataclass
class NetOutput:
    predicted: dict[str, torch.Tensor]  # task "s>t" -> (B, C, G, G) prediction of t's frozen features
    log_scale: dict[str, torch.Tensor]  # task -> (B, G, G) predicted log of the expected error (uncertainty)
    hidden: dict[str, torch.Tensor]  # task -> (B, G, G) bool: tokens predicted without seeing them
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


def tasks_for(modalities: tuple[str, ...], mapping: bool) -> tuple[str, ...]:
    """What the network predicts for a sample with these modalities: both mapping directions when it has
    both and mapping is on, else each modality's masked reconstruction."""
    if mapping and len(modalities) == 2:
        return ("rgb>geometry", "geometry>rgb")
    return tuple(f"{m}>{m}" for m in modalities)


def partition_masks(grid: tuple[int, int], block: int = 1) -> torch.Tensor:
    """(4, H, W) bool: the grid cut into block x block squares, which fall into four partitions by the
    parity of their row and column of squares. A hidden square's neighbours outside it all belong to the
    other partitions, and together the partitions cover the grid once."""
    rows = torch.arange(grid[0])[:, None] // block % 2
    cols = torch.arange(grid[1])[None, :] // block % 2
    return torch.stack([(rows == a) & (cols == b) for a in range(2) for b in range(2)])


class ConvBlock(nn.Module):
    """The decoder ablation without Mamba: x + Linear(GELU(dwconv3x3(Linear(LN(x))))), the VSS block's
    width (d -> expand * d -> d) and place in the stack, with a local convolution instead of the scan."""

    def __init__(self, d_model: int, expand: float = 2.0) -> None:
        super().__init__()
        inner = int(expand * d_model)
        self.norm = nn.LayerNorm(d_model)
        self.in_proj = nn.Linear(d_model, inner)
        self.conv = nn.Conv2d(inner, inner, 3, padding=1, groups=inner)
        self.out_proj = nn.Linear(inner, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, d) -> (B, H, W, d)."""
        h = self.in_proj(self.norm(x)).permute(0, 3, 1, 2)
        return x + self.out_proj(F.gelu(self.conv(h)).permute(0, 2, 3, 1))


class IUMADNet(nn.Module):
    def __init__(self, cfg: ModelConfig, in_channels: int, text_dim: int = 384) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.inp = nn.ModuleDict({m: nn.Sequential(nn.LayerNorm(in_channels), nn.Linear(in_channels, d))
                                  for m in MODALITIES})
        self.mask_token = nn.Parameter(torch.zeros(d))
        self.task = nn.ParameterDict({t.replace(">", "_to_"): nn.Parameter(torch.zeros(d)) for t in TASKS})
        self.fusion = CrossModalFusion(d, cfg.heads)
        self.bottleneck = Bottleneck(d, cfg.bottleneck, cfg.dropout, cfg.variational) if cfg.bottleneck else None
        self.adaptor = TextAdaptor(d, text_dim)
        block = (lambda: VSSBlock(d, d_state=cfg.d_state, expand=cfg.expand, routes=cfg.routes)) \
            if cfg.decoder == "mamba" else (lambda: ConvBlock(d, cfg.expand))
        self.decoder = nn.ModuleList(block() for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d)
        self.out = nn.ModuleDict({m: nn.Linear(d, in_channels) for m in MODALITIES})
        self.scale = nn.ModuleDict({m: nn.Linear(d, 1) for m in MODALITIES}) if cfg.uncertainty else None

    @property
    def device(self) -> torch.device:
        """Where the weights live: inputs are moved here, outputs come back to the CPU."""
        return self.mask_token.device

    # ------------------------------------------------------------------ parts

    def tokens(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """(B, C, H, W) frozen features -> (B, H, W, d) tokens per modality (jittered in training)."""
        out = {}
        for m, f in feats.items():
            t = f.permute(0, 2, 3, 1)
            if self.training:
                t = jitter(t, self.cfg.jitter_scale, self.cfg.jitter_prob)
            out[m] = self.inp[m](t)
        return out

    def squeeze(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The information bottleneck F_g and its KL term (the identity and 0 without a bottleneck)."""
        if self.bottleneck is None:
            return tokens, tokens.new_zeros(())
        return self.bottleneck(tokens)

    def fused_logits(self, tokens: dict[str, torch.Tensor], class_texts: torch.Tensor) -> torch.Tensor:
        """Class logits of F_fu, the cross-attention fusion of every modality's tokens."""
        b, h, w, d = next(iter(tokens.values())).shape
        fused = self.fusion({m: t.reshape(b, h * w, d) for m, t in tokens.items()}, (h, w))
        return self.adaptor.logits(fused, class_texts)

    def predict(self, tokens: dict[str, torch.Tensor], task: str, text: torch.Tensor,
                hidden: torch.Tensor | None = None) -> TaskOutput:
        """One task "s>t" from the source's tokens. A reconstruction (s == t) hides the `hidden`
        (B, H, W) tokens behind the mask token."""
        source, target = task.split(">")
        x = tokens[source]
        if hidden is not None and source == target and self.cfg.masking:
            x = torch.where(hidden[..., None], self.mask_token.to(x.dtype).expand_as(x), x)
        b, h, w, d = x.shape
        gated, kl = self.squeeze(x)
        x = gated + self.task[task.replace(">", "_to_")]
        if self.cfg.text_film:
            x = self.adaptor.condition(x.reshape(b, h * w, d), text).reshape(b, h, w, d)
        for layer in self.decoder:
            x = layer(x)
        x = self.norm(x)
        log_scale = None if self.scale is None else self.scale[target](x)[..., 0]
        return TaskOutput(self.out[target](x).permute(0, 3, 1, 2), log_scale, x.reshape(b, h * w, d),
                          gated.reshape(b, h * w, d), kl)

    # ------------------------------------------------------------------ training

    def forward(self, feats: dict[str, torch.Tensor], text: torch.Tensor, class_texts: torch.Tensor,
                hidden: dict[str, torch.Tensor] | None = None) -> NetOutput:
        """Training pass. feats: (B, C, G, G) frozen features per present modality; text: (B, T)
        embedding of each sample's class; class_texts: (K, T) of all known classes; hidden: the masks
        to use per reconstruction task (a random sub-grid per sample when not given; a teacher gets
        its student's)."""
        b, _, h, w = next(iter(feats.values())).shape
        tokens = self.tokens(feats)
        mods = tuple(m for m in MODALITIES if m in feats)
        hidden = dict(hidden or {})
        predicted, log_scale, dec, gated = {}, {}, [], []
        kl = tokens[mods[0]].new_zeros(())
        for task in tasks_for(mods, self.cfg.mapping):
            source, target = task.split(">")
            if source == target and not self.cfg.masking:  # the shortcut ablation learns every token
                hidden[task] = torch.ones(b, h, w, dtype=torch.bool, device=text.device)
            elif source == target and task not in hidden:
                parts = partition_masks((h, w), self.cfg.mask_block).to(text.device)
                hidden[task] = parts[torch.randint(PARTITIONS, (b,), device=text.device)]
            elif source != target:
                hidden[task] = torch.ones(b, h, w, dtype=torch.bool, device=text.device)
            out = self.predict(tokens, task, text, hidden[task])
            predicted[task] = out.prediction
            if out.log_scale is not None:
                log_scale[task] = out.log_scale
            dec.append(out.decoder)
            gated.append(out.gated)
            kl = kl + out.kl
        return NetOutput(
            predicted=predicted,
            log_scale=log_scale,
            hidden=hidden,
            logits_fused=self.fused_logits(tokens, class_texts),
            logits_bottleneck=self.adaptor.logits(torch.cat(gated, 1), class_texts),
            logits_decoder=self.adaptor.logits(torch.cat(dec, 1), class_texts),
            kl=kl / len(predicted),
        )

    # ------------------------------------------------------------------ scoring

    def anomaly_tokens(self, feats: dict[str, torch.Tensor], text: torch.Tensor) -> dict[str, torch.Tensor]:
        """Inference: per-token discrepancy 1 - cos(frozen, predicted) for every task of the sample (divided
        by the predicted expected error with `model.uncertainty`), keyed "mapping/<target>" or
        "reconstruction/<modality>", (B, G, G) each. A masked reconstruction runs the decoder once per
        sub-grid, scoring each token in the pass that hid it."""
        _, _, h, w = next(iter(feats.values())).shape
        tokens = self.tokens(feats)
        mods = tuple(m for m in MODALITIES if m in feats)
        out = {}
        for task in tasks_for(mods, self.cfg.mapping):
            source, target = task.split(">")
            truth = feats[target]
            key = f"mapping/{target}" if source != target else f"reconstruction/{target}"
            if source != target or not self.cfg.masking:  # one pass (the shortcut ablation sees every token)
                out[key] = self._scored(truth, self.predict(tokens, task, text))
                continue
            score = truth.new_zeros(truth.shape[0], h, w)
            for part in partition_masks((h, w), self.cfg.mask_block).to(truth.device):
                mask = part.expand(truth.shape[0], h, w)
                score = torch.where(mask, self._scored(truth, self.predict(tokens, task, text, mask)), score)
            out[key] = score
        return out

    @staticmethod
    def _scored(truth: torch.Tensor, out: TaskOutput) -> torch.Tensor:
        err = prediction_error(truth, out.prediction.to(truth.dtype))  # float32 under a bfloat16 autocast too
        return err if out.log_scale is None else err * torch.exp(-out.log_scale.to(truth.dtype))


def prediction_loss(target: torch.Tensor, predicted: torch.Tensor, where: torch.Tensor,
                    cosine: float = 1.0, mse: float = 1.0, log_scale: torch.Tensor | None = None) -> torch.Tensor:
    """cosine * cosine distance + mse * scale-free squared error, averaged over the `where` (B, G, G)
    tokens; features are (B, C, G, G). With a predicted `log_scale` s, the negative log-likelihood of the
    (detached) cosine distance e under an exponential law of mean exp(s), e * exp(-s) + s, is added: it
    teaches s the error to expect at each token of a normal sample, and leaves the prediction's own
    gradient unweighted (so uncertain tokens are not learned less)."""
    cos = 1 - F.cosine_similarity(target, predicted, dim=1)
    err = (predicted - target).pow(2).mean(1) / target.pow(2).mean().clamp_min(1e-8)
    per_token = cosine * cos + mse * err
    if log_scale is not None:
        per_token = per_token + cos.detach() * torch.exp(-log_scale) + log_scale
    w = where.to(cos.dtype)
    return (per_token * w).sum() / w.sum().clamp_min(1.0)


def prediction_error(target: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """Per-token 1 - cosine(frozen, predicted): (B, C, G, G) -> (B, G, G)."""
    return 1 - F.cosine_similarity(target, predicted, dim=1)
