"""Explore: drop in images and compare teacher and student: predictions, per-head attention, rollout, agreement.

Widgets only; every number and picture comes from ``vitkd.analysis`` through the cached
wrappers in ``app.common``. Per-user state lives in ``st.session_state`` (keys ``explore_*``).

Built to stay cheap with many users: uploads are decoded once, straight to a small copy
(``common.decode_image``), and analysed once (``common.analyze_cached``). The page is nested
``st.fragment``s, so a widget reruns only its part: an upload or an example redraws the images
and their analysis, not the sidebar; a display, block or query control redraws the analysis
view (``show_analysis``), never the decode or the analysis; a tab's own controls redraw that
tab. Only the open tab and an open overview are drawn; every overlay is rendered and
PNG-encoded once per (pair, image, settings) and shared by all sessions (``common.rendered``);
exports are built only when downloaded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import Any, TypeVar

import numpy as np
import streamlit as st

from app import common
from vitkd.agreement import block_divergence, pair_divergences
from vitkd.analysis import ImageAnalysis, class_rollout, recompute_rollout
from vitkd.export import analysis_to_csv, analysis_to_json
from vitkd.images import DEFAULT_MAX_PIXELS
from vitkd.maps import (
    HeadComparison,
    Tile,
    blocks_overview,
    compare_heads,
    comparison_png,
    heads_text,
    mark_query,
    model_query,
    paired_teacher_block,
    query_grid,
    render_map,
    rollout_map,
    taught_by,
)
from vitkd.overlay import COLORMAPS, encode_png
from vitkd.pairs import ModelPair
from vitkd.rollout import HEAD_FUSIONS

TILE = 150  # px per head map
PREVIEW = 200  # px of the analysed crop
EXAMPLE = 64  # px per example thumbnail
MAX_UPLOADS = 20  # uploads one session opens; more get a message instead of a decode each
TABS = ("Head attention", "Rollout", "Agreement", "Export")
FLAG_COLORS = {"agree": "blue", "disagree": "orange", "both-right": "green", "both-wrong": "red",
               "teacher-wrong": "orange", "student-wrong": "red"}
SCALE_LABELS = {"map": "per map", "model": "per model", "shared": "shared by both models"}
TARGET_LABELS = {"own": "each model's prediction", "true": "true class", "other": "the other model's prediction",
                 "chosen": "a chosen class"}

# PNG bytes and captions of rendered tiles: what the page shows and the render cache keeps.
PngTiles = tuple[tuple[bytes, str], ...]
T = TypeVar("T")


@dataclass(frozen=True)
class ImageSource:
    """An image the user can look at: an upload, an example, or one sent from another page."""

    key: str
    name: str
    data: bytes
    label: int | None  # true class index under the current pair, when known


@dataclass(frozen=True, eq=False)
class Shown:
    """The analysis on screen, the image's name, and what identifies them in the render cache."""

    analysis: ImageAnalysis
    pair: ModelPair
    pair_key: str
    image_key: str
    name: str

    def rendered(self, what: str, settings: tuple[Any, ...], render: Callable[[], T]) -> T:
        """``render()`` once per (pair, image, ``what``, ``settings``) across sessions (``common.rendered``)."""
        return common.rendered(what, self.pair_key, self.image_key, settings, render)


# ----------------------------------------------------------------------------------------------- image input

def _pick_example() -> None:
    st.session_state["explore_choice"] = f"example:{st.session_state['explore_example']}"


def _on_upload() -> None:
    files = (st.session_state.get("explore_uploads") or [])[:MAX_UPLOADS]
    if files:  # show the newest upload this session opens
        st.session_state["explore_choice"] = f"upload:{files[-1].file_id}"


def _label_index(pair: ModelPair, class_name: str | None) -> int | None:
    return pair.class_names.index(class_name) if class_name in pair.class_names else None


def _too_many_uploads(count: int, ignored: Sequence[str]) -> str:
    names = ", ".join(f"**{name}**" for name in ignored[:5]) + (f" and {len(ignored) - 5} more"
                                                               if len(ignored) > 5 else "")
    return (f"{count} images uploaded; a session opens at most {MAX_UPLOADS}. Not opened: {names}. "
            "Remove uploads you are done with (x beside each file) to open others.")


def _example_labels(examples: Sequence[common.Example]) -> dict[str, str]:
    """File name -> its class, numbered when a class has several examples (a widget tells options by label)."""
    counts: dict[str, int] = {}
    labels = {}
    for example in examples:
        label = example.label or example.name
        counts[label] = counts.get(label, 0) + 1
        labels[example.name] = label if counts[label] == 1 else f"{label} {counts[label]}"
    return labels


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
                 f"{DEFAULT_MAX_PIXELS / 1e6:g} megapixels per file, {MAX_UPLOADS} files per session.")
        st.caption(f"Limit {config.max_upload_mb} MB per file. Images are resized (shorter side) and "
                   f"centre-cropped to {pair.img_size} px, as in training.")
        uploads = list(uploads or [])
        if len(uploads) > MAX_UPLOADS:
            st.warning(_too_many_uploads(len(uploads), [u.name for u in uploads[MAX_UPLOADS:]]))
            uploads = uploads[:MAX_UPLOADS]
    if examples:
        with example_col:  # two elements, not a grid of them: every element costs each full run
            labels = _example_labels(examples)
            st.image([str(e.path) for e in examples], caption=[labels[e.name] for e in examples], width=EXAMPLE)
            st.pills("**Or pick an example** (true class known)", list(labels), format_func=labels.__getitem__,
                     required=True, key="explore_example", on_change=_pick_example, wrap=True)

    sources: list[ImageSource] = []
    for upload in uploads:
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


def decoded_sources(sources: list[ImageSource], crop_size: int) -> list[tuple[ImageSource, np.ndarray]]:
    """Decode every source (to a small copy, once per file); each bad file gets its own ``st.error``."""
    good = []
    for source in sources:
        image, error = common.decode_image(common.image_key(source.data), source.data, crop_size)
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


# ----------------------------------------------------------------------------------------------- rendering

def _pngs(tiles: Sequence[Tile]) -> PngTiles:
    return tuple((encode_png(t.image), t.caption) for t in tiles)


def _comparison_pngs(comparison: HeadComparison) -> tuple[PngTiles, PngTiles]:
    return _pngs(comparison.teacher), _pngs(comparison.student)


def rollout_tiles(analysis: ImageAnalysis, grads: dict[str, np.ndarray], classes: dict[str, int], fusion: str,
                  discard: float, alpha: float, colormap: str) -> list[Tile]:
    """Attention rollout and class-specific gradient rollout tiles, teacher's two then student's two."""
    tiles = []
    for role in ("teacher", "student"):
        result = analysis.model(role)
        rmap = rollout_map(recompute_rollout(result, fusion, discard), result.layout)  # the model's own grid
        tiles += [
            Tile(render_map(analysis.image_rgb, rmap, 2 * TILE, alpha, colormap),
                 f"{role} rollout ({fusion}, discard {discard:.2f})", False),
            Tile(render_map(analysis.image_rgb, rollout_map(grads[role], result.layout), 2 * TILE, alpha,
                            colormap),
                 f"{role} gradient rollout: {analysis.class_names[classes[role]]} "
                 f"(p={float(result.probs[classes[role]]):.2f})", False),
        ]
    return tiles


# ----------------------------------------------------------------------------------------------- sections

def show_predictions(shown: Shown, query: tuple[int, int] | None) -> None:
    analysis = shown.analysis
    flag = analysis.flag
    st.badge(flag.message(), color=FLAG_COLORS[flag.status],
             icon=":material/check:" if flag.status in ("agree", "both-right") else ":material/warning:")
    image_col, teacher_col, student_col = st.columns([1.1, 2, 2])
    true_name = None if analysis.true_label is None else analysis.class_names[analysis.true_label]
    with image_col:
        preview = shown.rendered("preview", (query, PREVIEW), lambda: encode_png(
            mark_query(analysis, query, PREVIEW)))
        st.image(preview, width=PREVIEW, output_format="PNG")
        st.caption(f"**{shown.name}** ({analysis.image_rgb.shape[0]} px crop the models saw)"
                   + (f"; true class: **{true_name}**" if true_name else "; true class unknown"))
        if query is not None:
            st.caption(query_caption(analysis, query))
    for col, result, role in ((teacher_col, analysis.teacher, "Teacher"), (student_col, analysis.student, "Student")):
        with col:
            st.plotly_chart(common.topk_figure_cached(shown.pair_key, shown.image_key, role, analysis.true_label,
                                                      result),
                            key=f"explore_top_{role}", config={"displayModeBar": False})


def query_caption(analysis: ImageAnalysis, query: tuple[int, int]) -> str:
    """Which patch each model's maps query: one patch, or each model's own when their grids differ."""
    t_grid, s_grid = analysis.teacher.layout.grid_size, analysis.student.layout.grid_size
    if analysis.same_grid:
        return f"Query patch: row {query[0]}, column {query[1]} of the {t_grid[0]}x{t_grid[1]} grid."
    gh, gw = query_grid(analysis)
    parts = [f"{role} patch {model_query(analysis, role, query)} of its {g[0]}x{g[1]} grid ({frame} frame)"
             for role, g, frame in (("teacher", t_grid, "amber"), ("student", s_grid, "blue"))]
    return (f"Query: row {query[0]}, column {query[1]} of the finer {gh}x{gw} grid; " + ", ".join(parts)
            + ", both covering the same point of the image.")


def display_settings(where: st.delta_generator.DeltaGenerator) -> tuple[float, str, str]:
    """Opacity, colour map and colour scale, drawn in ``where`` (a sidebar container of ``show_images``)."""
    with where:
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

    gh, gw = query_grid(analysis)
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
        # on the finer grid when the models' grids differ; the caption under the image says which patch each uses
        row = cols[3].number_input("Row", 0, gh - 1, key="explore_qrow")
        col = cols[4].number_input("Column", 0, gw - 1, key="explore_qcol")
        query = (int(row), int(col))
    return int(teacher_block), int(student_block), query


def show_tiles(title: str, tiles: PngTiles, width: int = TILE // 2) -> None:
    """One ``st.image`` for all tiles, ``width`` px each (four of them fill half the page; they wrap) and
    sharp on high-density screens: one element, not a grid of them."""
    st.markdown(title)
    st.image([png for png, _ in tiles], caption=[caption for _, caption in tiles], width=width,
             output_format="PNG")


def head_view() -> str:
    """The "View" control's value, also when the heads tab is not drawn (for the export)."""
    return st.session_state.get("explore_view", "per head")


def heads_comparison(analysis: ImageAnalysis, teacher_block: int, student_block: int,
                     query: tuple[int, int] | None, view: str, alpha: float, colormap: str,
                     scale: str) -> HeadComparison:
    return compare_heads(analysis, teacher_block, student_block, query=query,
                         head_fusion=None if view == "per head" else view, alpha=alpha, colormap=colormap,
                         scale=scale, size=TILE)


@st.fragment
def show_heads(shown: Shown, teacher_block: int, student_block: int, query: tuple[int, int] | None,
               alpha: float, colormap: str, scale: str) -> None:
    analysis = shown.analysis
    view = st.segmented_control("View", ["per head", *HEAD_FUSIONS], default="per head", required=True,
                                key="explore_view", persist_state="page",
                                format_func=lambda v: v if v == "per head" else f"{v} of heads")
    teacher_tiles, student_tiles = shown.rendered(
        "heads", (teacher_block, student_block, query, view, alpha, colormap, scale, TILE),
        lambda: _comparison_pngs(heads_comparison(analysis, teacher_block, student_block, query, view, alpha,
                                                  colormap, scale)))
    left, right = st.columns(2, gap="large")
    with left:
        show_tiles(f"**Teacher**, block {teacher_block}", teacher_tiles)
    with right:
        show_tiles(f"**Student**, block {student_block}", student_tiles)
    if analysis.head_map is not None:
        st.caption("Framed maps are distilled pairs: a student head shows the teacher head that taught it, "
                   "a teacher head the student heads it taught.")
    overview = st.expander("All blocks overview (rows: blocks from the first down, columns: heads)",
                           key="explore_overview", on_change="rerun")
    if overview.open:
        with overview:
            hm = analysis.head_map
            t_marks = frozenset((p.teacher_block, p.teacher_head) for p in hm.pairs) if hm else frozenset()
            s_marks = frozenset((p.student_block, p.student_head) for p in hm.pairs) if hm else frozenset()
            teacher_png, student_png = shown.rendered("overview", (query, alpha, colormap), lambda: tuple(
                encode_png(blocks_overview(analysis.model(role), analysis.image_rgb,
                                           model_query(analysis, role, query), alpha, colormap, highlight=marks))
                for role, marks in (("teacher", t_marks), ("student", s_marks))))
            left, right = st.columns(2, gap="large")
            left.image(teacher_png, output_format="PNG",
                       caption=f"Teacher: {analysis.teacher.depth} blocks x {analysis.teacher.num_heads} heads")
            right.image(student_png, output_format="PNG",
                        caption=f"Student: {analysis.student.depth} blocks x {analysis.student.num_heads} heads")


def _rollout_target(analysis: ImageAnalysis, target: str, role: str, chosen: int) -> int:
    own, other = analysis.model(role), analysis.model("student" if role == "teacher" else "teacher")
    return int({"own": own.predicted, "true": analysis.true_label, "other": other.predicted, "chosen": chosen}[target])


def rollout_settings(analysis: ImageAnalysis) -> tuple[str, float, dict[str, int]]:
    """(head fusion, discard ratio, class index per role) as the rollout tab's controls last set them."""
    state = st.session_state
    target = state.get("explore_target", "own")
    if target == "true" and analysis.true_label is None:
        target = "own"
    chosen = int(state.get("explore_class", analysis.teacher.predicted))
    classes = {role: _rollout_target(analysis, target, role, chosen) for role in ("teacher", "student")}
    return state.get("explore_rollout_fusion", "mean"), float(state.get("explore_discard", 0.0)), classes


@st.fragment
def show_rollout(shown: Shown, alpha: float, colormap: str) -> None:
    """Attention rollout and class-specific gradient rollout of both models."""
    analysis, pair = shown.analysis, shown.pair
    cols = st.columns([1, 1, 1])
    cols[0].segmented_control("Head fusion", list(HEAD_FUSIONS), default="mean", required=True,
                              key="explore_rollout_fusion", persist_state="page")
    cols[1].slider("Discard ratio", 0.0, 0.95, 0.0, 0.05, key="explore_discard", persist_state="page",
                   help="Zero the weakest attention weights of every block before rolling out "
                        "(the CLS column is kept).")
    targets = ["own", "other", "chosen"] if analysis.true_label is None else ["own", "true", "other", "chosen"]
    cols = st.columns([2, 1])
    target = cols[0].segmented_control("Class-specific rollout explains", targets, default="own", required=True,
                                       format_func=TARGET_LABELS.__getitem__, key="explore_target",
                                       persist_state="page")
    if target == "chosen":
        classes = list(range(len(analysis.class_names)))
        common.ensure_choice("explore_class", classes, analysis.teacher.predicted)
        cols[1].selectbox("Class", classes, format_func=analysis.class_names.__getitem__, key="explore_class",
                          persist_state="page")
    fusion, discard, classes = rollout_settings(analysis)
    grads = {role: common.class_rollout_cached(shown.pair_key, shown.image_key, role, classes[role], model,
                                               analysis.model(role))
             for role, model in (("teacher", pair.teacher), ("student", pair.student))}
    tiles = shown.rendered("rollout", (fusion, discard, classes["teacher"], classes["student"], alpha, colormap),
                           lambda: _pngs(rollout_tiles(analysis, grads, classes, fusion, discard, alpha, colormap)))
    left, right = st.columns(2, gap="large")
    with left:
        show_tiles("**Teacher**", tiles[:2], width=TILE)
    with right:
        show_tiles("**Student**", tiles[2:], width=TILE)


def show_agreement(analysis: ImageAnalysis, teacher_block: int, student_block: int) -> None:
    gh, gw = analysis.layout.grid_size
    resampled = ("" if analysis.same_grid else
                 f" Compared on the coarser {gh}x{gw} patch grid: the finer model's attention is averaged onto it.")
    st.markdown("Jensen-Shannon divergence (bits, 0 to 1) between each student head of "
                f"block {student_block} and each teacher head of block {teacher_block}, averaged over query tokens."
                f"{resampled} Change the blocks above.")
    matrix = block_divergence(analysis, teacher_block, student_block)
    marks = [(sh, th) for sh, (tb, heads) in taught_by(analysis.head_map, student_block).items()
             if tb == teacher_block for th in heads]  # a head taught by a group: each of its teacher heads
    st.plotly_chart(common.divergence_figure(matrix, teacher_block, student_block, marks), key="explore_js",
                    config={"displayModeBar": False})
    rows = pair_divergences(analysis)
    if not rows:
        st.info("This student has no head map (a baseline or a student of another teacher): no distilled pairs.")
    else:
        st.markdown("**Distilled pairs on this image** (rank 1: the taught teacher head, or the mean of a group of "
                    "heads, is closer than every head of its block)")
        st.dataframe([{"teacher head": f"T{r['teacher_block']}.h{heads_text(r['teacher_head'])}",
                       "student head": f"S{r['student_block']}.h{r['student_head']}",
                       "JS divergence (bits)": round(r["js"], 5), "rank": f"{r['rank']} of {r['teacher_heads']}"}
                      for r in rows], hide_index=True)
    show_head_stats(analysis)


def show_head_stats(analysis: ImageAnalysis) -> None:
    """One number per head and block for both models: where a student head looks unlike its teacher's."""
    st.markdown("**How each head looks on this image**: one marker per head, averaged over the query patches. "
                "Distance: how far from a patch its attention goes, in input pixels (each model at its own input "
                "size; 0 = only itself); the dotted line is what attention spread evenly over every token would "
                "score. Hover a marker for all four numbers.")
    metric = st.segmented_control("Measure", list(common.HEAD_STAT_LABELS), default="distance_px",
                                  format_func=lambda k: common.HEAD_STAT_LABELS[k][0], key="explore_headstat",
                                  required=True)
    head_map = analysis.head_map
    distilled = {"teacher": {(p.teacher_block, p.teacher_head) for p in head_map.pairs} if head_map else set(),
                 "student": {(p.student_block, p.student_head) for p in head_map.pairs} if head_map else set()}
    stats = {role: analysis.model(role).head_stats() for role in ("teacher", "student")}
    uniform = {role: analysis.model(role).uniform_head_stats() for role in ("teacher", "student")}
    st.plotly_chart(common.head_stats_figure(stats, metric, distilled, uniform), key="explore_headstats",
                    config={"displayModeBar": False})


def export_png(shown: Shown, teacher_block: int, student_block: int, query: tuple[int, int] | None, view: str,
               rollout: tuple[str, float, dict[str, int]], alpha: float, colormap: str, scale: str) -> bytes:
    """The shown head maps and rollouts as one captioned PNG (built when the download is clicked)."""
    analysis, pair = shown.analysis, shown.pair
    fusion, discard, classes = rollout
    grads = {role: class_rollout(model, analysis.model(role).inputs, classes[role], analysis.model(role).tokens or None)
             for role, model in (("teacher", pair.teacher), ("student", pair.student))}
    comparison = heads_comparison(analysis, teacher_block, student_block, query, view, alpha, colormap, scale)
    return comparison_png(comparison, rollout_tiles(analysis, grads, classes, fusion, discard, alpha, colormap))


def show_export(shown: Shown, teacher_block: int, student_block: int, query: tuple[int, int] | None,
                alpha: float, colormap: str, scale: str) -> None:
    analysis, name = shown.analysis, shown.name
    stem = name.rsplit(".", 1)[0]
    view, rollout = head_view(), rollout_settings(analysis)
    st.markdown("Download what is shown: the head maps and rollouts as one PNG, the numbers as JSON (predictions, "
                "distilled-pair divergences, every block's CLS maps) or CSV (probabilities, pair divergences).")
    row = st.container(horizontal=True)
    # Each file is built only when its button is clicked.
    row.download_button("Overlays (PNG)", lambda: export_png(shown, teacher_block, student_block, query, view,
                                                              rollout, alpha, colormap, scale),
                        f"{stem}-attention.png", "image/png", key="explore_dl_png", on_click="ignore")
    row.download_button("Numbers (JSON)", lambda: analysis_to_json(analysis, name), f"{stem}-analysis.json",
                        "application/json", key="explore_dl_json", on_click="ignore")
    row.download_button("Numbers (CSV)", lambda: analysis_to_csv(analysis), f"{stem}-analysis.csv", "text/csv",
                        key="explore_dl_csv", on_click="ignore")


# ----------------------------------------------------------------------------------------------- page

@st.fragment
def show_analysis(shown: Shown, settings: st.delta_generator.DeltaGenerator) -> None:
    """Everything drawn from one analysis; a widget in here reruns this part only (no decode, no analysis).
    ``settings``: where the display controls go (a sidebar container its parent fragment draws every run)."""
    alpha, colormap, scale = display_settings(settings)
    predictions = st.container()  # drawn above the controls, filled once the query patch is known
    teacher_block, student_block, query = block_and_query(shown.analysis)
    with predictions:
        show_predictions(shown, query)
    heads_tab, rollout_tab, agreement_tab, export_tab = st.tabs(TABS, key="explore_tab", on_change="rerun")
    if heads_tab.open:  # only the open tab is drawn
        with heads_tab:
            show_heads(shown, teacher_block, student_block, query, alpha, colormap, scale)
    if rollout_tab.open:
        with rollout_tab:
            show_rollout(shown, alpha, colormap)
    if agreement_tab.open:
        with agreement_tab:
            show_agreement(shown.analysis, teacher_block, student_block)
    if export_tab.open:
        with export_tab:
            show_export(shown, teacher_block, student_block, query, alpha, colormap, scale)


@st.fragment
def show_images(status: common.PairStatus) -> None:
    """Image input and its analysis. Uploading or picking an image reruns this part only: the pair, the
    sidebar's model picker and the page around it stay as they are (a model change reruns the page)."""
    pair, config = status.pair, common.server_config()
    good = decoded_sources(image_sources(pair, config), pair.img_size)
    if not good:
        st.info("Upload an image or pick an example.")
        return
    source, image = choose(good)
    key = common.image_key(source.data)
    analysis = common.analyze_cached(status.key, key, source.label, pair, image)
    st.divider()
    # The display controls live in the sidebar; a fragment may only write to a container outside it that
    # its parent draws on every run, so this part reserves their place there.
    show_analysis(Shown(analysis, pair, status.key, key, source.name), st.sidebar.container())


def main() -> None:
    st.title("Explore attention")
    status = common.pair_status()
    if status.pair is None:
        st.info("Choose a compatible teacher and student in the sidebar to explore their attention.")
        return
    st.caption(f"Teacher **{status.teacher.label}** vs student **{status.student.label}**")
    show_images(status)


main()
