"""Presets and the builder: which class each preset builds, configs that round-trip, the presets listing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

from vitkd.checkpoint import load_checkpoint, save_checkpoint
from vitkd.cli import main
from vitkd.errors import ConfigError
from vitkd.models import (
    DISTILLED_PRESETS,
    PRESETS,
    ModelConfig,
    build_model,
    default_img_size,
    describe_model,
    format_model_overrides,
    has_distillation_token,
    model_config,
    parse_model_overrides,
)
from vitkd.sl_layers import LocalitySelfAttention, ShiftedPatchTokenization

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


# ---------------------------------------------------------------- SL-ViT (spt, lsa)


@pytest.mark.parametrize("name, base", [("cifar-teacher-sl", "cifar-teacher"), ("cifar-student-sl", "cifar-student")])
def test_sl_presets_are_their_base_plus_spt_and_lsa(name: str, base: str) -> None:
    assert dict(PRESETS[name]) == dict(PRESETS[base], spt=True, lsa=True)
    model = build_model(name, 10)
    assert isinstance(model.patch_embed, ShiftedPatchTokenization)
    assert all(type(blk.attn) is LocalitySelfAttention for blk in model.blocks)
    base_desc, desc = describe_model(build_model(base, 10)), describe_model(model)
    assert {k for k in desc if desc[k] != base_desc[k]} == {"parameters", "spt", "lsa"}
    assert (desc["spt"], desc["lsa"], base_desc["spt"], base_desc["lsa"]) == (True, True, False, False)


def test_spt_and_lsa_overrides_build_the_layers_and_round_trip() -> None:
    model = build_model("cifar-student", 10, spt=True, lsa=True)
    preset = build_model("cifar-student-sl", 10)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in preset.state_dict().items()}
    config = model_config(model)
    assert config.overrides == {"spt": True, "lsa": True}
    rebuilt = build_model(ModelConfig.from_dict(config.to_dict()))
    assert describe_model(rebuilt) == describe_model(model)
    only_lsa = build_model("cifar-student", 10, lsa=True)
    assert not describe_model(only_lsa)["spt"] and describe_model(only_lsa)["lsa"]
    plain = build_model("cifar-student-sl", 10, spt=False, lsa=False)  # an override turns a preset's layer off
    assert describe_model(plain) == describe_model(build_model("cifar-student", 10))
    deit = build_model("cifar-student-deit", 10, spt=True, lsa=True)
    assert has_distillation_token(deit) and describe_model(deit)["lsa"]
    timm_sl = build_model("vit_tiny_patch16_224", 7, img_size=32, depth=1, spt=True, lsa=True)
    assert describe_model(timm_sl)["spt"] and describe_model(timm_sl)["lsa"]
    assert "spt" not in PRESETS["cifar-student"] and "spt" in PRESETS["cifar-student-sl"]  # presets untouched


@pytest.mark.parametrize("name, kwargs, match", [
    ("cifar-student", {"spt": "yes"}, "'spt' must be true or false"),
    ("cifar-student", {"lsa": 1}, "'lsa' must be true or false"),
    ("cifar-student", {"spt": True, "dynamic_img_size": True}, "needs a fixed input size"),
    ("cifar-student", {"lsa": True, "attn_layer": "attn"}, "attn_layer"),
    ("cifar-student-sl", {"embed_layer": ShiftedPatchTokenization}, "embed_layer"),
])
def test_spt_and_lsa_overrides_reject_bad_values(name: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_model(name, 10, **kwargs)


def test_spt_and_lsa_have_no_pretrained_weights() -> None:
    with pytest.raises(ConfigError, match="no pretrained weights"):
        build_model("vit_tiny_patch16_224", 10, pretrained=True, lsa=True)  # refused before any download


def test_sl_checkpoint_round_trip(tmp_path) -> None:
    model = build_model("cifar-student-sl", 10, depth=2)
    with torch.no_grad():
        for i, blk in enumerate(model.blocks):
            blk.attn.logit_scale.fill_(0.4 + i)  # learned values, not the initial ones
    model.eval()
    path = save_checkpoint(model, {"kind": "supervised"}, tmp_path / "sl.safetensors")
    loaded, meta = load_checkpoint(path)
    assert meta["model"] == {"name": "cifar-student-sl", "num_classes": 10, "img_size": None,
                             "overrides": {"depth": 2}}
    assert isinstance(loaded.patch_embed, ShiftedPatchTokenization)
    assert [blk.attn.logit_scale.item() for blk in loaded.blocks] == pytest.approx([0.4, 1.4])
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
    overridden = build_model("cifar-student", 10, depth=1, spt=True, lsa=True)
    loaded, meta = load_checkpoint(save_checkpoint(overridden, {}, tmp_path / "override.safetensors"))
    assert meta["model"]["overrides"] == {"depth": 1, "spt": True, "lsa": True}
    assert describe_model(loaded) == describe_model(overridden)


def test_presets_command_lists_the_sl_presets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["presets"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    for name in ("cifar-teacher-sl", "cifar-student-sl"):
        params = sum(p.numel() for p in build_model(name, 10).parameters())
        assert f"{params / 1e6:.2f}M" in lines[name]


# ---------------------------------------------------------------- timm:NAME, overrides, local weights files

TINY_TIMM = dict(depth=1, embed_dim=8, num_heads=2, patch_size=8, img_size=32)  # vit_tiny_patch16_224, shrunk


def _timm_weights(path: Path, num_classes: int = 10, **changes) -> dict[str, torch.Tensor]:
    """Save a tiny timm ViT's weights with safetensors (or torch.save for .pth); return them as written."""
    model = timm.create_model("vit_tiny_patch16_224", num_classes=num_classes, **dict(TINY_TIMM, **changes))
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return state


def test_timm_prefix_builds_the_timm_model_and_records_the_bare_name() -> None:
    reference = timm.create_model("vit_tiny_patch16_224", num_classes=3, **TINY_TIMM)
    for spelling in ("timm:vit_tiny_patch16_224", "vit_tiny_patch16_224"):
        model = build_model(spelling, num_classes=3, **TINY_TIMM)
        assert type(model) is type(reference)
        assert {k: v.shape for k, v in model.state_dict().items()} == \
               {k: v.shape for k, v in reference.state_dict().items()}
        assert model_config(model).name == "vit_tiny_patch16_224"  # what a checkpoint's metadata may name
    assert default_img_size("timm:vit_tiny_patch16_224") == 224


@pytest.mark.parametrize("name, match", [
    ("timm:", "names no model"),
    ("timm:cifar-student", "is a vitkd preset, not a timm model: drop the 'timm:' prefix"),
    ("timm:no_such_vit", "unknown model 'no_such_vit'"),
])
def test_timm_prefix_errors(name: str, match: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(match)):
        build_model(name, num_classes=3)


def test_parse_model_overrides_reads_json_else_text() -> None:
    expected = {"patch_size": 8, "depth": 2, "qk_norm": True, "drop_rate": 0.1, "global_pool": "avg",
                "fc_norm": None}
    assert parse_model_overrides("patch_size=8, depth=2, qk_norm=true, drop_rate=0.1, global_pool=avg, "
                                 "fc_norm=null") == expected
    assert parse_model_overrides(["patch_size=8", "depth = 2", "qk_norm=true,drop_rate=0.1", "global_pool=avg",
                                  "fc_norm=null"]) == expected
    assert parse_model_overrides("patch_size=[8, 8], depth=1") == {"patch_size": [8, 8], "depth": 1}
    assert parse_model_overrides("") == {} and parse_model_overrides([]) == {}


@pytest.mark.parametrize("text, match", [
    ("colour=red", "unknown model override 'colour'"),
    ("depth", "'depth' is not KEY=VALUE"),
    ("=3", "is not KEY=VALUE"),
    ("depth=1, depth=2", "'depth' is given twice"),
    ("num_classes=3", "'num_classes' is not allowed: the number of classes comes from the data"),
    ("img_size=64", "'img_size' is not allowed: use --img-size"),
    ("checkpoint_path=x.pth", "unknown model override 'checkpoint_path'"),  # a loader argument, never passed on
    ('depth={"a": 1}', "is not a number, true/false, a string or a list"),
])
def test_parse_model_overrides_errors_name_the_key(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(match)):
        parse_model_overrides(text)


def test_format_model_overrides_is_what_the_parser_reads_back() -> None:
    overrides = {"depth": 2, "qk_norm": True, "global_pool": "avg", "patch_size": [8, 8], "drop_rate": 0.25,
                 "pos_embed": "8"}  # a string that reads as JSON is quoted
    items = format_model_overrides(overrides)
    assert items == ["depth=2", "qk_norm=true", "global_pool=avg", "patch_size=[8, 8]", "drop_rate=0.25",
                     'pos_embed="8"']
    assert parse_model_overrides(items) == overrides


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("num_classes", [4, 10], ids=["new-head", "same-head"])
def test_pretrained_file_loads_its_weights_and_a_new_head_when_classes_differ(suffix: str, num_classes: int,
                                                                              tmp_path: Path) -> None:
    path = tmp_path / f"tiny{suffix}"
    _timm_weights(path)
    written = load_file(str(path)) if suffix == ".safetensors" else torch.load(path, weights_only=True)
    model = build_model("timm:vit_tiny_patch16_224", num_classes=num_classes, pretrained_file=path, **TINY_TIMM)
    state = model.state_dict()
    body = [k for k in written if not k.startswith("head.")]
    assert body and all(torch.equal(state[k], written[k]) for k in body)
    assert state["head.weight"].shape == (num_classes, 8)
    assert torch.equal(state["head.weight"], written["head.weight"]) == (num_classes == 10)
    assert model_config(model).overrides == {k: v for k, v in TINY_TIMM.items() if k != "img_size"}
    with torch.device("meta"):  # the pre-check: shapes from the file, nothing read
        checked = build_model("timm:vit_tiny_patch16_224", num_classes=num_classes, pretrained_file=path,
                              **TINY_TIMM)
    assert checked.head.weight.is_meta


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("changes, match", [
    (dict(depth=2), "the file lacks blocks.1."),
    (dict(depth=2, num_classes=10), "blocks.1."),  # same head: timm itself loads strictly
    (dict(embed_dim=16), "size mismatch for cls_token"),
    (dict(depth=0), "blocks.0."),
])
def test_a_mismatched_pretrained_file_is_one_clear_error(device: str, changes: dict, match: str,
                                                         tmp_path: Path) -> None:
    path = tmp_path / "tiny.safetensors"
    _timm_weights(path)
    kwargs = dict(TINY_TIMM, num_classes=4)
    kwargs.update(changes)
    with pytest.raises(ConfigError) as info, torch.device(device):
        build_model("timm:vit_tiny_patch16_224", pretrained_file=path, **kwargs)
    message = str(info.value)
    assert message.startswith("--pretrained-file tiny.safetensors does not fit vit_tiny_patch16_224")
    assert match in message and "\n" not in message and len(message) < 600
    assert "same model and --model-override values" in message


def test_pretrained_file_refusals(tmp_path: Path) -> None:
    path = tmp_path / "tiny.safetensors"
    _timm_weights(path)
    cases = [
        (dict(name="timm:vit_tiny_patch16_224", pretrained_file=tmp_path / "missing.safetensors"), "no such file"),
        (dict(name="cifar-student", pretrained_file=path), "preset 'cifar-student' has no pretrained weights"),
        (dict(name="timm:vit_tiny_patch16_224", pretrained_file=path, pretrained=True), "pass one"),
    ]
    (tmp_path / "notes.txt").write_text("x")
    cases.append((dict(name="timm:vit_tiny_patch16_224", pretrained_file=tmp_path / "notes.txt"),
                  "not a weights file"))
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    cases.append((dict(name="timm:vit_tiny_patch16_224", pretrained_file=tmp_path / "junk.safetensors"),
                  "not a readable weights file"))
    for kwargs, match in cases:
        with pytest.raises(ConfigError, match=re.escape(match)):
            build_model(num_classes=4, **kwargs)
