"""Configuration: shipped YAML files load, default.yaml states the code defaults, mistakes are usage errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from iumad.config import Config, load_config
from iumad.errors import UsageError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    assert isinstance(load_config(path), Config)


def test_default_yaml_spells_out_the_code_defaults() -> None:
    assert load_config(CONFIGS / "default.yaml").to_dict() == Config().to_dict()


@pytest.mark.parametrize("text, message", [
    ("model: {dept: 3}", "unknown key model.dept"),
    ("train: {epochs: many}", "train.epochs must be int"),
    ("score: 3", "score must be a mapping"),
    ("model: [1, 2", "malformed YAML"),
    ("- a\n- b", "must be a YAML mapping"),
    ("model: {routes: diagonal}", "model.routes must be one of strided, cross"),
    ("score: {image_score: mean}", "score.image_score must be one of max, topk"),
    ("model: {variational: true}", "model.variational needs a bottleneck"),
    ("backbone: {precision: half}", "backbone.precision must be one of float32, bfloat16, auto"),
])
def test_config_mistakes_are_usage_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UsageError, match=message) as info:
        load_config(path)
    assert info.value.exit_code == 2 and "bad.yaml" in str(info.value)


def test_config_hash_changes_with_any_value() -> None:
    a, b = Config(), Config()
    b.model.depth = 3
    assert a.hash() == Config().hash() != b.hash()
