"""End to end in headless Chromium: a real ``streamlit run`` server, uploads through the page's file input.

Checks that an uploaded image's predictions and maps render without an exception box, that
two browser sessions uploading different images each see their own, and that a teacher and a
student with different patch grids (8x8 and 4x4) are shown side by side. Expected predictions are
computed here, independently of the server, from the pair the server picks by default.
Skipped only outside CI when Chromium is missing; in CI (``CI=true``) a missing Chromium fails.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("vitkd_screenshot", REPO_ROOT / "scripts" / "screenshot.py")
driver = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(driver)

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def chromium_path() -> str:
    if not Path(driver.CHROMIUM).exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"Chromium not found at {driver.CHROMIUM}: the browser test must run in CI")
        pytest.skip(f"Chromium not found at {driver.CHROMIUM}")
    return driver.CHROMIUM


@pytest.fixture(scope="module")
def server(chromium_path: str, tiny_pair, tmp_path_factory: pytest.TempPathFactory):
    """The app on a free port, seeing the tiny checkpoint pair (plus whatever checkpoints/ bundles)."""
    root = tmp_path_factory.mktemp("browser")
    checkpoints = root / "checkpoints"
    checkpoints.mkdir()
    shutil.copy(tiny_pair.teacher, checkpoints / "tiny-teacher.safetensors")
    shutil.copy(tiny_pair.student, checkpoints / "tiny-student.safetensors")
    env = dict(os.environ, VITKD_CHECKPOINT_DIRS=str(checkpoints), VITKD_RUNS_DIR=str(root / "runs"),
               VITKD_ENABLE_TRAINING="0")
    env.pop("VITKD_DATA_ROOTS", None)
    with driver.streamlit_server(env, root / "server.log") as url:
        yield url, env


@pytest.fixture(scope="module")
def grid_server(chromium_path: str, tiny_pair, tmp_path_factory: pytest.TempPathFactory):
    """The app seeing the tiny pair (plus whatever checkpoints/ bundles) and a student with twice the default
    teacher's patch size: a 4x4 grid where the teacher has 8x8. Yields the URL, the environment, the default
    teacher's path and the coarse student's."""
    import torch

    from app.common import default_pair, list_checkpoints, parse_server_config
    from vitkd.attention import token_layout
    from vitkd.checkpoint import load_checkpoint, save_checkpoint
    from vitkd.models import build_model

    root = tmp_path_factory.mktemp("browser-grids")
    checkpoints = root / "grids"
    checkpoints.mkdir()
    shutil.copy(tiny_pair.teacher, checkpoints / "tiny-teacher.safetensors")
    env = dict(os.environ, VITKD_CHECKPOINT_DIRS=str(checkpoints), VITKD_RUNS_DIR=str(root / "runs"),
               VITKD_ENABLE_TRAINING="0")
    env.pop("VITKD_DATA_ROOTS", None)
    teacher_entry, _ = default_pair([e for e in list_checkpoints(parse_server_config([], env)) if e.error is None])
    teacher, meta = load_checkpoint(teacher_entry.path)
    patch = int(teacher.patch_embed.patch_size[0]) * 2
    torch.manual_seed(0)
    coarse = build_model("cifar-student", len(meta["class_names"]), img_size=int(meta["img_size"]), depth=2,
                         patch_size=patch).eval()
    assert token_layout(coarse).grid_size != token_layout(teacher).grid_size
    student = save_checkpoint(coarse, {k: meta[k] for k in ("class_names", "mean", "std", "img_size")}
                              | {"kind": "supervised"}, checkpoints / "tiny-student-coarse.safetensors")
    with driver.streamlit_server(env, root / "server.log") as url:
        yield url, env, Path(teacher_entry.path), student


@pytest.fixture(scope="module")
def browser(chromium_path: str):
    with driver.chromium() as instance:
        yield instance


def _write_image(path: Path, color: tuple[int, int, int], seed: int) -> Path:
    """A 48x40 photo-like image (not the model's 32 px, so the page has to resize and crop it)."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.asarray(color, dtype=np.float64) + rng.normal(0, 25, size=(40, 48, 3)), 0, 255)
    pixels[10:22, 14:30] = 250
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def _expected_titles(env: dict[str, str], image: Path) -> dict[str, tuple[str, float]]:
    """Top-1 (class, probability) per model for the pair the server shows by default, computed here."""
    from app.common import default_pair, list_checkpoints, parse_server_config
    from vitkd.analysis import analyze_pair
    from vitkd.images import load_image
    from vitkd.pairs import load_pair

    config = parse_server_config([], env)
    teacher, student = default_pair([e for e in list_checkpoints(config) if e.error is None])
    analysis = analyze_pair(load_pair(teacher.path, student.path), load_image(image))
    return {role: (result.top_k[0].name, float(result.top_k[0].prob))
            for role, result in (("Teacher", analysis.teacher), ("Student", analysis.student))}


def _check_predictions(page, expected: dict[str, tuple[str, float]]) -> None:
    shown = driver.prediction_titles(page)
    assert set(shown) == {"Teacher", "Student"}, shown
    for role, (name, prob) in expected.items():
        shown_name, shown_prob = shown[role].rsplit(" (", 1)
        assert shown_name == name, (role, shown[role], expected)
        assert float(shown_prob.rstrip("%)")) == pytest.approx(100 * prob, abs=0.11)


def _no_exception(page) -> None:
    boxes = page.locator(driver.EXCEPTION)
    assert boxes.count() == 0, boxes.first.inner_text()


def test_upload_renders_predictions_and_maps(server, browser, tmp_path: Path) -> None:
    url, env = server
    image = _write_image(tmp_path / "upload-red.png", (200, 40, 40), seed=1)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        driver.open_app(page, url)
        _no_exception(page)
        driver.start_upload(page, image)
        driver.wait_for_image(page, image.name)
        _no_exception(page)
        _check_predictions(page, _expected_titles(env, image))
        # The head maps: one tile per teacher and student head of the shown blocks, all decoded images.
        assert page.locator('[data-testid="stImage"] img').count() >= 8
        assert page.get_by_text("Student, block").count() >= 1
        page.screenshot(path=str(tmp_path / "explore.png"), full_page=True)
        # Exports are built when their button is clicked (deferred), by the server that shows the page.
        page.get_by_role("tab", name="Export").click()
        downloads = {}
        for label in ("Overlays (PNG)", "Numbers (JSON)"):
            with page.expect_download(timeout=60_000) as download:
                page.get_by_role("button", name=label).click()
            downloads[label] = Path(download.value.path()).read_bytes()
        with Image.open(io.BytesIO(downloads["Overlays (PNG)"])) as png:
            assert png.format == "PNG" and png.width >= 8 * 150  # a row of teacher head maps at least
        assert json.loads(downloads["Numbers (JSON)"])["image"] == image.name
    finally:
        page.close()


def test_upload_to_a_pair_with_different_patch_grids(grid_server, browser, tmp_path: Path) -> None:
    """Pick the coarse student in the sidebar, upload an image: both models' predictions and head maps."""
    from vitkd.analysis import analyze_pair
    from vitkd.images import load_image
    from vitkd.pairs import load_pair

    url, _, teacher, student = grid_server
    image = _write_image(tmp_path / "upload-grids.png", (40, 160, 200), seed=5)
    pair = load_pair(teacher, student)
    assert pair.model_layout("teacher").grid_size != pair.model_layout("student").grid_size
    analysis = analyze_pair(pair, load_image(image))
    expected = {role: (result.top_k[0].name, float(result.top_k[0].prob))
                for role, result in (("Teacher", analysis.teacher), ("Student", analysis.student))}
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        driver.open_app(page, url)
        driver.pick_model(page, "student", "grids/tiny-student-coarse")
        _no_exception(page)
        driver.start_upload(page, image)
        driver.wait_for_image(page, image.name)
        _no_exception(page)
        _check_predictions(page, expected)
        heads = analysis.student.num_heads
        assert page.get_by_text(f"S1.h{heads - 1}", exact=True).count() == 1  # the student's maps, own grid
        page.screenshot(path=str(tmp_path / "grids.png"), full_page=True)
    finally:
        page.close()


def test_two_sessions_each_see_their_own_image(server, browser, tmp_path: Path) -> None:
    url, env = server
    images = [_write_image(tmp_path / "session-a-red.png", (200, 40, 40), seed=2),
              _write_image(tmp_path / "session-b-blue.png", (40, 40, 200), seed=3)]
    contexts = []
    try:
        for _ in images:  # each one closed below even if opening the next fails
            contexts.append(browser.new_context(viewport={"width": 1400, "height": 1000}))
        pages = [context.new_page() for context in contexts]
        for page in pages:
            driver.open_app(page, url)
        for page, image in zip(pages, images, strict=True):  # both uploads in flight at once
            driver.start_upload(page, image)
        for page, image in zip(pages, images, strict=True):
            driver.wait_for_image(page, image.name)
        for page, image, other in zip(pages, images, images[::-1], strict=True):
            _no_exception(page)
            text = page.inner_text("body")
            assert f"{image.name} (" in text and other.name not in text
            _check_predictions(page, _expected_titles(env, image))
            page.screenshot(path=str(tmp_path / f"{image.stem}.png"), full_page=True)
    finally:
        for context in contexts:
            context.close()


def _rerun_requests(page) -> list[str]:
    """Every script rerun the page asks the server for, as its fragment id ("" for a full run of the page)."""
    from streamlit.proto.BackMsg_pb2 import BackMsg

    requests: list[str] = []

    def on_frame(payload: str | bytes) -> None:
        if isinstance(payload, bytes):
            msg = BackMsg.FromString(payload)
            if msg.WhichOneof("type") == "rerun_script":
                requests.append(msg.rerun_script.fragment_id)

    page.on("websocket", lambda ws: ws.on("framesent", on_frame))
    return requests


def test_display_controls_rerun_only_their_fragment(server, browser, tmp_path: Path) -> None:
    url, _ = server
    image = _write_image(tmp_path / "upload-green.png", (40, 200, 40), seed=4)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        requests = _rerun_requests(page)
        driver.open_app(page, url)
        assert requests and requests[0] == "", requests  # opening the page runs all of it
        requests.clear()
        driver.start_upload(page, image)
        driver.wait_for_image(page, image.name)
        assert requests and all(requests), requests  # an upload reruns the images' part, not the sidebar
        upload_fragment = requests[-1]
        requests.clear()
        page.get_by_text("max of heads", exact=True).click()  # the heads tab's own control
        page.get_by_text("max of heads", exact=False).nth(1).wait_for(timeout=60_000)  # a tile caption
        driver.wait_idle(page)
        page.get_by_text("patch", exact=True).click()  # a control of the whole analysis view
        page.get_by_label("Row").wait_for(timeout=60_000)
        driver.wait_idle(page)
        _no_exception(page)
        assert len(requests) >= 2 and all(requests), requests  # fragment reruns only, never the whole page
        assert upload_fragment not in requests  # nor the images' part: no decode, no analysis
    finally:
        page.close()
