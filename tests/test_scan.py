"""Misclassification scan vs an independent reference: timm's unfused forward, a numpy rollout and JS."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitkd.scan
from vitkd.checkpoint import load_checkpoint, save_checkpoint
from vitkd.data import load_split
from vitkd.errors import ConfigError, IncompatibleModelsError
from vitkd.models import build_model
from vitkd.scan import GROUPS, cached_split_of, list_labelled_images, scan_data, scan_folder, scan_split

CLASS_NAMES = ("cat", "dog", "frog")
MEAN, STD = (0.5, 0.45, 0.4), (0.25, 0.2, 0.3)


def make_pair(directory: Path, class_names: tuple[str, ...] = CLASS_NAMES) -> tuple[Path, Path]:
    """A tiny teacher (depth 2, 4 heads) and student (depth 2, 2 heads) checkpoint on the 8x8 grid."""
    paths = []
    for role, seed, heads in (("teacher", 0, 4), ("student", 1, 2)):
        torch.manual_seed(seed)
        model = build_model("cifar-student", len(class_names), depth=2, num_heads=heads, embed_dim=32)
        with torch.no_grad():  # sharper than timm's near-uniform init, so attention maps differ visibly
            for blk in model.blocks:
                blk.attn.qkv.weight.normal_(0.0, 0.5)
        meta = {"class_names": list(class_names), "mean": list(MEAN), "std": list(STD), "img_size": 32,
                "head_map": None if role == "teacher" else [[1, 0, 1, 0], [1, 1, 1, 1]], "kind": role,
                "data": "imagefolder:tiny", "metrics": {"accuracy": 50.0}}
        paths.append(save_checkpoint(model, meta, directory / f"{role}.safetensors"))
    return paths[0], paths[1]


def make_folder(root: Path, per_class: int = 7, class_names: tuple[str, ...] = CLASS_NAMES, seed: int = 0) -> Path:
    """``root/<class>/<i>.png``: 32x32 images whose colour depends on the class, plus noise."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(class_names):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.zeros((32, 32, 3), dtype=np.float64)
            base[..., c % 3] = 200.0
            pixels = np.clip(base + rng.normal(0, 40, size=base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: on a busy 2-core machine torch's thread pool spins for ~0.4 s per call; one thread is ~1 ms."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pair(one_thread, tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("scan")
    teacher_path, student_path = make_pair(directory)
    folder = make_folder(directory / "test")
    make_folder(directory / "train", per_class=2, seed=1)  # load_split reads train's mean/std for any split
    teacher, teacher_meta = load_checkpoint(teacher_path)
    student, student_meta = load_checkpoint(student_path)
    return teacher, teacher_meta, student, student_meta, folder


def _reference_pixels(path: str, mean: tuple[float, ...] = MEAN, std: tuple[float, ...] = STD) -> torch.Tensor:
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255.0
    pixels = (pixels - np.array(mean)) / np.array(std)
    return torch.from_numpy(pixels).permute(2, 0, 1)[None].float()


def _reference_probs_and_attention(model: torch.nn.Module, x: torch.Tensor) -> tuple[np.ndarray, list[np.ndarray]]:
    """Class probabilities and each block's attention probabilities from timm's own unfused path (hooks)."""
    captured: list[np.ndarray] = []
    handles = []
    for blk in model.blocks:
        blk.attn.fused_attn = False  # a private copy: the scan under test never sees these flags or hooks
        handles.append(blk.attn.attn_drop.register_forward_hook(
            lambda _m, inputs, _out: captured.append(inputs[0].detach().double().numpy())))
    try:
        with torch.no_grad():
            probs = model(x).softmax(-1).double().numpy()[0]
    finally:
        for h in handles:
            h.remove()
        for blk in model.blocks:
            blk.attn.fused_attn = True
    return probs, captured


def _numpy_rollout_cls(attn: list[np.ndarray], num_prefix_tokens: int = 1) -> np.ndarray:
    """Whole rollout by hand over every token, then its CLS row over the patch tokens, renormalised."""
    t = attn[0].shape[-1]
    result = np.eye(t)
    for block in attn:
        a = 0.5 * block[0].mean(axis=0) + 0.5 * np.eye(t)
        a = a / a.sum(axis=1, keepdims=True)
        result = a @ result
    row = result[0, num_prefix_tokens:]
    return row / row.sum()


def _numpy_js_bits(p: np.ndarray, q: np.ndarray) -> float:
    m = 0.5 * (p + q)
    return float(0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m))) / np.log(2.0)


def test_scan_matches_direct_forward_and_groups(pair) -> None:
    teacher, teacher_meta, student, student_meta, folder = pair
    seen = []
    result = scan_split(teacher, teacher_meta, student, student_meta, folder, batch_size=8,
                        progress=lambda done, total: seen.append((done, total)))
    assert len(result.rows) == 21
    assert seen == [(8, 21), (16, 21), (21, 21)]
    assert sum(result.counts.values()) == 21 and set(result.counts) == set(GROUPS)
    for row in result.rows:
        assert Path(row.path).parent.name == CLASS_NAMES[row.label] == row.label_name
        x = _reference_pixels(row.path)
        with torch.no_grad():
            t_logits, s_logits = teacher(x)[0], student(x)[0]
        assert row.teacher_pred == int(t_logits.argmax()) and row.student_pred == int(s_logits.argmax())
        assert row.teacher_conf == pytest.approx(float(t_logits.softmax(-1).max()), abs=1e-5)
        assert row.student_conf == pytest.approx(float(s_logits.softmax(-1).max()), abs=1e-5)
        t_ok, s_ok = row.teacher_pred == row.label, row.student_pred == row.label
        expected = {(True, False): "teacher_right_student_wrong", (False, True): "student_right_teacher_wrong",
                    (False, False): "both_wrong", (True, True): "both_right"}[(t_ok, s_ok)]
        assert row.group == expected
        assert 0.0 <= row.divergence <= 1.0
    for name in GROUPS:
        assert result.counts[name] == len(result.group(name))
        divergences = [r.divergence for r in result.group(name)]
        assert divergences == sorted(divergences, reverse=True)
    csv_lines = result.to_csv().strip().splitlines()
    assert len(csv_lines) == 22 and csv_lines[0].startswith("path,label,label_name,teacher_pred")


def test_divergence_equals_independent_js(pair) -> None:
    teacher, teacher_meta, student, student_meta, folder = pair
    result = scan_split(teacher, teacher_meta, student, student_meta, folder, limit=5)
    assert len(result.rows) == 5
    row = result.rows[3]
    x = _reference_pixels(row.path)
    t_probs, t_attn = _reference_probs_and_attention(teacher, x)
    s_probs, s_attn = _reference_probs_and_attention(student, x)
    assert row.teacher_conf == pytest.approx(t_probs.max(), abs=1e-5)
    expected = _numpy_js_bits(_numpy_rollout_cls(t_attn), _numpy_rollout_cls(s_attn))
    assert expected > 1e-4  # different random models attend differently: the check is not vacuous
    assert row.divergence == pytest.approx(expected, rel=1e-3, abs=1e-7)
    same = scan_split(teacher, teacher_meta, teacher, teacher_meta, folder, limit=2)
    assert all(r.divergence == pytest.approx(0.0, abs=1e-9) for r in same.rows)


def test_flat_folder_with_labels_and_bad_files(pair, tmp_path: Path) -> None:
    teacher, teacher_meta, student, student_meta, folder = pair
    flat = tmp_path / "examples"
    flat.mkdir()
    for name, src in (("a.png", folder / "dog" / "0.png"), ("b.png", folder / "frog" / "1.png"),
                      ("unlabelled.png", folder / "cat" / "2.png")):
        (flat / name).write_bytes(src.read_bytes())
    (flat / "broken.png").write_bytes(b"not an image")
    labels = {"a.png": "dog", "b.png": 2, "broken.png": "cat"}
    (flat / "labels.json").write_text(json.dumps(labels))
    result = scan_split(teacher, teacher_meta, student, student_meta, flat, labels=labels)
    assert [(Path(r.path).name, r.label) for r in result.rows] == [("a.png", 1), ("b.png", 2)]
    assert [Path(p).name for p, _ in result.skipped] == ["broken.png"]
    reference = scan_split(teacher, teacher_meta, student, student_meta, folder)
    by_file = {(Path(r.path).parent.name, Path(r.path).name): r for r in reference.rows}
    assert result.rows[0].teacher_conf == pytest.approx(by_file[("dog", "0.png")].teacher_conf, abs=1e-6)
    assert result.rows[1].divergence == pytest.approx(by_file[("frog", "1.png")].divergence, abs=1e-6)


def test_class_name_mismatches_raise_clear_errors(pair, tmp_path: Path) -> None:
    teacher, teacher_meta, student, student_meta, _ = pair
    other = make_folder(tmp_path / "other", per_class=1, class_names=("cat", "horse"))
    with pytest.raises(ConfigError, match=r"class folders \['horse'\].*not classes of the selected models"):
        scan_split(teacher, teacher_meta, student, student_meta, other)
    with pytest.raises(ConfigError, match="'zebra' is not one of the models' classes"):
        list_labelled_images(other / "cat", CLASS_NAMES, {"0.png": "zebra"})
    renamed = dict(student_meta, class_names=["cat", "dog", "toad"])
    with pytest.raises(IncompatibleModelsError, match="teacher classes .* and student classes .* differ"):
        scan_split(teacher, teacher_meta, student, renamed, other)


def test_limit_spreads_over_classes(pair) -> None:
    teacher, teacher_meta, student, student_meta, folder = pair
    all_rows = scan_split(teacher, teacher_meta, student, student_meta, folder).rows
    limited = scan_split(teacher, teacher_meta, student, student_meta, folder, limit=6).rows
    assert [r.path for r in limited] == [all_rows[int(i * len(all_rows) / 6)].path for i in range(6)]
    assert {r.label for r in limited} == {r.label for r in all_rows}  # every class folder is represented


# ------------------------------------------------------------------------------------- the cached path: scan_data

def _source(folder: Path) -> str:
    return f"imagefolder:{folder.parent}"


def _assert_same_rows(fast, slow) -> None:
    """Two scans of one folder: same files, labels, predictions and groups; confidences and divergences to 1e-5."""
    assert [(r.path, r.label, r.teacher_pred, r.student_pred, r.group) for r in fast.rows] == \
        [(r.path, r.label, r.teacher_pred, r.student_pred, r.group) for r in slow.rows]
    for a, b in zip(fast.rows, slow.rows, strict=True):
        assert a.teacher_conf == pytest.approx(b.teacher_conf, abs=1e-5)
        assert a.student_conf == pytest.approx(b.student_conf, abs=1e-5)
        assert a.divergence == pytest.approx(b.divergence, rel=1e-4, abs=1e-8)
    assert fast.counts == slow.counts


def test_scan_data_equals_scan_split_and_plain_forwards(pair) -> None:
    teacher, teacher_meta, student, student_meta, folder = pair
    student_stats = (0.3, 0.6, 0.45), (0.2, 0.3, 0.25)  # each model is normalised with its own statistics
    student_meta = dict(student_meta, mean=list(student_stats[0]), std=list(student_stats[1]))
    seen = []
    fast = scan_data(teacher, teacher_meta, student, student_meta, _source(folder), batch_size=8,
                     progress=lambda done, total: seen.append((done, total)))
    assert seen == [(8, 21), (16, 21), (21, 21)]
    assert len(fast.rows) == 21 and not fast.skipped
    _assert_same_rows(fast, scan_split(teacher, teacher_meta, student, student_meta, folder))
    # Counts from plain forwards (timm's fused path, PIL decode, normalised by hand), independent of both scans.
    expected = dict.fromkeys(GROUPS, 0)
    for label, name in enumerate(CLASS_NAMES):
        for file in sorted((folder / name).iterdir()):
            with torch.no_grad():
                t_ok = int(teacher(_reference_pixels(str(file))).argmax()) == label
                s_ok = int(student(_reference_pixels(str(file), *student_stats)).argmax()) == label
            expected[{(True, False): "teacher_right_student_wrong", (False, True): "student_right_teacher_wrong",
                      (False, False): "both_wrong", (True, True): "both_right"}[(t_ok, s_ok)]] += 1
    assert fast.counts == expected
    summary = fast.summary()
    assert summary["n"] == 21 and summary["counts"] == expected and summary["skipped"] == 0
    assert summary["teacher_accuracy"] == pytest.approx(
        100 * (expected["both_right"] + expected["teacher_right_student_wrong"]) / 21)
    assert summary["student_accuracy"] == pytest.approx(
        100 * (expected["both_right"] + expected["student_right_teacher_wrong"]) / 21)
    assert summary["teacher_accuracy"] != summary["student_accuracy"]  # a swap would show
    assert summary["mean_divergence"] == pytest.approx(sum(r.divergence for r in fast.rows) / 21)
    # An already loaded split scans the same, and so does a limit (same images as the per-image path).
    loaded = load_split(_source(folder), "test", 32, progress=False)
    _assert_same_rows(scan_data(teacher, teacher_meta, student, student_meta, loaded), fast)
    _assert_same_rows(scan_data(teacher, teacher_meta, student, student_meta, loaded, limit=5),
                      scan_split(teacher, teacher_meta, student, student_meta, folder, limit=5))


def test_scan_data_rollout_rows_equal_whole_rollout(pair) -> None:
    """The CLS-row shortcut (vector-matrix products) equals row 0 of the whole rollout (``vitkd.rollout``)."""
    from vitkd.attention import capture_attention, token_layout
    from vitkd.rollout import attention_rollout

    teacher = pair[0]
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        probs = [capture_attention(teacher, x).attn_probs[b] for b in range(len(teacher.blocks))]
    whole = attention_rollout(probs)[:, 0, 1:]
    row = vitkd.scan._cls_rollout_row(probs, token_layout(teacher).num_prefix_tokens)
    torch.testing.assert_close(row, whole / whole.sum(-1, keepdim=True), rtol=1e-5, atol=1e-7)


def test_scan_data_refuses_other_classes_and_loads_each_models_size(pair, tmp_path: Path) -> None:
    teacher, teacher_meta, student, student_meta, folder = pair
    other = make_folder(tmp_path / "other" / "test", per_class=1, class_names=("cat", "dog", "horse"))
    make_folder(tmp_path / "other" / "train", per_class=1, class_names=("cat", "dog", "horse"))
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError, match=r"the models predict 3 classes \(cat, dog, frog\) but .* has 3 classes "
                                          r"\(cat, dog, horse\)"):
        scan_data(teacher, teacher_meta, student, student_meta, _source(other), cache_dir=cache)
    assert not cache.exists()  # refused before decoding anything
    # A student reading 64x64 images with 8x8 patches: the same 8x8 grid, so the pair scans; the split is
    # loaded at each model's size, as the per-image path resizes each file for each model.
    torch.manual_seed(2)
    big = build_model("cifar-student", 3, img_size=64, patch_size=8, depth=2, num_heads=2, embed_dim=32).eval()
    big_meta = dict(student_meta, img_size=64)
    fast = scan_data(teacher, teacher_meta, big, big_meta, _source(folder))
    _assert_same_rows(fast, scan_split(teacher, teacher_meta, big, big_meta, folder))
    assert len({r.divergence for r in fast.rows}) > 1


def _deit_student(directory: Path) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(5)
    model = build_model("cifar-student-deit", len(CLASS_NAMES), depth=2, num_heads=2, embed_dim=32)
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight.normal_(0.0, 0.5)
    meta = {"class_names": list(CLASS_NAMES), "mean": list(MEAN), "std": list(STD), "img_size": 32,
            "kind": "distilled"}
    return load_checkpoint(save_checkpoint(model, meta, directory / "deit.safetensors"))


def test_deit_student_with_plain_teacher_divergence_over_patches(pair, tmp_path: Path) -> None:
    teacher, teacher_meta, _, _, folder = pair
    deit, deit_meta = _deit_student(tmp_path)
    assert deit.num_prefix_tokens == 2 and teacher.num_prefix_tokens == 1
    slow = scan_split(teacher, teacher_meta, deit, deit_meta, folder, limit=4)
    fast = scan_data(teacher, teacher_meta, deit, deit_meta, _source(folder), limit=4)
    _assert_same_rows(fast, slow)
    for row in fast.rows:
        x = _reference_pixels(row.path)
        _, t_attn = _reference_probs_and_attention(teacher, x)
        s_probs, s_attn = _reference_probs_and_attention(deit, x)  # eval: the mean of the two heads
        assert s_attn[0].shape[-1] == 66  # CLS, distillation token, 64 patches
        assert row.student_conf == pytest.approx(s_probs.max(), abs=1e-5)
        expected = _numpy_js_bits(_numpy_rollout_cls(t_attn, 1), _numpy_rollout_cls(s_attn, 2))
        assert expected > 1e-4
        assert row.divergence == pytest.approx(expected, rel=1e-3, abs=1e-7)
    # Swapping the roles (the DeiT model as teacher) gives the same divergences: JS is symmetric.
    swapped = scan_data(deit, deit_meta, teacher, teacher_meta, _source(folder), limit=4)
    assert [r.divergence for r in swapped.rows] == pytest.approx([r.divergence for r in fast.rows], rel=1e-6)


def _coarse_student(directory: Path) -> tuple[torch.nn.Module, dict]:
    """A student with patch 8: a 4x4 grid where the teacher has 8x8, a quarter of the tokens."""
    torch.manual_seed(7)
    model = build_model("cifar-student", len(CLASS_NAMES), patch_size=8, depth=2, num_heads=2, embed_dim=32)
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight.normal_(0.0, 0.5)
    meta = {"class_names": list(CLASS_NAMES), "mean": list(MEAN), "std": list(STD), "img_size": 32,
            "kind": "supervised", "data": "imagefolder:tiny"}
    return load_checkpoint(save_checkpoint(model, meta, directory / "coarse.safetensors"))


def _coarsen_row(row: np.ndarray, fine: int, coarse: int) -> np.ndarray:
    """A distribution over fine x fine patches onto coarse x coarse, by loops: each coarse patch holds the sum of
    the fine patches it covers."""
    k = fine // coarse
    out = np.zeros(coarse * coarse)
    for r in range(fine):
        for c in range(fine):
            out[(r // k) * coarse + c // k] += row[r * fine + c]
    return out / out.sum()


def test_different_patch_grids_compare_on_the_coarser_grid(pair, tmp_path: Path) -> None:
    teacher, teacher_meta, _, _, folder = pair
    coarse, coarse_meta = _coarse_student(tmp_path)
    slow = scan_split(teacher, teacher_meta, coarse, coarse_meta, folder)
    fast = scan_data(teacher, teacher_meta, coarse, coarse_meta, _source(folder))
    _assert_same_rows(fast, slow)
    expected_counts = dict.fromkeys(GROUPS, 0)
    for row in fast.rows:
        x = _reference_pixels(row.path)
        t_probs, t_attn = _reference_probs_and_attention(teacher, x)
        s_probs, s_attn = _reference_probs_and_attention(coarse, x)
        assert s_attn[0].shape[-1] == 17  # CLS and 16 patches
        assert row.teacher_pred == int(t_probs.argmax()) and row.student_pred == int(s_probs.argmax())
        expected_counts[row.group] += 1
        t_row = _coarsen_row(_numpy_rollout_cls(t_attn), 8, 4)  # the teacher's rollout onto the student's 4x4
        expected = _numpy_js_bits(t_row, _numpy_rollout_cls(s_attn))
        assert expected > 1e-4
        assert row.divergence == pytest.approx(expected, rel=1e-3, abs=1e-7)
    assert fast.counts == expected_counts
    # The finer model as the student: the same comparison, JS is symmetric.
    swapped = scan_data(coarse, coarse_meta, teacher, teacher_meta, _source(folder))
    assert [r.divergence for r in swapped.rows] == pytest.approx([r.divergence for r in fast.rows], rel=1e-6)


def _scan_in_app(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, checkpoints: Path, data_root: Path,
                 teacher: Path, student: Path) -> AppTest:  # noqa: F821 - imported here, as streamlit is heavy
    """The Misclassifications page over ``data_root``'s test split with this pair, after one Scan click."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from app import common

    monkeypatch.setattr(common, "BUNDLED_CHECKPOINTS", tmp_path / "none")
    monkeypatch.setenv("VITKD_CHECKPOINT_DIRS", str(checkpoints))
    monkeypatch.setenv("VITKD_DATA_ROOTS", str(data_root))
    monkeypatch.setenv("VITKD_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("VITKD_TORCH_THREADS", "0")
    st.cache_data.clear()
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app" / "streamlit_app.py"), default_timeout=60)
    at.session_state[common.TEACHER_KEY] = str(teacher)
    at.session_state[common.STUDENT_KEY] = str(student)
    at.switch_page("views/misclassified.py")
    at.run()
    split = at.selectbox(key="misc_split")
    split.set_value(next(o for o in split.options if o.startswith(f"{data_root.name}/test"))).run()
    at.button[0].click().run()  # Scan
    return at


def test_app_scans_a_pair_with_different_grids_like_the_library(pair, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The Misclassifications page on the 8x8 teacher and the 4x4 student: the counts ``scan_folder`` gives."""


    teacher, teacher_meta, _, _, folder = pair
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    coarse, coarse_meta = _coarse_student(checkpoints)
    teacher_path = save_checkpoint(teacher, dict(teacher_meta), checkpoints / "teacher.safetensors")
    at = _scan_in_app(monkeypatch, tmp_path, checkpoints, folder.parent, teacher_path,
                      checkpoints / "coarse.safetensors")
    assert not at.exception and not at.main.error
    expected = scan_folder(teacher, teacher_meta, coarse, coarse_meta, folder)
    assert sum(expected.counts.values()) == 21
    shown = {t.label.rsplit(" (", 1)[0]: int(t.label.rsplit("(", 1)[1].rstrip(")")) for t in at.tabs}
    assert shown == {vitkd.scan.GROUP_TITLES[g]: n for g, n in expected.counts.items()}
    table = at.dataframe[0].value
    assert sorted(table["attention JS (bits)"]) == pytest.approx(sorted(round(r.divergence, 5)
                                                                        for r in expected.rows), abs=1e-5)


def test_per_image_path_holds_one_full_size_image_at_a_time(pair, tmp_path: Path, monkeypatch) -> None:
    """``scan_split`` decodes and resizes file by file: the previous full-size image is gone before the next opens."""
    import weakref

    teacher, teacher_meta, student, student_meta, _ = pair
    big = make_folder(tmp_path / "big", per_class=3)
    for file in big.rglob("*.png"):
        Image.open(file).resize((256, 192)).save(file)
    alive: list[weakref.ref] = []
    most_alive_at_open = []
    real_open = vitkd.scan.open_rgb

    def open_rgb(path):
        most_alive_at_open.append(sum(ref() is not None for ref in alive))
        image = real_open(path)
        alive.append(weakref.ref(image))
        return image

    monkeypatch.setattr(vitkd.scan, "open_rgb", open_rgb)
    result = scan_split(teacher, teacher_meta, student, student_meta, big, batch_size=9)
    assert len(result.rows) == 9 and len(most_alive_at_open) == 9
    assert max(most_alive_at_open) == 0


def test_scan_folder_uses_the_cache_for_data_root_splits(pair, tmp_path: Path, monkeypatch) -> None:
    teacher, teacher_meta, student, student_meta, folder = pair
    assert cached_split_of(folder) == (_source(folder), "test")
    assert cached_split_of(folder.parent / "train") == (_source(folder), "train")
    assert cached_split_of(folder / "cat") is None
    (tmp_path / "test").mkdir()
    (tmp_path / "val").mkdir()
    assert cached_split_of(tmp_path / "val") is None  # load_split reads test/ when both exist
    calls = []
    real_data, real_split = vitkd.scan.scan_data, vitkd.scan.scan_split
    monkeypatch.setattr(vitkd.scan, "scan_data", lambda *a, **k: calls.append("data") or real_data(*a, **k))
    monkeypatch.setattr(vitkd.scan, "scan_split", lambda *a, **k: calls.append("split") or real_split(*a, **k))
    fast = scan_folder(teacher, teacher_meta, student, student_meta, folder, limit=6)
    assert calls == ["data"]
    _assert_same_rows(fast, real_split(teacher, teacher_meta, student, student_meta, folder, limit=6))
    # A class folder (not a split) and a split with a file the decoder rejects go file by file.
    calls.clear()
    scan_folder(teacher, teacher_meta, student, student_meta, folder / "cat", labels={"0.png": "cat"})
    assert calls == ["split"]
    broken = make_folder(tmp_path / "broken" / "test", per_class=2)
    make_folder(tmp_path / "broken" / "train", per_class=1)
    (broken / "dog" / "bad.png").write_bytes(b"not an image")
    calls.clear()
    result = scan_folder(teacher, teacher_meta, student, student_meta, broken)
    # the cached path stops at the file the decoder rejects; the per-file path then lists it as skipped
    assert calls == ["data", "split"] and [Path(p).name for p, _ in result.skipped] == ["bad.png"]
    assert len(result.rows) == 6


# ----------------------------------------------------- what the cached path decodes, and when a scan is stale

# 5 evenly spaced of the 21 files of make_folder(per_class=7) (step 21/5 = 4.2: positions 0, 4, 8, 12, 16;
# cat 0-6, dog 7-13, frog 14-20), by hand.
SCANNED = ("cat/0.png", "cat/4.png", "dog/1.png", "dog/5.png", "frog/2.png")


def test_scan_decodes_only_the_scanned_images_of_a_root_without_train(pair, tmp_path: Path, monkeypatch,
                                                                         capsys: pytest.CaptureFixture) -> None:
    """``scan --limit`` decodes those images only, never the train split: a root with only test/ scans."""
    import vitkd.data
    from vitkd.cli import main

    teacher, teacher_meta, student, student_meta, _ = pair
    root = tmp_path / "only_test"
    folder = make_folder(root / "test")
    cache = tmp_path / "cache"
    decoded: list[str] = []
    real_open = vitkd.data.open_rgb
    monkeypatch.setattr(vitkd.data, "open_rgb", lambda path: decoded.append(str(path)) or real_open(path))
    expected = [str(folder / rel) for rel in SCANNED]
    fast = scan_data(teacher, teacher_meta, student, student_meta, _source(folder), limit=5, cache_dir=cache)
    assert decoded == expected and [r.path for r in fast.rows] == expected
    _assert_same_rows(fast, scan_split(teacher, teacher_meta, student, student_meta, folder, limit=5))
    # A student at another size: the same 5 files decoded again at its size, nothing else.
    torch.manual_seed(2)
    big = build_model("cifar-student", 3, img_size=64, patch_size=8, depth=2, num_heads=2, embed_dim=32).eval()
    decoded.clear()
    scan_data(teacher, teacher_meta, big, dict(student_meta, img_size=64), _source(folder), limit=5, cache_dir=cache)
    assert sorted(decoded) == sorted(expected * 2)
    # The app's path takes the cache for this split, and the CLI scans it.
    calls = []
    real_data = vitkd.scan.scan_data
    monkeypatch.setattr(vitkd.scan, "scan_data", lambda *a, **k: calls.append("data") or real_data(*a, **k))
    _assert_same_rows(scan_folder(teacher, teacher_meta, student, student_meta, folder, limit=5, cache_dir=cache),
                      fast)
    assert calls == ["data"]
    teacher_path, student_path = make_pair(tmp_path)
    assert main(["scan", "--teacher", str(teacher_path), "--student", str(student_path), "--data", _source(folder),
                 "--limit", "5", "--device", "cpu", "--cache-dir", str(cache), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 5 and report["counts"] == fast.counts


def _rewrite_png(path: Path, seed: int) -> None:
    """New pixels in the same file (no entry added or removed, so no folder's mtime moves), a new mtime."""
    before = path.stat().st_mtime_ns
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    os.utime(path, ns=(before + 10**9, before + 10**9))


def _folder_mtimes(folder: Path) -> list[int]:
    """What the old scan key saw: the folder's and its class subfolders' mtimes."""
    return [folder.stat().st_mtime_ns] + [p.stat().st_mtime_ns for p in sorted(folder.iterdir()) if p.is_dir()]


def test_app_rescans_after_an_image_is_rewritten_in_place_or_added_in_a_nested_folder(
        pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:


    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    teacher_path, student_path = make_pair(checkpoints)
    folder = make_folder(tmp_path / "data" / "test", per_class=3)
    (folder / "cat" / "more").mkdir()  # nested, as rglob and make_dataset read it
    calls = []
    real_scan = vitkd.scan.scan_folder
    monkeypatch.setattr(vitkd.scan, "scan_folder", lambda *a, **k: calls.append(a[4]) or real_scan(*a, **k))
    at = _scan_in_app(monkeypatch, tmp_path, checkpoints, folder.parent, teacher_path, student_path)

    def images() -> str:
        assert not at.exception and not at.main.error
        return next(m.value for m in at.metric if m.label == "Images")

    assert images() == "9" and len(calls) == 1
    at.run()
    assert images() == "9" and len(calls) == 1  # nothing changed: the cached scan
    stamps = _folder_mtimes(folder)
    _rewrite_png(folder / "dog" / "1.png", seed=5)
    assert _folder_mtimes(folder) == stamps
    at.run()
    assert images() == "9" and len(calls) == 2  # rescanned: the CLI would see the new pixels too
    Image.open(folder / "cat" / "0.png").save(folder / "cat" / "more" / "extra.png")
    assert _folder_mtimes(folder) == stamps
    at.run()
    assert images() == "10" and len(calls) == 3


def test_folder_fingerprint_follows_the_per_file_listing(tmp_path: Path) -> None:
    """Folders that are not a data root's split (``scan_split``'s listing): nested class folders, flat labelled ones."""
    plain = make_folder(tmp_path / "plain", per_class=2)
    (plain / "dog" / "deeper").mkdir()
    first = vitkd.scan.folder_fingerprint(plain, CLASS_NAMES)
    assert vitkd.scan.folder_fingerprint(plain, CLASS_NAMES) == first
    stamps = _folder_mtimes(plain)
    _rewrite_png(plain / "frog" / "0.png", seed=1)
    rewritten = vitkd.scan.folder_fingerprint(plain, CLASS_NAMES)
    Image.open(plain / "cat" / "0.png").save(plain / "dog" / "deeper" / "x.png")
    assert _folder_mtimes(plain) == stamps
    assert len({first, rewritten, vitkd.scan.folder_fingerprint(plain, CLASS_NAMES)}) == 3
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("a.png", "b.png"):
        (flat / name).write_bytes((plain / "cat" / "1.png").read_bytes())
    labels = {"a.png": "dog"}
    first = vitkd.scan.folder_fingerprint(flat, CLASS_NAMES, labels)
    _rewrite_png(flat / "b.png", seed=2)  # not labelled: not scanned
    assert vitkd.scan.folder_fingerprint(flat, CLASS_NAMES, labels) == first
    _rewrite_png(flat / "a.png", seed=3)
    assert vitkd.scan.folder_fingerprint(flat, CLASS_NAMES, labels) != first
