"""The distillation losses: attention (MSE/CE/KL over mapped heads), logit KD, DeiT hard distillation."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

from .errors import ConfigError, IncompatibleModelsError
from .headmap import HeadPair

__all__ = ["per_sample_attention_loss", "attention_loss", "gather_heads", "merge_head_group", "distillation_loss",
           "logit_kd", "logit_distillation_loss", "deit_hard_loss", "drop_distillation_token", "LOSS_KINDS",
           "GATES", "WEIGHTINGS"]

LossKind = Literal["mse", "ce", "kl"]
LOSS_KINDS: tuple[str, ...] = ("mse", "ce", "kl")
GATES: tuple[str, ...] = ("none", "teacher-correct", "student-correct")
WEIGHTINGS: tuple[str, ...] = ("none", "student-confidence", "student-doubt")


def _stack_heads(attn_logits: dict[int, torch.Tensor], heads: Sequence[tuple[int, int]]) -> torch.Tensor:
    """The maps of ``(block, head)`` stacked into [B, len(heads), T, T], in order."""
    # One index_select per run of consecutive heads from the same block: in the backward pass
    # this scatters into each block's gradient once instead of once per head.
    runs: list[tuple[int, list[int]]] = []
    for block, head in heads:
        if runs and runs[-1][0] == block:
            runs[-1][1].append(head)
        else:
            runs.append((block, [head]))
    parts = []
    for block, block_heads in runs:
        scores = attn_logits[block]
        if block_heads == list(range(scores.shape[1])):
            parts.append(scores)
        else:
            parts.append(scores.index_select(1, torch.tensor(block_heads, device=scores.device)))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _groups_by_student_head(pairs: Sequence[HeadPair]) -> list[list[HeadPair]]:
    groups: dict[tuple[int, int], list[HeadPair]] = {}
    for p in pairs:
        groups.setdefault((p.student_block, p.student_head), []).append(p)
    return list(groups.values())


def merge_head_group(maps: torch.Tensor, kind: str, dim: int = 1) -> torch.Tensor:
    """One target from a group of teacher maps (logits) along ``dim``: their mean attention.

    - ``ce``/``kl``: the mean of the group's probabilities, returned as its log
      (``log mean_h softmax(l_h)``, computed as a logsumexp): the losses' softmax gives back
      exactly that mean distribution;
    - ``mse``: the mean of the group's logits (the loss compares logits; the mean logit is the
      group's average query-key score).

    Computed in float32 (float64 stays); ``-inf`` (masked) keys stay ``-inf`` only where every
    head of the group masks them (``ce``/``kl``) or any does (``mse``).
    """
    if kind not in LOSS_KINDS:
        raise ConfigError(f"a group of teacher heads needs the attention loss to merge them: use one of "
                          f"{', '.join(LOSS_KINDS)}, got {kind!r}")
    x = maps.to(torch.promote_types(maps.dtype, torch.float32))
    if kind == "mse":
        return x.mean(dim)
    return torch.logsumexp(F.log_softmax(x, dim=-1), dim=dim) - math.log(x.shape[dim])


def gather_heads(attn_logits: dict[int, torch.Tensor], pairs: Sequence[HeadPair], side: str,
                 kind: str | None = None) -> torch.Tensor:
    """The maps of the mapped heads of one side (``teacher`` or ``student``) as [B, P, T, T], one per student head.

    ``P`` is the number of mapped student heads, in the order they first appear in ``pairs``.
    The student side stacks each mapped student head once. The teacher side stacks, per
    student head, its one teacher head's logits, or for a group of teacher heads (several
    pairs with the same student head) the group's merged target (``merge_head_group`` with
    ``kind``, the attention loss, which a group needs). With one pair per student head both
    sides are the plain stack of the pairs' heads, in pair order.
    """
    if side not in ("teacher", "student"):
        raise ValueError(side)
    groups = _groups_by_student_head(pairs)
    if side == "student":
        return _stack_heads(attn_logits, [(g[0].student_block, g[0].student_head) for g in groups])
    maps = _stack_heads(attn_logits, [(p.teacher_block, p.teacher_head) for g in groups for p in g])
    sizes = [len(g) for g in groups]
    if max(sizes) == 1:
        return maps
    if kind is None:
        raise ConfigError("a head map with groups of teacher heads needs the attention loss (kind) to merge them")
    if len(set(sizes)) == 1:  # equal groups: one reduction over [B, P, g, T, T]
        return merge_head_group(maps.unflatten(1, (len(groups), sizes[0])), kind, dim=2)
    return torch.stack([merge_head_group(part, kind) for part in maps.split(sizes, dim=1)], dim=1)


def drop_distillation_token(attn_logits: torch.Tensor) -> torch.Tensor:
    """A DeiT model's maps [B, P, T, T] (CLS, distillation token, patches) without the distillation token.

    Removes token 1's row and column: [B, P, T - 1, T - 1], laid out like a one-prefix-token
    ViT's maps (CLS, patches), so a DeiT student can follow a plain ViT teacher (or the other
    way round). The maps stay pre-softmax logits: the ``ce``/``kl`` losses then compare the
    student's attention renormalised over CLS and patches (what it gives them, whatever it
    gives its distillation token); ``mse`` compares the remaining logits.
    """
    if attn_logits.shape[-1] < 3 or attn_logits.shape[-1] != attn_logits.shape[-2]:
        raise IncompatibleModelsError(f"expected [..., T, T] DeiT attention maps with T >= 3, got "
                                      f"{tuple(attn_logits.shape)}")
    t = attn_logits.shape[-1]
    keep = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(2, t)]).to(attn_logits.device)
    return attn_logits.index_select(-2, keep).index_select(-1, keep)


def _teacher_over_student_keys(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The teacher's logits with the keys the student masks (``-inf``) masked too.

    Its softmax is the teacher's row renormalised over the keys the student can attend to.
    """
    return teacher.masked_fill(student == -math.inf, -math.inf)


def _finite(log_p: torch.Tensor) -> torch.Tensor:
    """``log p`` with ``-inf`` (p = 0) clamped to the lowest finite value, so ``p log p`` is exactly 0 there
    (not ``0 * -inf = NaN``) and gradients stay finite; every other entry is unchanged."""
    return log_p.clamp(min=torch.finfo(log_p.dtype).min)


def _has_masked_keys(*maps: torch.Tensor) -> bool:
    """True if a map holds a ``-inf`` logit. One reduction per map, no copy: the masked formulas cost
    several extra passes over [B, P, T, T], so eager losses skip them for maps without masked keys."""
    return any(m.numel() > 0 and bool(m.amin() == -math.inf) for m in maps)


def _soft_target_rows(log_ps: torch.Tensor, log_pt: torch.Tensor, pt: torch.Tensor, kl: bool,
                      masked: bool) -> torch.Tensor:
    """Per row ``-sum p_t log p_s`` (+ ``sum p_t log p_t`` for KL); with ``masked``, keys with ``p_t = 0`` add 0."""
    if masked:
        log_ps, log_pt = _finite(log_ps), _finite(log_pt)
    if kl:
        return (pt * (log_pt - log_ps)).sum(-1)
    return -(pt * log_ps).sum(-1)


class _SoftTargetRowLoss(torch.autograd.Function):
    """Per-row ``-sum p_t log p_s`` (``+ sum p_t log p_t`` for KL) against a fixed teacher.

    Both have the gradient ``p_s - p_t`` w.r.t. the student logits; writing it by hand
    replaces autograd's chain through log-softmax, product and sum, which dominates the
    cost of a distillation step (maps are [B, pairs, T, T]). Masked keys follow
    ``attention_loss``: ``p_t`` is renormalised over the student's unmasked keys.
    """

    @staticmethod
    def forward(ctx: Any, student: torch.Tensor, teacher: torch.Tensor, kl: bool, masked: bool) -> torch.Tensor:
        log_ps = F.log_softmax(student, dim=-1)
        log_pt = F.log_softmax(_teacher_over_student_keys(student, teacher) if masked else teacher, dim=-1)
        pt = log_pt.exp()
        per_row = _soft_target_rows(log_ps, log_pt, pt, kl, masked)
        ctx.save_for_backward(log_ps, pt)
        return per_row

    @staticmethod
    def backward(ctx: Any, grad_rows: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        log_ps, pt = ctx.saved_tensors
        return (log_ps.exp() - pt) * grad_rows.unsqueeze(-1), None, None, None


def per_sample_attention_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str,
                              masked: bool = True) -> torch.Tensor:
    """``attention_loss(..., reduction="none")`` in plain ops, for ``torch.compile`` to fuse.

    On CPU the compiled KL runs forward and backward several times faster than eager
    PyTorch, whose many passes over [B, pairs, T, T] dominate a distillation step.
    Masked (``-inf``) keys are handled as ``attention_loss`` documents; ``masked=False`` skips
    that handling (same values for maps without ``-inf``, fewer passes in eager PyTorch).
    """
    if kind == "mse":
        if masked:
            both = (student != -math.inf) & (teacher != -math.inf)
            per_row = torch.where(both, student - teacher, 0.0).pow(2).sum(-1) / both.sum(-1)
        else:
            per_row = (student - teacher).pow(2).mean(dim=-1)
    else:
        log_ps = F.log_softmax(student, dim=-1)
        log_pt = F.log_softmax(_teacher_over_student_keys(student, teacher) if masked else teacher, dim=-1)
        per_row = _soft_target_rows(log_ps, log_pt, log_pt.exp(), kind == "kl", masked)
    return per_row.flatten(1).mean(dim=1)


PerSampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def attention_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str,
                   reduction: str = "mean", per_sample_fn: PerSampleLoss | None = None) -> torch.Tensor:
    """Attention distillation loss between mapped heads, both [B, P, T, T] pre-softmax logits.

    - ``mse``: squared error of the logits, averaged over keys;
    - ``ce``: cross-entropy ``-sum_k p_t log p_s`` of the probabilities;
    - ``kl``: ``KL(p_t || p_s) = sum_k p_t (log p_t - log p_s)``.

    Reduction: each query row gives one number (keys summed for ``ce``/``kl``, averaged for
    ``mse``); rows are averaged over the batch, the mapped pairs and the query rows, so a
    given alpha weighs the attention term the same for head-, block- and encoder-level maps.
    ``reduction="none"`` returns the per-sample mean [B] (what the gates and weightings reweigh).
    Probabilities are computed in float32 and log space. ``per_sample_fn`` (a compiled
    ``per_sample_attention_loss`` of the same kind) replaces the eager computation.

    Masked keys: a logit of ``-inf`` marks a key the query cannot attend to (the diagonal of a
    Locality Self-Attention block, ``vitkd.sl_layers``). Either model may have them:

    - ``mse`` leaves out every key masked in either model: a row is the mean over the keys
      finite in both (a plain student's diagonal logit is free under an LSA teacher);
    - ``ce``/``kl`` compare the student's own distribution ``p_s`` with the teacher's row
      renormalised over the keys the student can attend to: ``p_t`` is the softmax of the
      teacher's logits with the student's masked keys set to ``-inf``. Keys with ``p_t = 0``
      add 0 (``0 log 0 = 0``). So a plain student under an LSA teacher is pushed to give its
      own key no attention (what the teacher does), and an LSA student under a plain teacher
      matches the teacher's attention to the other tokens, never an unreachable ``+inf``.

    Each row must keep one key that neither model masks (LSA masks only the diagonal, T >= 2).
    """
    if student_logits.shape != teacher_logits.shape:
        raise IncompatibleModelsError(f"mapped attention shapes differ: student {tuple(student_logits.shape)}, "
                                      f"teacher {tuple(teacher_logits.shape)}")
    if kind not in LOSS_KINDS:
        raise ConfigError(f"unknown attention loss {kind!r}: use one of {', '.join(LOSS_KINDS)}")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # bf16/fp16 -> fp32, fp64 stays
    s = student_logits.to(dtype)
    t = teacher_logits.to(dtype)
    if per_sample_fn is not None:
        per_sample = per_sample_fn(s, t)
    elif kind in ("ce", "kl") and not t.requires_grad:
        per_sample = _SoftTargetRowLoss.apply(s, t, kind == "kl", _has_masked_keys(s, t)).flatten(1).mean(dim=1)
    else:
        per_sample = per_sample_attention_loss(s, t, kind, masked=_has_masked_keys(s, t))
    if reduction == "none":
        return per_sample
    if reduction == "mean":
        return per_sample.mean()
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def _attention_weights(student_class_logits: torch.Tensor, labels: torch.Tensor,
                       teacher_class_logits: torch.Tensor | None, gate: str, weighting: str) -> torch.Tensor | None:
    """Per-sample weights [B] of the attention term (None: plain mean); no gradient flows through them."""
    if gate not in GATES:
        raise ConfigError(f"unknown gate {gate!r}: use one of {', '.join(GATES)}")
    if weighting not in WEIGHTINGS:
        raise ConfigError(f"unknown weighting {weighting!r}: use one of {', '.join(WEIGHTINGS)}")
    weights = None
    if gate == "teacher-correct":
        if teacher_class_logits is None:
            raise ConfigError("the teacher-correct gate needs the teacher's class logits")
        weights = (teacher_class_logits.argmax(-1) == labels).float()
    elif gate == "student-correct":
        weights = (student_class_logits.detach().argmax(-1) == labels).float()
    if weighting != "none":
        logits = student_class_logits.detach()
        probs = F.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        p_true = probs.gather(1, labels[:, None]).squeeze(1)
        soft = p_true if weighting == "student-confidence" else 1.0 - p_true
        weights = soft if weights is None else weights * soft
    return weights


def distillation_loss(
    student_class_logits: torch.Tensor,
    labels: torch.Tensor,
    student_attn: torch.Tensor,
    teacher_attn: torch.Tensor,
    kind: str,
    alpha: float,
    teacher_class_logits: torch.Tensor | None = None,
    gate: str = "none",
    label_smoothing: float = 0.0,
    kd_weight: float = 0.0,
    kd_temperature: float = 4.0,
    per_sample_fn: PerSampleLoss | None = None,
    weighting: str = "none",
    student_dist_logits: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """``alpha * CE(labels) + (1 - alpha) * L_att`` (+ ``kd_weight * T^2 KL`` on logits if asked).

    Which images the attention term sees, with per-image attention losses ``l_i`` and weights ``w_i``:

    - ``gate="teacher-correct"``: ``w_i = 1`` if the teacher classifies image i correctly, else 0;
    - ``gate="student-correct"``: ``w_i = 1`` if the student's argmax (this forward) is the label, else 0;
    - ``weighting="student-confidence"``: ``w_i = p_student(y_i)`` (softmax of the student's class
      logits); ``"student-doubt"``: ``w_i = 1 - p_student(y_i)``. A gate multiplies the weighting.

    The attention term is the weighted mean ``L_att = sum_i w_i l_i / sum_i w_i`` (0 when every
    ``w_i`` is 0), so alpha keeps its meaning; with no gate and no weighting it is the plain mean
    over the batch. The weights are detached: the student is never pushed to change its
    predictions to gain or lose attention signal.

    DeiT student (``student_dist_logits`` [B, C], the distillation head's logits, with
    ``student_class_logits`` the class head's): the label term ``CE(labels)`` becomes
    ``deit_hard_loss`` (0.5 CE of the class head with the labels + 0.5 CE of the distillation
    head with the teacher's argmax), so the total is ``alpha * deit_hard + (1 - alpha) * L_att``
    and ``terms["kd"]`` is the distillation head's CE. The student-correct gate and the
    weightings then read the student's prediction, the mean of the two heads. This replaces the
    Hinton logit term: ``kd_weight`` must be 0.

    Returns the total (``"loss"``) and each term, detached (``"ce"``, ``"att"``, ``"kd"``), for logging.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
    predicted = student_class_logits if student_dist_logits is None else (student_class_logits
                                                                           + student_dist_logits) / 2
    weights = _attention_weights(predicted, labels, teacher_class_logits, gate, weighting)
    if student_dist_logits is None:
        ce = F.cross_entropy(student_class_logits.float(), labels, label_smoothing=label_smoothing)
        label_term = ce
    else:
        if kd_weight > 0:
            raise ConfigError("a DeiT student distils the teacher's logits through its distillation head; "
                              "drop the logit KD weight (kd_weight 0)")
        if teacher_class_logits is None:
            raise ConfigError("DeiT hard distillation needs the teacher's class logits")
        hard = deit_hard_loss(student_class_logits, student_dist_logits, labels, teacher_class_logits,
                              label_smoothing)
        ce, label_term = hard["ce"], hard["loss"]
    per_sample = attention_loss(student_attn, teacher_attn, kind, reduction="none", per_sample_fn=per_sample_fn)
    if weights is None:
        att = per_sample.mean()
    else:  # weighted mean; with all weights 0 the numerator is 0 and so is the term (and its gradient)
        att = (per_sample * weights).sum() / weights.sum().clamp(min=torch.finfo(weights.dtype).tiny)
    total = alpha * label_term + (1.0 - alpha) * att
    terms = {"ce": ce.detach(), "att": att.detach()}
    if student_dist_logits is not None:
        terms["kd"] = hard["kd"]
    elif kd_weight > 0:
        if teacher_class_logits is None:
            raise ConfigError("logit distillation needs the teacher's class logits")
        kd = logit_kd(student_class_logits, teacher_class_logits, kd_temperature)
        total = total + kd_weight * kd
        terms["kd"] = kd.detach()
    terms["loss"] = total
    return terms


def logit_kd(student_class_logits: torch.Tensor, teacher_class_logits: torch.Tensor,
             temperature: float) -> torch.Tensor:
    """Hinton's ``T^2 KL(softmax(t / T) || softmax(s / T))``, averaged over the batch."""
    T = temperature
    return F.kl_div(F.log_softmax(student_class_logits.float() / T, -1), F.log_softmax(
        teacher_class_logits.float() / T, -1), reduction="batchmean", log_target=True) * T * T


def logit_distillation_loss(student_class_logits: torch.Tensor, labels: torch.Tensor,
                            teacher_class_logits: torch.Tensor, label_smoothing: float, kd_weight: float,
                            kd_temperature: float) -> dict[str, torch.Tensor]:
    """``CE(labels) + kd_weight * T^2 KL`` on class logits: logit distillation without an attention term."""
    ce = F.cross_entropy(student_class_logits.float(), labels, label_smoothing=label_smoothing)
    kd = logit_kd(student_class_logits, teacher_class_logits, kd_temperature)
    return {"loss": ce + kd_weight * kd, "ce": ce.detach(), "kd": kd.detach()}


def deit_hard_loss(class_logits: torch.Tensor, dist_logits: torch.Tensor, labels: torch.Tensor,
                   teacher_class_logits: torch.Tensor, label_smoothing: float = 0.0) -> dict[str, torch.Tensor]:
    """DeiT's hard-label distillation: ``0.5 * CE(class head, labels) + 0.5 * CE(dist head, teacher argmax)``.

    ``class_logits`` and ``dist_logits`` [B, C] are the student's two heads (timm's
    ``VisionTransformerDistilled`` in distilled training mode), ``teacher_class_logits`` [B, C].
    The equal 0.5/0.5 split is DeiT's (Touvron et al. 2021, hard distillation): the teacher's
    decision counts as much as the true label. Label smoothing applies to the label term only;
    the teacher's argmax is taken as is, as in DeiT. Returns ``{"loss", "ce", "kd"}`` (the
    last two detached: the class head's and the distillation head's cross-entropy).
    """
    if class_logits.shape != dist_logits.shape or class_logits.shape != teacher_class_logits.shape:
        raise IncompatibleModelsError(
            f"DeiT hard distillation needs [B, C] logits of one shape; got class head {tuple(class_logits.shape)}, "
            f"distillation head {tuple(dist_logits.shape)}, teacher {tuple(teacher_class_logits.shape)}")
    ce = F.cross_entropy(class_logits.float(), labels, label_smoothing=label_smoothing)
    kd = F.cross_entropy(dist_logits.float(), teacher_class_logits.detach().argmax(-1))
    return {"loss": 0.5 * ce + 0.5 * kd, "ce": ce.detach(), "kd": kd.detach()}
