"""Misclassifications: scan a split with the selected teacher and student, group images by who got them right.

Widgets only; the scan is ``vitkd.scan.scan_folder``: a data root's split (``ROOT/test``) is read from
the decoded-image cache, as ``python -m vitkd scan --data imagefolder:ROOT`` reads it (same rows),
and any other folder file by file. Splits come from the server's configured data roots (never a
path typed in the browser). A scan is cached per (model file versions,
fingerprint of every file the scan lists, limit), so coming back to a split is instant. Per-user state: ``misc_*`` keys.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import streamlit as st

from app import common
from vitkd.errors import VitkdError
from vitkd.pairs import ModelPair
from vitkd.scan import GROUP_TITLES, GROUPS, ScanResult, ScanRow, folder_fingerprint, scan_folder, split_folders

GALLERY_COLUMNS = 6
GALLERY_MAX = 36  # thumbnails per group; the table and the CSV hold every image
THUMB = 96  # px
SORTS = {"most divergent first": True, "least divergent first": False}
SHORT_TITLES = {"teacher_right_student_wrong": "Only teacher right",
                "student_right_teacher_wrong": "Only student right", "both_wrong": "Both wrong",
                "both_right": "Both right"}


def split_choices(config: common.ServerConfig,
                  class_names: Sequence[str] | None = None) -> dict[str, tuple[str, str | None]]:
    """Label -> (folder, labels as JSON or None) for every scannable split of the configured data roots."""
    examples_dir = common.EXAMPLES_DIR.resolve()
    choices: dict[str, tuple[str, str | None]] = {}
    for root in config.data_roots:
        if root.resolve() == examples_dir:
            labels = {e.name: e.label for e in common.examples(class_names) if e.label is not None}
            if labels:
                choices["Bundled examples"] = (str(root), json.dumps(labels, sort_keys=True))
            continue
        for folder in split_folders(root):
            label = root.name if folder == root else f"{root.name}/{folder.name}"
            shown = common.display_path(folder)
            choices[label if shown == label else f"{label}  ({shown})"] = (str(folder), None)
    return choices


def folder_version(folder: str, class_names: Sequence[str], labels_json: str | None) -> str:
    """``folder_fingerprint`` of the listing the scan reads: an image added (nested folders too), removed or
    overwritten in place changes it, where folder mtimes miss the last two."""
    return folder_fingerprint(folder, class_names, json.loads(labels_json) if labels_json else None)


@st.cache_data(max_entries=16, show_spinner=False)
def scan_cached(pair_key: str, folder: str, version: str, labels_json: str | None, limit: int,
                _pair: ModelPair) -> ScanResult:
    """``scan_folder`` once per (model file versions, folder version, labels, limit); models are passed unhashed.

    The progress bar is created here so a cache hit replays it (it ends empty) instead of failing.
    """
    bar = st.progress(0.0, text="Scanning...")

    def progress(done: int, total: int) -> None:
        bar.progress(done / max(1, total), text=f"Scanned {done} of {total} images")

    labels = json.loads(labels_json) if labels_json else None
    result = scan_folder(_pair.teacher, _pair.teacher_meta, _pair.student, _pair.student_meta, folder,
                         labels=labels, limit=limit, progress=progress)
    bar.empty()
    return result


def _short_name(path: str, folder: str) -> str:
    """The image's path inside the scanned folder (``cat/0001.png``): file names repeat across classes."""
    try:
        return Path(path).relative_to(folder).as_posix()
    except ValueError:
        return Path(path).name


def table(result: ScanResult, folder: str) -> tuple[list[dict[str, object]], list[ScanRow]]:
    """Table records (image named inside the folder, never by its server path) and their rows, same order."""
    rows = sorted(result.rows, key=lambda r: r.divergence, reverse=True)
    return [{"image": _short_name(r.path, folder), "true": r.label_name, "teacher": r.teacher_pred_name,
             "teacher p": round(r.teacher_conf, 4), "student": r.student_pred_name,
             "student p": round(r.student_conf, 4), "group": GROUP_TITLES[r.group],
             "attention JS (bits)": round(r.divergence, 5)} for r in rows], rows


def browser_csv(result: ScanResult, folder: str) -> str:
    """The scan's CSV with each image named inside the scanned folder (no server path reaches the browser)."""
    rows = tuple(dataclasses.replace(r, path=_short_name(r.path, folder)) for r in result.rows)
    return dataclasses.replace(result, rows=rows).to_csv()


def open_row(row: ScanRow) -> None:
    name = Path(row.path).name
    try:
        data = Path(row.path).read_bytes()
    except OSError:  # moved or deleted on the server since the scan
        st.error(f"**{common.escape_markdown(name)}** can no longer be read on the server (moved or deleted "
                 "since the scan): scan the split again.")
        return
    common.open_in_explore(name, data, row.label)


def show_gallery(result: ScanResult) -> None:
    tabs = st.tabs([f"{GROUP_TITLES[g]} ({result.counts[g]})" for g in GROUPS])
    for tab, group in zip(tabs, GROUPS, strict=True):
        with tab:
            rows = result.group(group)
            if not rows:
                st.caption("No images in this group.")
                continue
            order = st.radio("Order", list(SORTS), horizontal=True, key=f"misc_sort_{group}",
                             help="Attention divergence: Jensen-Shannon divergence (bits, 0 to 1) between the "
                                  "teacher's and the student's CLS attention rollout over patches (on the "
                                  "coarser patch grid when the two grids differ).")
            if not SORTS[order]:
                rows = rows[::-1]
            if len(rows) > GALLERY_MAX:
                st.caption(f"Showing {GALLERY_MAX} of {len(rows)}; the table above lists all of them.")
            rows = rows[:GALLERY_MAX]
            for start in range(0, len(rows), GALLERY_COLUMNS):
                cols = st.columns(GALLERY_COLUMNS)
                for offset, (col, row) in enumerate(zip(cols, rows[start:start + GALLERY_COLUMNS], strict=False)):
                    with col:
                        esc = common.escape_markdown
                        st.image(row.path, width=THUMB,
                                 caption=f"{esc(row.label_name)}: T {esc(row.teacher_pred_name)} "
                                         f"{row.teacher_conf:.0%}, S {esc(row.student_pred_name)} "
                                         f"{row.student_conf:.0%}, JS {row.divergence:.3f}")
                        if st.button("Explore", key=f"misc_open_{group}_{start + offset}", width="stretch"):
                            open_row(row)


def main() -> None:
    st.title("Misclassifications")
    st.caption("Run both models over a split; see which images the teacher gets right and the student not "
               "(and the reverse), and how differently the two look at each image.")
    status = common.pair_status()
    if status.pair is None:
        st.info("Choose a compatible teacher and student in the sidebar to scan a split.")
        return
    config = common.server_config()
    choices = split_choices(config, status.pair.class_names)
    if len(choices) <= 1:
        st.info("No data roots are configured, so only the bundled examples can be scanned. Start the server "
                "with `VITKD_DATA_ROOTS=DIR` or `streamlit run app/streamlit_app.py -- --data-root DIR` "
                "(DIR/test/<class>/*.jpg, or DIR/<class>/*.jpg).")
    if not choices:
        return
    labels = list(choices)
    common.ensure_choice("misc_split", labels, labels[0])
    cols = st.columns([3, 1, 1], vertical_alignment="bottom")
    choice = cols[0].selectbox("Images", labels, key="misc_split",
                               help="Splits of the server's configured data roots; class names must be the "
                                    "models' classes.")
    limit = cols[1].number_input("Limit", min_value=1, max_value=1_000_000, value=1000, step=100, key="misc_limit",
                                 help="Scan at most this many images, evenly spaced over the split in file order.")
    folder, labels_json = choices[choice]
    request = (status.key, folder, labels_json, int(limit))
    if cols[2].button("Scan", type="primary", width="stretch"):
        st.session_state["misc_request"] = request
    if st.session_state.get("misc_request") != request:
        st.caption("Press **Scan** to classify the images with both models.")
        return
    try:
        version = folder_version(folder, status.pair.class_names, labels_json)
        result = scan_cached(status.key, folder, version, labels_json, int(limit), status.pair)
    except (VitkdError, OSError) as exc:
        st.error(common.escape_markdown(common.redact_paths(str(exc))))
        return
    if result.skipped:
        with st.expander(f"{len(result.skipped)} files could not be read and were skipped"):
            st.dataframe([{"file": _short_name(p, folder), "reason": common.redact_paths(why)}
                          for p, why in result.skipped], hide_index=True)
    if not result.rows:
        st.warning("No image could be classified.")
        return
    metrics = st.columns(6)
    metrics[0].metric("Images", len(result.rows))
    metrics[1].metric("Teacher accuracy", f"{result.teacher_accuracy:.1f} %")
    metrics[2].metric("Student accuracy", f"{result.student_accuracy:.1f} %")
    for col, group in zip(metrics[3:], GROUPS[:3], strict=True):
        col.metric(SHORT_TITLES[group], result.counts[group], help=GROUP_TITLES[group])

    st.subheader("All images")
    st.caption("Sorted by attention divergence; click a column to re-sort, select a row to open it in Explore.")
    records, ordered = table(result, folder)
    selection = st.dataframe(records, hide_index=True, on_select="rerun", selection_mode="single-row",
                             key="misc_table")
    st.download_button("Download CSV", browser_csv(result, folder), "misclassifications.csv", "text/csv",
                       on_click="ignore", key="misc_csv")
    picked = selection.selection.rows if selection is not None else []
    if picked:
        open_row(ordered[picked[0]])

    st.subheader("By group")
    show_gallery(result)


main()
