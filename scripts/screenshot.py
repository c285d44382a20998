"""Screenshot of the explorer for the README (``docs/explorer.png``), and the browser driver the tests share.

Usage: ``python scripts/screenshot.py [--image app/examples/cat_0001.jpg] [--out docs/explorer.png]
[--checkpoint-dir DIR --teacher LABEL --student LABEL] [--student-block N] [--patch-query] [--tab NAME]``.
It starts ``streamlit run app/streamlit_app.py`` on a free port with the bundled checkpoints
(``checkpoints/``, the app's default pair), uploads the image in headless Chromium, waits for
the maps and saves a full-page screenshot. ``tests/test_browser.py`` drives the app with the
same functions, so the picture shows what the test checks.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
APP = REPO_ROOT / "app" / "streamlit_app.py"
CHROMIUM = os.environ.get("VITKD_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
UPLOAD_INPUT = '[data-testid="stFileUploader"] input[type="file"]'
EXCEPTION = '[data-testid="stException"]'


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(url: str, process: subprocess.Popen, log_path: Path, timeout: float) -> None:
    """Poll Streamlit's ``/_stcore/health`` until it answers 200; fail early if the server died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"streamlit exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError), \
                urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(0.25)
    raise TimeoutError(f"streamlit not healthy after {timeout:.0f}s:\n{log_path.read_text()[-3000:]}")


def stop_process_group(process: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM the process's whole group (started with ``start_new_session=True``), SIGKILL it if it is still
    there after ``timeout`` s, and reap it: no server or browser child outlives a test or a bench."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)


@contextlib.contextmanager
def streamlit_server(env: Mapping[str, str], log_path: Path, timeout: float = 120.0) -> Iterator[str]:
    """Run the app headless on a free local port; yields its URL and always stops it (the whole group)."""
    port = free_port()
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless", "true",
           "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
           "--server.fileWatcherType", "none"]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(cmd, cwd=REPO_ROOT, env=dict(env), stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, log_path, timeout)
        yield url
    finally:
        stop_process_group(process)


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """Headless Chromium (the system one) through Playwright."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def wait_idle(page: Any, timeout_ms: int = 60_000) -> None:
    """Wait until the script run is over (no "Running" status) and every image has loaded."""
    page.wait_for_function(
        """() => {
            const running = document.querySelector('[data-testid="stStatusWidget"]');
            const images = Array.from(document.querySelectorAll('[data-testid="stImage"] img'));
            return !running && images.every(img => img.complete && img.naturalWidth > 0);
        }""", timeout=timeout_ms, polling=250)


def open_app(page: Any, url: str, timeout_ms: int = 60_000) -> None:
    page.goto(url, wait_until="domcontentloaded", timeout=timeout_ms)
    page.locator(UPLOAD_INPUT).wait_for(state="attached", timeout=timeout_ms)
    wait_idle(page, timeout_ms)


def start_upload(page: Any, image: Path) -> None:
    page.locator(UPLOAD_INPUT).set_input_files(str(image))


def wait_for_image(page: Any, name: str, timeout_ms: int = 90_000) -> None:
    """Wait until Explore shows ``name`` (its crop is captioned "<name> (<n> px crop ...)") and its maps."""
    page.get_by_text(f"{name} (").first.wait_for(timeout=timeout_ms)
    page.get_by_text("Teacher, block").first.wait_for(timeout=timeout_ms)
    wait_idle(page, timeout_ms)


def pick_model(page: Any, role: str, label: str) -> None:
    """Choose ``label`` (a checkpoint as the sidebar lists it) in the sidebar's Teacher or Student picker and
    wait until the page compares with it."""
    picker = page.locator('[data-testid="stSidebar"] [data-testid="stSelectbox"]').nth(
        {"teacher": 0, "student": 1}[role])
    picker.click()
    page.get_by_role("option", name=label, exact=True).click()
    page.get_by_text(f"{label} ({role})").first.wait_for(timeout=60_000)  # the pair in use
    wait_idle(page)


def prediction_titles(page: Any) -> dict[str, str]:
    """The top-1 titles of the two prediction charts, e.g. ``{"Teacher": "cat (71.3%)", "Student": ...}``."""
    titles = page.locator('[data-testid="stPlotlyChart"] .gtitle').all_text_contents()  # SVG: no innerText
    return dict(t.split(": ", 1) for t in titles if t.startswith(("Teacher: ", "Student: ")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, default=REPO_ROOT / "app" / "examples" / "cat_0001.jpg")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "explorer.png")
    parser.add_argument("--checkpoint-dir", type=Path, default=None,
                        help="extra checkpoint folder (the bundled checkpoints/ are always searched first)")
    parser.add_argument("--teacher", default=None, metavar="LABEL",
                        help="pick this checkpoint as teacher, as the sidebar lists it (default: the default pair)")
    parser.add_argument("--student", default=None, metavar="LABEL", help="pick this checkpoint as student")
    parser.add_argument("--student-block", type=int, default=None, metavar="N",
                        help="show this student block (default: the one the page pairs with the teacher's)")
    parser.add_argument("--patch-query", action="store_true",
                        help="maps of the middle patch's attention instead of the CLS token's")
    parser.add_argument("--tab", default=None, metavar="NAME",
                        help="open this tab of the analysis (e.g. Agreement) before the screenshot")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--max-height", type=int, default=2400, help="crop the page below this many pixels")
    args = parser.parse_args(argv)
    found = sorted((REPO_ROOT / "checkpoints").glob("*.safetensors"))
    if args.checkpoint_dir is not None:
        found += sorted(args.checkpoint_dir.glob("*.safetensors")) + sorted(args.checkpoint_dir.glob("*/*.safetensors"))
    if not found:
        print("error: no checkpoints in checkpoints/ (the bundled pair); train them first (see README) or pass "
              "--checkpoint-dir", file=sys.stderr)
        return 2
    if not Path(CHROMIUM).exists():
        print(f"error: no Chromium at {CHROMIUM}; set VITKD_CHROMIUM", file=sys.stderr)
        return 2
    env = dict(os.environ, VITKD_ENABLE_TRAINING="0")
    env.pop("VITKD_CHECKPOINT_DIRS", None)
    if args.checkpoint_dir is not None:
        env["VITKD_CHECKPOINT_DIRS"] = str(args.checkpoint_dir.resolve())
    log_path = args.out.parent / ".screenshot-server.log"
    with streamlit_server(env, log_path) as url, chromium() as browser:
        page = browser.new_page(viewport={"width": args.width, "height": 1000}, device_scale_factor=1)
        open_app(page, url)
        for role in ("teacher", "student"):
            if getattr(args, role):
                pick_model(page, role, getattr(args, role))
        start_upload(page, args.image)
        wait_for_image(page, args.image.name)
        if page.locator(EXCEPTION).count():
            print(f"error: the page shows an exception:\n{page.locator(EXCEPTION).first.inner_text()}",
                  file=sys.stderr)
            return 1
        titles = prediction_titles(page)
        if args.student_block is not None:
            page.locator('[data-testid="stSelectbox"]').filter(has_text="Student block").get_by_role("combobox").click()
            page.keyboard.type(str(args.student_block))  # the list filters to the typed block
            page.keyboard.press("Enter")
            wait_idle(page)
        if args.patch_query:
            page.get_by_text("patch", exact=True).click()
            wait_idle(page)
        if args.tab:
            page.get_by_role("tab", name=args.tab).click()
            wait_idle(page)
            page.wait_for_timeout(1000)  # plotly draws after the script run ends
        # The app scrolls inside its own container, so grow the window to the content instead of full_page.
        height = page.evaluate(
            "() => document.querySelector('[data-testid=\"stMainBlockContainer\"]').scrollHeight")
        page.set_viewport_size({"width": args.width, "height": min(max(1000, int(height) + 80), args.max_height)})
        wait_idle(page)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(args.out))
    log_path.unlink(missing_ok=True)
    print(f"wrote {args.out}: " + ", ".join(f"{role} {title}" for role, title in titles.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
