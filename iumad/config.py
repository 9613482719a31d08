"""Typed configuration loaded from YAML: defaults in code, files override only what they name.

Unknown keys and wrong types are usage errors (exit 2) naming the file and the key, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from iumad.errors import UsageError


@dataclass
class BackboneConfig:
    name: str = "tf_efficientnet_lite0"
    weights: str | None = None
    levels: list[int] = field(default_factory=lambda: [2, 3])
    input_size: int = 256
    precision: str = "float32"  # auto: bfloat16 on CPUs with AVX512-BF16 or AMX, float32 elsewhere (resolved
    #                          once per model: a saved model keeps the precision its memories were built in)
    cache_limit_gb: float = 4.0  # feature cache bound, least recently used out (0 = none); not in config_hash


@dataclass
class ModelConfig:
    dim: int = 128  # token width inside fusion and decoder
    bottleneck: int = 0  # hidden width of the information bottleneck (ablation: 64); 0 = none, the default
    dropout: float = 0.1
    variational: bool = False  # variational IB (ablation)
    beta: float = 1e-3  # weight of KL to N(0, I) in the variational form
    heads: int = 4
    depth: int = 2  # VSS blocks in the decoder
    d_state: int = 16
    expand: int = 2
    routes: str = "strided"  # "strided" (EfficientVMamba ES2D: a quarter of the scan cost) or "cross" (SS2D)
    decoder: str = "mamba"  # mamba (VSS blocks) or conv (the ablation: depthwise conv blocks, same width and depth)
    mapping: bool = True  # both modalities: predict each from the other (cross-modal mapping branch)
    masking: bool = True  # reconstruction inpaints hidden sub-grids; false = the identity-shortcut ablation
    mask_block: int = 1  # side of the hidden squares, in tokens (four partitions of squares, one hidden per pass)
    text_film: bool = True  # condition the decoder on the class's text embedding (FiLM)
    uncertainty: bool = True  # predict each token's expected error and score the error relative to it
    jitter_scale: float = 0.0  # UniAD feature jitter: noise ~ N(0, (scale * |f| / C)^2); 0 = off
    jitter_prob: float = 1.0


@dataclass
class LossConfig:
    cosine: float = 1.0
    mse: float = 1.0
    cls: float = 0.1
    ib: float = 0.1


@dataclass
class TrainConfig:
    epochs: int = 80  # chosen on painted tire (benchmarks/tune_real.py): 0.897 against 0.881 at 40
    batch_size: int = 8
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    threads: int = 0  # 0 = torch's default
    crop: int = 16  # train on random crops of crop x crop tokens (0 = the whole grid); inference sees it whole
    device: str = "auto"  # auto (CUDA when torch sees it), cpu, cuda or cuda:N; not part of config_hash


@dataclass
class ScoreConfig:
    sigma: float = 4.0  # Gaussian smoothing of maps at input resolution
    image_score: str = "max"  # max or topk
    topk: float = 0.01  # fraction of pixels averaged for topk
    learned: bool = True  # the network's maps: mapping and reconstruction (false: a memory-bank-only model)
    retrieval: bool = True  # nearest-neighbour branch against stored normal features
    fusion: str = "mean"  # how a class's maps are combined: mean (every standardised map alike) or
    #                       reliability (weight 1 / spread of its image scores on held-out normals)
    bank_size: int = 4096  # tokens per class and modality kept for retrieval (coreset)
    foreground_dilation: int = 8  # px; pixels farther from the object (geometry foreground, object_region)
    #                               are not scored
    object_region: bool = True  # RGB-only classes: score only where their normals have texture, when that
    #                             outlines an object on a plainer background (iumad.data.region)
    class_by: str = "prototypes"  # how "auto" predicts a class: prototypes (nearest frozen pooled
    #                               descriptor), classifier (the text classifier), memory (token memory)
    prototypes: int = 64  # pooled descriptors kept per class and modality for class_by = prototypes
    precision: str = "auto"  # auto: bfloat16 on CPUs with AVX512-BF16 or AMX, float32 elsewhere; bfloat16:
    #                          the network and the retrieval product in bfloat16 when scoring (slower on CPUs
    #                          without it); float32: the same numbers on every machine


@dataclass
class ContinualConfig:
    replay: bool = True  # train each step on the old classes' exemplars too
    distill: bool = True  # keep the previous model's reconstructions and class logits (distillation)
    distill_weight: float = 1.0  # weight of the reconstruction distillation term
    distill_logit_weight: float = 1.0  # weight of the KL between old and new class logits
    distill_temperature: float = 2.0
    exemplar_method: str = "herding"  # herding (in pooled feature space) or random
    exemplar_budget: int = 20  # replay exemplars per class (per_class) or over all classes (total)
    exemplar_budget_mode: str = "per_class"  # per_class, or total: split evenly, old classes re-balanced
    holdout: int = 16  # held-out normal samples per class: calibration, thresholds, drift; never trained on
    evaluation_budget: int | None = None  # samples per old class per step (a fixed stratified subset); 0/null = all
    threshold_from: str = "evaluation"  # evaluation: F1-optimal on a labelled evaluation set when it has
    #                                     defects; normals: always the quantile of held-out normal scores
    threshold_quantile: float = 0.99  # normal-quantile thresholds (classes without defect data)
    quarantine_z: float = 4.0  # nightly: robust z-score above which a new "good" sample is quarantined
    quarantine_max_share: float = 0.05  # nightly: at most this share of a delivery is quarantined


@dataclass
class Config:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    continual: ContinualConfig = field(default_factory=ContinualConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Of the model's configuration: where it runs and how much it caches are left out."""
        d = self.to_dict()
        d["train"].pop("device", None)
        d["backbone"].pop("cache_limit_gb", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


DEVICE_NAMES = re.compile(r"auto|cpu|cuda(:\d+)?")
CHOICES = {("model", "routes"): ("strided", "cross"), ("model", "decoder"): ("mamba", "conv"), ("score", "image_score"): ("max", "topk"),
           ("score", "fusion"): ("mean", "reliability"), ("score", "precision"): ("float32", "bfloat16", "auto"),
           ("backbone", "precision"): ("float32", "bfloat16", "auto"),
           ("continual", "exemplar_method"): ("herding", "random"),
           ("continual", "exemplar_budget_mode"): ("per_class", "total"),
           ("continual", "threshold_from"): ("evaluation", "normals"),
           ("score", "class_by"): ("prototypes", "classifier", "memory")}


def from_dict(data: dict[str, Any], source: str = "config") -> Config:
    """Build a Config from nested dicts, checking every key, type and choice."""
    cfg = _build(Config, data, source, "")
    for (section, key), allowed in CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            raise UsageError(f"{source}: {section}.{key} must be one of {', '.join(allowed)}, got {_show(value)}")
    if not DEVICE_NAMES.fullmatch(str(cfg.train.device)):
        raise UsageError(f"{source}: train.device must be auto, cpu, cuda or cuda:N, got {_show(cfg.train.device)}")
    if cfg.continual.evaluation_budget is not None and cfg.continual.evaluation_budget < 0:
        raise UsageError(f"{source}: continual.evaluation_budget must be >= 0 (0 or null: every sample), "
                         f"got {cfg.continual.evaluation_budget}")
    if not (cfg.score.learned or cfg.score.retrieval):
        raise UsageError(f"{source}: score.learned and score.retrieval are both off; nothing would score")
    if cfg.model.variational and cfg.model.bottleneck <= 0:
        raise UsageError(f"{source}: model.variational needs a bottleneck; set model.bottleneck (e.g. 64) "
                         "or variational: false")
    return cfg


def load_config(path: Path | None) -> Config:
    """Defaults, overridden by the YAML file at `path` (if given)."""
    if path is None:
        return Config()
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise UsageError(f"{path}: config file not found", file=path, fix="check the --config path") from None
    except OSError as exc:  # a directory, a symlink loop, no permission
        raise UsageError(f"{path}: cannot read the config file ({exc.strerror or type(exc).__name__})",
                         file=path) from None
    except RecursionError:
        raise UsageError(f"{path}: malformed YAML (nested too deeply); fix the file", file=path,
                         fix="fix the file") from None
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: bad UTF-8, an int beyond Python's digit limit
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise UsageError(f"{path}: malformed YAML ({first}); fix the file", file=path, fix="fix the file") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a config must be a YAML mapping of sections", file=path)
    try:
        return from_dict(data, str(path))
    except UsageError as exc:  # its message names the file; say so in the structured field too
        exc.file = exc.file or str(path)
        raise


def _build(cls: type, data: Any, source: str, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise UsageError(f"{source}: {prefix.rstrip('.') or 'top level'} must be a mapping")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names, key=_show)  # YAML keys may be of any type, even None
    if unknown:
        first = unknown[0]
        shown = first if isinstance(first, str) and len(first) <= 80 and first.isprintable() else _show(first)
        raise UsageError(f"{source}: unknown key {prefix}{shown}; allowed: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        kind = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(kind):
            kwargs[name] = _build(kind, value, source, key + ".")
        else:
            kwargs[name] = _coerce(kind, value, source, key)
    return cls(**kwargs)


def _coerce(kind: Any, value: Any, source: str, key: str) -> Any:
    args = get_args(kind)
    if value is None and type(None) in args:
        return None
    base = next((a for a in args if a is not type(None)), kind) if args and get_origin(kind) is not list else kind
    if get_origin(base) is list:
        if not isinstance(value, list):
            raise UsageError(f"{source}: {key} must be a list")
        return [_coerce(get_args(base)[0], v, source, key) for v in value]
    if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        with contextlib.suppress(OverflowError):  # an int beyond float range falls through to the error
            return float(value)
    if base is bool and isinstance(value, bool):
        return value
    if base in (int, str) and isinstance(value, base) and not isinstance(value, bool) \
            and (base is str or abs(value) <= _INT_LIMIT):
        return value
    raise UsageError(f"{source}: {key} must be {getattr(base, '__name__', base)}, got {_show(value)}")


_INT_LIMIT = 2**63 - 1  # larger YAML ints would break the config hash (JSON) and every consumer


def _show(value: Any) -> str:
    """A short repr for messages (YAML may hold 10k-character strings or ints too long to print)."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's digit limit for str()
        text = f"<{type(value).__name__} too large to print>"
    return text if len(text) <= 80 else text[:80] + "..."
