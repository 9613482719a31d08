"""A model version's manifest (`detector.json`) and where the class blobs it names live: plain JSON and
paths, so the store's own bookkeeping (cleanup, `db check`, cache limits) reads it without loading a model."""

from __future__ import annotations

import json
from pathlib import Path

from iumad.errors import IumadError
from iumad.store.atomic import MANIFEST_FILE as MANIFEST


def blob_path(blobs: Path, sha256: str) -> Path:
    return Path(blobs) / sha256[:2] / f"{sha256}.pt"


def read_manifest(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise IumadError(f"{Path(folder) / MANIFEST}: missing or unreadable ({exc.__class__.__name__})") from None


def class_blobs(folder: Path, meta: dict) -> dict[str, Path]:
    """Class name -> the blob file a version's manifest references (none for format 2)."""
    if "blobs" not in meta:
        return {}
    return {c["name"]: blob_path(Path(folder) / meta["blobs"], c["blob"]) for c in meta["classes"]}
