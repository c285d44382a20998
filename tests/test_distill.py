"""Head maps against hand-written pair lists; losses against ``torch.nn.functional``."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from vitkd.attention import capture_attention
from vitkd.compiling import CompiledOrEager
from vitkd.distill import (
    GATES,
    LOSS_KINDS,
    WEIGHTINGS,
    attention_loss,
    deit_hard_loss,
    distillation_loss,
    drop_distillation_token,
    gather_heads,
    logit_distillation_loss,
    per_sample_attention_loss,
)
from vitkd.errors import ConfigError, IncompatibleModelsError
from vitkd.headmap import HeadPair, block_to_block, head_to_head
from vitkd.models import build_model

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
    (dict(alpha=0.5, weighting="teacher-confidence"), "unknown weighting"),
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


# ---------------------------------------------------------------- weighting by the student's performance


def _per_sample_kl(s: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
    """KL(p_t || p_s) of each image, summed over keys, averaged over pairs and query rows (torch's kl_div)."""
    return [F.kl_div(F.log_softmax(s[b], -1), F.softmax(t[b], -1), reduction="sum") / (P * T) for b in range(B)]


def test_student_correct_gate_keeps_what_the_student_gets_right(logits) -> None:
    s, t = logits
    labels = torch.tensor([2, 0, 1])
    student_class = torch.tensor([[0.0, 1.0, 4.0],  # right
                                  [0.0, 3.0, 1.0],  # wrong (label 0)
                                  [1.0, 2.0, 0.0]])  # right
    teacher_class = torch.zeros(B, 3)  # the teacher's opinion must not matter to this gate
    per_sample = _per_sample_kl(s, t)
    terms = distillation_loss(student_class, labels, s, t, "kl", alpha=0.25, teacher_class_logits=teacher_class,
                              gate="student-correct")
    expected_att = (per_sample[0] + per_sample[2]) / 2
    assert torch.allclose(terms["att"], expected_att, rtol=1e-5)
    assert torch.allclose(terms["loss"], 0.25 * F.cross_entropy(student_class, labels) + 0.75 * expected_att,
                          rtol=1e-5)
    # No teacher logits needed; every image wrong gives no attention signal (0, not NaN) and a zero gradient.
    s_leaf = s.clone().requires_grad_(True)
    none_right = distillation_loss(student_class, torch.tensor([0, 0, 0]), s_leaf, t, "kl", alpha=0.0,
                                   gate="student-correct")
    assert none_right["att"].item() == 0.0
    (grad,) = torch.autograd.grad(none_right["loss"], s_leaf)
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_weighted_and_gated_attention_term_matches_a_loop(logits, gate: str, weighting: str) -> None:
    s, t = logits
    gen = torch.Generator().manual_seed(7)
    student_class, teacher_class = torch.randn(B, 4, generator=gen) * 2, torch.randn(B, 4, generator=gen) * 2
    labels = student_class.argmax(-1)
    labels[1] = (labels[1] + 1) % 4  # the student gets image 1 wrong
    labels[2] = teacher_class[2].argmax()
    per_sample = _per_sample_kl(s, t)
    weights, loss_sum = [], 0.0
    for b in range(B):
        z = student_class[b].tolist()
        p_true = math.exp(z[labels[b]]) / sum(math.exp(v) for v in z)
        w = {"none": 1.0, "student-confidence": p_true, "student-doubt": 1.0 - p_true}[weighting]
        if gate == "teacher-correct":
            w *= float(teacher_class[b].argmax() == labels[b])
        elif gate == "student-correct":
            w *= float(student_class[b].argmax() == labels[b])
        weights.append(w)
        loss_sum = loss_sum + w * per_sample[b]
    expected_att = loss_sum / sum(weights) if sum(weights) > 0 else torch.tensor(0.0)
    terms = distillation_loss(student_class, labels, s, t, "kl", alpha=0.4, teacher_class_logits=teacher_class,
                              gate=gate, weighting=weighting)
    assert torch.allclose(terms["att"], torch.as_tensor(expected_att, dtype=torch.float32), rtol=1e-5, atol=1e-7)
    expected = 0.4 * F.cross_entropy(student_class, labels) + 0.6 * expected_att
    assert torch.allclose(terms["loss"], torch.as_tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-7)


def test_weighting_is_a_weighted_mean_so_alpha_keeps_its_meaning(logits) -> None:
    """Scaling the student's confidence on every image alike changes nothing: the weights are normalised."""
    s, t = logits
    labels = torch.tensor([0, 1, 2])
    confident = torch.eye(3) * 50.0  # p_student(y) == 1 for every image: the same as no weighting
    terms = distillation_loss(confident, labels, s, t, "mse", alpha=0.3, weighting="student-confidence")
    assert torch.allclose(terms["att"], F.mse_loss(s, t), rtol=1e-5)
    doubt = distillation_loss(confident, labels, s, t, "mse", alpha=0.3, weighting="student-doubt")
    assert doubt["att"].item() == 0.0 and torch.isfinite(doubt["loss"])  # sum of weights 0: no NaN


@pytest.mark.parametrize("gate, weighting", [("student-correct", "none"), ("none", "student-confidence"),
                                             ("none", "student-doubt"), ("student-correct", "student-doubt")])
def test_no_gradient_through_the_student_decision(logits, gate: str, weighting: str) -> None:
    s, t = logits
    student_class = torch.randn(B, 3, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    labels = student_class.detach().argmax(-1)
    terms = distillation_loss(student_class, labels, s, t, "kl", alpha=0.0, gate=gate, weighting=weighting)
    (grad,) = torch.autograd.grad(terms["loss"], student_class, allow_unused=True)
    assert grad is None or torch.equal(grad, torch.zeros_like(grad))  # alpha 0: only the attention term


@pytest.mark.parametrize("kind", ["ce", "kl"])
def test_hand_written_backward_with_per_sample_weights(kind: str) -> None:
    """What the gate and weightings feed the hand-written backward: a different upstream gradient per image.

    With the plain mean every row's upstream gradient is the same, so a backward that mixed rows
    up (e.g. used ``grad_rows.mean()``) would go unnoticed; non-uniform weights expose it.
    """
    torch.manual_seed(0)
    student = torch.randn(3, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    weights = torch.tensor([0.9, 0.0, 0.25], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda s: (attention_loss(s, teacher, kind, reduction="none") * weights).sum(), (student,))
    # The gradient by hand: image b gets w_b * (p_s - p_t) / (pairs * rows).
    (grad,) = torch.autograd.grad((attention_loss(student, teacher, kind, reduction="none") * weights).sum(),
                                  student)
    by_hand = weights[:, None, None, None] * (F.softmax(student, -1) - F.softmax(teacher, -1)) / (2 * 5)
    torch.testing.assert_close(grad, by_hand.detach())
    # And through distillation_loss itself, with weights from the student's class logits and a gate.
    student_class = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.5, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0])
    for gate, weighting in (("student-correct", "student-confidence"), ("none", "student-doubt")):
        assert torch.autograd.gradcheck(
            lambda s, g=gate, w=weighting: distillation_loss(student_class, labels, s, teacher, kind, 0.5,
                                                             gate=g, weighting=w)["loss"], (student,))


# ---------------------------------------------------------------- DeiT hard distillation and the alpha schedule


def _nll(logits: torch.Tensor, targets: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Label-smoothed cross-entropy written out: (1 - eps) * -log p(y) + eps * mean_c -log p(c), batch mean."""
    log_p = logits - logits.exp().sum(-1, keepdim=True).log()
    rows = [(1 - smoothing) * -log_p[b, targets[b]] + smoothing * -log_p[b].mean() for b in range(len(targets))]
    return torch.stack(rows).mean()


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_deit_hard_loss_matches_a_hand_reference(smoothing: float) -> None:
    gen = torch.Generator().manual_seed(11)
    cls, dist, teacher = (torch.randn(4, 5, generator=gen) * 2 for _ in range(3))
    labels = torch.tensor([0, 3, 1, 4])
    teacher_says = torch.tensor([int(max(range(5), key=lambda c: teacher[b, c])) for b in range(4)])
    ce, kd = _nll(cls, labels, smoothing), _nll(dist, teacher_says)  # no smoothing on the teacher's decision
    terms = deit_hard_loss(cls, dist, labels, teacher, smoothing)
    assert torch.allclose(terms["ce"], ce, rtol=1e-5) and torch.allclose(terms["kd"], kd, rtol=1e-5)
    assert torch.allclose(terms["loss"], 0.5 * ce + 0.5 * kd, rtol=1e-5)
    with pytest.raises(IncompatibleModelsError, match="one shape"):
        deit_hard_loss(cls, dist[:, :3], labels, teacher)


def test_deit_student_in_distillation_loss(logits) -> None:
    """``alpha * (0.5 CE(class head) + 0.5 CE(dist head, teacher argmax)) + (1 - alpha) * L_att``."""
    s, t = logits
    cls = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 2.0, 0.0]])
    dist = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.0, 4.0], [0.0, 1.0, 0.0]])
    teacher = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    per_sample = _per_sample_kl(s, t)
    hard = 0.5 * _nll(cls, labels) + 0.5 * _nll(dist, torch.tensor([0, 2, 0]))
    terms = distillation_loss(cls, labels, s, t, "kl", 0.3, teacher_class_logits=teacher, student_dist_logits=dist)
    assert torch.allclose(terms["loss"], 0.3 * hard + 0.7 * sum(per_sample) / B, rtol=1e-5)
    assert torch.allclose(terms["kd"], _nll(dist, torch.tensor([0, 2, 0])), rtol=1e-5)
    # The student's prediction is the mean of its heads: image 0 right (mean [2, 0.5, 0]), image 1 wrong
    # (mean [0, 0.5, 2]), image 2 right. The class head alone would keep images 1 and 2 instead.
    gated = distillation_loss(cls, labels, s, t, "kl", 0.0, teacher_class_logits=teacher, student_dist_logits=dist,
                              gate="student-correct")
    assert torch.allclose(gated["att"], (per_sample[0] + per_sample[2]) / 2, rtol=1e-5)
    with pytest.raises(ConfigError, match="kd_weight 0"):
        distillation_loss(cls, labels, s, t, "kl", 0.3, teacher_class_logits=teacher, student_dist_logits=dist,
                          kd_weight=0.5)
    with pytest.raises(ConfigError, match="teacher's class logits"):
        distillation_loss(cls, labels, s, t, "kl", 0.3, student_dist_logits=dist)


def test_drop_distillation_token_keeps_cls_and_patches() -> None:
    maps = torch.arange(2 * 6 * 6, dtype=torch.float32).reshape(1, 2, 6, 6)  # tokens: CLS, dist, 4 patches
    dropped = drop_distillation_token(maps)
    keep = [0, 2, 3, 4, 5]
    assert torch.equal(dropped, maps[:, :, keep][:, :, :, keep])
    # As probabilities: the student's attention over CLS and patches, renormalised without the dist token.
    probs = F.softmax(maps / 10, -1)[:, :, keep][:, :, :, keep]
    torch.testing.assert_close(F.softmax(dropped / 10, -1), probs / probs.sum(-1, keepdim=True))
    leaf = maps.clone().requires_grad_(True)
    drop_distillation_token(leaf).sum().backward()
    assert leaf.grad[:, :, 1].abs().sum() == 0 and leaf.grad[:, :, :, 1].abs().sum() == 0
    assert leaf.grad[:, :, keep][:, :, :, keep].eq(1).all()
    with pytest.raises(IncompatibleModelsError, match="T >= 3"):
        drop_distillation_token(torch.zeros(1, 1, 2, 2))


# ---------------------------------------------------------------- head maps


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


# ---------------------------------------------------------------- masked keys (Locality Self-Attention diagonals)

# (teacher masks its diagonal, student masks its diagonal): which side is an LSA model
MASKINGS = {"plain": (False, False), "lsa-teacher": (True, False), "lsa-student": (False, True),
            "lsa-both": (True, True)}


def _mask_diagonal(logits: torch.Tensor, on: bool) -> torch.Tensor:
    t = logits.shape[-1]
    return logits.masked_fill(torch.eye(t, dtype=torch.bool), -math.inf) if on else logits


def _masked_reference(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sample loss [B] row by row in Python floats: the rule ``attention_loss`` documents.

    mse: mean squared difference over keys finite in both; ce/kl: the student's softmax over its
    own finite keys against the teacher's softmax over the keys finite in both (student's keys).
    """
    b_, p_, t_, _ = student.shape
    out = []
    for b in range(b_):
        total = 0.0
        for p in range(p_):
            for q in range(t_):
                s_row, t_row = student[b, p, q].tolist(), teacher[b, p, q].tolist()
                if kind == "mse":
                    keys = [k for k in range(t_) if s_row[k] != -math.inf and t_row[k] != -math.inf]
                    total += sum((s_row[k] - t_row[k]) ** 2 for k in keys) / len(keys)
                    continue
                s_keys = [k for k in range(t_) if s_row[k] != -math.inf]
                both = [k for k in s_keys if t_row[k] != -math.inf]
                s_norm = sum(math.exp(s_row[k]) for k in s_keys)
                t_norm = sum(math.exp(t_row[k]) for k in both)
                for k in both:
                    p_t = math.exp(t_row[k]) / t_norm
                    total += -p_t * math.log(math.exp(s_row[k]) / s_norm)
                    if kind == "kl":
                        total += p_t * math.log(p_t)
        out.append(total / (p_ * t_))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("masking", list(MASKINGS))
@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_masked_keys_match_a_row_by_row_reference(logits, kind: str, masking: str) -> None:
    teacher_lsa, student_lsa = MASKINGS[masking]
    s = _mask_diagonal(logits[0], student_lsa).requires_grad_(True)
    t = _mask_diagonal(logits[1], teacher_lsa)
    reference = _masked_reference(s.detach(), t, kind)
    eager = attention_loss(s, t, kind, reduction="none")
    assert torch.isfinite(eager).all()
    torch.testing.assert_close(eager.double(), reference, rtol=1e-5, atol=1e-6)
    # the function torch.compile compiles, and the autograd path (a teacher that requires grad), agree
    torch.testing.assert_close(per_sample_attention_loss(s, t, kind), eager)
    torch.testing.assert_close(attention_loss(s, t.clone().requires_grad_(True), kind, reduction="none"), eager)
    (grad,) = torch.autograd.grad(eager.sum(), s)
    assert torch.isfinite(grad).all()
    diagonal = grad.diagonal(dim1=-2, dim2=-1)
    if student_lsa or (teacher_lsa and kind == "mse"):
        assert torch.equal(diagonal, torch.zeros_like(diagonal))  # a masked or excluded key gets no gradient
    elif teacher_lsa:  # ce/kl: the teacher gives its own key no attention, so the student's is pushed down
        assert (diagonal > 0).all()


@pytest.mark.parametrize("masking", list(MASKINGS))
@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_masked_keys_gradcheck(kind: str, masking: str) -> None:
    """float64 finite differences through the hand-written backward and the autograd path, masked keys included."""
    teacher_lsa, student_lsa = MASKINGS[masking]
    gen = torch.Generator().manual_seed(21)
    s = _mask_diagonal(torch.randn(2, 2, 4, 4, dtype=torch.float64, generator=gen), student_lsa)
    t = _mask_diagonal(torch.randn(2, 2, 4, 4, dtype=torch.float64, generator=gen), teacher_lsa)
    assert torch.autograd.gradcheck(lambda x: attention_loss(x, t, kind, reduction="none"),
                                    (s.clone().requires_grad_(True),))
    assert torch.autograd.gradcheck(lambda x, y: attention_loss(x, y, kind, reduction="none"),
                                    (s.clone().requires_grad_(True), t.clone().requires_grad_(True)))


def test_unmasked_maps_skip_the_masked_formulas_with_the_same_values(logits) -> None:
    """attention_loss takes the plain formulas when no map has -inf; the masked ones give the same numbers."""
    s, t = logits
    for kind in LOSS_KINDS:
        plain = per_sample_attention_loss(s, t, kind, masked=False)
        torch.testing.assert_close(per_sample_attention_loss(s, t, kind), plain)
        torch.testing.assert_close(attention_loss(s, t, kind, reduction="none"), plain)


def test_lsa_student_under_a_plain_teacher_stays_finite(logits) -> None:
    """Plain KL(p_t || p_s) is +inf when the student cannot attend where the teacher does; the rule renormalises."""
    s, t = _mask_diagonal(logits[0], True), logits[1]
    naive = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum")
    assert naive.item() == math.inf
    loss = attention_loss(s, t, "kl")
    assert torch.isfinite(loss) and loss > 0
    # matching the teacher's attention to the other tokens gives 0
    assert attention_loss(_mask_diagonal(t, True), t, "kl").abs().item() < 1e-6


def test_distilling_between_lsa_and_plain_models_is_finite() -> None:
    """Captured maps of an SL-ViT teacher and a plain student (and the other way round) through distillation_loss."""
    torch.manual_seed(0)
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    sl, plain = build_model("cifar-teacher-sl", 10, depth=1), build_model("cifar-student", 10, depth=1)
    for teacher, student in ((sl, plain), (build_model("cifar-teacher", 10, depth=1),
                                           build_model("cifar-student-sl", 10, depth=1))):
        pairs = block_to_block([0], [0], 4, teacher_heads=[0, 2, 4, 6]).pairs
        with torch.no_grad():
            t_attn = gather_heads(capture_attention(teacher, images).attn_logits, pairs, "teacher")
        out = capture_attention(student, images)
        s_attn = gather_heads(out.attn_logits, pairs, "student")
        assert torch.isneginf(t_attn).any() or torch.isneginf(s_attn).any()
        for kind in LOSS_KINDS:
            loss = distillation_loss(out.class_logits, labels, s_attn, t_attn, kind, alpha=0.5)["loss"]
            grads = torch.autograd.grad(loss, list(student.parameters()), allow_unused=True, retain_graph=True)
            assert torch.isfinite(loss) and all(g is None or torch.isfinite(g).all() for g in grads), kind


# ---------------------------------------------------------------- many-to-one head maps (teacher head groups)


def _group_target_by_loop(maps: torch.Tensor, heads: list[int], kind: str) -> torch.Tensor:
    """Reference target for one group, entry by entry: mean probability (log of it) or mean logit."""
    b, _, t, _ = maps.shape
    out = torch.empty(b, t, t, dtype=torch.float64)
    for i in range(b):
        for q in range(t):
            if kind == "mse":
                out[i, q] = sum(maps[i, h, q].double() for h in heads) / len(heads)
            else:
                probs = [torch.exp(maps[i, h, q].double()) / torch.exp(maps[i, h, q].double()).sum() for h in heads]
                out[i, q] = torch.log(sum(probs) / len(heads))
    return out


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_gather_heads_merges_a_group_of_teacher_heads(kind: str) -> None:
    torch.manual_seed(0)
    teacher = {5: torch.randn(2, 8, T, T) * 2, 4: torch.randn(2, 8, T, T) * 2}
    student = {3: torch.randn(2, 4, T, T), 2: torch.randn(2, 4, T, T)}
    head_map = head_to_head([(5, [0, 1], 3, 0), (5, 6, 3, 2), (4, [7, 2, 3], 2, 1)])
    target = gather_heads(teacher, head_map.pairs, "teacher", kind)
    assert target.shape == (2, 3, T, T) and target.dtype == torch.float32
    for idx, (block, heads) in enumerate(((5, [0, 1]), (5, [6]), (4, [7, 2, 3]))):
        torch.testing.assert_close(target[:, idx].double(), _group_target_by_loop(teacher[block], heads, kind),
                                   rtol=1e-5, atol=1e-5)
    # the student side stacks each mapped student head once, in the same order
    torch.testing.assert_close(gather_heads(student, head_map.pairs, "student"),
                               torch.stack([student[3][:, 0], student[3][:, 2], student[2][:, 1]], 1))
    if kind != "mse":  # the loss's softmax gives back the group's mean distribution
        mean_probs = (teacher[5][:, 0].softmax(-1) + teacher[5][:, 1].softmax(-1)) / 2
        torch.testing.assert_close(target[:, 0].softmax(-1), mean_probs)


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_equal_groups_take_the_same_values_as_uneven_ones(kind: str) -> None:
    """The one-reduction path for equal groups (8 -> 4 block maps) against the per-group path."""
    torch.manual_seed(1)
    teacher = {1: torch.randn(3, 8, T, T) * 2}
    even = block_to_block([1], [0], 4, num_teacher_heads=8)  # {0,1}->0, {2,3}->1, ...
    target = gather_heads(teacher, even.pairs, "teacher", kind)
    for sh in range(4):
        torch.testing.assert_close(target[:, sh].double(), _group_target_by_loop(teacher[1], [2 * sh, 2 * sh + 1],
                                                                                 kind), rtol=1e-5, atol=1e-5)


def test_groups_need_the_loss_kind_and_singletons_do_not() -> None:
    teacher = {5: torch.randn(2, 8, T, T)}
    with pytest.raises(ConfigError, match="needs the attention loss"):
        gather_heads(teacher, head_to_head([(5, [0, 1], 3, 0)]).pairs, "teacher")
    one_to_one = head_to_head([(5, 2, 3, 0)]).pairs
    assert torch.equal(gather_heads(teacher, one_to_one, "teacher", "kl"), teacher[5][:, 2:3])  # logits as is


def test_group_of_lsa_heads_keeps_masked_keys_masked() -> None:
    """LSA heads all mask the diagonal: the merged target too (probability 0, no NaN), for each kind."""
    maps = _mask_diagonal(torch.randn(2, 4, T, T), True)
    head_map = block_to_block([0], [0], 2, num_teacher_heads=4)
    for kind in LOSS_KINDS:
        target = gather_heads({0: maps}, head_map.pairs, "teacher", kind)
        assert not torch.isnan(target).any()
        assert torch.isneginf(torch.diagonal(target, dim1=-2, dim2=-1)).all()
        student = torch.randn(2, 2, T, T, requires_grad=True)
        loss = attention_loss(student, target, kind)
        (grad,) = torch.autograd.grad(loss, student)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), kind


def test_group_target_is_a_fixed_teacher_for_the_loss() -> None:
    """Through distillation_loss, a group's KL pulls the student head towards the group's mean distribution."""
    torch.manual_seed(2)
    teacher = {0: torch.randn(2, 2, T, T) * 3}
    pairs = head_to_head([(0, [0, 1], 0, 0)]).pairs
    target = gather_heads(teacher, pairs, "teacher", "kl")
    mean_probs = (teacher[0][:, 0].softmax(-1) + teacher[0][:, 1].softmax(-1)) / 2
    on_target = mean_probs.log()[:, None]
    assert attention_loss(on_target, target, "kl").abs().item() < 1e-6
    for head in (0, 1):  # either teacher head alone is farther from the group's target
        assert attention_loss(teacher[0][:, head:head + 1], target, "kl").item() > 1e-3
