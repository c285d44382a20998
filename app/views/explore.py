"""Explore: drop in images and compare teacher and student: predictions, per-head attention, rollout, agreement.

Widgets only; every number and picture comes from ``vitkd.analysis`` through the cached
wrappers in ``app.common``. Per-user state lives in ``st.session_state`` (keys ``explore_*``).
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral

import numpy as np
import streamlit as st

from app import common
from vitkd.agreement import head_divergence, pair_divergences
from vitkd.analysis import ImageAnalysis, recompute_rollout
from vitkd.export import analysis_to_csv, analysis_to_json
from vitkd.images import DEFAULT_MAX_PIXELS
from vitkd.maps import (
    HeadComparison,
    Tile,
    blocks_overview,
    compare_heads,
    comparison_png,
    mark_patch,
    paired_teacher_block,
    render_map,
    rollout_map,
    taught_by,
)
from vitkd.overlay import COLORMAPS
from vitkd.pairs import ModelPair
from vitkd.rollout import HEAD_FUSIONS

TILE = 150  # px per head map
PREVIEW = 200  # px of the analysed crop
FLAG_COLORS = {"agree": "blue", "disagree": "orange", "both-right": "green", "both-wrong": "red",
               "teacher-wrong": "orange", "student-wrong": "red"}
SCALE_LABELS = {"map": "per map", "model": "per model", "shared": "shared by both models"}
TARGET_LABELS = {"own": "each model's prediction", "true": "true class", "other": "the other model's prediction",
                 "chosen": "a chosen class"}


@dataclass(frozen=True)
class ImageSource:
    """An image the user can look at: an upload, an example, or one sent from another page."""

    key: str
    name: str
    data: bytes
    label: int | None  # true class index under the current pair, when known


# ----------------------------------------------------------------------------------------------- image input

def _pick_example(name: str) -> None:
    st.session_state["explore_example"] = name
    st.session_state["explore_choice"] = f"example:{name}"


def _on_upload() -> None:
    files = st.session_state.get("explore_uploads") or []
    if files:  # show the newest upload
        st.session_state["explore_choice"] = f"upload:{files[-1].file_id}"


def _label_index(pair: ModelPair, class_name: str | None) -> int | None:
    return pair.class_names.index(class_name) if class_name in pair.class_names else None


def image_sources(pair: ModelPair, config: common.ServerConfig) -> list[ImageSource]:
    """Draw the upload and example widgets; return every image available (bad uploads shown as errors)."""
    sent = st.session_state.pop(common.EXPLORE_IMAGE_KEY, None)
    if sent:
        st.session_state["explore_sent"] = sent
        st.session_state["explore_choice"] = f"sent:{common.image_key(sent['bytes'])}"
    examples = common.examples(pair.class_names)
    if examples and st.session_state.get("explore_example") not in {e.name for e in examples}:
        st.session_state["explore_example"] = examples[0].name

    upload_col, example_col = st.columns([2, 3], gap="large")
    with upload_col:
        uploads = st.file_uploader(
            "Upload images", type=list(common.IMAGE_TYPES), accept_multiple_files=True, key="explore_uploads",
            on_change=_on_upload,
            help=f"PNG, JPEG, WebP, BMP or GIF; up to {config.max_upload_mb} MB and "
                 f"{DEFAULT_MAX_PIXELS / 1e6:g} megapixels per file. Several files at once are fine.")
        st.caption(f"Limit {config.max_upload_mb} MB per file. Images are resized (shorter side) and "
                   f"centre-cropped to {pair.img_size} px, as in training.")
    with example_col:
        st.markdown("**Or pick an example** (true class known)")
        for row in range(0, len(examples), 6):
            cols = st.columns(6)
            for col, example in zip(cols, examples[row:row + 6], strict=False):
                with col:
                    st.image(str(example.path), width="stretch")
                    st.button(example.label or example.name, key=f"explore_ex_{example.name}",
                              on_click=_pick_example, args=(example.name,), width="stretch",
                              type="primary" if example.name == st.session_state["explore_example"] else "secondary")

    sources: list[ImageSource] = []
    for upload in uploads or []:
        sources.append(ImageSource(f"upload:{upload.file_id}", upload.name, upload.getvalue(), None))
    sent = st.session_state.get("explore_sent")
    if sent:
        label = sent.get("label")
        label = int(label) if isinstance(label, Integral) and 0 <= label < len(pair.class_names) else None
        sources.append(ImageSource(f"sent:{common.image_key(sent['bytes'])}", str(sent.get("name", "image")),
                                   sent["bytes"], label))
    chosen = next((e for e in examples if e.name == st.session_state.get("explore_example")), None)
    if chosen is not None:
        sources.append(ImageSource(f"example:{chosen.name}", chosen.name, chosen.path.read_bytes(),
                                   _label_index(pair, chosen.label)))
    return sources


def decoded_sources(sources: list[ImageSource]) -> list[tuple[ImageSource, np.ndarray]]:
    """Decode every source; each bad file gets its own ``st.error`` and the others carry on."""
    good = []
    for source in sources:
        image, error = common.decode_image(common.image_key(source.data), source.data)
        if error is not None:
            st.error(f"**{source.name}**: {error}")
        else:
            good.append((source, image))
    return good


def choose(good: list[tuple[ImageSource, np.ndarray]]) -> tuple[ImageSource, np.ndarray]:
    keys = [s.key for s, _ in good]
    names = {s.key: s.name for s, _ in good}
    common.ensure_choice("explore_choice", keys, keys[0])
    if len(good) > 1:
        st.radio("Image", keys, format_func=names.__getitem__, horizontal=True, key="explore_choice")
    return good[keys.index(st.session_state["explore_choice"])]


# ----------------------------------------------------------------------------------------------- sections

def show_predictions(analysis: ImageAnalysis, source: ImageSource, query: tuple[int, int] | None) -> None:
    flag = analysis.flag
    st.badge(flag.message(), color=FLAG_COLORS[flag.status],
             icon=":material/check:" if flag.status in ("agree", "both-right") else ":material/warning:")
    image_col, teacher_col, student_col = st.columns([1.1, 2, 2])
    true_name = None if analysis.true_label is None else analysis.class_names[analysis.true_label]
    with image_col:
        st.image(mark_patch(analysis.image_rgb, analysis.layout, query, PREVIEW), width=PREVIEW)
        st.caption(f"**{source.name}** ({analysis.image_rgb.shape[0]} px crop the models saw)"
                   + (f"; true class: **{true_name}**" if true_name else "; true class unknown"))
    for col, result, role in ((teacher_col, analysis.teacher, "Teacher"), (student_col, analysis.student, "Student")):
        top = result.top_k[0]
        with col:
            st.plotly_chart(common.topk_figure(result, analysis.true_label, f"{role}: {top.name} ({top.prob:.1%})"),
                            key=f"explore_top_{role}", config={"displayModeBar": False})


def display_settings() -> tuple[float, str, str]:
    with st.sidebar:
        st.subheader("Display")
        alpha = st.slider("Map opacity", 0.0, 1.0, 0.55, 0.05, key="explore_alpha")
        colormap = st.selectbox("Colour map", list(COLORMAPS), key="explore_cmap")
        scale = st.radio("Colour scale", list(SCALE_LABELS), format_func=SCALE_LABELS.__getitem__,
                         key="explore_scale", help="Per map stretches every map to its own range; shared by "
                                                   "both models puts teacher and student maps on one scale.")
    return alpha, colormap, scale


def block_and_query(analysis: ImageAnalysis) -> tuple[int, int, tuple[int, int] | None]:
    t_depth, s_depth = analysis.teacher.depth, analysis.student.depth
    head_map = analysis.head_map
    s_default = head_map.student_blocks[-1] if head_map is not None else s_depth - 1
    common.ensure_choice("explore_sblock", list(range(s_depth)), s_default)
    common.ensure_choice("explore_tblock", list(range(t_depth)),
                         paired_teacher_block(head_map, st.session_state["explore_sblock"], t_depth, s_depth))

    def follow_student() -> None:  # picking a student block shows the teacher block that taught it
        st.session_state["explore_tblock"] = paired_teacher_block(
            head_map, st.session_state["explore_sblock"], t_depth, s_depth)

    gh, gw = analysis.layout.grid_size
    cols = st.columns([1, 1, 1.2, 0.8, 0.8])
    teacher_block = cols[0].selectbox("Teacher block", list(range(t_depth)), key="explore_tblock")
    student_block = cols[1].selectbox("Student block", list(range(s_depth)), key="explore_sblock",
                                      on_change=follow_student,
                                      help="Changing it selects the teacher block that taught it.")
    query_kind = cols[2].segmented_control("Query token", ["CLS", "patch"], default="CLS", required=True,
                                           key="explore_query_kind",
                                           help="Maps show how much this token attends to each patch.")
    query = None
    if query_kind == "patch":
        common.ensure_choice("explore_qrow", list(range(gh)), gh // 2)  # the grid may differ after a model switch
        common.ensure_choice("explore_qcol", list(range(gw)), gw // 2)
        row = cols[3].number_input("Row", 0, gh - 1, key="explore_qrow")
        col = cols[4].number_input("Column", 0, gw - 1, key="explore_qcol")
        query = (int(row), int(col))
    return int(teacher_block), int(student_block), query


def show_tiles(title: str, tiles: tuple[Tile, ...] | list[Tile], per_row: int = 4) -> None:
    st.markdown(title)
    for start in range(0, len(tiles), per_row):
        for col, tile in zip(st.columns(per_row), tiles[start:start + per_row], strict=False):
            col.image(tile.image, caption=tile.caption, width="stretch")


def show_heads(analysis: ImageAnalysis, teacher_block: int, student_block: int, query: tuple[int, int] | None,
               alpha: float, colormap: str, scale: str) -> HeadComparison:
    view = st.segmented_control("View", ["per head", *HEAD_FUSIONS], default="per head", required=True,
                                key="explore_view", format_func=lambda v: v if v == "per head" else f"{v} of heads")
    comparison = compare_heads(analysis, teacher_block, student_block, query=query,
                               head_fusion=None if view == "per head" else view, alpha=alpha, colormap=colormap,
                               scale=scale, size=TILE)
    left, right = st.columns(2, gap="large")
    with left:
        show_tiles(f"**Teacher**, block {teacher_block}", comparison.teacher)
    with right:
        show_tiles(f"**Student**, block {student_block}", comparison.student)
    if analysis.head_map is not None:
        st.caption("Framed maps are distilled pairs: a student head shows the teacher head that taught it, "
                   "a teacher head the student heads it taught.")
    with st.expander("All blocks overview (rows: blocks from the first down, columns: heads)"):
        hm = analysis.head_map
        t_marks = frozenset((p.teacher_block, p.teacher_head) for p in hm.pairs) if hm else frozenset()
        s_marks = frozenset((p.student_block, p.student_head) for p in hm.pairs) if hm else frozenset()
        left, right = st.columns(2, gap="large")
        left.image(blocks_overview(analysis.teacher, analysis.image_rgb, analysis.layout, query, alpha, colormap,
                                   highlight=t_marks),
                   caption=f"Teacher: {analysis.teacher.depth} blocks x {analysis.teacher.num_heads} heads")
        right.image(blocks_overview(analysis.student, analysis.image_rgb, analysis.layout, query, alpha, colormap,
                                    highlight=s_marks),
                    caption=f"Student: {analysis.student.depth} blocks x {analysis.student.num_heads} heads")
    return comparison


def _rollout_target(analysis: ImageAnalysis, target: str, role: str, chosen: int) -> int:
    own, other = analysis.model(role), analysis.model("student" if role == "teacher" else "teacher")
    return {"own": own.predicted, "true": analysis.true_label, "other": other.predicted, "chosen": chosen}[target]


def show_rollout(analysis: ImageAnalysis, pair: ModelPair, pair_key: str, image_key: str, alpha: float,
                 colormap: str) -> list[Tile]:
    """Attention rollout and class-specific gradient rollout of both models; returns the tiles shown."""
    cols = st.columns([1, 1, 1])
    fusion = cols[0].segmented_control("Head fusion", list(HEAD_FUSIONS), default="mean", required=True,
                                       key="explore_rollout_fusion")
    discard = cols[1].slider("Discard ratio", 0.0, 0.95, 0.0, 0.05, key="explore_discard",
                             help="Zero the weakest attention weights of every block before rolling out "
                                  "(the CLS column is kept).")
    targets = ["own", "other", "chosen"] if analysis.true_label is None else ["own", "true", "other", "chosen"]
    cols = st.columns([2, 1])
    target = cols[0].segmented_control("Class-specific rollout explains", targets, default="own", required=True,
                                       format_func=TARGET_LABELS.__getitem__, key="explore_target")
    chosen = 0
    if target == "chosen":
        classes = list(range(len(analysis.class_names)))
        common.ensure_choice("explore_class", classes, analysis.teacher.predicted)
        chosen = cols[1].selectbox("Class", classes, format_func=analysis.class_names.__getitem__,
                                   key="explore_class")
    tiles: dict[str, list[Tile]] = {}
    for role, model in (("teacher", pair.teacher), ("student", pair.student)):
        result = analysis.model(role)
        rmap = rollout_map(recompute_rollout(result, fusion, discard), analysis.layout)
        class_index = int(_rollout_target(analysis, target, role, chosen))
        grad = common.class_rollout_cached(pair_key, image_key, role, class_index, model, result)
        tiles[role] = [
            Tile(render_map(analysis.image_rgb, rmap, 2 * TILE, alpha, colormap),
                 f"{role} rollout ({fusion}, discard {discard:.2f})", False),
            Tile(render_map(analysis.image_rgb, rollout_map(grad, analysis.layout), 2 * TILE, alpha, colormap),
                 f"{role} gradient rollout: {analysis.class_names[class_index]} "
                 f"(p={float(result.probs[class_index]):.2f})", False),
        ]
    left, right = st.columns(2, gap="large")
    with left:
        show_tiles("**Teacher**", tiles["teacher"], per_row=2)
    with right:
        show_tiles("**Student**", tiles["student"], per_row=2)
    return tiles["teacher"] + tiles["student"]


def show_agreement(analysis: ImageAnalysis, teacher_block: int, student_block: int) -> None:
    st.markdown("Jensen-Shannon divergence (bits, 0 to 1) between each student head of "
                f"block {student_block} and each teacher head of block {teacher_block}, averaged over query tokens. "
                "Change the blocks above.")
    matrix = head_divergence(analysis.student.attn_probs[student_block], analysis.teacher.attn_probs[teacher_block])
    marks = [(sh, th) for sh, (tb, th) in taught_by(analysis.head_map, student_block).items() if tb == teacher_block]
    st.plotly_chart(common.divergence_figure(matrix, teacher_block, student_block, marks), key="explore_js",
                    config={"displayModeBar": False})
    rows = pair_divergences(analysis)
    if not rows:
        st.info("This student has no head map (a baseline or a student of another teacher): no distilled pairs.")
        return
    st.markdown("**Distilled pairs on this image** (rank 1: the taught teacher head is the closest of its block)")
    st.dataframe([{"teacher head": f"T{r['teacher_block']}.h{r['teacher_head']}",
                   "student head": f"S{r['student_block']}.h{r['student_head']}",
                   "JS divergence (bits)": round(r["js"], 5), "rank": f"{r['rank']} of {r['teacher_heads']}"}
                  for r in rows], hide_index=True)


def show_export(analysis: ImageAnalysis, comparison: HeadComparison, rollout_tiles: list[Tile], name: str) -> None:
    stem = name.rsplit(".", 1)[0]
    st.markdown("Download what is shown: the head maps and rollouts as one PNG, the numbers as JSON (predictions, "
                "distilled-pair divergences, every block's CLS maps) or CSV (probabilities, pair divergences).")
    row = st.container(horizontal=True)
    row.download_button("Overlays (PNG)", comparison_png(comparison, rollout_tiles), f"{stem}-attention.png",
                            "image/png", key="explore_dl_png", on_click="ignore")
    row.download_button("Numbers (JSON)", analysis_to_json(analysis, name), f"{stem}-analysis.json",
                            "application/json", key="explore_dl_json", on_click="ignore")
    row.download_button("Numbers (CSV)", analysis_to_csv(analysis), f"{stem}-analysis.csv", "text/csv",
                            key="explore_dl_csv", on_click="ignore")


# ----------------------------------------------------------------------------------------------- page

def main() -> None:
    st.title("Explore attention")
    status = common.pair_status()
    if status.pair is None:
        st.info("Choose a compatible teacher and student in the sidebar to explore their attention.")
        return
    pair, config = status.pair, common.server_config()
    st.caption(f"Teacher **{status.teacher.label}** vs student **{status.student.label}**")
    good = decoded_sources(image_sources(pair, config))
    if not good:
        st.info("Upload an image or pick an example.")
        return
    source, image = choose(good)
    key = common.image_key(source.data)
    analysis = common.analyze_cached(status.key, key, source.label, pair, image)
    alpha, colormap, scale = display_settings()

    st.divider()
    predictions = st.container()  # drawn above the controls, filled once the query patch is known
    teacher_block, student_block, query = block_and_query(analysis)
    with predictions:
        show_predictions(analysis, source, query)
    heads_tab, rollout_tab, agreement_tab, export_tab = st.tabs(["Head attention", "Rollout", "Agreement",
                                                                 "Export"])
    with heads_tab:
        comparison = show_heads(analysis, teacher_block, student_block, query, alpha, colormap, scale)
    with rollout_tab:
        rollout_tiles = show_rollout(analysis, pair, status.key, key, alpha, colormap)
    with agreement_tab:
        show_agreement(analysis, teacher_block, student_block)
    with export_tab:
        show_export(analysis, comparison, rollout_tiles, source.name)


main()
