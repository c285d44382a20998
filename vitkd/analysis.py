"""Per-image analysis the app and the CLI share: both models' predictions, attention and rollouts.

Everything here is a pure function of its arguments (models are only read, never
mutated), so one cached model pair can serve many threads at once. Arrays handed to
callers are numpy: attention probabilities [H, T, T] per block, images RGB uint8 [H, W, 3].
Maps and overlays live in ``vitkd.maps``, head agreement in ``vitkd.agreement``, exports
in ``vitkd.export``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from .attention import TokenLayout, capture_attention
from .head_stats import HeadStats, head_stats, uniform_stats
from .headmap import HeadMap
from .images import preprocess
from .pairs import ModelPair, check_pair, norm_stats, restrict_tokens
from .rollout import HEAD_FUSIONS, attention_rollout, gradient_rollout

__all__ = ["Prediction", "ModelAnalysis", "ImageAnalysis", "analyze_image", "analyze_pair", "recompute_rollout",
           "class_rollout", "PredictionFlag", "flag_predictions"]


class Prediction(NamedTuple):
    index: int
    name: str
    prob: float


@dataclass(frozen=True, eq=False)
class ModelAnalysis:
    """One model's view of one image.

    ``attn_probs`` [L, H, T, T] holds every block's attention probabilities; ``rollout``
    [T, T] the attention rollout with the analysis' head fusion and discard ratio;
    ``inputs`` [1, 3, S, S] the normalised input (for ``class_rollout``). ``T`` counts the tokens
    of ``layout``: the pair's shared prefix tokens on this model's own patch grid
    (``ModelPair.map_layout``; the two models' grids may differ). ``tokens`` are their indices
    among the model's own tokens (all of them, unless a DeiT model next to a plain one loses its
    distillation token, its rows renormalised: ``vitkd.pairs.restrict_tokens``); ``full_attn_probs``
    then keeps every token's attention, so rollouts are computed over the tokens the model really
    used and restricted after.
    """

    role: str
    logits: np.ndarray
    probs: np.ndarray
    top_k: tuple[Prediction, ...]
    attn_probs: np.ndarray
    rollout: np.ndarray
    inputs: torch.Tensor
    layout: TokenLayout
    tokens: tuple[int, ...] = ()
    full_attn_probs: np.ndarray | None = None

    @property
    def predicted(self) -> int:
        return self.top_k[0].index

    @property
    def depth(self) -> int:
        return int(self.attn_probs.shape[0])

    @property
    def num_heads(self) -> int:
        return int(self.attn_probs.shape[1])

    @property
    def img_size(self) -> tuple[int, int]:
        """The model's input size (H, W)."""
        return int(self.inputs.shape[-2]), int(self.inputs.shape[-1])

    def head_stats(self) -> HeadStats:
        """``[L, H]`` per-head summaries of ``attn_probs`` (``vitkd.head_stats``), distances in input pixels."""
        return head_stats(self.attn_probs, self.layout, self.img_size)

    def uniform_head_stats(self) -> HeadStats:
        """The same summaries for attention spread evenly over this model's tokens (scalars)."""
        return uniform_stats(self.layout, self.img_size)


@dataclass(frozen=True)
class PredictionFlag:
    """Do the models agree, and (when the true label is known) which of them is right."""

    agree: bool
    teacher_correct: bool | None
    student_correct: bool | None

    @property
    def status(self) -> str:
        """One of ``agree``, ``disagree`` (label unknown), ``both-right``, ``both-wrong``, ``teacher-wrong``,
        ``student-wrong``."""
        if self.teacher_correct is None:
            return "agree" if self.agree else "disagree"
        if self.teacher_correct and self.student_correct:
            return "both-right"
        if not self.teacher_correct and not self.student_correct:
            return "both-wrong"
        return "student-wrong" if self.teacher_correct else "teacher-wrong"

    def message(self) -> str:
        return {
            "agree": "Teacher and student agree",
            "disagree": "Teacher and student disagree",
            "both-right": "Both models are right",
            "both-wrong": "Both models are wrong" + ("" if self.agree else " (and disagree)"),
            "teacher-wrong": "They disagree: the teacher is wrong, the student is right",
            "student-wrong": "They disagree: the student is wrong, the teacher is right",
        }[self.status]


def flag_predictions(teacher_pred: int, student_pred: int, true_label: int | None = None) -> PredictionFlag:
    """Agreement of two predicted class indices, and correctness when ``true_label`` is given."""
    if true_label is None:
        return PredictionFlag(teacher_pred == student_pred, None, None)
    return PredictionFlag(teacher_pred == student_pred, teacher_pred == true_label, student_pred == true_label)


@dataclass(frozen=True, eq=False)
class ImageAnalysis:
    """Teacher and student on one image; ``image_rgb`` [S, S, 3] is the crop both models saw.

    ``layout`` is where the two models' maps are compared (``ModelPair.layout``: the coarser patch
    grid); each model's own maps are on ``model(role).layout``.
    """

    image_rgb: np.ndarray
    class_names: tuple[str, ...]
    layout: TokenLayout
    head_map: HeadMap | None
    teacher: ModelAnalysis
    student: ModelAnalysis
    true_label: int | None
    head_fusion: str
    discard_ratio: float

    @property
    def same_grid(self) -> bool:
        """Whether both models see the image through the same patch grid (nothing is resampled)."""
        return self.teacher.layout.grid_size == self.student.layout.grid_size

    @property
    def flag(self) -> PredictionFlag:
        return flag_predictions(self.teacher.predicted, self.student.predicted, self.true_label)

    def model(self, role: str) -> ModelAnalysis:
        if role not in ("teacher", "student"):
            raise ValueError(f"role must be 'teacher' or 'student', got {role!r}")
        return self.teacher if role == "teacher" else self.student


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _analyze_model(role: str, model: torch.nn.Module, meta: Mapping[str, Any], image: Image.Image | np.ndarray,
                   img_size: int, class_names: Sequence[str], top_k: int, head_fusion: str,
                   discard_ratio: float, tokens: Sequence[int], layout: TokenLayout
                   ) -> tuple[ModelAnalysis, np.ndarray]:
    mean, std = norm_stats(meta)
    prep = preprocess(image, img_size, mean, std)
    inputs = prep.tensor.to(_model_device(model))
    with torch.inference_mode():
        out = capture_attention(model, inputs)  # one pass: logits and every block's attention
        blocks = sorted(out.attn_probs)
        probs_per_block = [out.attn_probs[b].float() for b in blocks]
        rollout = attention_rollout(probs_per_block, head_fusion, discard_ratio)[0]
        logits = out.class_logits[0].float()
        probs = logits.softmax(-1)
        k = min(top_k, probs.numel())
        top_p, top_i = probs.topk(k)
        attn = torch.stack([p[0] for p in probs_per_block]).cpu().numpy()
    top = tuple(Prediction(int(i), class_names[int(i)], float(p))
                for p, i in zip(top_p.tolist(), top_i.tolist(), strict=True))
    full, roll = None, rollout.cpu().numpy()
    if len(tokens) != attn.shape[-1]:  # a DeiT model next to a plain one: its distillation token goes
        full, attn, roll = attn, restrict_tokens(attn, tokens), restrict_tokens(roll, tokens)
    result = ModelAnalysis(role=role, logits=logits.cpu().numpy(), probs=probs.cpu().numpy(), top_k=top,
                           attn_probs=attn, rollout=roll, inputs=prep.tensor, layout=layout, tokens=tuple(tokens),
                           full_attn_probs=full)
    return result, prep.rgb


def analyze_pair(pair: ModelPair, image: Image.Image | np.ndarray, true_label: int | None = None, top_k: int = 5,
                 head_fusion: str = "mean", discard_ratio: float = 0.0) -> ImageAnalysis:
    """Predictions, every block's attention and the attention rollout of both models for one image."""
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
    if true_label is not None and not 0 <= int(true_label) < len(pair.class_names):
        raise ValueError(f"true_label {true_label} out of range for {len(pair.class_names)} classes")
    teacher, crop = _analyze_model("teacher", pair.teacher, pair.teacher_meta, image, pair.img_size,
                                   pair.class_names, top_k, head_fusion, discard_ratio, pair.tokens("teacher"),
                                   pair.map_layout("teacher"))
    student, _ = _analyze_model("student", pair.student, pair.student_meta, image, pair.img_size,
                                pair.class_names, top_k, head_fusion, discard_ratio, pair.tokens("student"),
                                pair.map_layout("student"))
    return ImageAnalysis(image_rgb=crop, class_names=pair.class_names, layout=pair.layout, head_map=pair.head_map,
                         teacher=teacher, student=student, true_label=None if true_label is None else int(true_label),
                         head_fusion=head_fusion, discard_ratio=float(discard_ratio))


def analyze_image(teacher: torch.nn.Module, teacher_meta: Mapping[str, Any], student: torch.nn.Module,
                  student_meta: Mapping[str, Any], image: Image.Image | np.ndarray, true_label: int | None = None,
                  top_k: int = 5, head_fusion: str = "mean", discard_ratio: float = 0.0) -> ImageAnalysis:
    """``analyze_pair`` for two loose models (checked with ``check_pair`` first)."""
    pair = check_pair(teacher, teacher_meta, student, student_meta)
    return analyze_pair(pair, image, true_label, top_k, head_fusion, discard_ratio)


def recompute_rollout(result: ModelAnalysis, head_fusion: str = "mean", discard_ratio: float = 0.0) -> np.ndarray:
    """Attention rollout [T, T] from already captured attention (no model call): for rollout sliders."""
    attn = result.attn_probs if result.full_attn_probs is None else result.full_attn_probs
    probs = torch.from_numpy(attn)[:, None]  # [L, 1, H, T, T]: a batch of one per block
    rollout = attention_rollout(list(probs), head_fusion, discard_ratio)[0].numpy()
    return rollout if result.full_attn_probs is None else restrict_tokens(rollout, result.tokens)


def class_rollout(model: torch.nn.Module, image_tensor: torch.Tensor, class_index: int,
                  tokens: Sequence[int] | None = None) -> np.ndarray:
    """Class-specific gradient rollout [T, T] for one normalised image [1, 3, S, S] (model is not mutated);
    restricted to ``tokens`` (``ModelAnalysis.tokens``) when given and fewer than the model's."""
    num_classes = int(model.num_classes)
    if not 0 <= int(class_index) < num_classes:
        raise ValueError(f"class_index {class_index} out of range for {num_classes} classes")
    inputs = image_tensor.to(_model_device(model))
    rollout = gradient_rollout(model, inputs, int(class_index))[0].detach().cpu().numpy()
    return rollout if tokens is None or len(tokens) == rollout.shape[-1] else restrict_tokens(rollout, tokens)
