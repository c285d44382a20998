"""Models: every checkpoint the server can see, from its metadata (nothing is loaded)."""

from __future__ import annotations

import streamlit as st

from app import common
from vitkd.headmap import HeadMap
from vitkd.pairs import describe_recipe, training_recipe

st.title("Checkpoints")
config = common.server_config()
entries = common.list_checkpoints(config)
searched = [*config.checkpoint_dirs, config.runs_dir]
st.caption("Searched: " + ", ".join(common.escape_markdown(common.display_path(d, config)) for d in searched))
if not entries:
    st.info("No checkpoints yet. Train with `python -m vitkd experiment configs/cifar10.yaml`, or set "
            "`VITKD_CHECKPOINT_DIRS` to a folder of `.safetensors` checkpoints.")
rows = []
for entry in entries:
    meta = entry.meta or {}
    model = meta.get("model") or {}
    metrics = meta.get("metrics") or {}
    head_map = meta.get("head_map")
    taught_by = (meta.get("teacher") or {}).get("path")
    rows.append({
        "checkpoint": entry.label,
        "problem": common.redact_paths(entry.error, config) if entry.error else None,
        "model": model.get("name"),
        "kind": meta.get("kind"),
        "data": common.redact_paths(meta["data"], config) if meta.get("data") else None,
        "parameters": common.format_count(meta["parameters"]) if meta.get("parameters") else None,
        "input px": meta.get("img_size"),
        "classes": len(meta.get("class_names") or []) or None,
        "accuracy %": metrics.get("accuracy"),
        "epoch": meta.get("epoch"),
        "recipe": describe_recipe(training_recipe(meta)) if entry.meta is not None else None,
        "head map": HeadMap.from_list(head_map).describe() if head_map else None,
        "teacher": common.display_path(taught_by, config) if taught_by else None,
    })
if rows:
    st.dataframe(rows, hide_index=True)
