"""Head maps against hand-written pair lists; losses against ``torch.nn.functional``."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from vitkd.compiling import CompiledOrEager
from vitkd.distill import (
    logit_distillation_loss,
    LOSS_KINDS,
    HeadMap,
    HeadPair,
    attention_loss,
    block_to_block,
    distillation_loss,
    encoder_to_encoder,
    gather_heads,
    head_to_head,
    parse_head_map,
    per_sample_attention_loss,
)
from vitkd.errors import ConfigError, IncompatibleModelsError

pytestmark = pytest.mark.timeout(30)

B, P, T = 3, 4, 5


def _pairs(rows: list[tuple[int, int, int, int]]) -> tuple[HeadPair, ...]:
    return tuple(HeadPair(*row) for row in rows)


@pytest.fixture
def logits() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(B, P, T, T, generator=gen) * 2, torch.randn(B, P, T, T, generator=gen) * 2


# ---------------------------------------------------------------- losses


def test_mse_matches_functional(logits) -> None:
    s, t = logits
    assert torch.allclose(attention_loss(s, t, "mse"), F.mse_loss(s, t), rtol=1e-6)
    per_sample = attention_loss(s, t, "mse", reduction="none")
    assert torch.allclose(per_sample, torch.stack([F.mse_loss(s[b], t[b]) for b in range(B)]), rtol=1e-6)
    assert attention_loss(t, t, "mse").item() == 0.0


def test_kl_matches_functional(logits) -> None:
    s, t = logits
    reference = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum") / (B * P * T)
    assert torch.allclose(attention_loss(s, t, "kl"), reference, rtol=1e-5)
    per_sample = attention_loss(s, t, "kl", reduction="none")
    for b in range(B):
        ref_b = F.kl_div(F.log_softmax(s[b], -1), F.softmax(t[b], -1), reduction="sum") / (P * T)
        assert torch.allclose(per_sample[b], ref_b, rtol=1e-5)
    assert attention_loss(t, t, "kl").abs().item() < 1e-6
    assert attention_loss(t, t + 3.0, "kl").abs().item() < 1e-6  # softmax ignores a per-row shift


def test_ce_matches_functional_and_is_minimal_at_teacher(logits) -> None:
    s, t = logits
    p_t = F.softmax(t, -1)
    reference = F.cross_entropy(s.reshape(-1, T), p_t.reshape(-1, T))  # probability targets, mean over rows
    assert torch.allclose(attention_loss(s, t, "ce"), reference, rtol=1e-5)
    entropy = -(p_t * p_t.log()).sum(-1).mean()
    at_teacher = attention_loss(t, t, "ce")
    assert torch.allclose(at_teacher, entropy, rtol=1e-5)
    assert attention_loss(s, t, "ce") > at_teacher
    assert attention_loss(t + 0.1 * s, t, "ce") > at_teacher


def test_loss_errors(logits) -> None:
    s, t = logits
    with pytest.raises(ConfigError, match="unknown attention loss"):
        attention_loss(s, t, "l1")
    with pytest.raises(IncompatibleModelsError, match="shapes differ"):
        attention_loss(s, t[:, :2], "kl")


def test_distillation_loss_alpha_weighting(logits) -> None:
    s, t = logits
    gen = torch.Generator().manual_seed(1)
    class_logits = torch.randn(B, 6, generator=gen)
    labels = torch.tensor([0, 3, 5])
    ce = F.cross_entropy(class_logits, labels)
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum") / (B * P * T)
    for alpha in (0.0, 0.3, 1.0):
        terms = distillation_loss(class_logits, labels, s, t, "kl", alpha)
        assert torch.allclose(terms["loss"], alpha * ce + (1 - alpha) * kl, rtol=1e-5)
        assert torch.allclose(terms["ce"], ce) and torch.allclose(terms["att"], kl, rtol=1e-5)
        assert "kd" not in terms
    smoothed = distillation_loss(class_logits, labels, s, t, "kl", 1.0, label_smoothing=0.1)
    assert torch.allclose(smoothed["loss"], F.cross_entropy(class_logits, labels, label_smoothing=0.1))


def test_teacher_correct_gate_drops_misclassified_samples(logits) -> None:
    s, t = logits
    labels = torch.tensor([1, 2, 0])
    teacher_class = torch.tensor([[0.0, 5.0, 0.0],  # right
                                  [5.0, 0.0, 0.0],  # wrong (label 2)
                                  [5.0, 0.0, 0.0]])  # right
    student_class = torch.zeros(B, 3)
    per_sample = [F.mse_loss(s[b], t[b]) for b in range(B)]
    terms = distillation_loss(student_class, labels, s, t, "mse", alpha=0.0, teacher_class_logits=teacher_class,
                              gate="teacher-correct")
    assert torch.allclose(terms["att"], (per_sample[0] + per_sample[2]) / 2, rtol=1e-6)
    assert torch.allclose(terms["loss"], terms["att"])
    ungated = distillation_loss(student_class, labels, s, t, "mse", alpha=0.0, teacher_class_logits=teacher_class)
    assert torch.allclose(ungated["att"], F.mse_loss(s, t), rtol=1e-6)

    all_wrong = distillation_loss(student_class, torch.tensor([2, 2, 2]), s, t, "mse", alpha=0.0,
                                  teacher_class_logits=teacher_class, gate="teacher-correct")
    assert all_wrong["att"].item() == 0.0  # no sample kept: no attention signal, not NaN
    with pytest.raises(ConfigError, match="class logits"):
        distillation_loss(student_class, labels, s, t, "mse", 0.5, gate="teacher-correct")


def test_distillation_loss_kd_term(logits) -> None:
    s, t = logits
    gen = torch.Generator().manual_seed(2)
    student_class, teacher_class = torch.randn(B, 6, generator=gen), torch.randn(B, 6, generator=gen)
    labels = torch.tensor([0, 1, 2])
    temp = 3.0
    kd = F.kl_div(F.log_softmax(student_class / temp, -1), F.softmax(teacher_class / temp, -1),
                  reduction="batchmean") * temp ** 2
    terms = distillation_loss(student_class, labels, s, t, "mse", 0.4, teacher_class_logits=teacher_class,
                              kd_weight=0.7, kd_temperature=temp)
    expected = 0.4 * F.cross_entropy(student_class, labels) + 0.6 * F.mse_loss(s, t) + 0.7 * kd
    assert torch.allclose(terms["kd"], kd, rtol=1e-5)
    assert torch.allclose(terms["loss"], expected, rtol=1e-5)
    with pytest.raises(ConfigError, match="teacher"):
        distillation_loss(student_class, labels, s, t, "mse", 0.4, kd_weight=1.0)


def test_logit_distillation_loss_alone_matches_a_hand_reference() -> None:
    gen = torch.Generator().manual_seed(5)
    student_class, teacher_class = torch.randn(4, 5, generator=gen), torch.randn(4, 5, generator=gen)
    labels = torch.tensor([0, 3, 1, 4])
    temp = 4.0
    # T^2 * mean over images of sum_c p_t (log p_t - log p_s), both softened by T, written out by hand.
    p_t = torch.softmax(teacher_class / temp, -1)
    kd = temp ** 2 * (p_t * (p_t.log() - torch.log_softmax(student_class / temp, -1))).sum(-1).mean()
    ce = -torch.log_softmax(student_class, -1)[torch.arange(4), labels].mean()
    terms = logit_distillation_loss(student_class, labels, teacher_class, 0.0, 1.0, temp)
    assert torch.allclose(terms["kd"], kd, rtol=1e-5) and torch.allclose(terms["ce"], ce, rtol=1e-5)
    assert torch.allclose(terms["loss"], ce + kd, rtol=1e-5)
    assert "att" not in terms


@pytest.mark.parametrize("kwargs, match", [
    (dict(alpha=1.5), "alpha"),
    (dict(alpha=0.5, gate="always"), "unknown gate"),
])
def test_distillation_loss_bad_options(logits, kwargs, match: str) -> None:
    s, t = logits
    with pytest.raises(ConfigError, match=match):
        distillation_loss(torch.zeros(B, 3), torch.zeros(B, dtype=torch.long), s, t, "kl", **kwargs)


def test_gradient_reaches_student_logits_only(logits) -> None:
    s, t = logits
    s = s.clone().requires_grad_(True)
    t = t.clone().requires_grad_(True)
    attention_loss(s, t.detach(), "kl").backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


# ---------------------------------------------------------------- head maps


def test_head_to_head() -> None:
    head_map = head_to_head([(5, 0, 3, 1), (5, 2, 3, 0)])
    assert head_map.pairs == _pairs([(5, 0, 3, 1), (5, 2, 3, 0)])
    assert head_map.teacher_blocks == [5] and head_map.student_blocks == [3]
    assert HeadMap.from_list(head_map.to_list()) == head_map
    assert head_map.describe() == "T5.0->S3.1, T5.2->S3.0"


def test_block_to_block() -> None:
    assert block_to_block([4, 5], [2, 3], 2).pairs == _pairs(
        [(4, 0, 2, 0), (4, 1, 2, 1), (5, 0, 3, 0), (5, 1, 3, 1)])
    assert block_to_block([5], [3], 3, teacher_heads=[6, 0, 2]).pairs == _pairs(
        [(5, 6, 3, 0), (5, 0, 3, 1), (5, 2, 3, 2)])


@pytest.mark.parametrize("t_depth, s_depth, teacher_blocks", [
    (4, 4, [0, 1, 2, 3]),
    (12, 4, [2, 5, 8, 11]),
    (17, 7, [1, 4, 6, 9, 11, 14, 16]),  # round((j + 1) * 17 / 7) - 1
    (6, 1, [5]),
])
def test_encoder_to_encoder(t_depth: int, s_depth: int, teacher_blocks: list[int]) -> None:
    head_map = encoder_to_encoder(t_depth, s_depth, 2)
    expected = [(tb, h, sb, h) for sb, tb in enumerate(teacher_blocks) for h in range(2)]
    assert head_map.pairs == _pairs(expected)


def test_encoder_to_encoder_uneven_is_monotonic_and_ends_aligned() -> None:
    for t_depth in range(1, 18):
        for s_depth in range(1, t_depth + 1):
            blocks = [p.teacher_block for p in encoder_to_encoder(t_depth, s_depth, 1).pairs]
            assert blocks[-1] == t_depth - 1
            assert all(a < b for a, b in zip(blocks[:-1], blocks[1:], strict=True))
            assert all(0 <= b < t_depth for b in blocks)


def test_parse_head_map_all_syntaxes() -> None:
    assert parse_head_map("encoder", 6, 8, 4, 4) == encoder_to_encoder(6, 4, 4)
    assert parse_head_map(" encoder[0, 2,4,6] ", 6, 8, 4, 4) == encoder_to_encoder(6, 4, 4, [0, 2, 4, 6])
    assert parse_head_map("block:4->2;5->3", 6, 8, 4, 4) == block_to_block([4, 5], [2, 3], 4)
    assert parse_head_map("block: 5->3[0,2,4,6]", 6, 8, 4, 4) == block_to_block([5], [3], 4, [0, 2, 4, 6])
    assert parse_head_map("head:5.0->3.1; 5.2->3.0", 6, 8, 4, 4).pairs == _pairs([(5, 0, 3, 1), (5, 2, 3, 0)])
    assert parse_head_map("block:5->3[0,2,4,6];4->2[0,2,4,6]", 6, 8, 4, 4) == block_to_block(
        [5, 4], [3, 2], 4, [0, 2, 4, 6])


def test_parse_head_map_block_list_written_once() -> None:
    expected = block_to_block([5, 4], [3, 2], 4, [0, 2, 4, 6])
    assert parse_head_map("block:4->2;5->3[0,2,4,6]", 6, 8, 4, 4).pairs == tuple(
        sorted(expected.pairs, key=lambda p: p.teacher_block))
    assert parse_head_map("block:5->3[0,2,4,6];4->2", 6, 8, 4, 4) == expected


@pytest.mark.parametrize("spec, error, match", [
    ("block:6->3", ConfigError, "teacher block 6 out of range"),
    ("block:5->4", ConfigError, "student block 4 out of range"),
    ("head:5.8->3.0", ConfigError, "teacher head 8 out of range"),
    ("head:5.0->3.4", ConfigError, "student head 4 out of range"),
    ("head:5.0->3.1;4.0->3.1", ConfigError, "mapped twice"),
    ("block:5->3;4->3", ConfigError, "mapped twice"),
    ("encoder[0,1]", ConfigError, "one teacher head per student head"),
    ("encoder[0,0,1,2]", ConfigError, "repeat"),
    ("block:5->3[0,1,2,3];4->2[3,2,1,0]", ConfigError, "one teacher-head list"),
    ("block:5-3", ConfigError, "bad block pair"),
    ("block:", ConfigError, "no block pairs"),
    ("head:5->3", ConfigError, "bad head pair"),
    ("heads:5.0->3.0", ConfigError, "start with"),
    ("", ConfigError, "start with"),
])
def test_parse_head_map_errors(spec: str, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        parse_head_map(spec, 6, 8, 4, 4)


def test_map_validation_errors() -> None:
    with pytest.raises(ConfigError, match="student depth 5 exceeds teacher depth 4"):
        encoder_to_encoder(4, 5, 2)
    with pytest.raises(ConfigError, match="as many teacher blocks"):
        block_to_block([1, 2], [0], 2)
    with pytest.raises(ConfigError, match="at least one"):
        head_to_head([])
    with pytest.raises(ConfigError, match="negative"):
        head_to_head([(0, -1, 0, 0)])
    with pytest.raises(ConfigError, match="row must be"):
        HeadMap.from_list([[1, 2, 3]])
    head_map = encoder_to_encoder(6, 4, 4)
    with pytest.raises(IncompatibleModelsError, match="65 tokens and student 17"):
        head_map.validate(6, 8, 4, 4, teacher_tokens=65, student_tokens=17)
    assert head_map.validate(6, 8, 4, 4, teacher_tokens=65, student_tokens=65) is head_map


def test_gather_heads_follows_pair_order() -> None:
    teacher = {5: torch.randn(2, 8, T, T), 4: torch.randn(2, 8, T, T)}
    student = {3: torch.randn(2, 4, T, T)}
    pairs = _pairs([(5, 6, 3, 0), (4, 1, 3, 2)])
    assert torch.equal(gather_heads(teacher, pairs, "teacher"), torch.stack([teacher[5][:, 6], teacher[4][:, 1]], 1))
    assert torch.equal(gather_heads(student, pairs, "student"), torch.stack([student[3][:, 0], student[3][:, 2]], 1))


def test_gather_heads_whole_blocks_and_mixed_runs_match_stack() -> None:
    torch.manual_seed(0)
    teacher = {4: torch.randn(2, 8, 5, 5), 5: torch.randn(2, 8, 5, 5)}
    student = {2: torch.randn(2, 4, 5, 5), 3: torch.randn(2, 4, 5, 5)}
    for head_map in (block_to_block([4, 5], [2, 3], 4, [0, 1, 2, 3]), block_to_block([4, 5], [2, 3], 4, [6, 0, 3, 1]),
                     head_to_head([[5, 1, 3, 0], [4, 7, 3, 1], [4, 2, 2, 3]])):
        for side, scores in (("teacher", teacher), ("student", student)):
            reference = torch.stack([scores[getattr(p, f"{side}_block")][:, getattr(p, f"{side}_head")]
                                     for p in head_map.pairs], dim=1)
            assert torch.equal(gather_heads(scores, head_map.pairs, side), reference)


@pytest.mark.parametrize("kind", ["ce", "kl"])
def test_soft_target_loss_gradient_matches_autograd(kind: str) -> None:
    """The hand-written backward (p_s - p_t) equals autograd through log_softmax, in float64."""
    torch.manual_seed(0)
    student = torch.randn(3, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    fast = attention_loss(student, teacher, kind)
    (fast_grad,) = torch.autograd.grad(fast, student)
    # Reference: the same formula with a teacher that requires grad takes the plain autograd path.
    teacher_leaf = teacher.clone().requires_grad_(True)
    log_ps, log_pt = F.log_softmax(student, -1), F.log_softmax(teacher_leaf, -1)
    rows = -(log_pt.exp() * log_ps).sum(-1) if kind == "ce" else (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    reference = rows.mean()
    (ref_grad,) = torch.autograd.grad(reference, student)
    torch.testing.assert_close(fast, reference)
    torch.testing.assert_close(fast_grad, ref_grad)
    assert torch.autograd.gradcheck(lambda s: attention_loss(s, teacher, kind), (student,))
    slow = attention_loss(student, teacher_leaf, kind)  # the autograd path agrees too
    torch.testing.assert_close(slow, reference)


@pytest.mark.timeout(240)
def test_compiled_loss_matches_eager_values_and_gradients() -> None:
    """What training runs with --compile: torch.compile of per_sample_attention_loss, vs the eager loss."""
    torch.manual_seed(0)
    teacher = torch.randn(3, 2, 9, 9)
    for kind in LOSS_KINDS:
        student = torch.randn(3, 2, 9, 9, requires_grad=True)
        compiled = CompiledOrEager(functools.partial(per_sample_attention_loss, kind=kind), "loss")
        fast = attention_loss(student, teacher, kind, reduction="none", per_sample_fn=compiled)
        (fast_grad,) = torch.autograd.grad(fast.sum(), student)
        eager = attention_loss(student, teacher, kind, reduction="none")
        (eager_grad,) = torch.autograd.grad(eager.sum(), student)
        torch.testing.assert_close(fast, eager, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fast_grad, eager_grad, rtol=1e-5, atol=1e-6)
        assert not compiled._eager_only  # it really ran the compiled function
