"""Where the frozen backbone and the network run: `--device auto|cpu|cuda[:N]` or `train.device`.

Memories, calibration and maps stay on the CPU (small, and numpy reads them); features, network passes
and retrieval go to the device. A checkpoint does not fix its device: it runs where it is loaded.
Under torchrun, `auto` and `cuda` mean the rank's LOCAL_RANK GPU. `IUMAD_DEVICE` sets the choice for a
process and its children (benchmarks); `--device` wins over it, and both win over the config.
"""

from __future__ import annotations

import functools
import os

import torch

from iumad.config import DEVICE_NAMES
from iumad.errors import UsageError

_process_choice: str | None = None  # set by the CLI's --device; wins over every config


def check_name(name: str, where: str = "--device") -> str:
    """`name` if it is a device we understand (availability is checked only when it is used)."""
    if not isinstance(name, str) or not DEVICE_NAMES.fullmatch(name):
        raise UsageError(f"{where} {name!r}: use auto, cpu, cuda or cuda:N", fix="use auto, cpu, cuda or cuda:N")
    return name


def set_process_device(name: str | None) -> None:
    """The device every detector of this process uses, whatever its config says (None: the config's)."""
    global _process_choice
    _process_choice = None if name is None else check_name(name)


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device for `name` (or for the process's --device): `auto` is the CUDA device when torch
    sees one, else the CPU; asking for CUDA where there is none is an error, not a silent CPU run."""
    env = os.environ.get("IUMAD_DEVICE") or None
    where = "--device" if _process_choice else "IUMAD_DEVICE" if env else "train.device"
    name = check_name(_process_choice or env or name, where)
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError(f"device {name!r}: torch {torch.__version__} sees no CUDA device; use --device cpu "
                         "(or auto)", fix="use --device cpu or --device auto")
    index = int(name.split(":")[1]) if ":" in name else int(os.environ.get("LOCAL_RANK", "0"))
    if index >= torch.cuda.device_count():
        raise UsageError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) visible; "
                         "use --device cuda:N with a smaller N", fix="use a visible device")
    return torch.device("cuda", index)


@functools.lru_cache(maxsize=1)
def cpu_has_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX); elsewhere oneDNN emulates it,
    slower than float32."""
    cpu = getattr(torch, "cpu", None)
    checks = (getattr(cpu, "_is_avx512_bf16_supported", None), getattr(cpu, "_is_amx_tile_supported", None))
    return any(check is not None and bool(check()) for check in checks)


def scoring_precision(setting: str, device: torch.device) -> str:
    """`score.precision` or `backbone.precision` resolved for `device`: auto is bfloat16 on a CPU that has
    it natively, else float32 (a GPU is fast enough without it)."""
    if setting != "auto":
        return setting
    return "bfloat16" if device.type == "cpu" and cpu_has_bfloat16() else "float32"
