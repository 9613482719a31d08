"""Heat-map overlay PNGs for the service, and the two bounded memories they live in.

`overlay_png` draws one picture per sample with `iumad predict`'s overlay rules (iumad/eval/overlay.py:
the fused map on the RGB image, or the geometry map on the rendered geometry when there is no RGB; the
fixed colour scale; the white threshold contour). `MapCache` is an LRU of rendered PNGs bounded in
entries and bytes, addressed by ids the server makes (never by anything a request names on disk).
`RecentPredictions` is the dashboard's ring of the latest scored samples: each keeps its row and, while
the ring's byte budget allows, the uploaded bytes and the fused map, so its overlay is drawn only when
someone looks at it and scoring pays nothing for it.
"""

from __future__ import annotations

import secrets
import tempfile
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from iumad.data.sample import Sample
from iumad.eval.overlay import color_range, heat_overlay, paint_contour, png_bytes, render_geometry, rgb_image
from iumad.serve.uploads import Upload, write_records

MAP_ID_CHARS = 32  # hex characters of a map id (128 random bits)


def new_id() -> str:
    """A fresh map id: random, so ids say nothing about requests and cannot be guessed."""
    return secrets.token_hex(MAP_ID_CHARS // 2)


def overlay_png(sample: Sample, maps: dict[str, np.ndarray], threshold: float | None, alpha: float = 0.5) -> bytes:
    """One PNG: the fused map on the RGB image (the geometry map on the rendered geometry when the sample
    has no RGB), on the shared colour scale, with the white contour of map >= threshold."""
    vmin, vmax = color_range(threshold)
    if sample.rgb is not None:
        image, amap = rgb_image(sample), maps["fused"]
    else:
        image, amap = render_geometry(sample), maps.get("geometry", maps["fused"])
    return png_bytes(paint_contour(heat_overlay(image, amap, vmin, vmax, alpha), amap, threshold))


class MapCache:
    """Rendered PNGs by id, least recently used out beyond `max_items` entries or `max_bytes` bytes."""

    def __init__(self, max_items: int = 256, max_bytes: int = 64 * 2 ** 20) -> None:
        self.max_items, self.max_bytes = max_items, max_bytes
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, key: str, png: bytes) -> str:
        with self._lock:
            old = self._items.pop(key, None)
            self._bytes -= len(old) if old is not None else 0
            self._items[key] = png
            self._bytes += len(png)
            while self._items and (len(self._items) > self.max_items or self._bytes > self.max_bytes):
                _, dropped = self._items.popitem(last=False)
                self._bytes -= len(dropped)
        return key

    def get(self, key: str) -> bytes | None:
        with self._lock:
            png = self._items.get(key)
            if png is not None:
                self._items.move_to_end(key)
            return png

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes


@dataclass
class Recent:
    """One scored sample: its JSON row and, until the ring's budget drops them, what redraws its overlay."""

    id: str
    at: float
    row: dict[str, Any]
    uploads: dict[str, tuple[str, bytes]] | None  # kind -> (field name, bytes), as uploads.Upload.files
    maps: dict[str, np.ndarray] | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        if self.uploads is None:
            return 0
        return sum(len(b) for _, b in self.uploads.values()) + sum(m.nbytes for m in (self.maps or {}).values())


class RecentPredictions:
    """The latest `max_items` predictions; the oldest ones lose their pixels first when over `max_bytes`."""

    def __init__(self, max_items: int = 24, max_bytes: int = 128 * 2 ** 20) -> None:
        self.max_items, self.max_bytes = max_items, max_bytes
        self._ring: deque[Recent] = deque(maxlen=max_items)
        self._lock = threading.Lock()

    def add(self, row: dict[str, Any], uploads: dict[str, tuple[str, bytes]], maps: dict[str, np.ndarray],
            map_id: str | None = None) -> str:
        """Remember one prediction; returns its id (`map_id` when its overlay is already in the cache)."""
        keep = {k: maps[k] for k in ("fused", "geometry") if k in maps}
        item = Recent(map_id or new_id(), time.time(), row, dict(uploads), keep)
        with self._lock:
            self._ring.append(item)
            total = sum(r.nbytes for r in self._ring)
            for old in self._ring:  # oldest first
                if total <= self.max_bytes or old is item:
                    break
                total -= old.nbytes
                old.uploads, old.maps = None, None
        return item.id

    def latest(self) -> list[Recent]:
        """Newest first."""
        with self._lock:
            return list(reversed(self._ring))

    def find(self, item_id: str) -> Recent | None:
        with self._lock:
            return next((r for r in self._ring if r.id == item_id), None)


def render_recent(item: Recent) -> bytes | None:
    """Draw a remembered prediction's overlay from its uploaded bytes (None when they were dropped):
    written into a fresh temporary folder under server-chosen names and read by the project's readers."""
    uploads, maps = item.uploads, item.maps
    if uploads is None or maps is None:
        return None
    with tempfile.TemporaryDirectory(prefix="iumad-serve-map-") as tmp:
        _, (sample,) = write_records([Upload(dict(uploads))], Path(tmp))
        return overlay_png(sample, maps, item.row.get("threshold"))
