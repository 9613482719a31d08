"""A detector to bytes and back: a manifest (config, classes, calibration) and a tensor file.

Nothing here touches the file system: the store writes the bytes atomically and checks their sha256
(`iumad.store.checkpoints`), so the model floor never depends on how files are kept.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from iumad import __version__
from iumad.config import from_dict
from iumad.errors import IumadError, UsageError
from iumad.model.detector import Detector
from iumad.model.memory import ClassState

FORMAT = 2  # 2: mapping / masked-reconstruction network (the network of format 1 cannot be loaded)


def tensors_bytes(det: Detector) -> bytes:
    """model.pt: the network's weights and every class's text, memories and prototypes."""
    if det.net is None:
        raise UsageError("nothing to save: the model has not been trained")
    tensors = {"net": {k: v.cpu() for k, v in det.net.state_dict().items()},
               "classes": {n: {"text": c.text, "banks": c.banks, "prototypes": c.prototypes}
                           for n, c in det.classes.items()}}
    buf = io.BytesIO()
    torch.save(tensors, buf)
    return buf.getvalue()


def manifest(det: Detector, checkpoint: str, sha256: str) -> dict[str, Any]:
    """detector.json: what model.pt cannot hold, and model.pt's name and sha256."""
    return {
        "iumad_version": __version__,
        "format": FORMAT,
        "config": det.config.to_dict(),
        "classes": [{"name": c.name, "modalities": list(c.modalities), "stats": c.stats, "weights": c.weights}
                    for c in det.classes.values()],
        "checkpoint": checkpoint,
        "sha256": sha256,
    }


def from_bytes(meta: dict[str, Any], data: bytes, where: Path, cache_dir: Path | None = None) -> Detector:
    """The detector a manifest and its (already verified) tensor bytes describe."""
    if meta.get("format", 1) != FORMAT:
        raise IumadError(f"{where}: a model of format {meta.get('format', 1)} (this iumad reads {FORMAT}); "
                         "relearn its classes with this version or install the iumad that wrote it")
    tensors = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    config = from_dict(meta["config"], str(where))
    config.train.device = "auto"  # a model runs where it is loaded (or on the process's --device)
    det = Detector(config, cache_dir=cache_dir)
    for c in meta["classes"]:
        t = tensors["classes"][c["name"]]
        det.classes[c["name"]] = ClassState(c["name"], tuple(c["modalities"]), t["text"], dict(t["banks"]),
                                            dict(t["prototypes"]), {k: tuple(v) for k, v in c["stats"].items()},
                                            dict(c.get("weights", {})))
    det.ensure_net().load_state_dict(tensors["net"], strict=True)
    det.net.eval()
    return det
