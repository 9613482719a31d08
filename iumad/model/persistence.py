"""A detector to bytes and back: a manifest (config, classes, calibration), the network's tensor file
and one tensor blob per class.

Nothing here touches the file system: the store writes the bytes atomically and checks their sha256
(`iumad.store.checkpoints`), so the model floor never depends on how files are kept.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Callable

import torch

from iumad import __version__
from iumad.config import from_dict
from iumad.errors import IumadError, UsageError
from iumad.model.detector import Detector
from iumad.model.memory import ClassState

FORMAT = 3  # 3: the network in model.pt, each class's tensors in a blob of their own (content-addressed)
READS = (2, 3)  # 2: every class inside model.pt (the stores of before the blobs)


def network_bytes(det: Detector) -> bytes:
    """model.pt: the network's weights (the only part that changes at every step)."""
    if det.net is None:
        raise UsageError("nothing to save: the model has not been trained")
    buf = io.BytesIO()
    torch.save({"net": {k: v.cpu() for k, v in det.net.state_dict().items()}}, buf)
    return buf.getvalue()


def class_bytes(state: ClassState) -> bytes:
    """A class's text, memories, prototypes and object region: frozen-feature data that a later step
    leaves as it is, so versions that share the class share these bytes (torch.save writes equal tensors
    identically)."""
    buf = io.BytesIO()
    extra = {} if state.region is None else {"region": state.region}  # blobs of classes without one stay as they were
    torch.save({"text": state.text, "banks": state.banks, "prototypes": state.prototypes, **extra}, buf)
    return buf.getvalue()


def manifest(det: Detector, checkpoint: str, sha256: str, class_blobs: dict[str, str], blobs: str) -> dict[str, Any]:
    """detector.json: config, calibration, model.pt's name and sha256, and each class's blob (its sha256,
    under the folder `blobs`, relative to the manifest's)."""
    return {
        "iumad_version": __version__,
        "format": FORMAT,
        "config": det.config.to_dict(),
        # as resolved where it was fitted: the memories hold features of this precision, so a machine that
        # resolves `backbone.precision: auto` otherwise must still compute these
        "backbone_precision": det.spec.precision,
        "classes": [{"name": c.name, "modalities": list(c.modalities), "stats": c.stats, "weights": c.weights,
                     "blob": class_blobs[c.name]} for c in det.classes.values()],
        "blobs": blobs,
        "checkpoint": checkpoint,
        "sha256": sha256,
    }


def from_bytes(meta: dict[str, Any], data: bytes, where: Path, cache_dir: Path | None = None,
               class_data: Callable[[str], bytes] | None = None) -> Detector:
    """The detector a manifest and its (already verified) bytes describe: model.pt's `data`, and
    `class_data(sha256)` for each class blob of format 3."""
    fmt = meta.get("format", 1)
    if fmt not in READS:
        raise IumadError(f"{where}: a model of format {fmt} (this iumad reads {', '.join(map(str, READS))}); "
                         "relearn its classes with this version or install the iumad that wrote it")
    tensors = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    config = from_dict(meta["config"], str(where))
    config.train.device = "auto"  # a model runs where it is loaded (or on the process's --device)
    det = Detector(config, cache_dir=cache_dir,  # written before the setting: float32 features
                   backbone_precision=meta.get("backbone_precision", "float32"))
    for c in meta["classes"]:
        if fmt == 2:
            t = tensors["classes"][c["name"]]
        else:
            if class_data is None:
                raise UsageError(f"{where}: format 3 needs its class blobs")
            t = torch.load(io.BytesIO(class_data(c["blob"])), map_location="cpu", weights_only=True)
        state = ClassState(c["name"], tuple(c["modalities"]), t["text"], dict(t["banks"]), dict(t["prototypes"]),
                           {k: tuple(v) for k, v in c["stats"].items()}, dict(c.get("weights", {})), t.get("region"))
        if fmt == 3:
            state.remember_blob(c["blob"])
        det.classes[c["name"]] = state
    det.ensure_net().load_state_dict(tensors["net"], strict=True)
    det.net.eval()
    return det
