"""Frozen features on disk, so training epochs, later steps and replay never rerun the backbone.

An entry is keyed by the sha256 of (input file content, modality, backbone id, input size,
preprocessing key, reading parameters): a changed file, backbone, weights or preprocessing never reuses a stale entry.
Entries are float16 `.npy` files under `<store>/features/<2 hex>/<key>.npy`, written atomically.

The cache is bounded: past `limit` bytes, the least recently used entries (a hit refreshes an entry's
modification time) are removed until it holds 90 % of the limit. Nothing depends on an entry: a miss
rereads the sample's files (exemplars included, whose files the store keeps and checks), so eviction
costs time, never data. Entries may vanish under a reader (another process evicting): that is a miss.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from iumad.files import TMP_PREFIX, atomic_write_bytes

EVICT_TO = 0.9  # of the limit, so that eviction runs once per several hundred entries, not on every write
_process_limit_gb: float | None = None  # the CLI's --cache-limit: wins over every config


def set_process_limit(gb: float | None) -> None:
    """The feature-cache limit (GB, 0 = none) of every cache this process opens (None: the config's)."""
    global _process_limit_gb
    _process_limit_gb = gb


def limit_bytes(config_gb: float) -> int | None:
    """Bytes the cache may hold under the process's --cache-limit or `config_gb`; None = unbounded."""
    gb = config_gb if _process_limit_gb is None else _process_limit_gb
    return None if gb <= 0 else int(gb * 2 ** 30)


def cache_key(content_sha256: str, modality: str, backbone_id: str, input_size: int, preprocessing: str,
              extra: str = "") -> str:
    """One key over everything that determines the entry; `extra` carries reading parameters such as
    an Eyecandies depth range, which change the data without changing the file."""
    return hashlib.sha256(
        f"{content_sha256}|{modality}|{backbone_id}|{input_size}|{preprocessing}|{extra}".encode()
    ).hexdigest()


@dataclass(frozen=True)
class Entry:
    path: Path
    size: int
    used: float  # modification time: written or last read


class FeatureCache:
    """Content-addressed float16 feature store; `get` returns None on a miss or an unreadable entry."""

    def __init__(self, root: Path, limit: int | None = None) -> None:
        self.root = Path(root)
        self.limit = limit
        self.hits = 0
        self.misses = 0
        self.evicted = 0
        self._size: int | None = None  # bytes held, counted on the first write of a bounded cache

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
        if self.limit is not None:
            try:
                os.utime(p)  # recently used: evicted last
            except OSError:
                pass
        return arr

    def put(self, key: str, array: np.ndarray) -> None:
        """Store floats as float16 (features); other dtypes (masks) as they are; evict past the limit."""
        if np.issubdtype(array.dtype, np.floating):
            array = array.astype(np.float16)
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
        data = buf.getvalue()
        atomic_write_bytes(self.path(key), data)
        if self.limit is None:
            return
        if self._size is None:
            self._size = sum(e.size for e in self.entries())
        else:
            self._size += len(data)
        if self._size > self.limit:
            self.evict(int(self.limit * EVICT_TO))

    def entries(self) -> list[Entry]:
        """Every entry on disk (temporaries of writes in progress are not entries)."""
        out = []
        if not self.root.is_dir():
            return out
        for sub in os.scandir(self.root):
            if not sub.is_dir(follow_symlinks=False):
                continue
            for f in os.scandir(sub.path):
                if f.name.endswith(".npy") and not f.name.startswith(TMP_PREFIX) and f.is_file(follow_symlinks=False):
                    try:
                        st = f.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    out.append(Entry(Path(f.path), st.st_size, st.st_mtime))
        return out

    def evict(self, target: int) -> tuple[int, int]:
        """Remove least recently used entries until at most `target` bytes remain; (entries, bytes) removed."""
        entries = sorted(self.entries(), key=lambda e: e.used)
        total = sum(e.size for e in entries)
        removed = freed = 0
        for e in entries:
            if total - freed <= target:
                break
            try:
                e.path.unlink()
            except FileNotFoundError:
                pass
            removed += 1
            freed += e.size
        self._size = total - freed
        self.evicted += removed
        return removed, freed

    def stats(self) -> dict[str, object]:
        entries = self.entries()
        return {"folder": str(self.root), "entries": len(entries), "bytes": sum(e.size for e in entries),
                "limit_bytes": self.limit, "oldest_use": min((e.used for e in entries), default=None),
                "newest_use": max((e.used for e in entries), default=None)}
