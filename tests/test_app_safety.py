"""Safe by default: who can reach the server and train from it, names shown literally, no server paths in
the browser, checkpoints listed from their headers.

- ``make run`` serves this machine only (checked on the listening socket of the exact command it runs);
  browser training is on only for such a local server or when enabled explicitly.
- ``escape_markdown``: a real Streamlit server renders hostile names through every Markdown element the
  pages use, and headless Chromium must read back exactly the name, with no link, image, emphasis or
  directive made from it; AppTest checks the sidebar escapes checkpoint names.
- No element any page sends (every proto AppTest sees) holds the repository's or pytest's absolute paths.
- ``checkpoint_shape`` (the Train page's checkpoint listing) builds nothing off the ``meta`` device.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import streamlit as st
import torch
from google.protobuf import text_format
from streamlit.testing.v1 import AppTest

from app import common
from vitkd.checkpoint import read_checkpoint_meta, save_checkpoint
from vitkd.errors import CheckpointError

REPO_ROOT = Path(__file__).resolve().parents[1]
APP = str(REPO_ROOT / "app" / "streamlit_app.py")
HOSTILE = "**x**[y](javascript:alert(1))<img src=x>.png"

_spec = importlib.util.spec_from_file_location("vitkd_screenshot", REPO_ROOT / "scripts" / "screenshot.py")
driver = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(driver)


# --------------------------------------------------------------------------------------------- bind address

def make_run_command(*variables: str) -> list[str]:
    """The streamlit command ``make run`` runs (from ``make -n``: printed, not run), as argv."""
    dry = subprocess.run(["make", "-s", "-n", "run", *variables], cwd=REPO_ROOT, capture_output=True, text=True,
                         check=True, timeout=30).stdout.replace("\\\n", " ")
    lines = [line for line in dry.splitlines() if " -m streamlit run " in line]
    assert len(lines) == 1, dry
    return shlex.split(lines[0])


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on ``port`` (from /proc/net/tcp and tcp6)."""
    found: set[str] = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                address, port_hex = fields[1].split(":")
                if fields[3] == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
                    raw = bytes.fromhex(address)
                    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # little-endian words
                    family = socket.AF_INET if width == 8 else socket.AF_INET6
                    found.add(socket.inet_ntop(family, words))
    return found


def outward_address() -> str | None:
    """This machine's address on its default route (no packet is sent), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("10.255.255.255", 1))
            address = sock.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


@contextlib.contextmanager
def started(argv: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """Run ``argv`` from the repository in its own process group; always stop the whole group."""
    with log.open("w") as out:
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        yield proc
    finally:
        driver.stop_process_group(proc)


@pytest.mark.slow
def test_make_run_serves_this_machine_only(tmp_path: Path) -> None:
    port = driver.free_port()
    argv = make_run_command(f"PORT={port}")
    assert f"--server.port={port}" in argv and "--server.address=127.0.0.1" in argv
    env = dict(os.environ, HOME=str(tmp_path), VITKD_RUNS_DIR=str(tmp_path / "runs"))
    env.pop("VITKD_ENABLE_TRAINING", None)
    with started(argv, env, tmp_path / "server.log") as proc:
        driver.wait_healthy(f"http://127.0.0.1:{port}", proc, tmp_path / "server.log", timeout=120)
        assert listening_addresses(port) == {"127.0.0.1"}, listening_addresses(port)
        address = outward_address()
        if address is not None:
            with pytest.raises(OSError), socket.create_connection((address, port), timeout=3):
                pass


def test_make_run_address_opens_the_server_on_request() -> None:
    assert "--server.address=127.0.0.1" in make_run_command()
    assert "--server.address=0.0.0.0" in make_run_command("ADDRESS=0.0.0.0")


@pytest.mark.parametrize("address, environ, argv, expected", [
    ("127.0.0.1", {}, [], True),
    ("localhost", {}, [], True),
    ("::1", {}, [], True),
    (None, {}, [], False),  # Streamlit's default: every interface
    ("0.0.0.0", {}, [], False),
    ("::", {}, [], False),
    ("10.1.2.3", {}, [], False),
    ("0.0.0.0", {"VITKD_ENABLE_TRAINING": "1"}, [], True),
    ("0.0.0.0", {}, ["--enable-training"], True),
    ("127.0.0.1", {"VITKD_ENABLE_TRAINING": "0"}, [], False),
    ("127.0.0.1", {}, ["--disable-training"], False),
])
def test_browser_training_is_on_for_a_local_server_or_when_enabled(address, environ, argv, expected) -> None:
    assert common.parse_server_config(argv, environ, server_address=address).training_enabled is expected


def test_train_page_follows_the_server_address(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("VITKD_ENABLE_TRAINING", raising=False)
    monkeypatch.setenv("VITKD_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setattr(common, "network_available", lambda *a, **k: False)
    at = AppTest.from_file(APP, default_timeout=60)
    at.switch_page("views/train.py")
    at.run()
    assert not at.exception
    assert any("Training from the browser is off" in i.value for i in at.info)  # AppTest: no address, like Docker

    real_get_option = st.get_option
    monkeypatch.setattr(common.st, "get_option",
                        lambda key: "127.0.0.1" if key == "server.address" else real_get_option(key))
    at.run()
    assert not at.exception
    assert not any("Training from the browser is off" in i.value for i in at.info)
    assert "New run" in [h.value for h in at.subheader]


# --------------------------------------------------------------------------------------------- Markdown

NAMES = [
    HOSTILE,
    "<script>alert(1)</script>.png",
    ":red[warn] :material/home: :smile: $x^2$ ~~gone~~ a_b_c.png",
    "www.evil.example.com.png",
    "mail me@evil.example.png",
    "1. list.png",
    "# heading.png",
    "> quote.png",
    "- item.png",
    "back\\slash `tick` |pipe| &amp; {brace}.png",
]

_RENDER_SCRIPT = '''
import numpy as np
import streamlit as st
from app.common import escape_markdown

names = {names!r}
for name in names:
    st.markdown(escape_markdown(name))
    st.markdown("**" + escape_markdown(name) + "**")
    st.caption(escape_markdown(name))
    st.error(escape_markdown(name))
st.radio("Image", [escape_markdown(n) for n in names])
st.image(np.zeros((8, 8, 3), np.uint8), caption=escape_markdown(names[0]))
st.title("done")
'''


def test_escape_markdown_keeps_plain_names_unchanged() -> None:
    for name in ("cat_0001.jpg"[:0] + "cat-0001.jpg", "checkpoints/cifar10-teacher", "a b.png"):
        assert common.escape_markdown(name) == name
    assert common.escape_markdown("two\nlines") == "two lines"


@pytest.mark.slow
def test_escaped_names_render_literally_in_a_browser(tmp_path: Path) -> None:
    if not Path(driver.CHROMIUM).exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"Chromium not found at {driver.CHROMIUM}")
        pytest.skip(f"Chromium not found at {driver.CHROMIUM}")
    script = tmp_path / "names.py"
    script.write_text(_RENDER_SCRIPT.format(names=NAMES))
    port = driver.free_port()
    argv = [sys.executable, "-m", "streamlit", "run", str(script), "--server.headless=true",
            f"--server.port={port}", "--server.address=127.0.0.1", "--browser.gatherUsageStats=false",
            "--server.fileWatcherType=none"]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HOME=str(tmp_path))
    with started(argv, env, tmp_path / "server.log") as proc, driver.chromium() as browser:
        driver.wait_healthy(f"http://127.0.0.1:{port}", proc, tmp_path / "server.log", timeout=120)
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}", wait_until="domcontentloaded", timeout=120_000)
        page.get_by_role("heading", name="done").wait_for(timeout=120_000)  # the script's last element
        driver.wait_idle(page, 120_000)
        # Widgets may paint after the heading on a loaded machine: read until every element is there (or 60 s).
        deadline = time.monotonic() + 60
        while True:
            rendered = _rendered_texts(page)
            texts = [r["text"] for r in rendered]
            if all(texts.count(name) >= 5 for name in NAMES) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        page.close()
    for name in NAMES:  # st.markdown plain and bold, st.caption, st.error, a radio option
        assert texts.count(name) >= 5, (name, texts.count(name))
    assert {"text": NAMES[0], "where": "stImageCaption", "made": 0} in rendered
    made = [r for r in rendered if r["text"] in NAMES and r["made"]]
    assert not made, made


def _rendered_texts(page) -> list[dict]:
    """Every Markdown-rendered element's visible text, where it is, and how many elements Markdown made in it."""
    return page.evaluate("""() => Array.from(document.querySelectorAll(
                '[data-testid="stMarkdownContainer"], [data-testid="stCaptionContainer"], '
                + '[data-testid="stImageCaption"]')).map(el => ({
                text: el.innerText.replaceAll('\\u2060', '').trim(),  // the word joiners escape_markdown adds
                where: el.getAttribute('data-testid'),
                made: el.querySelectorAll('a, img, em, del, code, h1, h2, ol, ul, blockquote, script, '
                                          + 'span.katex, [data-testid="stIconMaterial"], span[style*="color"]')
                        .length}))""")


def _checkpoint_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_pair) -> Path:
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    monkeypatch.setenv("VITKD_CHECKPOINT_DIRS", str(folder))
    monkeypatch.setenv("VITKD_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setattr(common, "network_available", lambda *a, **k: False)
    st.cache_data.clear()
    return folder


def _markdown_texts(at) -> list[str]:
    """The Markdown source of every Markdown-rendering element of ``at`` (an AppTest or one of its blocks)."""
    return [e.value for kind in ("markdown", "caption", "info", "error", "warning", "success")
            for e in getattr(at, kind)]


def test_hostile_checkpoint_names_are_escaped_in_the_sidebar(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                             tiny_pair) -> None:
    folder = _checkpoint_env(monkeypatch, tmp_path, tiny_pair)
    stem = HOSTILE.removesuffix(".png")
    teacher = shutil.copy(tiny_pair.teacher, folder / f"{stem}-teacher.safetensors")
    student = shutil.copy(tiny_pair.student, folder / f"{stem}-student.safetensors")
    (folder / f"{stem}-broken.safetensors").write_bytes(b"not a checkpoint")
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state[common.TEACHER_KEY] = str(teacher)
    at.session_state[common.STUDENT_KEY] = str(student)
    at.run()
    assert not at.exception
    texts = _markdown_texts(at.sidebar)
    label = f"checkpoints/{stem}"
    assert any(f"**{common.escape_markdown(label + '-teacher')}** (teacher)" in t for t in texts), texts
    assert any(f"Skipped **{common.escape_markdown(label + '-broken')}**" in t for t in texts), texts
    assert not [t for t in texts if stem in t]  # the raw name never reaches Markdown


# --------------------------------------------------------------------------------------------- server paths

def _sent_texts(at: AppTest) -> str:
    """Every proto of the page (what the browser receives: texts, labels, options, help, ids, tables)."""
    return "\n".join(text_format.MessageToString(node.proto, as_utf8=True) for node in at._tree
                     if getattr(node, "proto", None) is not None)


def test_no_server_paths_reach_the_browser(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                           tmp_path_factory: pytest.TempPathFactory, tiny_pair,
                                           image_folder: Path) -> None:
    from vitkd.jobs import job_status, list_jobs, start_job

    folder = _checkpoint_env(monkeypatch, tmp_path, tiny_pair)
    teacher = shutil.copy(tiny_pair.teacher, folder / "tiny-teacher.safetensors")
    student = shutil.copy(tiny_pair.student, folder / "tiny-student.safetensors")
    (folder / "broken.safetensors").write_bytes(b"not a checkpoint")
    monkeypatch.setenv("VITKD_DATA_ROOTS", str(image_folder))
    monkeypatch.setenv("VITKD_ENABLE_TRAINING", "1")
    # A failed browser run: its message, log and command name the data folder and the run folder.
    job = start_job(tmp_path / "runs", ["train", "--model", "cifar-student", "--data",
                                        f"imagefolder:{tmp_path / 'missing-data'}", "--epochs", "1"])
    for _ in range(600):
        if not job_status(job).running:
            break
        import time
        time.sleep(0.1)
    assert job_status(job).state == "failed" and str(tmp_path) in job.log_path.read_text()
    forbidden = {str(REPO_ROOT), str(tmp_path_factory.getbasetemp()), str(Path.home())}
    for page in ("views/explore.py", "views/train.py", "views/models.py"):
        at = AppTest.from_file(APP, default_timeout=90)
        at.session_state[common.TEACHER_KEY] = str(teacher)
        at.session_state[common.STUDENT_KEY] = str(student)
        at.switch_page(page)
        at.run()
        assert not at.exception, (page, at.exception)
        if page == "views/train.py":
            at.radio(key="train_mode").set_value("distill").run()
            at.selectbox(key="train_teacher").set_value(str(teacher)).run()
            assert any("Failed" in e.value for e in at.error)
        sent = _sent_texts(at)
        assert "tiny-teacher" in sent and "broken" in sent  # the check sees the sidebar and its errors
        leaks = [f for f in forbidden if f in sent]
        assert not leaks, (page, leaks, [line for line in sent.splitlines() if any(f in line for f in leaks)][:5])
    assert [j.name for j in list_jobs(tmp_path / "runs")] == [job.name]


# --------------------------------------------------------------------------------------------- listing

@pytest.mark.parametrize("name, overrides", [
    ("cifar-teacher", {}),
    ("cifar-student-deit", {"depth": 2}),
    ("cifar-student", {"depth": 2, "reg_tokens": 2}),
    ("cifar-student", {"depth": 2, "class_token": False, "global_pool": "avg"}),
    ("nette-student", {"depth": 1}),
    ("vit_tiny_patch16_224", {"depth": 2, "embed_dim": 16, "num_heads": 2, "img_size": 64}),
    ("deit_tiny_distilled_patch16_224", {"depth": 1, "embed_dim": 16, "num_heads": 2, "img_size": 32}),
])
def test_checkpoint_shape_reads_headers_and_builds_on_meta_only(name: str, overrides: dict, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import vitkd.checkpoint
    import vitkd.models
    from vitkd.attention import token_layout
    from vitkd.jobs import checkpoint_shape
    from vitkd.models import build_model, has_distillation_token

    model = build_model(name, 4, **overrides)
    path = save_checkpoint(model, {"class_names": list("abcd")}, tmp_path / "m.safetensors")
    layout = token_layout(model)
    built_on: list[str] = []
    for module in (vitkd.models, vitkd.checkpoint):
        real = module.build_model

        def spy(*args, _real=real, **kwargs):
            built = _real(*args, **kwargs)
            built_on.append(next(built.parameters()).device.type)
            return built

        monkeypatch.setattr(module, "build_model", spy)
    meta = read_checkpoint_meta(path)
    for shape in (checkpoint_shape(meta, path), checkpoint_shape(meta)):
        assert (shape.depth, shape.num_heads, shape.img_size) == (len(model.blocks), model.blocks[0].attn.num_heads,
                                                                  model.patch_embed.img_size[0])
        assert (shape.grid, shape.num_prefix_tokens) == (layout.grid_size, layout.num_prefix_tokens)
        assert shape.distillation_token == has_distillation_token(model)
    assert set(built_on) <= {"meta"}, built_on


def test_checkpoint_shape_refuses_hostile_metadata_quickly(tmp_path: Path) -> None:
    import json
    import time

    from safetensors.torch import save_file

    from vitkd.jobs import checkpoint_shape

    huge = {"format_version": 1, "model": {"name": "cifar-student", "num_classes": 10, "img_size": None,
                                           "overrides": {"depth": 10_000, "embed_dim": 8192}}}
    path = tmp_path / "huge.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"vitkd": json.dumps(huge)})
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="depth 10000"):
        checkpoint_shape(huge, path)
    assert time.perf_counter() - start < 2.0
    loader = dict(huge, model=dict(huge["model"], overrides={"checkpoint_path": str(tmp_path / "x.pth")}))
    for where in (None, path):
        with pytest.raises(CheckpointError, match="not architecture arguments"):
            checkpoint_shape(loader, where)


@pytest.mark.slow
def test_forged_metadata_is_skipped_on_every_page(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                 tiny_pair) -> None:
    """Ill-typed or absurdly nested metadata (and any failure no check foresaw) skips that file, with a line
    saying why, instead of a traceback on every page."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = _checkpoint_env(monkeypatch, tmp_path, tiny_pair)
    shutil.copy(tiny_pair.teacher, folder / "pair-teacher.safetensors")
    shutil.copy(tiny_pair.student, folder / "pair-student.safetensors")
    with safe_open(str(tiny_pair.student), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - not a dict
    meta = read_checkpoint_meta(tiny_pair.student)
    save_file(tensors, str(folder / "typed-student.safetensors"),
              metadata={"vitkd": json.dumps(dict(meta, class_names=5, head_map=5, img_size=100_000))})
    save_file(tensors, str(folder / "nested-student.safetensors"), metadata={"vitkd": "[" * 50_000 + "]" * 50_000})
    save_file(tensors, str(folder / "listed-student.safetensors"),
              metadata={"vitkd": json.dumps(dict(meta, model=["x"]))})
    (folder / "unforeseen.safetensors").write_bytes(b"x")
    real_read = common.read_checkpoint_meta

    def read(path):
        if path.endswith("unforeseen.safetensors"):
            raise RuntimeError("a failure no check foresaw")
        return real_read(path)

    monkeypatch.setattr(common, "read_checkpoint_meta", read)
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception
    texts = "\n".join(_markdown_texts(at.sidebar))
    for stem in ("typed-student", "nested-student", "listed-student", "unforeseen"):
        assert f"Skipped **checkpoints/{common.escape_markdown(stem)}**" in texts, texts
    at.switch_page("views/models.py").run()
    assert not at.exception
    problems = {row["checkpoint"]: row["problem"] for row in at.dataframe[0].value.to_dict("records")}
    assert "not a size in pixels" in problems["checkpoints/typed-student"]
    assert "not valid JSON" in problems["checkpoints/nested-student"]
    assert "'model' is ['x'], not a mapping" in problems["checkpoints/listed-student"]
    assert "RuntimeError: a failure no check foresaw" in problems["checkpoints/unforeseen"]
    assert not isinstance(problems["checkpoints/pair-student"], str)  # no problem (None, shown as NaN)


def test_a_pair_that_fails_unforeseen_is_a_message_on_every_page(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                 tiny_pair) -> None:
    """Loading passed every check, then something no check foresaw raised: the pages say so in one line."""
    folder = _checkpoint_env(monkeypatch, tmp_path, tiny_pair)
    shutil.copy(tiny_pair.teacher, folder / "pair-teacher.safetensors")
    shutil.copy(tiny_pair.student, folder / "pair-student.safetensors")

    def check_pair(*args, **kwargs):
        raise RuntimeError("a failure no check foresaw")

    monkeypatch.setattr(common, "check_pair", check_pair)
    st.cache_resource.clear()  # pairs loaded by earlier tests would not reach check_pair
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception
    shown = "\n".join(_markdown_texts(at) + _markdown_texts(at.sidebar))
    expected = common.escape_markdown("cannot load this pair (RuntimeError: a failure no check foresaw)")
    assert expected in shown, shown  # shown escaped, as every message
    for page in ("views/misclassified.py", "views/models.py"):
        at.switch_page(page).run()
        assert not at.exception


def test_a_checkpoint_replaced_with_its_mtime_kept_is_a_new_version(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                   tiny_pair) -> None:
    """``cp -p`` / ``rsync -a`` keep the mtime: caches keyed by it alone would serve the old weights."""
    folder = _checkpoint_env(monkeypatch, tmp_path, tiny_pair)
    target = folder / "model.safetensors"
    shutil.copy(tiny_pair.student, target)
    before = os.stat(target)
    (entry,) = [e for e in common.list_checkpoints() if e.path == str(target)]
    replacement = folder / "incoming.tmp"
    shutil.copy(tiny_pair.student, replacement)  # same size; the bytes could differ, the stat would not tell
    os.utime(replacement, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(replacement, target)
    assert os.stat(target).st_mtime_ns == before.st_mtime_ns and os.stat(target).st_size == before.st_size
    (again,) = [e for e in common.list_checkpoints() if e.path == str(target)]
    assert again.version != entry.version


def test_a_student_beside_a_rewritten_teacher_file_draws_no_distilled_pairs(monkeypatch: pytest.MonkeyPatch,
                                                                           tmp_path: Path, tiny_pair) -> None:
    """Same architecture, other file: the student's head map names heads of a teacher that is not this one."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = _checkpoint_env(monkeypatch, tmp_path, tiny_pair)
    teacher, student = folder / "pair-teacher.safetensors", folder / "pair-student.safetensors"
    shutil.copy(tiny_pair.student, student)
    with safe_open(str(tiny_pair.teacher), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - not a dict
    meta = read_checkpoint_meta(tiny_pair.teacher)
    save_file(tensors, str(teacher), metadata={"vitkd": json.dumps(dict(meta, epoch=7))})  # other bytes
    st.cache_resource.clear()
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["vitkd_teacher"], at.session_state["vitkd_student"] = str(teacher), str(student)
    at.run()
    assert not at.exception
    texts = "\n".join(_markdown_texts(at.sidebar))
    assert common.escape_markdown("distilled from another teacher file") in texts, texts
    shutil.copy(tiny_pair.teacher, teacher)  # the very file it learned from: pairs drawn again
    at.run()
    assert common.escape_markdown("distilled from another teacher file") not in "\n".join(_markdown_texts(at.sidebar))
