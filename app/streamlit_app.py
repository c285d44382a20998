"""Entrypoint: ``streamlit run app/streamlit_app.py [-- --checkpoint-dir DIR --data-root DIR --enable-training]``
(all options and their environment variables: ``app.common.parse_server_config``).

Routes with ``st.navigation`` and draws the sidebar model picker every page shares.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `streamlit run` puts app/ on the path, not the repository root
    sys.path.insert(0, str(REPO_ROOT))

import streamlit as st  # noqa: E402

from app.common import apply_torch_threads, render_sidebar, server_config  # noqa: E402


@st.cache_resource(max_entries=1, show_spinner=False)
def freeze_startup_objects() -> int:
    """Once per server: move everything imported so far (torch, timm, plotly, streamlit: ~400k objects) out
    of the garbage collector's reach. Streamlit runs a full collection after every script run
    (``runner.postScriptGC``); without this each one walks all of them, about 0.25 CPU-seconds per run on this
    2-core machine, more than the page itself. Objects created later are collected as usual."""
    gc.freeze()
    return gc.get_freeze_count()


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
MMAP_THRESHOLD = 4 << 20


@st.cache_resource(max_entries=1, show_spinner=False)
def return_large_buffers_to_os() -> bool:
    """Once per server (glibc only): allocations of 4 MB and more get their own mapping, given back to the
    system when freed. A large upload is decoded in ~200 MB of 16 MB Pillow blocks; by default glibc serves
    those from per-thread heaps that keep them after the decode, so every script thread that decoded one
    would hold its ~200 MB for good. Returns whether the setting took."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return bool(libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):  # not glibc: keep the allocator's defaults
        return False


st.set_page_config(page_title="vitkd attention explorer", layout="wide")
apply_torch_threads(server_config())
if not st.get_option("global.appTest"):  # process-wide server settings; leave a test process alone
    freeze_startup_objects()
    return_large_buffers_to_os()

# Pages live in views/, not pages/, so Streamlit's legacy pages/ discovery never competes with st.navigation.
_PAGES = [
    ("explore.py", "Explore", ":material/visibility:"),
    ("misclassified.py", "Misclassifications", ":material/report:"),
    ("train.py", "Train", ":material/model_training:"),
    ("models.py", "Models", ":material/inventory_2:"),
]
pages = [st.Page(f"views/{name}", title=title, icon=icon, default=(name == "explore.py"))
         for name, title, icon in _PAGES]
navigation = st.navigation(pages)
render_sidebar()
navigation.run()
