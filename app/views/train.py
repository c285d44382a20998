"""Train: start a distillation or baseline run from the browser and follow it.

The run is a separate ``python -m vitkd`` process (``vitkd.jobs``): it survives page reloads,
only one runs per server, and its state is read back from its run folder, so every session
sees the same job. A cancelled or crashed run with committed epochs can be resumed. Runs'
last checkpoints (``RunDir.last``) join the sidebar model picker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from app import common
from vitkd.data import source_version
from vitkd.distill import GATES, LOSS_KINDS, WEIGHTINGS
from vitkd.errors import VitkdError
from vitkd.headmap import parse_head_map
from vitkd.jobs import (
    DOWNLOADABLE_SOURCES,
    Job,
    JobStatus,
    ModelShape,
    active_job,
    cancel_job,
    checkpoint_shape,
    config_to_args,
    job_status,
    list_jobs,
    model_shape,
    resume_job,
    source_class_names,
    start_job,
    student_presets_for,
    training_sources,
)
from vitkd.models import DISTILLED_PRESETS, PRESETS, TIMM_PREFIX, parse_model_overrides, resolve_model_name

MODES = {"distill": "Distil a student from a teacher", "train": "Train on labels only (baseline or teacher)"}
PRETRAINED_HOST = "huggingface.co"  # where timm downloads pretrained weights from
DOWNLOAD_LABELS = {"cifar10": "CIFAR-10 (torchvision, downloaded on first use, 170 MB)",
                   "cifar100": "CIFAR-100 (torchvision, downloaded on first use, 170 MB)"}
HEAD_MAP_HELP = """Which teacher heads teach which student heads (0-based):

- `encoder`: student block j follows an evenly spaced teacher block; with fewer student heads each
  student head follows the mean of an even group of teacher heads (8 -> 4: {0,1}, {2,3}, ...);
  `encoder[0,2,4,6]` picks one teacher head per student head.
- `block:5->3;4->2`: the listed block pairs, heads grouped the same way; `block:5->3[0,2,4,6]` picks the heads.
- `head:5.0->3.1;5.2->3.0`: single heads, `teacher_block.head->student_block.head`; `head:5.{0,1}->3.0`
  makes a student head follow the mean of teacher heads 0 and 1.
"""
OVERRIDES_HELP = """Architecture arguments, comma separated `KEY=VALUE` (the CLI's `--model-override`): e.g.
`patch_size=8, depth=2`. Values are JSON when they parse (`8`, `0.1`, `true`), else text."""
MODEL_PICKER_HELP = f"A preset, or type any timm ViT as `{TIMM_PREFIX}NAME` (e.g. `{TIMM_PREFIX}vit_tiny_patch16_224`)."
WEIGHTING_HELP = """How much each image's attention loss counts, from the student's own prediction (detached):
`student-confidence` weighs image i by p_student(true class), `student-doubt` by 1 - p_student(true class).
The attention term stays a weighted mean, so alpha keeps its meaning; a gate multiplies the weighting."""
KD_HELP = """Hinton logit distillation from the same teacher: adds `weight x T^2 x KL(teacher || student)` on the
class logits softened at temperature T (0: off). With alpha 1 it is logit distillation alone, no attention term."""
RANK_IMAGES = (20, 2000)  # how many training images the head ranking may use (min, max)
STATE_ICONS = {"running": ":material/autorenew:", "finished": ":material/check_circle:",
               "failed": ":material/error:", "cancelled": ":material/cancel:"}


def curves(status: JobStatus) -> go.Figure:
    """Train loss and test accuracy per epoch, from the run's metrics (one row per committed epoch)."""
    epochs = [m.get("epoch") for m in status.metrics]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Training loss", "Test accuracy (%)"))
    fig.add_trace(go.Scatter(x=epochs, y=[m.get("train_loss") for m in status.metrics], mode="lines+markers",
                             name="loss"), row=1, col=1)
    if any("train_att" in m for m in status.metrics):
        fig.add_trace(go.Scatter(x=epochs, y=[m.get("train_att") for m in status.metrics], mode="lines+markers",
                                 name="attention loss"), row=1, col=1)
    fig.add_trace(go.Scatter(x=epochs, y=[m.get("accuracy") for m in status.metrics], mode="lines+markers",
                             name="accuracy"), row=1, col=2)
    fig.update_xaxes(title_text="epoch")
    fig.update_layout(height=300, margin=dict(l=10, r=10, t=40, b=10), legend=dict(orientation="h", y=-0.3))
    return fig


def _log_tail(job: Job, config: common.ServerConfig, lines: int = 20) -> str:
    """The log's last lines, server paths named as the browser may see them."""
    try:
        tail = job.log_path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "\n".join(common.redact_paths(line, config) for line in tail)


def _shown_command(args: list[str] | tuple[str, ...], config: common.ServerConfig) -> str:
    return common.redact_paths("python -m vitkd " + " ".join(args), config)


def show_job(job: Job, status: JobStatus) -> None:
    config = common.server_config()
    st.markdown(f"{STATE_ICONS[status.state]} **{job.name}**: {status.state} (`{job.command}`, started "
                f"{_format_time(job.started)})")
    if status.running:
        text = f"epoch {min(status.epoch + 1, max(1, status.epochs))} of {status.epochs or '?'}"
        if status.batches:
            text += f", batch {status.batch} of {status.batches}"
        if status.loss is not None:
            text += f", loss {status.loss:.4f}"
        st.progress(status.fraction, text=text)
    elif status.state == "finished":
        st.success(f"Finished: test accuracy {common.format_accuracy(status.accuracy)}. The checkpoint "
                   f"`{job.name}/{job.checkpoint.name}` is now in the sidebar model picker.")
    else:
        cancelled = status.state == "cancelled"
        message = common.escape_markdown(common.redact_paths(status.message, config))
        if cancelled:
            text = f"Cancelled: {message}." if status.message else "Cancelled."
        else:
            text = f"Failed: {message or 'the process ended without finishing'}"
        if status.resumable:
            text += (f" {status.committed_epoch} of {status.epochs} epochs are committed: **Resume** continues "
                     f"after epoch {status.committed_epoch} (or run `{_shown_command(job.resume_args, config)}`).")
        (st.warning if cancelled else st.error)(text)
    if status.metrics:
        st.plotly_chart(curves(status), key=f"train_curves_{job.name}", config={"displayModeBar": False})
    with st.expander("Log"):
        st.code(_log_tail(job, config) or "(empty)", language=None)


def _format_time(timestamp: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def cancel(job: Job) -> None:
    cancel_job(job)
    st.session_state["train_cancelled"] = job.name


def resume(runs_dir: Path, job: Job) -> None:
    """Button callback: the job's command again with ``--resume``; a refusal is shown by the panel."""
    try:
        resume_job(runs_dir, job)
    except VitkdError as exc:
        st.session_state["train_error"] = str(exc)


@st.fragment(run_every=2)
def job_panel(runs_dir: Path) -> None:
    """Refreshes itself every 2 s; when the job's state changes the whole page reruns (start button, picker)."""
    job = active_job(runs_dir)
    shown = job or next(iter(list_jobs(runs_dir)), None)
    if shown is None:
        st.caption("No training runs yet.")
        return
    status = job_status(shown)
    if error := st.session_state.pop("train_error", None):
        st.error(error)
    show_job(shown, status)
    if status.running:
        st.button("Cancel", key="train_cancel", on_click=cancel, args=(shown,), type="secondary",
                  help="Stops the process (SIGTERM) at the next training step; committed epochs are kept and "
                       "the run can be resumed.")
    elif status.resumable and job is None:
        st.button("Resume", key="train_resume", on_click=resume, args=(runs_dir, shown), type="primary",
                  help=f"Runs the same command again with --resume in {shown.name}: training continues after "
                       f"epoch {status.committed_epoch}, with the same schedule as an uninterrupted run.")
    seen = st.session_state.get("train_seen")
    st.session_state["train_seen"] = (shown.name, status.state)
    if seen is not None and seen[0] == shown.name and (seen[1] == "running") != status.running:
        st.rerun(scope="app")  # a run started or ended: the start button and the model picker follow


def teacher_choices() -> dict[str, common.CheckpointEntry]:
    """Readable checkpoints, likely teachers first: named teacher, then trained on labels (no head map)."""
    entries = [e for e in common.list_checkpoints() if e.meta is not None]
    entries.sort(key=lambda e: ("teacher" not in e.label, bool((e.meta or {}).get("head_map"))))
    return {e.path: e for e in entries}


def distill_fields(teachers: dict[str, common.CheckpointEntry]) -> tuple[dict[str, Any] | None, list[str]]:
    """Teacher, student preset, head map and loss widgets; returns (config fields or None, problems shown)."""
    if not teachers:
        st.info("No teacher checkpoints found: train a teacher first (choose 'Train on labels only').")
        return None, []
    paths = list(teachers)
    picked = st.session_state.get(common.TEACHER_KEY)  # the sidebar's teacher, if it can teach
    common.ensure_choice("train_teacher", paths, picked if picked in teachers else paths[0])
    teacher_path = st.selectbox("Teacher checkpoint", paths, format_func=lambda p: teachers[p].label,
                                key="train_teacher")
    teacher = teachers[teacher_path]
    try:
        t_shape = checkpoint_shape(teacher.meta, teacher.path)
    except VitkdError as exc:
        st.error("Cannot read the teacher's architecture: "
                 + common.escape_markdown(common.redact_paths(str(exc), common.server_config())))
        return None, []
    presets = student_presets_for(t_shape)
    if not presets:
        st.info(f"No student preset reads the teacher's {t_shape.img_size} px input with its prefix tokens: type a "
                "timm model (timm:NAME) below.")
        presets = ["timm:vit_tiny_patch16_224"]
    students = [p for p in presets if "student" in p] + [p for p in presets if "student" not in p]
    cols = st.columns(2)
    with cols[0]:
        student = model_picker("Student model", students, "train_student",
                               f"Presets trained at the teacher's {t_shape.img_size} px input, those with its "
                               f"{t_shape.grid[0]}x{t_shape.grid[1]} token grid first; on another grid the "
                               "teacher's maps are resampled onto the student's. " + MODEL_PICKER_HELP)
    s_shape, model_extra = model_fields(student, t_shape.img_size)
    if s_shape is None:
        return None, ["fix the student model"]
    deit = student in DISTILLED_PRESETS
    cols[1].caption(f"Teacher: {t_shape.depth} blocks x {t_shape.num_heads} heads. "
                    f"Student: {s_shape.depth} blocks x {s_shape.num_heads} heads"
                    + (" and a distillation token: it trains with DeiT hard-label distillation (`--kd deit-hard`), "
                       "its maps without the distillation token." if deit else "."))
    head_map = st.text_input("Head map", value="encoder", key="train_head_map", help=HEAD_MAP_HELP)
    problems = []
    try:
        parsed = parse_head_map(head_map, t_shape.depth, t_shape.num_heads, s_shape.depth, s_shape.num_heads)
        description = parsed.describe()
        st.caption(f":green[Valid head map, {len(parsed.pairs)} head pairs:] "
                   + (description if len(description) < 400 else description[:400] + "..."))
    except VitkdError as exc:
        st.error(f"Head map: {common.escape_markdown(exc)}")
        problems.append("fix the head map")
    cols = st.columns(3)
    loss = cols[0].selectbox("Attention loss", list(LOSS_KINDS), index=list(LOSS_KINDS).index("kl"), key="train_loss")
    alpha = cols[1].slider("Alpha (weight of label CE)", 0.0, 1.0, 0.5, 0.05, key="train_alpha",
                           help="loss = alpha * CE + (1 - alpha) * attention loss")
    gate = cols[2].selectbox("Gate", list(GATES), key="train_gate",
                             help="teacher-correct (student-correct): distil attention only on images the teacher "
                                  "(the student, in this forward) classifies right")
    cols = st.columns(3)
    weighting = cols[0].selectbox("Weighting", list(WEIGHTINGS), key="train_weighting", help=WEIGHTING_HELP)
    kd_weight = cols[1].number_input("Logit KD weight", 0.0, 100.0, 0.0, 0.25, key="train_kd_weight", disabled=deit,
                                     help=KD_HELP if not deit else "A DeiT student learns the teacher's decisions "
                                     "through its distillation token (`--kd deit-hard`), not through logit KD.")
    kd_temperature = cols[2].number_input("KD temperature", 0.5, 20.0, 4.0, 0.5, key="train_kd_temperature",
                                          disabled=deit or kd_weight == 0, help="T of the logit KD term.")
    fields = {"model": student, "teacher": teacher_path, "head_map": head_map, "loss": loss, "alpha": float(alpha),
              "gate": gate, "weighting": weighting, "img_size": t_shape.img_size, **model_extra}
    if alpha == 1.0:  # no attention term: the head map, loss, gate and weighting do nothing
        fields.update(head_map=None, gate="none", weighting="none")
        problems = [p for p in problems if p != "fix the head map"]
        st.caption("Alpha 1 gives the attention term no weight: the head map, loss, gate and weighting are not used."
                   + ("" if kd_weight > 0 or deit else " Set a logit KD weight, or the teacher teaches nothing."))
    if deit:
        fields["kd"] = "deit-hard"
    elif kd_weight > 0:
        fields.update(kd_weight=float(kd_weight), kd_temperature=float(kd_temperature))
    return fields, problems


def rank_teacher_heads(teacher: common.CheckpointEntry, source: str) -> None:
    """On request, the teacher's heads ranked by what switching each off costs on the dataset's training images."""
    with st.expander("Which teacher heads matter? Rank them on this dataset's training images"):
        shape = checkpoint_shape(teacher.meta or {}, teacher.path)
        st.caption("Each head of the teacher is switched off in turn and the training images are classified "
                   "again: the darker the cell, the more the teacher relies on that head (cross-entropy increase; "
                   "hover for the top-1 points lost). Training images, not test ones, so the heads you choose "
                   f"are not chosen on test. {shape.depth * shape.num_heads + 1} passes over the images (one per "
                   "head and one with all on): seconds for the small presets, long for large models on a CPU; "
                   "changing any setting on this page stops it between passes.")
        cols = st.columns([1, 1], vertical_alignment="bottom")
        limit = int(cols[0].number_input("Images", min_value=RANK_IMAGES[0], max_value=RANK_IMAGES[1], value=500,
                                         step=100, key="train_rank_limit",
                                         help="Evenly spaced over the training split (every class covered)."))
        request = (teacher.path, teacher.version, source, limit)
        if cols[1].button("Rank heads", key="train_rank"):
            st.session_state["train_rank_request"] = request
            st.session_state.pop("train_rank_data", None)  # the data as it is at this click
        if st.session_state.get("train_rank_request") != request:
            return
        try:
            if "train_rank_data" not in st.session_state:  # listed once per click, not on every rerun
                st.session_state["train_rank_data"] = source_version(source, "train")
            result = common.head_importance_cached(teacher.path, teacher.version, source,
                                                   st.session_state["train_rank_data"], limit)
        except (VitkdError, OSError) as exc:
            st.error(common.escape_markdown(common.redact_paths(str(exc), common.server_config())))
            return
        st.plotly_chart(common.importance_figure(result), key="train_rank_chart", config={"displayModeBar": False})
        top = ", ".join(f"{b}.{h}" for b, h in result.ranking()[:8])
        st.caption(f"{result.n} training images, {result.accuracy:.1f}% top-1 with every head on. Most important "
                   f"first (teacher `block.head`, as the head map writes them): {top}.")


def model_picker(label: str, presets: list[str], key: str, help: str) -> str:
    """A preset selectbox that also takes a typed model (``timm:NAME``); a typed choice stays an option."""
    typed = st.session_state.get(key)
    options = presets + ([typed] if isinstance(typed, str) and typed.strip() and typed not in presets else [])
    common.ensure_choice(key, options, "cifar-student" if "cifar-student" in presets else presets[0])
    return str(st.selectbox(label, options, key=key, accept_new_options=True, help=help) or "").strip()


def model_fields(model: str, img_size: int | None = None) -> tuple[ModelShape | None, dict[str, Any]]:
    """The overrides text box (and, for a timm model, timm's pretrained weights), then the model's shape;
    returns (shape, run config fields), or (None, {}) after showing the error."""
    text = st.text_input("Model overrides", key="train_overrides", placeholder="patch_size=8, depth=2",
                         help=OVERRIDES_HELP)
    try:
        overrides = parse_model_overrides(text)
        shape = model_shape(model, img_size, overrides)
    except VitkdError as exc:
        st.error(common.escape_markdown(common.redact_paths(str(exc), common.server_config())))
        return None, {}
    fields: dict[str, Any] = {"model_overrides": overrides}
    if resolve_model_name(model) not in PRESETS:
        online = common.network_available(PRETRAINED_HOST)
        pretrained = st.checkbox("Start from timm's pretrained weights", key="train_pretrained", disabled=not online,
                                 help="Downloaded by timm on first use." if online else
                                 "This server cannot reach the model hub. Offline, train from the command line "
                                 "with `--pretrained-file PATH` (a local timm weights file).")
        if pretrained and online:
            fields["pretrained"] = True
    return shape, fields


def train_fields() -> dict[str, Any] | None:
    presets = [p for p in PRESETS if p not in DISTILLED_PRESETS]  # a distillation token needs a teacher
    model = model_picker("Model", presets, "train_model", MODEL_PICKER_HELP)
    shape, fields = model_fields(model)
    if shape is None:
        return None
    st.caption(f"{shape.depth} blocks x {shape.num_heads} heads, {shape.img_size} px input, "
               f"{shape.grid[0]}x{shape.grid[1]} patch grid.")
    return {"model": model, **fields}


def main() -> None:
    st.title("Train")
    config = common.server_config()
    if not config.training_enabled:
        st.info("Training from the browser is off on this server: by default only a server bound to this machine "
                "(`make run`, `--server.address=127.0.0.1`) trains, since a run starts processes on it. Train with "
                "`python -m vitkd train|distill`, or start the server with `VITKD_ENABLE_TRAINING=1` "
                "(or `-- --enable-training`).")
        return
    st.subheader("Current run")
    job_panel(config.runs_dir)
    running = active_job(config.runs_dir)

    st.subheader("New run")
    sources = training_sources(config.data_roots, downloads=common.network_available())
    if not sources:
        st.info("No training data: no data root with `train/` and `test/` (or `val/`) class folders is configured, "
                "and this server cannot download CIFAR-10/100 (no network). Start the server with "
                "`VITKD_DATA_ROOTS=DIR` or `-- --data-root DIR` (DIR/train/<class>/*.jpg and DIR/test/<class>/*.jpg).")
        return
    if not any(source in DOWNLOADABLE_SOURCES for source in sources):
        st.caption("CIFAR-10/100 downloads are not offered: this server has no network.")
    mode = st.radio("Run", list(MODES), format_func=MODES.__getitem__, horizontal=True, key="train_mode")
    teachers = teacher_choices()
    if mode == "distill":
        fields, problems = distill_fields(teachers)
    else:
        fields = train_fields()
        problems = [] if fields is not None else ["fix the model"]
    source_names = {s: DOWNLOAD_LABELS.get(s) or common.display_path(s.split(":", 1)[1], config) for s in sources}
    common.ensure_choice("train_data", sources, sources[0])
    cols = st.columns(3)
    source = cols[0].selectbox("Dataset", sources, format_func=source_names.__getitem__, key="train_data")
    epochs = cols[1].number_input("Epochs", 1, 1000, 10, key="train_epochs")
    batch_size = cols[2].number_input("Batch size", 1, 4096, 128, key="train_batch_size")
    if fields is not None and fields.get("teacher"):
        teacher_classes = (teachers[fields["teacher"]].meta or {}).get("class_names")
        data_classes = source_class_names(source)
        if teacher_classes and data_classes is not None and list(teacher_classes) != data_classes:
            shown = common.escape_markdown(", ".join(teacher_classes[:8]))
            st.error(f"The teacher was trained on classes {shown}"
                     f"{'...' if len(teacher_classes) > 8 else ''}, but this dataset has "
                     f"{common.escape_markdown(', '.join(data_classes[:8])) or 'none'}"
                     f"{'...' if len(data_classes) > 8 else ''}.")
            problems.append("pick the teacher's dataset")
    if fields is not None and fields.get("teacher") and "pick the teacher's dataset" not in problems:
        rank_teacher_heads(teachers[fields["teacher"]], source)
    args: list[str] | None = None
    if fields is not None:
        run_config = dict(fields, data=source, epochs=int(epochs), batch_size=int(batch_size))
        if source in DOWNLOADABLE_SOURCES:
            run_config["download"] = True
        try:
            args = config_to_args(run_config)
        except VitkdError as exc:
            st.error(common.escape_markdown(common.redact_paths(str(exc), config)))
            problems.append(str(exc))
    if args is not None:
        with st.expander("Command line"):
            st.code(_shown_command(args, config) + " --out RUN_DIR", language="bash", wrap_lines=True)
    if running is not None:
        st.caption(f"Run **{running.name}** is in progress; one run at a time per server.")
    start = st.button("Start training", type="primary", key="train_start",
                      disabled=running is not None or args is None or bool(problems))
    if start and args is not None:
        try:
            job = start_job(config.runs_dir, run_config, name=f"{mode}-{fields['model']}")
        except VitkdError as exc:
            st.error(common.escape_markdown(common.redact_paths(str(exc), config)))
            return
        st.session_state["train_seen"] = (job.name, "running")
        st.rerun()


main()
