"""`iumad cache stats|clear`: the store's feature cache, bounded by the production model's
`backbone.cache_limit_gb` (or the process's --cache-limit)."""

from __future__ import annotations

from typing import Any

from iumad.config import BackboneConfig
from iumad.model.feature_cache import FeatureCache, limit_bytes
from iumad.store import repository as repo
from iumad.errors import IumadError
from iumad.store.db import Store
from iumad.store.manifest import read_manifest


def _limit_gb(store: Store) -> float:
    """The production model's cache limit (the default where there is none or it predates the key)."""
    with store.session() as s:
        version = repo.get_production(s)
        folder = None if version is None else version.checkpoint_dir
    try:
        meta = read_manifest(store.path(folder)) if folder else {}
    except IumadError:
        meta = {}
    return float(meta.get("config", {}).get("backbone", {}).get("cache_limit_gb", BackboneConfig.cache_limit_gb))


def cache_stats(store: Store) -> dict[str, Any]:
    """Entries, bytes and limit of the store's feature cache."""
    return FeatureCache(store.features_dir, limit_bytes(_limit_gb(store))).stats()


def clear_cache(store: Store, wait: float = 0.0) -> dict[str, Any]:
    """Remove every entry, under the writer lock (a running step would only have to reread its files)."""
    with store.writer_lock(wait):
        cache = FeatureCache(store.features_dir, limit_bytes(_limit_gb(store)))
        removed, freed = cache.evict(0)
    return {"folder": str(store.features_dir), "removed_entries": removed, "freed_bytes": freed}
