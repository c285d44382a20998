"""The Explore page through Streamlit's AppTest, on tiny generated checkpoints: examples, uploads (good and bad),
images sent from other pages, model switches, a pair with different patch grids, broken checkpoints and
incompatible pairs; plus server config."""

from __future__ import annotations

import ast
import base64
import io
import json
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from streamlit.testing.v1 import AppTest

import app.common as common
from vitkd.agreement import block_divergence, pair_divergences
from vitkd.analysis import analyze_pair
from vitkd.checkpoint import save_checkpoint
from vitkd.images import load_image
from vitkd.models import build_model
from vitkd.pairs import load_pair

APP = Path(__file__).resolve().parents[1] / "app" / "streamlit_app.py"
CIFAR = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
HEAD_MAP = [[1, h, 1, h] for h in range(4)] + [[0, 0, 0, 2]]
# the 4x4-grid student: each head of block 1 follows the mean of two teacher heads (8 -> 4, grouped evenly)
GROUP_MAP = [[1, [2 * h, 2 * h + 1], 1, h] for h in range(4)]
TIMEOUT = 60




@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory, sharpen) -> Path:
    """tiny-teacher, a distilled and a baseline student, a 4x4-grid student taught by groups of teacher heads,
    an incompatible student (other classes), two broken files."""
    folder = tmp_path_factory.mktemp("app_ckpts")
    torch.manual_seed(0)
    meta = dict(class_names=CIFAR, mean=[0.49, 0.48, 0.45], std=[0.25, 0.24, 0.26], img_size=32, data="cifar10",
                epoch=1, metrics={"accuracy": 42.0})
    save_checkpoint(sharpen(build_model("cifar-teacher", 10, depth=2), 5.0), dict(meta, kind="supervised"),
                    folder / "tiny-teacher.safetensors")
    save_checkpoint(sharpen(build_model("cifar-student", 10, depth=2), 5.0), dict(meta, kind="distilled",
                                                                              head_map=HEAD_MAP),
                    folder / "tiny-student-distilled.safetensors")
    save_checkpoint(sharpen(build_model("cifar-student", 10, depth=2), 5.0), dict(meta, kind="supervised"),
                    folder / "tiny-student-baseline.safetensors")
    save_checkpoint(sharpen(build_model("cifar-student", 10, depth=2, patch_size=8), 5.0),
                    dict(meta, kind="distilled", head_map=GROUP_MAP), folder / "coarse-student.safetensors")
    save_checkpoint(build_model("cifar-student", 5, depth=2), dict(meta, class_names=CIFAR[:5], kind="supervised"),
                    folder / "five-class-student.safetensors")
    (folder / "broken.safetensors").write_bytes(b"not a checkpoint at all")
    good = (folder / "tiny-student-baseline.safetensors").read_bytes()
    (folder / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    return folder


@pytest.fixture()
def app_env(ckpt_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Only the tiny checkpoints are visible: bundled folder and runs folder point at empty temp dirs."""
    empty = tmp_path / "bundled"
    empty.mkdir()
    monkeypatch.setattr(common, "BUNDLED_CHECKPOINTS", empty)
    monkeypatch.setenv("VITKD_CHECKPOINT_DIRS", str(ckpt_dir))
    monkeypatch.setenv("VITKD_RUNS_DIR", str(tmp_path / "runs"))
    threads = torch.get_num_threads()
    yield ckpt_dir
    torch.set_num_threads(threads)  # the entrypoint sets the server's thread count; other tests keep theirs


def start(teacher: Path | None = None, student: Path | None = None) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    if teacher is not None:
        at.session_state[common.TEACHER_KEY] = str(teacher)
    if student is not None:
        at.session_state[common.STUDENT_KEY] = str(student)
    return at.run()


def chart_titles(at: AppTest) -> list[str]:
    return [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in at.get("plotly_chart")
            if "title" in json.loads(c.proto.spec)["layout"]]


def chart_data(at: AppTest, key: str) -> list[dict]:
    """The traces of the plotly chart drawn with widget key ``key``."""
    return next(json.loads(c.proto.spec)["data"] for c in at.get("plotly_chart") if c.proto.id.endswith(key))


def plotly_array(value: list | dict) -> np.ndarray:
    """A plotly JSON array: a list, or a typed array ({"dtype", "bdata": base64})."""
    if isinstance(value, dict):
        return np.frombuffer(base64.b64decode(value["bdata"]), value["dtype"])
    return np.asarray(value, dtype=float)


def expected_titles(folder: Path, student: str, image_bytes: bytes) -> list[str]:
    """What the page should show, computed with the library directly (no Streamlit)."""
    pair = load_pair(folder / "tiny-teacher.safetensors", folder / student)
    result = analyze_pair(pair, load_image(image_bytes))
    return [f"{role}: {r.top_k[0].name} ({r.top_k[0].prob:.1%})"
            for role, r in (("Teacher", result.teacher), ("Student", result.student))]


def png_bytes(size=(40, 40), seed=0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def open_tab(at: AppTest, label: str) -> AppTest:
    """Select an Explore tab, as a click on it does (only the open tab is drawn)."""
    at.session_state["explore_tab"] = label
    return at.run()


def main_errors(at: AppTest) -> list[str]:
    return [e.value for e in at.main.error]


# --------------------------------------------------------------------------------------------- page behaviour

def test_example_predictions_views_and_errors(app_env: Path):
    at = start()
    assert not at.exception
    assert [t.value for t in at.title] == ["Explore attention"]
    sidebar = {s.label: s.value for s in at.sidebar.selectbox}
    assert sidebar["Teacher"] == str(app_env / "tiny-teacher.safetensors")
    assert sidebar["Student"] == str(app_env / "tiny-student-distilled.safetensors")  # the distilled one by default
    # Both unreadable files are reported in the sidebar; the app still works.
    sidebar_errors = " ".join(e.value for e in at.sidebar.error)
    assert "broken.safetensors" in sidebar_errors and "truncated.safetensors" in sidebar_errors
    assert main_errors(at) == []

    first = common.examples()[0]
    assert chart_titles(at)[:2] == expected_titles(app_env, "tiny-student-distilled.safetensors",
                                                   first.path.read_bytes())
    assert any(f"true class: **{first.label}**" in c.value for c in at.caption)
    assert any("badge[" in m.value for m in at.markdown)
    # Distilled-pair table equals the library's numbers for this image.
    pair = load_pair(app_env / "tiny-teacher.safetensors", app_env / "tiny-student-distilled.safetensors")
    ref = pair_divergences(analyze_pair(pair, load_image(first.path.read_bytes()), CIFAR.index(first.label)))
    assert not at.dataframe  # only the open tab is drawn
    open_tab(at, "Agreement")
    table = at.dataframe[0].value
    np.testing.assert_allclose(table["JS divergence (bits)"].to_numpy(), [round(r["js"], 5) for r in ref], atol=1e-5)
    assert list(table["student head"]) == [f"S{r['student_block']}.h{r['student_head']}" for r in ref]

    cat = next(e for e in common.examples() if e.label == "cat")
    at.pills(key="explore_example").set_value(cat.name).run()
    assert not at.exception
    assert any(f"**{cat.name}**" in c.value and "true class: **cat**" in c.value for c in at.caption)
    assert chart_titles(at)[:2] == expected_titles(app_env, "tiny-student-distilled.safetensors",
                                                   cat.path.read_bytes())

    # Other views: fused heads, a query patch, another block, class rollout for a chosen class.
    open_tab(at, "Head attention")
    assert len(at.main.image) >= 2  # the head tiles (and the preview)
    at.segmented_control(key="explore_view").set_value("max").run()
    at.segmented_control(key="explore_query_kind").set_value("patch").run()
    at.selectbox(key="explore_sblock").set_value(0).run()
    assert at.selectbox(key="explore_tblock").value == 0  # follows the head map: S0 was taught by T0
    assert at.number_input(key="explore_qrow").value == 4  # the middle of the 8x8 grid
    at.number_input(key="explore_qrow").set_value(7).run()
    open_tab(at, "Rollout")
    at.segmented_control(key="explore_target").set_value("chosen").run()
    teacher_top = chart_titles(at)[0].split(": ")[1].split(" (")[0]  # "Teacher: cat (12.3%)"
    assert at.selectbox(key="explore_class").value == CIFAR.index(teacher_top)  # defaults to its prediction
    at.selectbox(key="explore_class").set_value(5).run()
    assert not at.exception and main_errors(at) == [] and not at.warning
    # Settings of a tab survive while another tab is open; the export tab offers the three files.
    open_tab(at, "Export")
    assert [b.label for b in at.get("download_button")] == ["Overlays (PNG)", "Numbers (JSON)", "Numbers (CSV)"]
    open_tab(at, "Head attention")
    assert at.segmented_control(key="explore_view").value == "max"
    open_tab(at, "Rollout")
    assert at.segmented_control(key="explore_target").value == "chosen" and at.selectbox(key="explore_class").value == 5
    assert not at.exception and main_errors(at) == [] and not at.warning


def test_model_switch_and_incompatible_pair(app_env: Path):
    # Switching the student in the sidebar re-analyses the image with the new pair.
    at = open_tab(start(), "Agreement")
    at.sidebar.selectbox(key=common.STUDENT_KEY).set_value(str(app_env / "tiny-student-baseline.safetensors")).run()
    assert not at.exception
    assert any("no head map" in i.value for i in at.info)
    assert chart_titles(at)[:2] == expected_titles(app_env, "tiny-student-baseline.safetensors",
                                                   common.examples()[0].path.read_bytes())
    # (AppTest 1.67 drops entrypoint-drawn sidebar elements after the first run of a multipage app, so the
    # sidebar's own messages are checked on fresh sessions below.)
    at = start(student=app_env / "five-class-student.safetensors")
    assert not at.exception
    errors = " ".join(e.value for e in at.sidebar.error)
    assert "classes differ" in errors and "10 classes" in errors and "5 classes" in errors
    assert any("compatible teacher and student" in i.value for i in at.main.info)
    assert not at.get("plotly_chart")


def test_a_pair_with_different_patch_grids(app_env: Path):
    """An 8x8-grid teacher and a 4x4-grid student: both predictions, each model's maps on its own grid, the query
    patch mapped onto each grid, agreement on the coarser grid with every head of a group framed."""
    at = start(student=app_env / "coarse-student.safetensors")
    assert not at.exception and main_errors(at) == []
    assert not any("differ" in e.value for e in at.sidebar.error)
    example = common.examples()[0]
    assert chart_titles(at)[:2] == expected_titles(app_env, "coarse-student.safetensors", example.path.read_bytes())
    tiles = [caption for image in at.main.image for caption in image.captions]
    assert "S1.h0 <- taught by T1.h{0,1}" in tiles and "T1.h1 -> S1.h0" in tiles
    at.segmented_control(key="explore_query_kind").set_value("patch").run()
    assert at.number_input(key="explore_qrow").value == 4  # the query is chosen on the finer (8x8) grid
    at.number_input(key="explore_qrow").set_value(7).run()
    at.number_input(key="explore_qcol").set_value(2).run()
    assert not at.exception and main_errors(at) == []
    assert any("teacher patch (7, 2) of its 8x8 grid" in c.value and "student patch (3, 1) of its 4x4 grid" in c.value
               for c in at.caption)
    at.session_state["explore_overview"] = True  # the all-blocks overview, each model on its own grid
    at.run()
    assert not at.exception and main_errors(at) == []
    assert "Student: 2 blocks x 4 heads" in [caption for image in at.main.image for caption in image.captions]
    open_tab(at, "Rollout")
    assert not at.exception and main_errors(at) == []
    open_tab(at, "Agreement")
    assert not at.exception and main_errors(at) == []
    assert any("coarser 4x4 patch grid" in m.value for m in at.markdown)
    pair = load_pair(app_env / "tiny-teacher.safetensors", app_env / "coarse-student.safetensors")
    ref = pair_divergences(analyze_pair(pair, load_image(example.path.read_bytes()), CIFAR.index(example.label)))
    table = at.dataframe[0].value
    assert list(table["teacher head"]) == [f"T1.h{{{2 * h},{2 * h + 1}}}" for h in range(4)]
    np.testing.assert_allclose(table["JS divergence (bits)"].to_numpy(), [round(r["js"], 5) for r in ref], atol=1e-5)
    heatmap = chart_data(at, "explore_js")
    shown = plotly_array(heatmap[0]["z"]).reshape(4, 8)
    analysis = analyze_pair(pair, load_image(example.path.read_bytes()))
    np.testing.assert_allclose(shown, block_divergence(analysis, 1, 1), atol=1e-12)
    assert len(heatmap[1]["x"]) == 8  # each student head framed with both teacher heads of its group

    # Head summaries: each model's heads at its own grid, distances in input pixels; the head map as diamonds.
    traces = {t["name"]: t for t in chart_data(at, "explore_headstats")}
    assert set(traces) == {"teacher", "teacher: head in the head map", "student", "student: head in the head map"}
    for role in ("teacher", "student"):
        expected = analysis.model(role).head_stats().distance_px
        in_map = {(p.teacher_block, p.teacher_head) if role == "teacher" else (p.student_block, p.student_head)
                  for p in pair.head_map.pairs}
        shown_values = {}
        for name in (role, f"{role}: head in the head map"):
            prefix = "T" if role == "teacher" else "S"
            for text, y in zip(traces[name]["hovertext"], plotly_array(traces[name]["y"]), strict=True):
                block, head = map(int, text.split("<br>")[0][1:].split(".h"))
                assert text.startswith(prefix) and ((block, head) in in_map) == name.endswith("map")
                shown_values[block, head] = y
        assert sorted(shown_values) == [(b, h) for b in range(expected.shape[0]) for h in range(expected.shape[1])]
        np.testing.assert_allclose([shown_values[k] for k in sorted(shown_values)], expected.ravel(), atol=1e-9)
    spec = next(json.loads(c.proto.spec) for c in at.get("plotly_chart") if c.proto.id.endswith("explore_headstats"))
    lines = [shape["y0"] for shape in spec["layout"]["shapes"]]  # the uniform-attention line, teacher then student
    # An 8x8 and a 4x4 grid over the same 32 px give different flat baselines: each line is its own model's.
    assert lines == pytest.approx([analysis.model(r).uniform_head_stats().distance_px for r in ("teacher", "student")])
    assert lines[0] != pytest.approx(lines[1])
    at.segmented_control(key="explore_headstat").set_value("self_share").run()
    assert not at.exception and main_errors(at) == []
    shown_self = plotly_array(chart_data(at, "explore_headstats")[0]["y"])
    assert shown_self.min() >= 0 and shown_self.max() <= 1


def huge_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG written by hand: a few KB on disk, width*height pixels decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    body = zlib.compress(b"\x00" * ((1 + (width + 7) // 8) * height), 9)
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bad_uploads_each_get_an_error_and_good_ones_still_work(app_env: Path):
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    one_pixel = io.BytesIO()
    Image.new("RGB", (1, 1)).save(one_pixel, "PNG")
    good = png_bytes((40, 56), seed=5)
    files = [
        ("notes.png", b"just some text, not an image", "image/png"),
        ("cut.jpg", jpeg.getvalue()[: len(jpeg.getvalue()) // 2], "image/jpeg"),
        ("empty.png", b"", "image/png"),
        ("dot.png", one_pixel.getvalue(), "image/png"),
        ("huge.png", huge_png(10_000, 10_000), "image/png"),
        ("good.png", good, "image/png"),
    ]
    at = start()
    at.file_uploader(key="explore_uploads").set_value(files).run()
    assert not at.exception
    errors = main_errors(at)
    expected = {"notes.png": "not an image", "cut.jpg": "truncated or corrupt", "empty.png": "0 bytes",
                "dot.png": "1x1 pixels", "huge.png": "50 megapixel limit"}
    for name, message in expected.items():
        assert any(f"**{name}**" in e and message in e for e in errors), (name, errors)
    assert len(errors) == len(expected)
    # The good upload (the newest file) is the one analysed.
    assert any("**good.png**" in c.value and "true class unknown" in c.value for c in at.caption)
    assert chart_titles(at)[:2] == expected_titles(app_env, "tiny-student-distilled.safetensors", good)
    assert set(at.radio(key="explore_choice").options) == {"good.png", common.examples()[0].name}


def big_flat_png(side: tuple[int, int], seed: int) -> bytes:
    """A large, highly compressible PNG (a few flat bands): small to upload, big when decoded."""
    rng = np.random.default_rng(seed)
    rows = np.repeat(rng.integers(0, 255, (8, 1, 3), dtype=np.uint8), -(-side[0] // 8), axis=0)[:side[0]]
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(np.broadcast_to(rows, (side[0], side[1], 3)))).save(buf, "PNG")
    return buf.getvalue()


def test_uploads_past_the_session_cap_get_a_message(app_env: Path, monkeypatch: pytest.MonkeyPatch):
    """Many large compressible uploads: only the first ``cap`` are decoded, each straight to a small copy
    (long side DISPLAY_SIDE), which is what the cache keeps; the rest get one clear message."""
    from vitkd.images import DISPLAY_SIDE

    cap = 20  # app/views/explore.py MAX_UPLOADS
    side = (2400, 1800)  # 4.3 MP, 13 MB decoded, a few KB as PNG
    files = [(f"img{i:02d}.png", big_flat_png(side, seed=100 + i), "image/png") for i in range(cap + 3)]
    assert all(len(data) < 64_000 for _, data, _ in files)
    decoded, kept = [], []

    def recording(data, **kw):
        decoded.append(data)
        image = load_image(data, **kw)
        kept.append(image.size)
        return image

    monkeypatch.setattr(common, "load_image", recording)
    common.decode_image.clear()
    at = start()
    at.file_uploader(key="explore_uploads").set_value(files).run()
    assert len(decoded) == 1 + cap  # the example on opening, then the first `cap` uploads only
    # Every upload's kept copy: the long side scaled from 2400 to DISPLAY_SIDE, the aspect ratio kept.
    assert kept[1:] == [(side[1] * DISPLAY_SIDE // side[0], DISPLAY_SIDE)] * cap, kept
    assert not at.exception and main_errors(at) == []
    warnings = [w.value for w in at.main.warning]
    assert len(warnings) == 1, warnings
    assert f"{cap + 3} images uploaded" in warnings[0] and f"at most {cap}" in warnings[0]
    ignored = [name for name, _, _ in files[cap:]]
    assert all(f"**{name}**" in warnings[0] for name in ignored)
    # The first `cap` are opened (and only those are decoded); the newest of them is shown.
    assert set(at.radio(key="explore_choice").options) == {name for name, _, _ in files[:cap]} | {
        common.examples()[0].name}
    assert any(f"**{files[cap - 1][0]}**" in c.value for c in at.caption)
    # At the cap exactly: no message.
    at.file_uploader(key="explore_uploads").set_value(files[:cap]).run()
    assert not at.main.warning and not at.exception


def test_display_changes_never_rerun_the_analysis(app_env: Path, monkeypatch: pytest.MonkeyPatch):
    """Sliders, colour maps, blocks, query patch, views and tabs redraw from the one analysis of the image."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[1].shape)
        return analyze_pair(*args, **kwargs)

    monkeypatch.setattr(common, "analyze_pair", counting)
    common.analyze_cached.clear()
    at = start()
    at.file_uploader(key="explore_uploads").set_value([("a.png", png_bytes((48, 40), seed=9), "image/png")]).run()
    assert not at.exception and len(calls) == 2  # the example on opening, then the upload
    first_tiles = at.main.image[1].value
    at.sidebar.slider(key="explore_alpha").set_value(0.9).run()
    at.sidebar.selectbox(key="explore_cmap").set_value("viridis").run()
    at.sidebar.radio(key="explore_scale").set_value("shared").run()
    at.selectbox(key="explore_sblock").set_value(0).run()
    at.segmented_control(key="explore_query_kind").set_value("patch").run()
    at.segmented_control(key="explore_view").set_value("mean").run()
    for tab in ("Rollout", "Agreement", "Export", "Head attention"):
        open_tab(at, tab)
    assert not at.exception and main_errors(at) == []
    assert at.main.image[1].value != first_tiles  # the maps were redrawn with the new settings
    assert len(calls) == 2, calls


def test_overlays_are_rendered_once_and_shared_by_sessions(app_env: Path, monkeypatch: pytest.MonkeyPatch):
    import vitkd.maps

    calls = []
    real = vitkd.maps.compare_heads
    monkeypatch.setattr(vitkd.maps, "compare_heads", lambda *a, **k: calls.append(a[1:3]) or real(*a, **k))
    common.rendered.clear()
    at = start()
    assert len(calls) == 1
    open_tab(at, "Rollout")
    open_tab(at, "Head attention")
    start()  # another session, same image and settings: served from the cache
    assert len(calls) == 1
    at.sidebar.selectbox(key="explore_cmap").set_value("viridis").run()
    assert len(calls) == 2 and not at.exception


def test_image_sent_from_another_page(app_env: Path):
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    data = png_bytes((36, 50), seed=3)
    at.session_state[common.EXPLORE_IMAGE_KEY] = {"name": "from-scan.png", "bytes": data, "label": 3}
    at.run()
    assert not at.exception
    assert any("**from-scan.png**" in c.value and "true class: **cat**" in c.value for c in at.caption)
    assert chart_titles(at)[:2] == expected_titles(app_env, "tiny-student-distilled.safetensors", data)
    assert common.EXPLORE_IMAGE_KEY not in at.session_state  # consumed once

    at.session_state[common.EXPLORE_IMAGE_KEY] = {"name": "empty.png", "bytes": b"", "label": None}
    at.run()
    assert not at.exception
    assert any("empty.png" in e and "0 bytes" in e for e in main_errors(at))


def test_no_checkpoints_gives_instructions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("VITKD_TORCH_THREADS", "0")  # leave this process's thread count alone
    monkeypatch.setattr(common, "BUNDLED_CHECKPOINTS", tmp_path / "none")
    monkeypatch.setenv("VITKD_CHECKPOINT_DIRS", str(tmp_path / "also-none"))
    monkeypatch.setenv("VITKD_RUNS_DIR", str(tmp_path / "runs"))
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    assert not at.exception
    assert any("No checkpoints found" in i.value and "VITKD_CHECKPOINT_DIRS" in i.value for i in at.sidebar.info)
    assert any("compatible teacher and student" in i.value for i in at.main.info)


def test_every_app_cache_is_bounded_by_entries():
    """Each ``st.cache_data``/``st.cache_resource`` in app/ says how many entries it keeps (memory stays bounded)."""
    unbounded = []
    for path in sorted((APP.parent).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            bare = [d for d in getattr(node, "decorator_list", []) if isinstance(d, ast.Attribute)]  # @st.cache_data
            calls = [node] if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) else []
            unbounded += [f"{path.name}:{d.lineno}" for d in bare if d.attr in ("cache_data", "cache_resource")]
            unbounded += [f"{path.name}:{c.lineno}" for c in calls if c.func.attr in ("cache_data", "cache_resource")
                          and not any(k.arg == "max_entries" for k in c.keywords)]
    assert not unbounded, unbounded


# --------------------------------------------------------------------------------------------- configuration

def test_server_config_precedence(tmp_path: Path):
    env = {"VITKD_CHECKPOINT_DIRS": os.pathsep.join([str(tmp_path / "a"), str(tmp_path / "b")]),
           "VITKD_DATA_ROOTS": str(tmp_path / "data"), "VITKD_ENABLE_TRAINING": "0"}
    config = common.parse_server_config(["-x", "tests/foo.py", "--checkpoint-dir", str(tmp_path / "c")], env, 20)
    assert config.checkpoint_dirs == (common.BUNDLED_CHECKPOINTS, tmp_path / "c", tmp_path / "a", tmp_path / "b")
    assert config.data_roots == (tmp_path / "data", *(common.SAMPLES_DIR / n for n in common.SAMPLE_ROOTS),
                                 common.EXAMPLES_DIR)
    assert config.training_enabled is False and config.max_upload_mb == 20
    assert config.runs_dir == common.DEFAULT_RUNS_DIR
    assert common.parse_server_config(["--enable-training"], env).training_enabled is True
    # no address means every interface (as in Docker): off; a local server: on
    assert common.parse_server_config([], {}).training_enabled is False
    assert common.parse_server_config([], {}, server_address="127.0.0.1").training_enabled is True
    assert common.parse_server_config(["--disable-training"], {}).training_enabled is False
    assert common.parse_server_config(["--checkpoint-dir"], {}).checkpoint_dirs == (common.BUNDLED_CHECKPOINTS,)
    assert config.torch_threads == 1
    assert common.parse_server_config(["--torch-threads", "4"], {"VITKD_TORCH_THREADS": "2"}).torch_threads == 4
    assert common.parse_server_config([], {"VITKD_TORCH_THREADS": "0"}).torch_threads == 0


def test_listing_includes_finished_runs_and_skips_state_files(tmp_path: Path, ckpt_dir: Path):
    runs = tmp_path / "runs"
    (runs / "r1").mkdir(parents=True)
    (runs / "r1" / "last.safetensors").write_bytes((ckpt_dir / "tiny-teacher.safetensors").read_bytes())
    (runs / "r1" / "last.state.safetensors").write_bytes(b"state")
    (runs / "r2").mkdir()  # an unfinished run: nothing to list
    config = common.ServerConfig((tmp_path / "nothing",), (), True, runs, 20)
    entries = common.list_checkpoints(config)
    assert [(e.label, e.error) for e in entries] == [("runs/r1/last", None)]
    assert entries[0].meta["class_names"] == CIFAR
