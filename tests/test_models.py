"""Presets and the builder: which class each preset builds, configs that round-trip, the presets listing."""

from __future__ import annotations

import pytest
import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

from vitkd.cli import main
from vitkd.errors import ConfigError
from vitkd.models import (
    DISTILLED_PRESETS,
    PRESETS,
    ModelConfig,
    build_model,
    describe_model,
    has_distillation_token,
    model_config,
)

pytestmark = pytest.mark.timeout(60)


def test_presets_are_read_only() -> None:
    with pytest.raises(TypeError):
        PRESETS["mine"] = {}  # type: ignore[index]
    with pytest.raises(TypeError):
        PRESETS["cifar-student"]["depth"] = 2  # type: ignore[index]
    assert DISTILLED_PRESETS.issubset(PRESETS)


@pytest.mark.parametrize("name", [n for n in PRESETS if not n.startswith("seed")])
def test_every_preset_builds_its_class_and_round_trips_its_config(name: str) -> None:
    model = build_model(name, num_classes=10, depth=1)
    expected_cls = VisionTransformerDistilled if name.endswith("-deit") else VisionTransformer
    assert type(model) is expected_cls
    assert has_distillation_token(model) == name.endswith("-deit")
    assert model.num_prefix_tokens == (2 if name.endswith("-deit") else 1)
    config = model_config(model)
    assert config == ModelConfig(name=name, num_classes=10, overrides={"depth": 1})
    rebuilt = build_model(ModelConfig.from_dict(config.to_dict()))
    assert type(rebuilt) is type(model)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_deit_preset_is_its_base_preset_plus_the_token() -> None:
    """Same blocks and widths as ``cifar-student``; the keyword arguments are the same data."""
    assert dict(PRESETS["cifar-student-deit"]) == dict(PRESETS["cifar-student"])
    assert dict(PRESETS["nette-student-deit"]) == dict(PRESETS["nette-student"])
    base, deit = describe_model(build_model("cifar-student", 10)), describe_model(build_model("cifar-student-deit", 10))
    differs = {k for k in base if base[k] != deit[k]}
    assert differs == {"parameters", "num_prefix_tokens", "tokens", "distillation_token"}
    assert (deit["tokens"], deit["num_prefix_tokens"], deit["distillation_token"]) == (66, 2, True)


def test_deit_preset_rejects_what_its_head_cannot_read() -> None:
    with pytest.raises(ConfigError, match="cifar-student-deit"):
        build_model("cifar-student-deit", 10, global_pool="avg")  # the two heads read the two prefix tokens


def test_timm_distilled_name_is_recognised() -> None:
    model = build_model("deit_tiny_distilled_patch16_224", 7, img_size=32, depth=1)
    assert has_distillation_token(model) and not has_distillation_token(torch.nn.Linear(2, 2))


def test_presets_command_lists_the_deit_students(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["presets"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert set(lines) == set(PRESETS)
    params = sum(p.numel() for p in build_model("cifar-student-deit", 10).parameters())
    assert f"{params / 1e6:.2f}M" in lines["cifar-student-deit"]
