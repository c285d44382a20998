"""What every page shares: server configuration, checkpoint discovery, the cached loaders and the sidebar
model picker.

The ``st.cache_*`` wrappers live here and only here. Cached models are shared by every
session and thread, so nothing may mutate them; ``vitkd.analysis`` only reads them.
Configuration comes from the server (environment and command line), never from the browser.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import socket
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
import streamlit as st
import torch
from plotly.subplots import make_subplots

from vitkd.analysis import ImageAnalysis, ModelAnalysis, analyze_pair, class_rollout
from vitkd.checkpoint import load_checkpoint, read_checkpoint_meta
from vitkd.errors import VitkdError
from vitkd.files import file_sha256
from vitkd.head_stats import HeadStats
from vitkd.headmap import HeadMap
from vitkd.images import DEFAULT_MAX_PIXELS, DISPLAY_SIDE, load_image
from vitkd.importance import HeadImportance, head_importance_checkpoint
from vitkd.maps import heads_text
from vitkd.pairs import ModelPair, check_pair, model_summary
from vitkd.rundir import RunDir

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLED_CHECKPOINTS = REPO_ROOT / "checkpoints"
EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
# Labelled image folders bundled with the repository (scripts/make_samples.py): the Misclassifications
# page scans them with no configuration. A data root each, after the configured ones.
SAMPLES_DIR = REPO_ROOT / "samples"
SAMPLE_ROOTS = ("cifar10", "imagenette")
DEFAULT_RUNS_DIR = REPO_ROOT / "runs" / "app"
_log = logging.getLogger(__name__)
# Addresses that only this machine can reach: a server bound to one of them may train from the browser.
LOCAL_ADDRESSES = frozenset({"127.0.0.1", "localhost", "::1"})

TEACHER_KEY, STUDENT_KEY = "vitkd_teacher", "vitkd_student"
EXPLORE_IMAGE_KEY = "explore_image"  # {"name": str, "bytes": bytes, "label": int | None}: open it in Explore
EXPLORE_PAGE = "views/explore.py"
IMAGE_TYPES = ("png", "jpg", "jpeg", "webp", "bmp", "gif")
PREFERRED_TEACHERS = ("cifar10-teacher.safetensors", "imagenette-teacher.safetensors")

_FALSE = {"0", "false", "no", "off"}
_TRUE = {"1", "true", "yes", "on"}


# ----------------------------------------------------------------------------------------------- configuration

@dataclass(frozen=True)
class ServerConfig:
    """Set by whoever runs the server (env vars or ``streamlit run app/streamlit_app.py -- ...``).

    Args:
        checkpoint_dirs: folders searched for ``*.safetensors`` checkpoints (bundled ``checkpoints/`` first).
        data_roots: image folders pages may read (configured ones, then the bundled samples and examples).
        training_enabled: whether the browser may start training runs (by default only a server bound to a
            local address, see ``parse_server_config``).
        runs_dir: where browser-started runs write; each run folder's ``RunDir.last`` joins the model picker.
        max_upload_mb: Streamlit's ``server.maxUploadSize``.
        torch_threads: intra-op threads for analysis; 0 keeps torch's default. One is the default: the
            bundled models are small, and on a busy machine several threads per request spin-wait for
            each other (bench/app_latency.py: ~10 ms with 1 thread, up to ~1 s with 2 on a loaded 2-core box).
    """

    checkpoint_dirs: tuple[Path, ...]
    data_roots: tuple[Path, ...]
    training_enabled: bool
    runs_dir: Path
    max_upload_mb: int
    torch_threads: int = 1


def _split_paths(value: str | None) -> list[str]:
    return [p for p in (value or "").split(os.pathsep) if p.strip()]


def _unique(paths: Sequence[str | Path]) -> tuple[Path, ...]:
    seen: dict[Path, None] = {}
    for p in paths:
        seen.setdefault(Path(p).expanduser().absolute(), None)
    return tuple(seen)


def parse_server_config(argv: Sequence[str], environ: Mapping[str, str], max_upload_mb: int = 200,
                        server_address: str | None = None) -> ServerConfig:
    """``ServerConfig`` from script arguments (after ``--``) and the environment; unknown arguments are ignored.

    Command line beats environment: ``--checkpoint-dir DIR`` / ``VITKD_CHECKPOINT_DIRS`` (os.pathsep-separated),
    ``--data-root DIR`` / ``VITKD_DATA_ROOTS``, ``--runs-dir`` / ``VITKD_RUNS_DIR``, ``--enable-training`` /
    ``--disable-training`` / ``VITKD_ENABLE_TRAINING``, ``--torch-threads N`` / ``VITKD_TORCH_THREADS``
    (default 1; 0 keeps torch's default). Browser training is on by default only when ``server_address``
    (Streamlit's ``server.address``) is a local one (``LOCAL_ADDRESSES``, what ``make run`` binds); a server
    bound to every interface (no address, ``0.0.0.0``: the Docker image) trains only when enabled explicitly.
    """
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--checkpoint-dir", action="append", default=[])
    parser.add_argument("--data-root", action="append", default=[])
    parser.add_argument("--runs-dir", default=None)
    parser.add_argument("--enable-training", action="store_true")
    parser.add_argument("--disable-training", action="store_true")
    parser.add_argument("--torch-threads", default=None)
    try:
        args, _ = parser.parse_known_args(list(argv))
    except SystemExit:  # e.g. a flag without its value: fall back to the environment alone
        args, _ = parser.parse_known_args([])
    env_training = environ.get("VITKD_ENABLE_TRAINING", "").strip().lower()
    local = (server_address or "").strip().lower() in LOCAL_ADDRESSES
    training = env_training not in _FALSE if env_training in _FALSE | _TRUE else local
    if args.enable_training:
        training = True
    if args.disable_training:
        training = False
    runs_dir = args.runs_dir or environ.get("VITKD_RUNS_DIR") or DEFAULT_RUNS_DIR
    threads_text = args.torch_threads or environ.get("VITKD_TORCH_THREADS") or "1"
    threads = int(threads_text) if threads_text.strip().isdigit() else 1
    return ServerConfig(
        checkpoint_dirs=_unique([BUNDLED_CHECKPOINTS, *args.checkpoint_dir,
                                 *_split_paths(environ.get("VITKD_CHECKPOINT_DIRS"))]),
        data_roots=_unique([*args.data_root, *_split_paths(environ.get("VITKD_DATA_ROOTS")),
                            *(SAMPLES_DIR / name for name in SAMPLE_ROOTS), EXAMPLES_DIR]),
        training_enabled=training,
        runs_dir=Path(runs_dir).expanduser().absolute(),
        max_upload_mb=int(max_upload_mb),
        torch_threads=threads,
    )


def server_config() -> ServerConfig:
    """This server's configuration (cheap; re-read each run so tests can change the environment)."""
    return parse_server_config(sys.argv[1:], os.environ, st.get_option("server.maxUploadSize"),
                               st.get_option("server.address"))


def apply_torch_threads(config: ServerConfig) -> None:
    """Process-wide server setting, applied by the entrypoint (never by ``vitkd``)."""
    if config.torch_threads > 0 and torch.get_num_threads() != config.torch_threads:
        torch.set_num_threads(config.torch_threads)


# ----------------------------------------------------------------------------------------------- checkpoints

@dataclass(frozen=True)
class CheckpointEntry:
    """One discovered checkpoint file: its metadata, or why it cannot be read."""

    path: str
    label: str
    version: str  # file_version(): keys every cache of what was read from it
    meta: dict[str, Any] | None
    error: str | None


def file_version(stat: os.stat_result) -> str:
    """mtime (ns), size and inode: a file replaced with its mtime kept (``cp -p``, ``rsync -a``) still differs."""
    return f"{stat.st_mtime_ns}-{stat.st_size}-{stat.st_ino}"


@st.cache_data(max_entries=512, show_spinner=False)
def _read_meta(path: str, version: str) -> tuple[dict[str, Any] | None, str | None]:
    """Header-only read, cached per file version; errors are returned so they are cached too."""
    try:
        return read_checkpoint_meta(path), None
    except VitkdError as exc:
        return None, str(exc)
    except Exception as exc:  # a bug or a header no check foresaw: one file must not break every page
        _log.exception("reading the metadata of %s failed", path)
        return None, f"{path}: cannot read its metadata ({type(exc).__name__}: {exc})"


def _candidates(config: ServerConfig) -> list[tuple[Path, Path]]:
    """(file, folder it was found under) for every checkpoint-looking file, in configuration order."""
    found: list[tuple[Path, Path]] = []
    for folder in config.checkpoint_dirs:
        if folder.is_dir():
            files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*/*.safetensors"))
            found += [(f, folder) for f in files]
    if config.runs_dir.is_dir():
        runs = [RunDir(d) for d in sorted(config.runs_dir.iterdir()) if d.is_dir()]
        found += [(run.last, config.runs_dir) for run in runs if run.last.is_file()]
    # A run folder's training state sits beside its checkpoints but is not a model; dot files are
    # atomic-write temporaries.
    return [(f, d) for f, d in found if f != RunDir(f.parent).state and not f.name.startswith(".")]


def list_checkpoints(config: ServerConfig | None = None) -> list[CheckpointEntry]:
    """Every checkpoint in the configured folders (and finished browser runs), readable or not."""
    config = config or server_config()
    entries: list[CheckpointEntry] = []
    seen: set[Path] = set()
    for path, folder in _candidates(config):
        resolved = path.resolve()
        if resolved in seen:
            continue
        seen.add(resolved)
        label = f"{folder.name}/{path.relative_to(folder).with_suffix('').as_posix()}"
        try:
            stat = path.stat()
        except OSError as exc:
            entries.append(CheckpointEntry(str(path), label, "", None, f"{path}: cannot read ({exc})"))
            continue
        version = file_version(stat)
        meta, error = _read_meta(str(path), version)
        entries.append(CheckpointEntry(str(path), label, version, meta, error))
    return entries


def default_pair(entries: Sequence[CheckpointEntry]) -> tuple[CheckpointEntry, CheckpointEntry]:
    """The pair shown first: the bundled CIFAR-10 teacher and its distilled student when present."""
    def name(e: CheckpointEntry) -> str:
        return Path(e.path).name

    def teacher_rank(e: CheckpointEntry) -> int:
        if name(e) in PREFERRED_TEACHERS:
            return PREFERRED_TEACHERS.index(name(e))
        return len(PREFERRED_TEACHERS) + (0 if "teacher" in e.label else 1)

    teacher = min(entries, key=teacher_rank)
    prefix = name(teacher).split("-teacher")[0]
    t_meta = teacher.meta or {}

    def student_rank(e: CheckpointEntry) -> int:
        meta = e.meta or {}
        same_data = (meta.get("class_names") == t_meta.get("class_names")
                     and meta.get("img_size") == t_meta.get("img_size"))
        if name(e) == f"{prefix}-student-distilled.safetensors":
            return 0
        if name(e).startswith(prefix) and "student" in name(e):
            return 1
        if same_data and meta.get("head_map"):
            return 2
        if same_data:
            return 3
        return 4 if "student" in e.label else 5

    others = [e for e in entries if e.path != teacher.path] or [teacher]
    return teacher, min(others, key=student_rank)


# ----------------------------------------------------------------------------------------------- cached loaders

def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@st.cache_resource(max_entries=8, show_spinner=False)
def load_model(path: str, version: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A checkpoint loaded once per process (per file version); shared by all sessions: never mutate it."""
    return load_checkpoint(path, device=_device())


@st.cache_resource(max_entries=4, show_spinner=False)
def _load_pair(teacher_path: str, teacher_version: str, student_path: str, student_version: str) -> ModelPair:
    teacher, teacher_meta = load_model(teacher_path, teacher_version)
    student, student_meta = load_model(student_path, student_version)
    return check_pair(teacher, teacher_meta, student, student_meta, file_sha256(teacher_path))


@dataclass(frozen=True)
class PairStatus:
    """The current selection: the entries, the checked pair (or the error saying why there is none)."""

    teacher: CheckpointEntry | None
    student: CheckpointEntry | None
    pair: ModelPair | None
    error: str | None

    @property
    def key(self) -> str:
        """Identifies the pair's file versions (for ``st.cache_data`` keys)."""
        if self.teacher is None or self.student is None:
            return ""
        return f"{self.teacher.path}@{self.teacher.version}|{self.student.path}@{self.student.version}"


def _selection(usable: Sequence[CheckpointEntry]) -> tuple[CheckpointEntry, CheckpointEntry]:
    by_path = {e.path: e for e in usable}
    teacher_default, student_default = default_pair(usable)
    teacher = by_path.get(st.session_state.get(TEACHER_KEY), teacher_default)
    student = by_path.get(st.session_state.get(STUDENT_KEY), student_default)
    return teacher, student


def pair_status() -> PairStatus:
    """Resolve the sidebar selection (or the defaults) to a loaded, checked pair; errors become messages."""
    usable = [e for e in list_checkpoints() if e.error is None]
    if not usable:
        return PairStatus(None, None, None, "no readable checkpoints found")
    teacher, student = _selection(usable)
    try:
        pair = _load_pair(teacher.path, teacher.version, student.path, student.version)
    except VitkdError as exc:
        return PairStatus(teacher, student, None, str(exc))
    except Exception as exc:  # a bug or a file no check foresaw: a message on the page, not a traceback
        _log.exception("loading the pair %s / %s failed", teacher.path, student.path)
        return PairStatus(teacher, student, None, f"cannot load this pair ({type(exc).__name__}: {exc})")
    return PairStatus(teacher, student, pair, None)


def selected_pair() -> ModelPair | None:
    """The teacher/student pair chosen in the sidebar, loaded and checked; None when there is no valid pair."""
    return pair_status().pair


def open_in_explore(name: str, data: bytes, label: int | None = None) -> None:
    """Switch to the Explore page showing this image (``label``: true class index under the current pair)."""
    st.session_state[EXPLORE_IMAGE_KEY] = {"name": name, "bytes": data, "label": label}
    st.switch_page(EXPLORE_PAGE)


def image_key(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


# Full-resolution decodes at a time in this server: a 50-megapixel PNG needs ~200 MB while it decodes
# (even though only a DISPLAY_SIDE copy is kept), so this bounds the server's peak memory.
DECODE_SLOTS = 1


@st.cache_resource(max_entries=1, show_spinner=False)
def _decode_slots() -> threading.BoundedSemaphore:
    """One semaphore per process, shared by every session (thread-safe by design)."""
    return threading.BoundedSemaphore(DECODE_SLOTS)


@st.cache_data(max_entries=64, show_spinner=False)
def decode_image(key: str, _data: bytes, crop_size: int = 0,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray | None, str | None]:
    """(RGB uint8 array, None) or (None, the ImageError message); cached by content digest ``key``.

    The array is never the full-resolution image: anything longer than ``DISPLAY_SIDE`` is decoded
    straight to a copy ``DISPLAY_SIDE`` long (short side at least ``crop_size``, the model's input), which
    is what the page shows and crops; smaller images are exactly what the training data path decodes.
    """
    try:
        image = load_image(_data, max_pixels=max_pixels, max_side=DISPLAY_SIDE, crop_size=crop_size,
                           decode_slot=_decode_slots())
        return np.asarray(image), None
    except VitkdError as exc:
        return None, str(exc)


@st.cache_data(max_entries=16, show_spinner="Analysing...")
def analyze_cached(pair_key: str, key: str, true_label: int | None, _pair: ModelPair,
                   _image: np.ndarray) -> ImageAnalysis:
    """``analyze_pair`` cached per (pair file versions, image digest, label): sliders rerun without models."""
    return analyze_pair(_pair, _image, true_label=true_label)


# Images per head-ranking batch: each pass holds a copy of the batch per head of the block, so memory grows
# with batch x heads (small here, so a large teacher's ranking stays within a desktop's memory).
RANK_BATCH_SIZE = 32


@st.cache_data(max_entries=8, show_spinner=False)
def head_importance_cached(path: str, version: str, source: str, data_version: str, limit: int) -> HeadImportance:
    """``head_importance_checkpoint`` on ``limit`` training images of ``source`` (a configured one), once per
    (checkpoint version, source and what its train split holds, limit). The bar lives here so a cache hit
    replays it (it ends empty)."""
    bar = st.progress(0.0, text="Reading the training images...")

    def progress(done: int, total: int) -> None:
        bar.progress(done / total, text=f"Switched off {done - 1} of {total - 1} heads")

    result = head_importance_checkpoint(path, data=source, split="train", limit=limit, batch_size=RANK_BATCH_SIZE,
                                        device=_device(), progress=progress)
    bar.empty()
    return result


@st.cache_data(max_entries=64, show_spinner="Computing class rollout...")
def class_rollout_cached(pair_key: str, key: str, role: str, class_index: int, _model: torch.nn.Module,
                         _result: ModelAnalysis) -> np.ndarray:
    return class_rollout(_model, _result.inputs, class_index, _result.tokens or None)


@st.cache_resource(max_entries=64, show_spinner=False)
def topk_figure_cached(pair_key: str, key: str, role: str, true_label: int | None,
                       _result: ModelAnalysis) -> go.Figure:
    """``topk_figure`` of one model on one image, built once and shared by every session (building a plotly
    figure costs more than the whole analysis). Never mutate it: ``st.plotly_chart`` only serialises it."""
    top = _result.top_k[0]
    return topk_figure(_result, true_label, f"{role}: {top.name} ({top.prob:.1%})")


@st.cache_data(max_entries=128, show_spinner=False)
def rendered(what: str, pair_key: str, key: str, settings: tuple[Any, ...], _render: Callable[[], Any]) -> Any:
    """``_render()`` (PNG bytes, or tiles of PNG bytes and captions) run once per (what, pair file versions,
    image digest ``key``, ``settings``) and shared by every session: an overlay is drawn and encoded once.

    ``settings`` must hold everything the picture depends on besides the pair and the image (blocks, query
    patch, opacity, colour map...). Entries are small (encoded images), so 128 of them stay in the tens of MB.
    """
    return _render()


# ----------------------------------------------------------------------------------------------- examples

@dataclass(frozen=True)
class Example:
    name: str
    path: Path
    label: str | None


def examples(class_names: Sequence[str] | None = None) -> list[Example]:
    """The bundled example images with their true class names (``app/examples/labels.json``).

    With ``class_names``, only the examples of those classes (all of them if none match), so a
    CIFAR-10 pair shows CIFAR-10 images and an Imagenette pair Imagenette photos.
    """
    labels_file = EXAMPLES_DIR / "labels.json"
    labels = json.loads(labels_file.read_text()) if labels_file.is_file() else {}
    files = sorted(p for p in EXAMPLES_DIR.iterdir() if p.suffix.lower().lstrip(".") in IMAGE_TYPES)
    found = [Example(p.name, p, labels.get(p.name)) for p in files]
    if class_names is not None:
        known = set(class_names)
        matching = [e for e in found if e.label in known]
        found = matching or found
    return found


# ----------------------------------------------------------------------------------------------- display helpers

# Characters that start Markdown (CommonMark + GFM) syntax anywhere in a line: emphasis, strikethrough,
# code, links and images (brackets), raw HTML and entities, tables, ``$`` math. Backslash-escaped; so is
# ``_``, except inside a word (``cat_0001``), where CommonMark never reads it as emphasis.
_MARKDOWN_INLINE = re.compile(r"[\\`*{}\[\]<>|~$&]|(?<![^\W_])_+|_+(?![^\W_])")
# ... and what only matters at the start of a line (headings, lists, quotes, setext rules).
_MARKDOWN_LINE_START = re.compile(r"^(\s*)(\d+(?=[.)])|(?=[#+\-=>]))")
# Streamlit and GFM also rewrite the parsed text, where escapes no longer count: ``:material/icon:``, emoji
# ``:name:`` and ``:color[...]`` directives, autolinks (``scheme://``, ``www.``, ``user@host``). A word joiner
# (U+2060, invisible, no line break) after each colon and before each ``@`` and ``www``'s dot breaks them.
_WORD_JOINER = "\u2060"
_TEXT_TRIGGERS = re.compile(r"(?<=:)|(?=@)|(?i:(?<=www)(?=\.))")
_ABSOLUTE_PATH = re.compile(r"(?<![\w./~-])/(?:[^\s/'\"`,;()]+/)+[^\s/'\"`,;()]*")


def escape_markdown(text: object) -> str:
    """``text`` shown literally wherever Streamlit renders Markdown (``st.markdown``, ``st.caption``,
    ``st.error`` and friends, image captions, radio options): no emphasis, link, image, HTML, directive,
    icon, emoji, ``$`` math or autolink is made from it. Markdown characters get CommonMark backslash
    escapes, Streamlit's and GFM's text patterns an invisible word joiner; line breaks become spaces.
    Letters, digits, ``.``, ``-``, ``/`` and spaces stay as they are (``cat-01.png`` is unchanged).
    Not for code spans (backticks show backslashes)."""
    flat = " ".join(str(text).splitlines())
    escaped = _MARKDOWN_INLINE.sub(lambda m: "".join("\\" + c for c in m.group(0)), flat)
    escaped = _TEXT_TRIGGERS.sub(_WORD_JOINER, escaped)
    match = _MARKDOWN_LINE_START.match(escaped)
    if match:  # "1. x" -> "1\. x", "# x" -> "\# x"
        cut = match.end()
        escaped = escaped[:cut] + "\\" + escaped[cut:]
    return escaped


def _named_roots(config: ServerConfig) -> list[Path]:
    """Configured folders the browser may know by name, deepest first (so the closest one names a file)."""
    roots = {Path(r) for r in (*config.checkpoint_dirs, config.runs_dir, *config.data_roots)}
    roots |= {r.resolve() for r in roots}
    return sorted(roots, key=lambda r: len(r.parts), reverse=True)


def display_path(path: str | Path, config: ServerConfig | None = None) -> str:
    """How the browser names a server path, never absolute: ``<configured folder's name>/<rest>`` inside a
    configured folder, relative inside the repository, else ``.../<parent>/<name>``."""
    config = config or server_config()
    p = Path(path)
    if not p.is_absolute():
        return p.as_posix()
    for root in _named_roots(config):
        if p == root or p.is_relative_to(root):
            return (Path(root.name) / p.relative_to(root)).as_posix()
    if p.is_relative_to(REPO_ROOT):
        return p.relative_to(REPO_ROOT).as_posix() or "."
    return ".../" + "/".join(p.parts[-2:])


def redact_paths(text: str, config: ServerConfig | None = None) -> str:
    """``text`` (an error message, a log line) with every absolute path replaced by ``display_path``'s name."""
    return _ABSOLUTE_PATH.sub(lambda m: display_path(m.group(0), config), str(text))


def network_available(host: str = "www.cs.toronto.edu", port: int = 443, timeout: float = 1.5) -> bool:
    """Whether this server can reach the internet (CIFAR-10/100's download host), cached for ten minutes."""
    return _reachable(host, port, timeout)


@st.cache_data(ttl=600, max_entries=8, show_spinner=False)
def _reachable(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def format_count(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.0f} k"


def format_accuracy(value: float | None) -> str:
    return "not recorded" if value is None else f"{value:.2f} %"


def describe_head_map(head_map: HeadMap | None) -> list[str]:
    """One line per student block: which teacher heads taught its heads (``h0 <- T5.h{0,1}``: a group's mean)."""
    if head_map is None:
        return []
    lines = []
    for block in head_map.student_blocks:
        groups = [g for g in head_map.groups if g.student_block == block]
        lines.append(f"S{block}: " + ", ".join(f"h{g.student_head} <- T{g.teacher_block}.h{heads_text(g.teacher_heads)}"
                                                for g in groups))
    return lines


def summary_markdown(summary: Mapping[str, Any]) -> str:
    grid = summary["grid"]
    rows = [
        ("Parameters", format_count(summary["parameters"])),
        ("Blocks x heads", f"{summary['blocks']} x {summary['heads']} (embed {summary['embed_dim']})"),
        ("Patch grid", f"{grid[0]}x{grid[1]} + {summary['num_prefix_tokens']} prefix"),
        ("Input", f"{summary['img_size'][0]} px, patch {summary['patch_size'][0]}"),
        ("Classes", str(len(summary["class_names"]))),
        ("Accuracy", format_accuracy(summary["accuracy"])),
        ("Kind", escape_markdown(summary["kind"]) + (f", epoch {summary['epoch']}" if summary.get("epoch") else "")),
    ]
    if summary.get("recipe_text"):
        rows.append(("Recipe", escape_markdown(summary["recipe_text"])))
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def ensure_choice(key: str, options: Sequence[Any], default: Any) -> None:
    """Before a widget is drawn: reset its stored value when it is missing or no longer an option
    (e.g. after switching to a model with fewer blocks)."""
    if st.session_state.get(key) not in options:
        st.session_state[key] = default


def _no_checkpoints_message(config: ServerConfig) -> str:
    folders = ", ".join(escape_markdown(display_path(d, config)) for d in config.checkpoint_dirs)
    return (f"No checkpoints found in {folders}. Train the bundled pair with "
            "`python -m vitkd experiment configs/cifar10.yaml` and copy its `last.safetensors` files into "
            "`checkpoints/`, or point the app at a folder of `.safetensors` checkpoints with "
            "`VITKD_CHECKPOINT_DIRS=DIR` or `streamlit run app/streamlit_app.py -- --checkpoint-dir DIR`.")


def render_sidebar() -> PairStatus:
    """The model picker every page shares: teacher and student selectboxes, their summaries, the pair in use."""
    config = server_config()
    entries = list_checkpoints(config)
    usable = [e for e in entries if e.error is None]
    sidebar = st.sidebar
    sidebar.subheader("Models")
    if not usable:
        sidebar.info(_no_checkpoints_message(config))
    else:
        paths = [e.path for e in usable]
        labels = {e.path: e.label for e in usable}
        teacher_default, student_default = default_pair(usable)
        ensure_choice(TEACHER_KEY, paths, teacher_default.path)
        ensure_choice(STUDENT_KEY, paths, student_default.path)
        sidebar.selectbox("Teacher", paths, format_func=labels.__getitem__, key=TEACHER_KEY)
        sidebar.selectbox("Student", paths, format_func=labels.__getitem__, key=STUDENT_KEY)
    status = pair_status() if usable else PairStatus(None, None, None, None)
    if status.error:
        sidebar.error(escape_markdown(redact_paths(status.error, config)))
    if status.pair is not None:
        pair = status.pair
        sidebar.caption(f"Comparing **{escape_markdown(status.teacher.label)}** (teacher) with "
                        f"**{escape_markdown(status.student.label)}** (student): {len(pair.class_names)} classes, "
                        f"{pair.img_size} px.")
        for note in pair.notes:
            sidebar.warning(escape_markdown(note))
        with sidebar.expander("Teacher summary"):
            st.markdown(summary_markdown(model_summary(pair.teacher, pair.teacher_meta)))
        with sidebar.expander("Student summary", expanded=False):
            st.markdown(summary_markdown(model_summary(pair.student, pair.student_meta)))
            lines = describe_head_map(pair.head_map)
            if lines:
                st.markdown("**Distilled heads** (student head <- teacher head):\n\n" +
                            "\n".join(f"- {line}" for line in lines))
            else:
                st.caption("No head map: a baseline student (not distilled) or one taught by another teacher.")
            taught_from = (pair.student_meta.get("teacher") or {}).get("path")
            if taught_from:
                st.caption(f"Distilled from {escape_markdown(display_path(taught_from, config))}.")
    elif status.teacher is not None:
        # The pair failed (incompatible or unreadable); still describe what loads so users see why.
        for role, entry in (("Teacher", status.teacher), ("Student", status.student)):
            try:
                model, meta = load_model(entry.path, entry.version)
            except VitkdError:
                continue
            with sidebar.expander(f"{role} summary"):
                st.markdown(summary_markdown(model_summary(model, meta)))
    broken = [e for e in entries if e.error is not None]
    for entry in broken:
        reason = escape_markdown(redact_paths(entry.error or "", config))
        sidebar.error(f"Skipped **{escape_markdown(entry.label)}**: {reason}")
    return status


# ----------------------------------------------------------------------------------------------- charts

def topk_figure(result: ModelAnalysis, true_label: int | None, title: str) -> go.Figure:
    """Horizontal bars of the top-k probabilities; the true class green, other bars blue."""
    preds = list(reversed(result.top_k))  # plotly draws the first category at the bottom
    colors = ["#2ca02c" if p.index == true_label else "#4c78a8" for p in preds]
    fig = go.Figure(go.Bar(x=[p.prob for p in preds], y=[p.name for p in preds], orientation="h",
                           marker_color=colors, text=[f"{p.prob:.1%}" for p in preds], textposition="auto",
                           hovertemplate="%{y}: %{x:.3f}<extra></extra>"))
    fig.update_layout(title=title, height=230, margin=dict(l=10, r=10, t=40, b=10),
                      xaxis=dict(range=[0, 1], tickformat=".0%"), yaxis=dict(automargin=True))
    return fig


def divergence_figure(matrix: np.ndarray, teacher_block: int, student_block: int,
                      marks: Sequence[tuple[int, int]]) -> go.Figure:
    """Student head (rows) x teacher head (columns) JS divergence; ``marks`` (student_head, teacher_head)
    are the distilled pairs, drawn as squares."""
    student_heads = [f"S{student_block}.h{h}" for h in range(matrix.shape[0])]
    teacher_heads = [f"T{teacher_block}.h{h}" for h in range(matrix.shape[1])]
    fig = go.Figure(go.Heatmap(z=matrix, x=teacher_heads, y=student_heads, colorscale="Viridis", zmin=0,
                               zmax=1.0, colorbar=dict(title="JS (bits)"),
                               hovertemplate="%{y} vs %{x}: JS %{z:.4f}<extra></extra>"))
    if marks:
        fig.add_trace(go.Scatter(x=[teacher_heads[t] for _, t in marks], y=[student_heads[s] for s, _ in marks],
                                 mode="markers", name="distilled pair", showlegend=True,
                                 marker=dict(symbol="square-open", size=26, color="#ffc400", line=dict(width=3)),
                                 hoverinfo="skip"))
    fig.update_layout(height=120 + 40 * matrix.shape[0], margin=dict(l=10, r=10, t=30, b=10),
                      yaxis=dict(autorange="reversed"), legend=dict(orientation="h", y=1.15))
    return fig


# What each field of ``HeadStats`` is called on the chart, and how its values are written.
HEAD_STAT_LABELS: dict[str, tuple[str, str]] = {
    "distance_px": ("mean attention distance (px)", ".1f"),
    "entropy_bits": ("attention entropy (bits)", ".2f"),
    "self_share": ("attention to itself", ".1%"),
    "prefix_share": ("attention to CLS / prefix tokens", ".1%"),
}
ROLE_COLORS = {"teacher": "#4c78a8", "student": "#f58518"}


def head_stats_figure(stats: Mapping[str, HeadStats], metric: str, distilled: Mapping[str, set[tuple[int, int]]],
                      uniform: Mapping[str, HeadStats]) -> go.Figure:
    """One marker per head, blocks along x (teacher left, student right, one y axis); ``distilled[role]``
    holds the (block, head) pairs of the head map, drawn as gold-edged diamonds; a dotted line marks what
    attention spread evenly over the tokens (``uniform[role]``) would score. Hover shows all four numbers."""
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, subplot_titles=("Teacher", "Student"),
                        horizontal_spacing=0.04)
    title = HEAD_STAT_LABELS[metric][0]
    for col, (role, prefix) in enumerate((("teacher", "T"), ("student", "S")), start=1):
        values = getattr(stats[role], metric)
        depth, heads = values.shape
        for in_map in (False, True):
            cells = [(b, h) for b in range(depth) for h in range(heads) if ((b, h) in distilled[role]) == in_map]
            if not cells:
                continue
            hover = ["<br>".join([f"{prefix}{b}.h{h}"] + [f"{label}: {getattr(stats[role], key)[b, h]:{f}}"
                                                          for key, (label, f) in HEAD_STAT_LABELS.items()])
                     for b, h in cells]
            marker = (dict(symbol="diamond", size=12, color=ROLE_COLORS[role], line=dict(width=2, color="#ffc400"))
                      if in_map else dict(size=8, color=ROLE_COLORS[role], opacity=0.8))
            fig.add_trace(go.Scatter(
                x=[b + (h - (heads - 1) / 2) * 0.5 / heads for b, h in cells],  # heads side by side in a block
                y=[values[b, h] for b, h in cells], mode="markers", marker=marker, hovertext=hover,
                hoverinfo="text", name=f"{role}: head in the head map" if in_map else role), row=1, col=col)
        fig.add_hline(y=float(getattr(uniform[role], metric)), line=dict(dash="dot", color="#888"), row=1, col=col,
                      annotation_text="uniform attention", annotation_position="bottom right")
        fig.update_xaxes(title_text="block", tickmode="array", tickvals=list(range(depth)), row=1, col=col)
    fig.update_yaxes(title_text=title, row=1, col=1)
    if metric in ("self_share", "prefix_share"):
        fig.update_yaxes(tickformat=".0%")
    fig.update_layout(height=340, margin=dict(l=10, r=10, t=40, b=10), legend=dict(orientation="h", y=-0.25))
    return fig


def importance_figure(result: HeadImportance) -> go.Figure:
    """Block (rows) x head (columns): cross-entropy increase with that head switched off; hover adds top-1 lost."""
    loss, drop = result.loss_increase, result.accuracy_drop
    text = [[f"block {b} head {h}: loss {loss[b, h]:+.4f}, top-1 {-drop[b, h]:+.2f} points"
             for h in range(loss.shape[1])] for b in range(loss.shape[0])]
    fig = go.Figure(go.Heatmap(z=loss, x=[f"h{h}" for h in range(loss.shape[1])],
                               y=[f"block {b}" for b in range(loss.shape[0])], colorscale="Reds", zmin=0,
                               colorbar=dict(title="loss +"), hovertext=text, hoverinfo="text"))
    fig.update_layout(height=120 + 34 * loss.shape[0], margin=dict(l=10, r=10, t=10, b=10),
                      yaxis=dict(autorange="reversed"))
    return fig
