"""Models: every checkpoint the server can see, from its metadata (nothing is loaded)."""

from __future__ import annotations

import streamlit as st

from app import common
from vitkd.headmap import HeadMap

st.title("Checkpoints")
config = common.server_config()
entries = common.list_checkpoints(config)
st.caption("Searched: " + ", ".join(f"`{d}`" for d in (*config.checkpoint_dirs, config.runs_dir)))
if not entries:
    st.info("No checkpoints yet. Train with `python -m vitkd experiment configs/cifar10.yaml`, or set "
            "`VITKD_CHECKPOINT_DIRS` to a folder of `.safetensors` checkpoints.")
rows = []
for entry in entries:
    meta = entry.meta or {}
    model = meta.get("model") or {}
    metrics = meta.get("metrics") or {}
    head_map = meta.get("head_map")
    rows.append({
        "checkpoint": entry.label,
        "problem": entry.error,
        "model": model.get("name"),
        "kind": meta.get("kind"),
        "data": meta.get("data"),
        "parameters": common.format_count(meta["parameters"]) if meta.get("parameters") else None,
        "input px": meta.get("img_size"),
        "classes": len(meta.get("class_names") or []) or None,
        "accuracy %": metrics.get("accuracy"),
        "epoch": meta.get("epoch"),
        "head map": HeadMap.from_list(head_map).describe() if head_map else None,
    })
if rows:
    st.dataframe(rows, hide_index=True)
