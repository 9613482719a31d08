"""A detector's files in a checkpoint folder: model.pt and detector.json, written atomically, and
refused on load when model.pt's sha256 differs from the one recorded."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from iumad.errors import IumadError
from iumad.model import persistence
from iumad.model.detector import Detector
from iumad.store.atomic import CHECKPOINT_FILE, atomic_write_bytes

MANIFEST = "detector.json"


def save_detector(det: Detector, folder: Path) -> str:
    """Write model.pt, then detector.json (config, classes, model.pt's sha256); returns the sha256."""
    folder = Path(folder)
    digest = atomic_write_bytes(folder / CHECKPOINT_FILE, persistence.tensors_bytes(det))
    meta = persistence.manifest(det, CHECKPOINT_FILE, digest)
    atomic_write_bytes(folder / MANIFEST, json.dumps(meta, indent=2).encode())
    return digest


def load_detector(folder: Path, expected_sha256: str | None = None, cache_dir: Path | None = None) -> Detector:
    """Load a saved detector; refuses a checkpoint whose sha256 differs from the recorded one."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        raise IumadError(f"{folder / MANIFEST}: missing or unreadable ({exc.__class__.__name__})") from None
    ckpt = folder / meta.get("checkpoint", CHECKPOINT_FILE)
    data = ckpt.read_bytes() if ckpt.is_file() else None
    if data is None:
        raise IumadError(f"{ckpt}: checkpoint missing; restore it or roll back to another model version",
                         file=ckpt, fix="restore it or roll back to another model version")
    digest = hashlib.sha256(data).hexdigest()
    for want in filter(None, (meta.get("sha256"), expected_sha256)):
        if digest != want:
            raise IumadError(f"{ckpt}: sha256 {digest[:12]}… does not match the recorded {want[:12]}…; "
                             "the file was changed or corrupted, refusing to load it", file=ckpt,
                             fix="restore the file or roll back to another model version")
    return persistence.from_bytes(meta, data, folder / MANIFEST, cache_dir)
