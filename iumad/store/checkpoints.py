"""A detector's files: model.pt (the network) and detector.json in the version's folder, and each class's
tensors in a content-addressed blob (`<blobs>/<2 hex>/<sha256>.pt`) written once and shared by every
version that holds the class unchanged, so a store grows by one network and the new class's data per
step. Everything is written atomically and refused on load when a sha256 differs from the recorded one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from iumad.errors import IumadError
from iumad.files import file_sha256
from iumad.model import persistence
from iumad.model.detector import Detector
from iumad.store.atomic import CHECKPOINT_FILE, atomic_write_bytes
from iumad.store.manifest import MANIFEST, blob_path, class_blobs, read_manifest


def save_detector(det: Detector, folder: Path, blobs: Path | None = None) -> str:
    """Write the class blobs that `blobs` (default: `folder/classes`) lacks, then model.pt, then
    detector.json; returns model.pt's sha256. The manifest is last: a folder without one is no version."""
    folder = Path(folder)
    blobs = Path(blobs) if blobs is not None else folder / "classes"
    shas = {}
    for name, state in det.classes.items():
        sha = state.known_blob()
        if sha is None or not blob_path(blobs, sha).is_file():  # else: saved or loaded as it is, and there
            data = persistence.class_bytes(state)
            sha = hashlib.sha256(data).hexdigest()
            path = blob_path(blobs, sha)
            if not (path.is_file() and file_sha256(path) == sha):  # written by an earlier version: shared
                atomic_write_bytes(path, data)
            state.remember_blob(sha)
        shas[name] = sha
    digest = atomic_write_bytes(folder / CHECKPOINT_FILE, persistence.network_bytes(det))
    meta = persistence.manifest(det, CHECKPOINT_FILE, digest, shas, os.path.relpath(blobs, folder))
    atomic_write_bytes(folder / MANIFEST, json.dumps(meta, indent=2).encode())
    return digest


def _verified(path: Path, *wants: str | None) -> bytes:
    """The file's bytes, after checking them against every recorded sha256 given."""
    if not path.is_file():
        raise IumadError(f"{path}: checkpoint file missing; restore it or roll back to another model version",
                         file=path, fix="restore it or roll back to another model version")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    want = next((w for w in wants if w and w != digest), None)
    if want is not None:
        raise IumadError(f"{path}: sha256 {digest[:12]}… does not match the recorded {want[:12]}…; "
                         "the file was changed or corrupted, refusing to load it", file=path,
                         fix="restore the file or roll back to another model version")
    return data


def load_detector(folder: Path, expected_sha256: str | None = None, cache_dir: Path | None = None) -> Detector:
    """Load a saved detector; refuses it when model.pt or a class blob differs from its recorded sha256."""
    folder = Path(folder)
    meta = read_manifest(folder)
    ckpt = folder / meta.get("checkpoint", CHECKPOINT_FILE)
    data = _verified(ckpt, meta.get("sha256"), expected_sha256)
    blobs = {c["blob"]: p for c, p in zip(meta["classes"], class_blobs(folder, meta).values())}
    return persistence.from_bytes(meta, data, folder / MANIFEST, cache_dir,
                                  lambda sha: _verified(blobs[sha], sha))
