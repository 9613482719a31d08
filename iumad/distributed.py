"""Training on several processes or GPUs: `torchrun --nproc-per-node=N -m iumad add-class ...`.

Rank 0 does the whole step (reads data, owns the store, prints, saves, evaluates). Right before
training it broadcasts what training needs (config, network weights, classes, the training items);
the other ranks build the same detector from it, and every rank trains its share of each batch inside
DistributedDataParallel (gloo on CPU, nccl on GPU), which averages the gradients, so all ranks keep
identical weights. The other ranks then exit; they never touch the store.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

_shared = False  # rank 0 has sent the training payload (or told the others there is none)


def init_from_env() -> None:
    """Join the process group torchrun describes (WORLD_SIZE > 1); a no-op otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":  # each rank its own GPU; `auto` and `cuda` resolve to it too (model/device.py)
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    if backend == "gloo":  # ranks share the CPU cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def share(payload: Any) -> Any:
    """Rank 0: send `payload` (None = no training will happen); other ranks: receive it."""
    global _shared
    box = [payload if rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    _shared = True
    return box[0]


def release_followers() -> None:
    """Rank 0, when a step ends before training (bad data, lock busy): tell the others to stop."""
    if world_size() > 1 and rank() == 0 and not _shared:
        share(None)


def follow() -> bool:
    """What ranks other than 0 run: train on rank 0's payload; False if there was nothing to train."""
    from iumad.config import from_dict
    from iumad.continual.distill import Distiller
    from iumad.model.detector import Detector

    payload = share(None)
    if payload is None:
        return False
    det = Detector(from_dict(payload["config"]))
    for name, modalities, text in payload["classes"]:
        det.register_class(name, modalities, text)
    det.ensure_net().load_state_dict(payload["state"])
    distill = None
    if payload["distill"] is not None:
        n_old, learning = payload["distill"]
        distill = Distiller(det.net, det.class_texts()[:n_old], det.config.continual, learning)
    det.train(payload["items"], distill=distill)
    return True


def training_payload(det, items, distill_args: tuple[int, list[int]] | None) -> dict[str, Any]:
    """What the other ranks need to train exactly what rank 0 trains."""
    return {"config": det.config.to_dict(), "state": {k: v.cpu() for k, v in det.net.state_dict().items()},
            "classes": [(c.name, c.modalities, c.text.numpy()) for c in det.classes.values()],
            "items": list(items), "distill": distill_args}
