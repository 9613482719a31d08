"""What every benchmark records beside its numbers: the git commit, the machine, and how a class's
records are cut down to one modality."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """HEAD's hash, with "-dirty" when tracked files other than benchmark results differ from it (a number
    from uncommitted code; a results file that a running benchmark rewrites is not code)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    head = git("rev-parse", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results")
    return head + ("-dirty" if changed else "")


def machine(threads: int | None = None) -> dict[str, Any]:
    import torch

    cpu = None
    try:  # "AMD EPYC" alone does not tell a VM's hosts apart, and their speed differs (family 25 model 17: Zen 4)
        fields = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines()[:30] if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        cpu = fields.get("model name")
        if cpu and "cpu family" in fields:
            cpu += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    except OSError:
        pass
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "cpu_model": cpu, "torch": torch.__version__,
            "threads": torch.get_num_threads() if threads is None else threads}


def only(records: Sequence, modality: str | None) -> list:
    """The records with the other modality dropped (None: both kept)."""
    if modality is None:
        return list(records)
    drop = "geometry" if modality == "rgb" else "rgb"
    return [dataclasses.replace(r, **{drop: None}) for r in records]


def run_config_protocol(cfg_dict: dict, data: Path, protocol: str, work: Path) -> dict[str, Any]:
    """`iumad benchmark --method iumad` with the config `cfg_dict` (written to `work`) on every class under
    `data`; the feature cache `work.parent/cache-protocol` is shared by the runs beside `work` (features
    are the backbone's, whatever the rest of the config). Returns run_protocol's result."""
    from iumad.eval.protocol import run_protocol
    from iumad.progress import StderrProgress

    work.mkdir(parents=True, exist_ok=True)
    config = work / "config.json"
    config.write_text(json.dumps(cfg_dict))
    return run_protocol(data, protocol, "iumad", "both", seed=0, out=work / "run", config=config,
                        cache=work.parent / "cache-protocol", progress=StderrProgress())
