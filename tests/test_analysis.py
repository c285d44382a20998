"""vitkd.analysis and vitkd.overlay against independent references: torch resampling, hand-indexed toys,
a plain-Python Jensen-Shannon, the model's own forward, and one thread vs two."""

from __future__ import annotations

import csv
import io
import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vitkd.agreement import (
    block_divergence,
    head_divergence,
    pair_divergences,
    patches_on_grid,
    probs_on_layout,
)
from vitkd.analysis import (
    ImageAnalysis,
    ModelAnalysis,
    Prediction,
    analyze_image,
    class_rollout,
    flag_predictions,
    recompute_rollout,
)
from vitkd.attention import TokenLayout, capture_attention
from vitkd.checkpoint import save_checkpoint
from vitkd.errors import IncompatibleModelsError
from vitkd.export import analysis_to_csv, analysis_to_json
from vitkd.headmap import HeadMap
from vitkd.images import preprocess
from vitkd.maps import (
    cls_attention_maps,
    compare_heads,
    comparison_png,
    fused_map,
    mark_patch,
    mark_query,
    model_query,
    paired_teacher_block,
    patch_at,
    query_grid,
    rollout_map,
)
from vitkd.models import build_model
from vitkd.overlay import enlarge_image, normalize_map, overlay, upsample_map
from vitkd.pairs import check_pair, load_pair, model_summary
from vitkd.rollout import attention_rollout, gradient_rollout

CLASSES = [f"class{i}" for i in range(10)]
HEAD_MAP = [[1, 0, 1, 0], [1, 3, 1, 1], [0, 2, 0, 3]]  # teacher block.head -> student block.head




def meta(**extra) -> dict:
    return dict(class_names=CLASSES, mean=[0.49, 0.48, 0.45], std=[0.25, 0.24, 0.26], img_size=32, **extra)


@pytest.fixture(scope="module")
def models(sharpen):
    torch.manual_seed(0)
    teacher = sharpen(build_model("cifar-teacher", 10, depth=2))
    student = sharpen(build_model("cifar-student", 10, depth=2))
    return teacher, meta(kind="supervised", metrics={"accuracy": 61.5}), student, meta(kind="distilled",
                                                                                        head_map=HEAD_MAP)


def random_image(seed: int, size=(40, 48)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def analysis(models) -> ImageAnalysis:
    teacher, t_meta, student, s_meta = models
    return analyze_image(teacher, t_meta, student, s_meta, random_image(0), true_label=3)


# --------------------------------------------------------------------------------------------- overlay helpers

@pytest.mark.parametrize("mode,torch_mode,atol", [("linear", "bilinear", 1e-5), ("cubic", "bicubic", 2e-2)])
def test_upsample_matches_torch_interpolate(mode, torch_mode, atol):
    m = np.random.default_rng(0).random((8, 8)).astype(np.float32)
    ours = upsample_map(m, (64, 48), mode)
    ref = F.interpolate(torch.from_numpy(m)[None, None], size=(64, 48), mode=torch_mode, align_corners=False)[0, 0]
    assert ours.shape == (64, 48)
    np.testing.assert_allclose(ours, ref.numpy(), atol=atol)
    if mode == "cubic":  # interior agrees tightly; only the border handling differs slightly
        np.testing.assert_allclose(ours[8:-8, 8:-8], ref.numpy()[8:-8, 8:-8], atol=2e-3)


def test_overlay_colours_and_clipping_by_hand():
    image = np.full((2, 2, 3), 200, dtype=np.uint8)
    attn = np.array([[0.0, 1.0], [2.0, 3.0]], dtype=np.float32)
    before = attn.copy(), image.copy()
    # jet maps 0 to dark blue (0, 0, 128) and 255 to dark red (128, 0, 0) in RGB.
    out = overlay(image, attn, alpha=1.0, colormap="jet", vmin=1.0, vmax=2.0)
    np.testing.assert_array_equal(out[0, 0], (0, 0, 128))  # 0 clipped up to vmin
    np.testing.assert_array_equal(out[0, 1], (0, 0, 128))
    np.testing.assert_array_equal(out[1, 0], (128, 0, 0))
    np.testing.assert_array_equal(out[1, 1], (128, 0, 0))  # 3 clipped down to vmax
    blended = overlay(image, attn, alpha=0.25, colormap="jet", vmin=1.0, vmax=2.0)
    np.testing.assert_array_equal(blended[0, 0], np.rint(0.75 * 200 + 0.25 * np.array([0, 0, 128])))
    np.testing.assert_array_equal(blended[1, 1], np.rint(0.75 * 200 + 0.25 * np.array([128, 0, 0])))
    np.testing.assert_array_equal(overlay(image, attn, alpha=0.0), image)
    np.testing.assert_array_equal(attn, before[0])  # inputs untouched
    np.testing.assert_array_equal(image, before[1])
    with pytest.raises(ValueError, match="alpha"):
        overlay(image, attn, alpha=1.5)
    with pytest.raises(ValueError, match="uint8"):
        overlay(image.astype(np.float32), attn)


def test_overlay_default_scale_is_the_maps_own_range():
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    attn = np.array([[0.25, 0.5], [0.375, 0.75]], dtype=np.float32)
    own = overlay(image, attn, alpha=1.0, colormap="jet", interpolation="nearest")
    explicit = overlay(image, attn, alpha=1.0, colormap="jet", vmin=0.25, vmax=0.75, interpolation="nearest")
    np.testing.assert_array_equal(own, explicit)
    np.testing.assert_array_equal(own[0, 0], (0, 0, 128))
    np.testing.assert_allclose(normalize_map(attn, 0.0, 1.0), attn)
    np.testing.assert_array_equal(normalize_map(np.ones((2, 2))), np.zeros((2, 2)))


# --------------------------------------------------------------------------------------------- map indexing

def toy_probs(heads: int, layout: TokenLayout, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = rng.random((heads, layout.num_tokens, layout.num_tokens))
    return p / p.sum(-1, keepdims=True)


def test_cls_attention_maps_by_hand():
    layout = TokenLayout(num_prefix_tokens=1, grid_size=(2, 3))
    probs = toy_probs(2, layout)
    maps = cls_attention_maps(probs, layout)
    query_maps = cls_attention_maps(probs, layout, query=(1, 2))
    assert maps.shape == (2, 2, 3)
    for h in range(2):
        for r in range(2):
            for c in range(3):
                key = 1 + 3 * r + c  # CLS first, then the grid row by row
                assert maps[h, r, c] == probs[h, 0, key]
                assert query_maps[h, r, c] == probs[h, 1 + 3 * 1 + 2, key]
    with pytest.raises(ValueError, match="outside the 2x3 grid"):
        cls_attention_maps(probs, layout, query=(2, 0))
    registers = TokenLayout(num_prefix_tokens=3, grid_size=(2, 2))
    reg_probs = toy_probs(1, registers)
    np.testing.assert_array_equal(cls_attention_maps(reg_probs, registers)[0].ravel(), reg_probs[0, 0, 3:])
    np.testing.assert_array_equal(rollout_map(reg_probs[0], registers).ravel(), reg_probs[0, 0, 3:])


@pytest.mark.parametrize("fusion,reduce", [("mean", np.mean), ("max", np.max), ("min", np.min)])
def test_fused_map(fusion, reduce):
    layout = TokenLayout(num_prefix_tokens=1, grid_size=(2, 2))
    probs = toy_probs(3, layout, seed=1)
    expected = reduce(probs[:, 0, 1:], axis=0).reshape(2, 2)
    np.testing.assert_allclose(fused_map(probs, layout, fusion), expected, rtol=1e-6)


# --------------------------------------------------------------------------------------------- divergence

def js_reference(p: list[float], q: list[float]) -> float:
    """Jensen-Shannon divergence in bits, written out in plain Python."""
    m = [(a + b) / 2 for a, b in zip(p, q, strict=True)]
    kl = lambda x: sum(a * math.log2(a / c) for a, c in zip(x, m, strict=True) if a > 0)
    return 0.5 * kl(p) + 0.5 * kl(q)


def test_head_divergence_matches_plain_python():
    layout = TokenLayout(num_prefix_tokens=1, grid_size=(2, 2))
    s, t = toy_probs(2, layout, seed=2), toy_probs(3, layout, seed=3)
    s[0, 1] = [0.5, 0.5, 0.0, 0.0, 0.0]  # zeros must not give NaN
    ours = head_divergence(s, t)
    assert ours.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            ref = np.mean([js_reference(list(s[i, r]), list(t[j, r])) for r in range(5)])
            assert ours[i, j] == pytest.approx(ref, rel=1e-9, abs=1e-12)
    np.testing.assert_allclose(head_divergence(t, s), ours.T, atol=1e-12)  # symmetric
    np.testing.assert_allclose(np.diag(head_divergence(t, t)), 0.0, atol=1e-12)  # zero on identical heads
    disjoint_p = np.array([[[1.0, 0.0], [1.0, 0.0]]])
    disjoint_q = np.array([[[0.0, 1.0], [0.0, 1.0]]])
    assert head_divergence(disjoint_p, disjoint_q)[0, 0] == pytest.approx(1.0)  # one bit: disjoint rows


# --------------------------------------------------------------------------------------------- analyze_image

def test_analysis_matches_model_forward_and_capture(models, analysis):
    teacher, t_meta, student, s_meta = models
    for model, m, result in ((teacher, t_meta, analysis.teacher), (student, s_meta, analysis.student)):
        x, crop = preprocess(random_image(0), 32, m["mean"], m["std"])
        np.testing.assert_array_equal(analysis.image_rgb, crop)
        with torch.no_grad():
            probs = model(x).softmax(-1)[0]  # timm's own (fused) forward
            captured = capture_attention(model, x)
        top_p, top_i = probs.topk(5)
        assert [p.index for p in result.top_k] == top_i.tolist()
        np.testing.assert_allclose([p.prob for p in result.top_k], top_p.numpy(), atol=1e-5)
        assert [p.name for p in result.top_k] == [CLASSES[i] for i in top_i.tolist()]
        assert result.predicted == int(probs.argmax())
        np.testing.assert_allclose(result.probs, probs.numpy(), atol=1e-5)
        assert result.attn_probs.shape == (2, model.blocks[0].attn.num_heads, 65, 65)
        for b in range(2):
            np.testing.assert_allclose(result.attn_probs[b], captured.attn_probs[b][0].numpy(), atol=1e-6)
        rollout = attention_rollout([captured.attn_probs[b] for b in range(2)])[0]
        np.testing.assert_allclose(result.rollout, rollout.numpy(), atol=1e-6)
        np.testing.assert_allclose(recompute_rollout(result, "max", 0.5),
                                   attention_rollout([captured.attn_probs[b] for b in range(2)], "max", 0.5)[0],
                                   atol=1e-6)
    assert analysis.true_label == 3
    flag = analysis.flag
    assert flag.agree == (analysis.teacher.predicted == analysis.student.predicted)
    assert flag.teacher_correct == (analysis.teacher.predicted == 3)


def test_class_rollout_matches_gradient_rollout_and_leaves_model_alone(models, analysis):
    teacher = models[0]
    ours = class_rollout(teacher, analysis.teacher.inputs, 7)
    ref = gradient_rollout(teacher, analysis.teacher.inputs, 7)[0]
    np.testing.assert_allclose(ours, ref.detach().numpy(), atol=1e-6)
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training
    with pytest.raises(ValueError, match="out of range"):
        class_rollout(teacher, analysis.teacher.inputs, 10)


def test_two_threads_on_shared_models_get_their_own_results(models):
    teacher, t_meta, student, s_meta = models
    images = [random_image(10), random_image(11, size=(64, 32))]
    alone = [analyze_image(teacher, t_meta, student, s_meta, img) for img in images]
    jobs = [images[i % 2] for i in range(12)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        together = list(pool.map(lambda img: analyze_image(teacher, t_meta, student, s_meta, img), jobs))
    for i, result in enumerate(together):
        ref = alone[i % 2]
        np.testing.assert_array_equal(result.image_rgb, ref.image_rgb)
        for role in ("teacher", "student"):
            np.testing.assert_allclose(result.model(role).probs, ref.model(role).probs, atol=1e-6)
            np.testing.assert_allclose(result.model(role).attn_probs, ref.model(role).attn_probs, atol=1e-6)
    assert not np.allclose(alone[0].teacher.probs, alone[1].teacher.probs)


# --------------------------------------------------------------------------------------------- pairs

def save(model, m, path: Path) -> Path:
    return save_checkpoint(model, m, path)


def test_load_pair_and_incompatibilities(tmp_path: Path, models):
    teacher, t_meta, student, s_meta = models
    pair = load_pair(save(teacher, t_meta, tmp_path / "t.safetensors"),
                     save(student, s_meta, tmp_path / "s.safetensors"))
    assert pair.layout == TokenLayout(1, (8, 8)) and pair.img_size == 32 and pair.class_names == tuple(CLASSES)
    assert pair.head_map is not None and pair.head_map.to_list() == HEAD_MAP and pair.notes == ()

    # Different patch grids at the same input size pair up: compared on the coarser grid, each drawn on its own.
    coarse = build_model("cifar-student", 10, depth=2, patch_size=8)  # 4x4 grid
    pair = load_pair(tmp_path / "t.safetensors", save(coarse, meta(), tmp_path / "coarse.safetensors"))
    assert pair.layout == TokenLayout(1, (4, 4))
    assert pair.map_layout("teacher") == TokenLayout(1, (8, 8)) and pair.map_layout("student") == TokenLayout(1, (4, 4))
    assert pair.tokens("teacher") == tuple(range(65)) and pair.tokens("student") == tuple(range(17))
    fine = build_model("cifar-student", 10, depth=2, patch_size=2)  # a finer student: 16x16
    coarse_teacher = build_model("cifar-teacher", 10, depth=2, patch_size=8)  # 4x4
    for t, s in ((teacher, fine), (coarse_teacher, fine), (fine, coarse)):
        grids = [m.patch_embed.grid_size for m in (t, s)]
        assert check_pair(t, t_meta, s, s_meta).layout == TokenLayout(1, tuple(map(min, *grids)))
    registers = build_model("cifar-student", 10, depth=2, patch_size=8, reg_tokens=2)
    with pytest.raises(IncompatibleModelsError, match=r"prefix tokens differ.*1 prefix token.*3 prefix token"):
        check_pair(teacher, t_meta, registers, meta())
    bigger = build_model("cifar-student", 10, img_size=64, depth=2, patch_size=8)  # also 8x8, but 64 px
    with pytest.raises(IncompatibleModelsError, match="input sizes differ.*32x32.*64x64"):
        check_pair(teacher, t_meta, bigger, dict(meta(), img_size=64))
    five = build_model("cifar-student", 5, depth=2)
    with pytest.raises(IncompatibleModelsError, match=r"classes differ.*10 classes.*5 classes"):
        check_pair(teacher, t_meta, five, dict(meta(), class_names=CLASSES[:5]))
    renamed = dict(s_meta, class_names=CLASSES[:9] + ["other"])
    with pytest.raises(IncompatibleModelsError, match="classes differ"):
        check_pair(teacher, t_meta, student, renamed)
    # A head map naming teacher heads this teacher lacks is dropped with a note, not an error.
    misfit = check_pair(teacher, t_meta, student, dict(s_meta, head_map=[[5, 0, 1, 0]]))
    assert misfit.head_map is None and "does not fit" in misfit.notes[0]
    # A head map recorded against another teacher architecture (same shape, other layers) is not drawn here.
    recorded = {"name": "cifar-teacher-sl", "num_classes": 10, "img_size": None, "overrides": {"depth": 2}}
    elsewhere = check_pair(teacher, t_meta, student, dict(s_meta, teacher={"model": recorded}))
    assert elsewhere.head_map is None and elsewhere.notes == (
        "the student was distilled from a cifar-teacher-sl (depth=2) teacher, not this one; its head map does not "
        "describe this pair, so distilled pairs are not shown",)
    same = dict(recorded, name=teacher.vitkd_config.name, overrides=teacher.vitkd_config.overrides)
    assert check_pair(teacher, t_meta, student, dict(s_meta, teacher={"model": same})).head_map is not None
    # Same architecture, other weights: told apart by the teacher file's SHA-256 when both are known.
    learned = dict(s_meta, teacher={"model": same, "path": "/runs/teacher/last.safetensors", "sha256": "a" * 64})
    retrained = check_pair(teacher, t_meta, student, learned, teacher_sha256="b" * 64)
    assert retrained.head_map is None and retrained.notes == (
        "the student was distilled from another teacher file (last.safetensors, other weights), not this one; its "
        "head map does not describe this pair, so distilled pairs are not shown",)
    assert check_pair(teacher, t_meta, student, learned, teacher_sha256="a" * 64).head_map is not None
    assert check_pair(teacher, t_meta, student, learned).head_map is not None  # this teacher's file unknown


def test_model_summary(models):
    teacher, t_meta, student, s_meta = models
    summary = model_summary(teacher, t_meta)
    assert summary["blocks"] == 2 and summary["heads"] == 8 and summary["grid"] == [8, 8]
    assert summary["accuracy"] == 61.5 and summary["kind"] == "supervised" and summary["head_map"] is None
    assert summary["parameters"] == sum(p.numel() for p in teacher.parameters())
    assert model_summary(student, s_meta)["head_map"] == "T1.0->S1.0, T1.3->S1.1, T0.2->S0.3"


def test_paired_teacher_block():
    from vitkd.headmap import HeadMap, encoder_to_encoder

    head_map = HeadMap.from_list([[4, 0, 2, 0], [4, 1, 2, 1], [5, 0, 3, 0]])
    assert paired_teacher_block(head_map, 2, 6, 4) == 4
    assert paired_teacher_block(head_map, 3, 6, 4) == 5
    # Student blocks the map does not mention fall back to the encoder-to-encoder spacing.
    encoder = {p.student_block: p.teacher_block for p in encoder_to_encoder(6, 4, 1).pairs}
    assert paired_teacher_block(head_map, 0, 6, 4) == encoder[0]
    assert [paired_teacher_block(None, s, 6, 4) for s in range(4)] == [encoder[s] for s in range(4)]


# --------------------------------------------------------------------------------------------- agreement, views, export

def test_pair_divergences_and_rank(analysis):
    rows = pair_divergences(analysis)
    assert [(r["teacher_block"], r["teacher_head"], r["student_block"], r["student_head"]) for r in rows] == [
        tuple(p) for p in HEAD_MAP]
    for r in rows:
        matrix = head_divergence(analysis.student.attn_probs[r["student_block"]],
                                 analysis.teacher.attn_probs[r["teacher_block"]])
        # Same grids: nothing is resampled, the numbers are exactly those of the maps as captured.
        assert probs_on_layout(analysis.teacher.attn_probs, analysis.teacher.layout, analysis.layout) is \
            analysis.teacher.attn_probs
        np.testing.assert_array_equal(block_divergence(analysis, r["teacher_block"], r["student_block"]), matrix)
        row = matrix[r["student_head"]]
        assert r["js"] == row[r["teacher_head"]]
        assert r["rank"] == 1 + sorted(row.tolist()).index(row[r["teacher_head"]])
        assert r["teacher_heads"] == 8


def _toy_model(role: str, attn: np.ndarray, layout: TokenLayout) -> ModelAnalysis:
    """A model's analysis holding only hand-made attention [L, H, T, T] (predictions are placeholders)."""
    return ModelAnalysis(role=role, logits=np.zeros(2), probs=np.array([0.5, 0.5]), top_k=(Prediction(0, "a", 0.5),),
                         attn_probs=attn, rollout=attn[0, 0], inputs=torch.zeros(1, 3, 8, 8), layout=layout)


def _coarsen_by_hand(p: np.ndarray, fine: int, coarse: int) -> np.ndarray:
    """[T, T] on CLS + fine x fine -> CLS + coarse x coarse, with loops: a coarse query row is the mean of the
    fine query rows it covers, a coarse key holds the sum of the fine keys it covers; CLS rows/columns stay."""
    k = fine // coarse
    cells = [[1 + fine * r + c for r in range(i * k, (i + 1) * k) for c in range(j * k, (j + 1) * k)]
             for i in range(coarse) for j in range(coarse)]
    groups = [[0], *cells]
    out = np.zeros((len(groups), len(groups)))
    for qi, queries in enumerate(groups):
        for ki, keys in enumerate(groups):
            out[qi, ki] = sum(sum(p[q, key] for key in keys) for q in queries) / len(queries)
    return out


@pytest.mark.parametrize("finer", ["teacher", "student"])
def test_divergences_across_grids_match_a_hand_resampled_reference(finer: str):
    """A 4x4-grid model against a 2x2-grid one: the heatmap and the distilled pairs (a group of two teacher
    heads, mean in probability space) equal JS in plain Python on attention coarsened by hand."""
    fine, coarse = TokenLayout(1, (4, 4)), TokenLayout(1, (2, 2))
    t_layout, s_layout = (fine, coarse) if finer == "teacher" else (coarse, fine)
    t_attn = toy_probs(3, t_layout, seed=4)[None]  # [1 block, 3 heads, T, T]
    s_attn = toy_probs(2, s_layout, seed=5)[None]
    s_attn[0, 1, 0] = 0.0
    s_attn[0, 1, 0, 2] = 1.0  # a one-hot CLS row: zeros must not give NaN
    head_map = HeadMap.from_list([[0, [0, 2], 0, 0], [0, 1, 0, 1]])
    analysis = ImageAnalysis(np.zeros((8, 8, 3), np.uint8), ("a", "b"), coarse, head_map,
                             _toy_model("teacher", t_attn, t_layout), _toy_model("student", s_attn, s_layout), None,
                             "mean", 0.0)

    def on_coarse(p: np.ndarray, layout: TokenLayout) -> np.ndarray:
        return p if layout == coarse else _coarsen_by_hand(p, 4, 2)

    t_ref = [on_coarse(t_attn[0, h], t_layout) for h in range(3)]
    s_ref = [on_coarse(s_attn[0, h], s_layout) for h in range(2)]
    group_ref = on_coarse((t_attn[0, 0] + t_attn[0, 2]) / 2, t_layout)  # the group's mean, then resampled
    js = lambda a, b: np.mean([js_reference(list(a[r]), list(b[r])) for r in range(5)])
    matrix = block_divergence(analysis, 0, 0)
    assert matrix.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            assert matrix[i, j] == pytest.approx(js(s_ref[i], t_ref[j]), rel=1e-9, abs=1e-12)
    rows = pair_divergences(analysis)
    assert [(r["teacher_head"], r["student_head"]) for r in rows] == [([0, 2], 0), (1, 1)]
    assert rows[0]["js"] == pytest.approx(js(s_ref[0], group_ref), rel=1e-9, abs=1e-12)
    assert rows[1]["js"] == pytest.approx(js(s_ref[1], t_ref[1]), rel=1e-9, abs=1e-12)
    assert rows[0]["rank"] == 1 + sum(js(s_ref[0], t) < rows[0]["js"] for t in t_ref)
    assert rows[1]["rank"] == 1 + sorted(matrix[1].tolist()).index(matrix[1, 1])
    # the scan's rollout rows: a distribution over 16 patches onto 4 (sums of 2x2 cells), renormalised
    fine_cls = (t_attn if finer == "teacher" else s_attn)[0, 0, 0, 1:]
    row = torch.from_numpy(fine_cls / fine_cls.sum())
    coarse_row = patches_on_grid(row, (4, 4), (2, 2))
    expected = [sum(float(row[4 * r + c]) for r in (2 * i, 2 * i + 1) for c in (2 * j, 2 * j + 1))
                for i in range(2) for j in range(2)]
    np.testing.assert_allclose(coarse_row.numpy(), expected, rtol=1e-12)
    assert patches_on_grid(row, (4, 4), (4, 4)) is row


def test_query_patch_maps_to_the_patch_covering_the_same_point():
    # Reference: the centre pixel of the query patch on a 32 px image, and the patch of the other grid holding it.
    for grid, target in (((8, 8), (4, 4)), ((4, 4), (8, 8)), ((6, 6), (4, 4)), ((8, 4), (2, 8))):
        for row in range(grid[0]):
            for col in range(grid[1]):
                y, x = (row + 0.5) * 32 / grid[0], (col + 0.5) * 32 / grid[1]
                assert patch_at((row, col), grid, target) == (int(y // (32 / target[0])), int(x // (32 / target[1])))
    assert patch_at((3, 1), (8, 8), (8, 8)) == (3, 1)
    with pytest.raises(ValueError, match="outside the 8x8 grid"):
        patch_at((8, 0), (8, 8), (4, 4))


@pytest.fixture(scope="module")
def grid_analysis(models) -> ImageAnalysis:
    """The 8x8-grid teacher against a 4x4-grid student, with a group of teacher heads in the head map."""
    teacher, t_meta, _, _ = models
    torch.manual_seed(1)
    coarse = sharpen_attention_copy(build_model("cifar-student", 10, depth=2, patch_size=8))
    rows = [[1, [0, 1], 1, 0], [1, 5, 1, 2], [0, [2, 3, 4], 0, 1]]
    return analyze_image(teacher, t_meta, coarse, meta(head_map=rows), random_image(0), true_label=3)


def sharpen_attention_copy(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight[: 2 * blk.attn.qkv.weight.shape[1]] *= 5.0
    return model.eval()


def test_different_grids_each_model_on_its_own_grid(grid_analysis: ImageAnalysis):
    a = grid_analysis
    assert a.layout == TokenLayout(1, (4, 4)) and not a.same_grid
    assert a.teacher.layout == TokenLayout(1, (8, 8)) and a.teacher.attn_probs.shape[-1] == 65
    assert a.student.layout == TokenLayout(1, (4, 4)) and a.student.attn_probs.shape[-1] == 17
    assert query_grid(a) == (8, 8)
    assert model_query(a, "teacher", (5, 2)) == (5, 2) and model_query(a, "student", (5, 2)) == (2, 1)
    comp = compare_heads(a, 1, 1, query=(5, 2), size=64, scale="map", colormap="viridis")
    big = enlarge_image(a.image_rgb, 64)
    t_map = cls_attention_maps(a.teacher.attn_probs[1], a.teacher.layout, (5, 2))[4]
    s_map = cls_attention_maps(a.student.attn_probs[1], a.student.layout, (2, 1))[3]
    assert s_map.shape == (4, 4)
    np.testing.assert_array_equal(comp.teacher[4].image, overlay(big, t_map, 0.5, "viridis", t_map.min(), t_map.max()))
    np.testing.assert_array_equal(comp.student[3].image, overlay(big, s_map, 0.5, "viridis", s_map.min(), s_map.max()))
    # A student head taught by a group is framed with each of its teacher heads.
    assert comp.student[0].caption == "S1.h0 <- taught by T1.h{0,1}" and comp.student[0].highlighted
    assert [t.highlighted for t in comp.teacher] == [True, True, False, False, False, True, False, False]
    assert comp.teacher[1].caption == "T1.h1 -> S1.h0"
    # The preview frames each model's own query patch (teacher 4 px cells, student 8 px cells on 32 px).
    marked = mark_query(a, (5, 2), 32)
    plain = enlarge_image(a.image_rgb, 32)
    changed = np.argwhere((marked != plain).any(axis=-1))
    assert (changed[:, 0].min(), changed[:, 0].max(), changed[:, 1].min(), changed[:, 1].max()) == (16, 23, 8, 15)
    assert (marked[20:24, 8:12] != plain[20:24, 8:12]).any()  # the teacher's patch (5, 2): rows 20-23, cols 8-11
    doc = json.loads(analysis_to_json(a, "x.png"))
    assert doc["grid"] == [4, 4] and doc["teacher"]["grid"] == [8, 8] and doc["student"]["grid"] == [4, 4]
    assert np.array(doc["student"]["cls_attention"]).shape == (2, 4, 4, 4)
    assert np.array(doc["teacher"]["rollout"]).shape == (8, 8)
    assert [r["teacher_head"] for r in doc["pair_divergence"]] == [[0, 1], 5, [2, 3, 4]]
    csv_rows = [r for r in csv.DictReader(io.StringIO(analysis_to_csv(a))) if r["quantity"] == "pair_js"]
    assert [r["teacher_head"] for r in csv_rows] == ["{0,1}", "5", "{2,3,4}"]
    assert rollout_map(recompute_rollout(a.student), a.student.layout).shape == (4, 4)


def test_compare_heads_captions_and_shared_scale(analysis):
    comp = compare_heads(analysis, teacher_block=1, student_block=1, alpha=0.5, colormap="viridis", scale="shared",
                         size=64)
    assert len(comp.teacher) == 8 and len(comp.student) == 4
    assert comp.student[1].caption == "S1.h1 <- taught by T1.h3" and comp.student[1].highlighted
    assert comp.teacher[3].caption == "T1.h3 -> S1.h1" and comp.teacher[3].highlighted
    assert comp.student[2].caption == "S1.h2" and not comp.student[2].highlighted
    t_maps = cls_attention_maps(analysis.teacher.attn_probs[1], analysis.layout)
    s_maps = cls_attention_maps(analysis.student.attn_probs[1], analysis.layout)
    lo, hi = min(t_maps.min(), s_maps.min()), max(t_maps.max(), s_maps.max())
    big = enlarge_image(analysis.image_rgb, 64)
    np.testing.assert_array_equal(comp.student[2].image, overlay(big, s_maps[2], 0.5, "viridis", lo, hi))
    np.testing.assert_array_equal(comp.teacher[5].image, overlay(big, t_maps[5], 0.5, "viridis", lo, hi))
    per_model = compare_heads(analysis, 1, 1, scale="model", size=64, colormap="viridis")
    np.testing.assert_array_equal(per_model.student[2].image,
                                  overlay(big, s_maps[2], 0.5, "viridis", s_maps.min(), s_maps.max()))
    fused = compare_heads(analysis, 0, 1, head_fusion="max", query=(2, 3), size=64)
    assert len(fused.teacher) == len(fused.student) == 1
    png = comparison_png(comp)
    decoded = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape[1] >= 8 * 64 and decoded.shape[0] >= 2 * 64


def test_mark_patch_frames_the_query_patch(analysis):
    plain = enlarge_image(analysis.image_rgb, 64)
    marked = mark_patch(analysis.image_rgb, analysis.layout, (1, 2), 64)
    changed = np.argwhere((marked != plain).any(axis=-1))
    assert changed[:, 0].min() == 8 and changed[:, 0].max() == 15  # row 1 of an 8x8 grid on 64 px
    assert changed[:, 1].min() == 16 and changed[:, 1].max() == 23
    np.testing.assert_array_equal(mark_patch(analysis.image_rgb, analysis.layout, None, 64), plain)


def test_flag_predictions():
    assert flag_predictions(1, 1).status == "agree"
    assert flag_predictions(1, 2).status == "disagree"
    assert flag_predictions(1, 2, 1).status == "student-wrong"
    assert flag_predictions(1, 2, 2).status == "teacher-wrong"
    assert flag_predictions(1, 2, 3).status == "both-wrong"
    assert flag_predictions(3, 3, 3).status == "both-right"
    assert "student is wrong" in flag_predictions(1, 2, 1).message()


def test_json_and_csv_export_round_trip(analysis):
    doc = json.loads(analysis_to_json(analysis, "x.png"))
    assert doc["image"] == "x.png" and doc["true_class"] == "class3"
    assert doc["teacher"]["predicted"] == analysis.teacher.predicted
    np.testing.assert_allclose(doc["student"]["probs"], analysis.student.probs, atol=1e-6)
    maps = np.array(doc["teacher"]["cls_attention"])
    assert maps.shape == (2, 8, 8, 8)
    np.testing.assert_allclose(maps[1], cls_attention_maps(analysis.teacher.attn_probs[1], analysis.layout),
                               atol=1e-6)
    assert [r["js"] for r in doc["pair_divergence"]] == pytest.approx([r["js"] for r in pair_divergences(analysis)],
                                                                      abs=1e-6)
    rows = list(csv.DictReader(io.StringIO(analysis_to_csv(analysis))))
    for role in ("teacher", "student"):
        probs = [float(r["value"]) for r in rows if r["quantity"] == "probability" and r["model"] == role]
        assert len(probs) == 10 and sum(probs) == pytest.approx(1.0, abs=1e-4)
    assert len([r for r in rows if r["quantity"] == "pair_js"]) == len(HEAD_MAP)
