"""Devices: `--device` / `train.device` are checked before anything runs, every part of a detector sits on
the resolved device, and a model runs where it is loaded. The CUDA comparison runs where torch sees a GPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from iumad.cli import app
from iumad.config import Config, from_dict, load_config
from iumad.errors import UsageError
from iumad.model.detector import Detector
from iumad.model.device import resolve_device, set_process_device
from tests.tiny import tiny_config, tiny_data

CUDA = torch.cuda.is_available()


def test_device_names_resolve_or_are_refused() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    for bad in ("gpu", "cuda:", "CPU", "cuda:x", ""):
        with pytest.raises(UsageError, match="auto, cpu, cuda or cuda:N"):
            resolve_device(bad)
    with pytest.raises(UsageError, match="train.device must be auto, cpu, cuda or cuda:N"):
        from_dict({"train": {"device": "gpu"}})
    if not CUDA:
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(UsageError, match="sees no CUDA device; use --device cpu"):
            resolve_device("cuda:0")
    set_process_device("cpu")  # the CLI's --device wins over a config's choice
    assert resolve_device("cuda") == torch.device("cpu")


def test_where_a_model_runs_is_not_part_of_its_config_hash() -> None:
    a, b = Config(), Config()
    b.train.device = "cpu"
    assert a.hash() == b.hash()


def test_detector_parts_sit_on_the_resolved_device() -> None:
    cfg = Config()
    cfg.train.device = "cpu"
    det = Detector(cfg)
    assert det.device == torch.device("cpu")
    assert {p.device for p in det.ensure_net().parameters()} == {torch.device("cpu")}
    assert det.backbone.mean.device == torch.device("cpu")


@pytest.mark.slow
def test_cli_device_cpu_runs_add_class_predict_and_benchmark(tmp_path: Path) -> None:
    data = tiny_data(tmp_path / "synth", seed=3, n_classes=2)
    config = tiny_config(tmp_path / "tiny.yaml")
    store = tmp_path / "store"
    name = sorted(p.name for p in data.iterdir() if p.is_dir())[0]
    runner = CliRunner()
    added = runner.invoke(app, ["add-class", name, "--data", str(data), "--config", str(config), "--store",
                                str(store), "--device", "cpu", "--json"])
    assert added.exit_code == 0, added.output
    predicted = runner.invoke(app, ["predict", str(data / name / "test"), "--class", name, "--store", str(store),
                                    "--device", "cpu", "--json"])
    assert predicted.exit_code == 0, predicted.output
    assert len(json.loads(predicted.stdout.strip().splitlines()[-1])) > 0
    bench = runner.invoke(app, ["benchmark", "--data", str(data), "--protocol", "1x2", "--config", str(config),
                                "--out", str(tmp_path / "bench"), "--device", "cpu", "--json"])
    assert bench.exit_code == 0, bench.output


def test_cli_refuses_an_unusable_device_before_creating_anything(tmp_path: Path) -> None:
    data = tiny_data(tmp_path / "synth", seed=3, n_classes=1)
    store = tmp_path / "store"
    for device in ["gpu"] + ([] if CUDA else ["cuda"]):
        result = CliRunner().invoke(app, ["add-class", "anything", "--data", str(data), "--store", str(store),
                                          "--device", device, "--json"])
        assert result.exit_code == 2, result.output
        assert "--device" in json.loads(result.stderr.strip())["error"]
        assert not store.exists()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (torch.cuda.is_available() is False here)")
def test_maps_on_cuda_match_the_cpu_maps(tmp_path: Path) -> None:
    """A model fitted on the CPU, loaded on the GPU: the same maps within float tolerance (convolution
    and scan kernels sum in other orders on the GPU)."""
    from iumad.data.dataset import find_classes
    from iumad.store.checkpoints import load_detector, save_detector

    data = tiny_data(tmp_path / "synth", seed=4, n_classes=1)
    source = find_classes(data)[0]
    cfg = load_config(tiny_config(tmp_path / "t.yaml"))
    cfg.train.device = "cpu"
    cfg.score.precision = "float32"  # both sides: auto scores the CPU side in bfloat16 on a CPU that has it
    det = Detector(cfg).fit({source.name: source.records("train")})
    records = source.records("test")
    cpu = det.predict_records(records, source.name)
    save_detector(det, tmp_path / "model")
    set_process_device("cuda")
    gpu_det = load_detector(tmp_path / "model")
    assert gpu_det.device.type == "cuda" and next(gpu_det.net.parameters()).is_cuda
    gpu = gpu_det.predict_records(records, source.name)
    for a, b in zip(cpu, gpu):
        np.testing.assert_allclose(b.maps["fused"], a.maps["fused"], rtol=1e-3, atol=2e-3)
        assert abs(a.score - b.score) <= 2e-3 * max(1.0, abs(a.score))


def test_scoring_precision_auto_is_bfloat16_only_on_a_cpu_that_has_it(monkeypatch) -> None:
    from iumad.model import device

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    for setting in ("float32", "bfloat16"):  # an explicit setting is kept everywhere
        assert device.scoring_precision(setting, cpu) == device.scoring_precision(setting, gpu) == setting
    monkeypatch.setattr(device, "cpu_has_bfloat16", lambda: True)
    assert device.scoring_precision("auto", cpu) == "bfloat16" and device.scoring_precision("auto", gpu) == "float32"
    monkeypatch.setattr(device, "cpu_has_bfloat16", lambda: False)
    assert device.scoring_precision("auto", cpu) == "float32"
