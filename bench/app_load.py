"""Server cost of the explorer under real browsers: CPU-seconds per session, latency with 1, 4 and 8 sessions,
and peak memory while three tabs upload twenty 49-megapixel PNGs each.

Starts ``streamlit run app/streamlit_app.py --server.headless=true --server.port=FREE`` with the bundled
checkpoints (the app's default pair) and drives headless Chromium sessions through Playwright the way
``tests/test_browser.py`` does (``scripts/screenshot.py`` holds the shared browser settings):

- **latency**: one warm-up session loads the models (not counted). Then, for each level N, N browser
  contexts open the page (each its own Streamlit session), wait until it is idle, and upload one image
  each at the same instant (each session a different photo-like JPEG, so nothing is shared through the
  caches). Latency is from ``set_input_files`` to both prediction charts of that image being on the page
  (fresh, not the stale elements of the previous run), and to the whole page being idle (maps loaded).
  Server CPU-seconds per session are the server process's ``utime + stime`` (``/proc/<pid>/stat``)
  over the whole level (opening, uploading, rendering, closing), divided by the sessions.
- **memory**: three tabs each upload the same twenty 7000x7000 mostly flat PNGs (~150 KB each) at once;
  the server's peak resident memory (``VmHWM`` after resetting it through ``/proc/<pid>/clear_refs``,
  and a 50 ms sampler of ``VmRSS``) minus its resident memory just before.

    python bench/app_load.py [--sessions 1,4,8] [--rounds 3] [--skip memory|latency]
                             [--tabs 3] [--big-images 20] [--big-side 7000] [--app OTHER/app/streamlit_app.py]

Chromium runs on the same machine as the server, so its CPU competes with the server's for the cores;
the latencies include that, the CPU-seconds do not. The load average is printed: a training job on the
same cores slows everything down.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("vitkd_screenshot", REPO_ROOT / "scripts" / "screenshot.py")
driver = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(driver)

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
TIMEOUT_MS = 600_000
VIEWPORT = {"width": 1400, "height": 1000}

# Both prediction charts and the caption naming ``name`` are on the page and fresh (not left over, faded,
# from the previous script run). textContent, not innerText: a check must not force a layout of the page.
# Opens a check of the caption naming ``name``, counting only elements not left over (stale) from a previous run.
_FRESH_CAPTION = """(name) => {
    const fresh = el => {
        const box = el.closest('[data-testid="stElementContainer"]');
        return box !== null && box.getAttribute('data-stale') !== 'true';
    };
    const caption = Array.from(document.querySelectorAll('[data-testid="stCaptionContainer"]'))
        .some(el => fresh(el) && el.textContent.includes(name + " ("));
"""
PREDICTIONS_SHOWN = _FRESH_CAPTION + """\
    const titles = Array.from(document.querySelectorAll('[data-testid="stPlotlyChart"] .gtitle'))
        .filter(fresh).map(t => t.textContent);
    return caption && titles.some(t => t.startsWith("Teacher: ")) && titles.some(t => t.startsWith("Student: "));
}"""
# Same caption, the script no longer running, the head maps' heading there and every image loaded.
PAGE_DONE = _FRESH_CAPTION + """\
    const maps = Array.from(document.querySelectorAll('[data-testid="stMarkdownContainer"]'))
        .some(el => el.textContent.includes("Teacher, block"));
    const running = document.querySelector('[data-testid="stStatusWidget"]');
    const images = Array.from(document.querySelectorAll('[data-testid="stImage"] img'));
    return caption && maps && !running && images.every(img => img.complete && img.naturalWidth > 0);
}"""
IDLE = """() => {
    const running = document.querySelector('[data-testid="stStatusWidget"]');
    const images = Array.from(document.querySelectorAll('[data-testid="stImage"] img'));
    return !running && images.every(img => img.complete && img.naturalWidth > 0);
}"""


# ----------------------------------------------------------------------------------------------- the server

def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (not its children), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15 of stat(5)


def browser_cpu_seconds(server_pid: int | None) -> float:
    """utime + stime of every live process this bench started except the server: Chromium and Playwright's
    driver (a process that exited in between is missed, so this reads low, never high)."""
    parents, times = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(stat.parent.name)
        parents[pid], times[pid] = int(fields[1]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    me, total = os.getpid(), 0.0
    for pid, seconds in times.items():
        ancestor = pid
        while ancestor not in (0, 1, me, server_pid) and ancestor in parents:
            ancestor = parents[ancestor]
        if ancestor == me and pid != me:
            total += seconds
    return total


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak resident) in kB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux: ``echo 5 > /proc/<pid>/clear_refs``); False where not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@dataclass
class Server:
    url: str
    pid: int
    log: Path


@contextlib.contextmanager
def streamlit_server(log: Path, app: Path = driver.APP) -> Iterator[Server]:
    """``streamlit run app/streamlit_app.py`` headless on a free port, bundled checkpoints, training off.

    ``app``: the entrypoint of another checkout to measure (run from that checkout's root)."""
    env = dict(os.environ, VITKD_ENABLE_TRAINING="0")
    for name in ("VITKD_CHECKPOINT_DIRS", "VITKD_DATA_ROOTS"):
        env.pop(name, None)
    port = driver.free_port()
    cmd = [sys.executable, "-m", "streamlit", "run", str(app), "--server.headless=true",
           f"--server.port={port}", "--server.address=127.0.0.1", "--browser.gatherUsageStats=false",
           "--server.fileWatcherType=none"]
    with open(log, "ab") as out:
        process = subprocess.Popen(cmd, cwd=app.resolve().parents[1], env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        driver.wait_healthy(url, process, log, 120.0)
        yield Server(url, process.pid, log)
    finally:
        driver.stop_process_group(process)


class RssSampler:
    """Largest VmRSS seen every ``interval`` seconds while running (a cross-check of VmHWM)."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid, self.interval, self.peak_kb = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                self.peak_kb = max(self.peak_kb, memory_kb(self.pid)["VmRSS"])
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ----------------------------------------------------------------------------------------------- images

def photo_jpeg(path: Path, seed: int, size: tuple[int, int] = (1600, 1200)) -> Path:
    """A photo-like JPEG: smooth colour blobs plus noise, different for every seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    coarse = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    pixels = np.clip(smooth + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path


def big_flat_png(path: Path, index: int, side: int) -> Path:
    """A ``side`` x ``side`` RGB PNG, one flat colour with one rectangle: ~150 KB on disk at 7000 px."""
    color = np.array([(37 * index) % 256, (91 * index + 40) % 256, (53 * index + 120) % 256], dtype=np.uint8)
    pixels = np.empty((side, side, 3), dtype=np.uint8)
    pixels[:] = color
    top = (index * side // 29) % (side // 2)
    pixels[top:top + side // 4, side // 8:side // 2] = 255 - color
    Image.fromarray(pixels).save(path, compress_level=9)
    return path


# ----------------------------------------------------------------------------------------------- sessions

@dataclass
class SessionTimes:
    open_s: float = 0.0
    predictions_s: float = 0.0
    done_s: float = 0.0
    errors: list[str] = field(default_factory=list)


async def run_session(browser, url: str, files: list[Path], barrier: asyncio.Barrier | None,
                      timeout_ms: int = TIMEOUT_MS) -> SessionTimes:
    """Open the page in a new context, wait for every session to be open, upload ``files``, wait for the last."""
    times = SessionTimes()
    context = await browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(timeout_ms)
    try:
        page = await context.new_page()
        start = time.perf_counter()
        await page.goto(url, wait_until="domcontentloaded", timeout=timeout_ms)
        await page.locator(driver.UPLOAD_INPUT).wait_for(state="attached", timeout=timeout_ms)
        await page.wait_for_function(IDLE, timeout=timeout_ms, polling=100)
        times.open_s = time.perf_counter() - start
        if barrier is not None:
            await barrier.wait()  # every page is open and idle ...
            await barrier.wait()  # ... and the browsers are done with the pages' code (see ``settle``)
        name = files[-1].name  # the page shows the newest upload
        start = time.perf_counter()
        await page.locator(driver.UPLOAD_INPUT).set_input_files([str(f) for f in files])
        await page.wait_for_function(PREDICTIONS_SHOWN, arg=name, timeout=timeout_ms, polling=100)
        times.predictions_s = time.perf_counter() - start
        await page.wait_for_function(PAGE_DONE, arg=name, timeout=timeout_ms, polling=100)
        times.done_s = time.perf_counter() - start
        boxes = page.locator(driver.EXCEPTION)
        if await boxes.count():
            times.errors.append(await boxes.first.inner_text())
        if barrier is not None:
            await barrier.wait()  # every page is done (read the browsers' CPU before any of them closes)
    finally:
        await context.close()
    return times


async def settle(pid: int | None, pages: int, quiet: float = 0.05, limit: float = 60.0) -> None:
    """Wait until the browsers use less than ``quiet`` CPU-seconds per page per second (at most ``limit`` s).

    A page reports idle long before Chromium is done with it: it keeps compiling the app's JavaScript
    (plotly.js among it) for seconds. Uploads that start then are slowed by that, not by the app, so
    every session uploads once the browsers are quiet, as a person picking a file would."""
    deadline, last = time.monotonic() + limit, browser_cpu_seconds(pid)
    while time.monotonic() < deadline:
        await asyncio.sleep(1.0)
        now = browser_cpu_seconds(pid)
        if now - last < quiet * pages:
            return
        last = now


@dataclass
class Level:
    sessions: list[SessionTimes]
    cpu_open: float  # server CPU-seconds while the sessions opened the page
    cpu_upload: float  # ... and from the uploads until the sessions closed
    browser_upload: float  # Chromium's CPU-seconds from the uploads until every page was done


async def run_level(browser, url: str, uploads: list[list[Path]], pid: int | None = None) -> Level:
    """Sessions open the page together, then upload together; the server's CPU is read between the phases."""
    barrier = asyncio.Barrier(len(uploads) + 1)  # the sessions and this coordinator
    marks = [cpu_seconds(pid)] if pid else []
    client: list[float] = []

    async def coordinate() -> None:
        await barrier.wait()  # every page is open and idle
        await settle(pid, len(uploads))
        if pid:
            marks.append(cpu_seconds(pid))
            client.append(browser_cpu_seconds(pid))
        await barrier.wait()  # go: every session uploads now
        await barrier.wait()  # every page shows its upload's maps
        if pid:
            client.append(browser_cpu_seconds(pid))

    *sessions, _ = await asyncio.gather(*(run_session(browser, url, files, barrier) for files in uploads),
                                        coordinate())
    if not pid:
        return Level(list(sessions), 0.0, 0.0, 0.0)
    await asyncio.sleep(0.5)  # let the server finish closing the sessions
    marks.append(cpu_seconds(pid))
    return Level(list(sessions), marks[1] - marks[0], marks[2] - marks[1], client[1] - client[0])


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, int(np.ceil(q / 100.0 * len(ordered))))
    return ordered[rank - 1]


async def bench_latency(server: Server, levels: list[int], rounds: int, work: Path) -> list[str]:
    from playwright.async_api import async_playwright

    seed = iter(range(10_000))
    rows = []
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=driver.CHROMIUM, args=driver.CHROMIUM_ARGS)
        try:
            warm = (await run_level(browser, server.url, [[photo_jpeg(work / "warmup.jpg", next(seed))]])).sessions
            print(f"warm-up session (loads the models): {warm[0].predictions_s:.2f} s to predictions, "
                  f"{warm[0].done_s:.2f} s to the full page", flush=True)
            for n in levels:
                results: list[SessionTimes] = []
                cpu_open = cpu_upload = client_cpu = 0.0
                for r in range(rounds):
                    uploads = [[photo_jpeg(work / f"s{n}-r{r}-{i}.jpg", next(seed))] for i in range(n)]
                    level = await run_level(browser, server.url, uploads, server.pid)
                    results += level.sessions
                    cpu_open, cpu_upload = cpu_open + level.cpu_open, cpu_upload + level.cpu_upload
                    client_cpu += level.browser_upload
                errors = [e for t in results for e in t.errors]
                pred = [t.predictions_s for t in results]
                done = [t.done_s for t in results]
                opened = [t.open_s for t in results]
                k = len(results)
                row = (f"| {n} | {k} | {(cpu_open + cpu_upload) / k:.2f} ({cpu_open / k:.2f} + {cpu_upload / k:.2f}) | "
                       f"{statistics.median(pred):.2f} | {percentile(pred, 95):.2f} | {statistics.median(done):.2f} | "
                       f"{percentile(done, 95):.2f} | {statistics.median(opened):.2f} | {client_cpu / k:.2f} | "
                       f"{len(errors)} |")
                print(row, flush=True)
                for error in errors[:3]:
                    print(f"  exception on the page: {error[:300]}", flush=True)
                rows.append(row)
        finally:
            await browser.close()
    return rows


async def bench_memory(server: Server, tabs: int, count: int, side: int, work: Path) -> str:
    from playwright.async_api import async_playwright

    folder = work / "big"
    folder.mkdir(exist_ok=True)
    files = [big_flat_png(folder / f"big{i:02d}.png", i, side) for i in range(count)]
    size_kb = sum(f.stat().st_size for f in files) / len(files) / 1024
    print(f"{count} PNGs of {side}x{side} ({side * side / 1e6:.0f} MP), {size_kb:.0f} KB each on average",
          flush=True)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=driver.CHROMIUM, args=driver.CHROMIUM_ARGS)
        try:
            context = await browser.new_context(viewport=VIEWPORT)
            context.set_default_timeout(TIMEOUT_MS)
            # Warm the models in this server first (a small upload), so the baseline holds them.
            warm = await run_level(browser, server.url, [[photo_jpeg(work / "mem-warmup.jpg", 99_999)]])
            del warm
            await asyncio.sleep(1.0)
            baseline = memory_kb(server.pid)["VmRSS"]
            exact = reset_peak(server.pid)
            with RssSampler(server.pid) as sampler:
                start = time.perf_counter()
                pages = [await context.new_page() for _ in range(tabs)]

                async def tab(page) -> None:
                    await page.goto(server.url, wait_until="domcontentloaded", timeout=TIMEOUT_MS)
                    await page.locator(driver.UPLOAD_INPUT).wait_for(state="attached", timeout=TIMEOUT_MS)
                    await page.wait_for_function(IDLE, timeout=TIMEOUT_MS, polling=100)
                    await page.locator(driver.UPLOAD_INPUT).set_input_files([str(f) for f in files])
                    await page.wait_for_function(PAGE_DONE, arg=files[-1].name, timeout=TIMEOUT_MS, polling=100)

                await asyncio.gather(*(tab(page) for page in pages))
                elapsed = time.perf_counter() - start
                held = memory_kb(server.pid)
            errors = [p for p in pages if await p.locator(driver.EXCEPTION).count()]
            await context.close()
        finally:
            await browser.close()
    peak = max(held["VmHWM"] if exact else 0, sampler.peak_kb)
    mb = 1024.0
    return (f"| {tabs} x {count} x {side}x{side} PNG ({size_kb:.0f} KB each) | {baseline / mb:.0f} | "
            f"{peak / mb:.0f} | {(peak - baseline) / mb:.0f} | {held['VmRSS'] / mb:.0f} | {elapsed:.1f} | "
            f"{'VmHWM' if exact else 'sampled'} | {len(errors)} |")


# ----------------------------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", default="1,4,8", help="comma-separated concurrent session counts")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per session count")
    parser.add_argument("--tabs", type=int, default=3)
    parser.add_argument("--big-images", type=int, default=20)
    parser.add_argument("--big-side", type=int, default=7000)
    parser.add_argument("--skip", action="append", default=[], choices=["latency", "memory"])
    parser.add_argument("--app", type=Path, default=driver.APP,
                        help="entrypoint to serve (default: this checkout's; e.g. an older checkout's, to compare)")
    args = parser.parse_args()
    if not Path(driver.CHROMIUM).exists():
        raise SystemExit(f"no Chromium at {driver.CHROMIUM} (apt-get install chromium, or set VITKD_CHROMIUM)")
    print(f"command: python {' '.join(sys.argv)}")
    print(f"app: {args.app}")
    print(f"{os.cpu_count()} CPUs, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}; "
          f"{platform.machine()}; python {platform.python_version()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="vitkd_app_load_") as tmp:
        work = Path(tmp)
        if "latency" not in args.skip:
            levels = [int(n) for n in args.sessions.split(",")]
            with streamlit_server(work / "server-latency.log", args.app) as server:
                print("\n| sessions at once | sessions | server CPU-s / session (open + upload) | "
                      "to predictions, median s | p95 s | "
                      "to full page, median s | p95 s | page open, median s | browser CPU-s / upload | exceptions |")
                print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
                asyncio.run(bench_latency(server, levels, args.rounds, work))
        if "memory" not in args.skip:
            with streamlit_server(work / "server-memory.log", args.app) as server:
                row = asyncio.run(bench_memory(server, args.tabs, args.big_images, args.big_side, work))
                print("\n| uploads | RSS before, MB | peak RSS, MB | growth, MB | RSS after, MB | time s | peak from | "
                      "exceptions |")
                print("|---|---|---|---|---|---|---|---|")
                print(row, flush=True)
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
