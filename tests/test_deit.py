"""DeiT students (distillation token, two heads): the preset, its forward modes, checkpoints, capture, a step.

References are computed from the model's own submodules: ``forward_features`` and the two
``nn.Linear`` heads applied by hand to the class and distillation tokens.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.models.deit import VisionTransformerDistilled

from vitkd.attention import CaptureModule, capture_attention, token_layout
from vitkd.checkpoint import load_checkpoint, save_checkpoint
from vitkd.distill import deit_hard_loss, distillation_loss, drop_distillation_token, gather_heads
from vitkd.headmap import block_to_block
from vitkd.models import build_model, count_parameters, describe_model, model_config

pytestmark = pytest.mark.timeout(60)

EMBED, CLASSES = 64, 10  # cifar-student's width; CIFAR-10


def _deit(**overrides) -> VisionTransformerDistilled:
    torch.manual_seed(0)
    return build_model("cifar-student-deit", CLASSES, **overrides)


def _heads_by_hand(model: VisionTransformerDistilled, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Class head on token 0 and distillation head on token 1 of the normed features, as nn.Linear maths."""
    features = model.forward_features(images)
    cls = features[:, 0] @ model.head.weight.T + model.head.bias
    dist = features[:, 1] @ model.head_dist.weight.T + model.head_dist.bias
    return cls, dist


def test_preset_parameters_are_the_student_plus_token_position_and_head() -> None:
    base, deit = build_model("cifar-student", CLASSES), _deit()
    # One distillation token, one more position embedding, one more head (weights + bias).
    extra = EMBED + EMBED + (EMBED * CLASSES + CLASSES)
    assert count_parameters(deit) == count_parameters(base) + extra == 142_804
    assert describe_model(deit)["parameters"] == 142_804
    assert tuple(deit.dist_token.shape) == (1, 1, EMBED) and tuple(deit.pos_embed.shape) == (1, 66, EMBED)


def test_forward_modes_eval_averages_the_two_heads() -> None:
    model = _deit().eval()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cls, dist = _heads_by_hand(model, images)
        out = model(images)
    assert out.shape == (3, CLASSES)
    torch.testing.assert_close(out, (cls + dist) / 2)
    assert not torch.allclose(cls, dist)  # two different heads: the mean is not either one

    train = _deit(drop_rate=0.0, proj_drop_rate=0.0).train()  # no dropout: train mode is deterministic
    train.set_distilled_training(True)
    with torch.no_grad():
        cls, dist = _heads_by_hand(train, images)
        pair = train(images)
    assert isinstance(pair, tuple) and len(pair) == 2
    torch.testing.assert_close(pair[0], cls)
    torch.testing.assert_close(pair[1], dist)


def test_checkpoint_round_trip(tmp_path) -> None:
    model = _deit().eval()
    path = save_checkpoint(model, {"epoch": 1}, tmp_path / "deit.safetensors")
    loaded, meta = load_checkpoint(path)
    assert type(loaded) is VisionTransformerDistilled and not loaded.training
    assert meta["model"] == {"name": "cifar-student-deit", "num_classes": CLASSES, "img_size": None, "overrides": {}}
    assert model_config(loaded) == model_config(model)
    original, restored = model.state_dict(), loaded.state_dict()
    assert {"dist_token", "head_dist.weight", "head_dist.bias"} <= original.keys()
    assert original.keys() == restored.keys() and all(torch.equal(original[k], restored[k]) for k in original)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


def test_capture_sees_both_prefix_tokens_and_matches_the_forward() -> None:
    model = _deit().eval()
    layout = token_layout(model)
    assert (layout.num_prefix_tokens, layout.grid_size, layout.num_tokens) == (2, (8, 8), 66)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = capture_attention(model, images, blocks=[1, 3])
        reference = model(images)
    assert sorted(out.attn_logits) == [1, 3]
    assert all(out.attn_logits[b].shape == (2, 4, 66, 66) for b in (1, 3))
    torch.testing.assert_close(out.attn_probs[3], F.softmax(out.attn_logits[3], -1))
    torch.testing.assert_close(out.class_logits, reference, rtol=1e-5, atol=1e-5)


def test_capture_module_returns_both_heads_in_distilled_training() -> None:
    model = _deit(drop_rate=0.0, proj_drop_rate=0.0).train()
    model.set_distilled_training(True)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    logits, attn = CaptureModule(model, [2, 3])(images)
    cls, dist = _heads_by_hand(model, images)
    assert sorted(attn) == [2, 3] and attn[3].shape == (2, 4, 66, 66)
    assert isinstance(logits, tuple), "CaptureModule returned one tensor: the heads were averaged"
    torch.testing.assert_close(logits[0], cls)
    torch.testing.assert_close(logits[1], dist)


def test_hard_distillation_step_trains_both_heads_and_the_token() -> None:
    model = _deit(drop_rate=0.0, proj_drop_rate=0.0).train()
    model.set_distilled_training(True)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([0, 1, 2, 3])
    teacher = torch.randn(4, CLASSES, generator=torch.Generator().manual_seed(5))
    cls, dist = model(images)
    deit_hard_loss(cls, dist, labels, teacher)["loss"].backward()
    for name in ("dist_token", "head.weight", "head_dist.weight", "cls_token"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_deit_student_follows_a_plain_vit_teacher_without_its_distillation_token() -> None:
    """cifar-teacher (CLS + 64 patches) teaches cifar-student-deit (CLS + dist + 64 patches): one training step."""
    torch.manual_seed(0)
    teacher = build_model("cifar-teacher", CLASSES, depth=2).eval()
    student = _deit(drop_rate=0.0, proj_drop_rate=0.0).train()
    student.set_distilled_training(True)
    head_map = block_to_block([1], [3], 4)
    t_tokens, s_tokens = token_layout(teacher).num_tokens, token_layout(student).num_tokens
    assert (t_tokens, s_tokens) == (65, 66)
    head_map.validate(2, 8, 4, 4, t_tokens, s_tokens - 1)  # what train.py validates once the token is dropped
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    labels = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        t_out = capture_attention(teacher, images, head_map.teacher_blocks)
    s_attn = capture_attention(student, images, head_map.student_blocks).attn_logits  # today: no dist logits
    cls, dist = student(images)  # timm's forward gives the two heads until CaptureModule does
    student_maps = drop_distillation_token(gather_heads(s_attn, head_map.pairs, "student"))
    teacher_maps = gather_heads(t_out.attn_logits, head_map.pairs, "teacher")
    assert student_maps.shape == teacher_maps.shape == (4, 4, 65, 65)
    terms = distillation_loss(cls, labels, student_maps, teacher_maps, "kl", 0.5,
                              teacher_class_logits=t_out.class_logits, student_dist_logits=dist)
    terms["loss"].backward()
    assert torch.isfinite(terms["loss"]) and terms["att"] > 0 and {"ce", "att", "kd"} <= terms.keys()
    for name in ("dist_token", "head_dist.weight", "blocks.3.attn.qkv.weight"):
        grad = dict(student.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
