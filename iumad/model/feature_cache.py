"""Frozen features on disk, so training epochs, later steps and replay never rerun the backbone.

An entry is keyed by the sha256 of (input file content, modality, backbone id, input size,
preprocessing key, reading parameters): a changed file, backbone, weights or preprocessing never reuses a stale entry.
Entries are float16 `.npy` files under `<store>/features/<2 hex>/<key>.npy`, written atomically.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np

from iumad.files import atomic_write_bytes


def cache_key(content_sha256: str, modality: str, backbone_id: str, input_size: int, preprocessing: str,
              extra: str = "") -> str:
    """One key over everything that determines the entry; `extra` carries reading parameters such as
    an Eyecandies depth range, which change the data without changing the file."""
    return hashlib.sha256(
        f"{content_sha256}|{modality}|{backbone_id}|{input_size}|{preprocessing}|{extra}".encode()
    ).hexdigest()


class FeatureCache:
    """Content-addressed float16 feature store; `get` returns None on a miss or an unreadable entry."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npy"

    def get(self, key: str) -> np.ndarray | None:
        p = self.path(key)
        try:
            arr = np.load(p, allow_pickle=False)
        except (FileNotFoundError, ValueError, OSError, EOFError):
            self.misses += 1
            return None
        self.hits += 1
        return arr

    def put(self, key: str, array: np.ndarray) -> None:
        """Store floats as float16 (features); other dtypes (masks) as they are."""
        if np.issubdtype(array.dtype, np.floating):
            array = array.astype(np.float16)
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
        atomic_write_bytes(self.path(key), buf.getvalue())
