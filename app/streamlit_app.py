"""Entrypoint: ``streamlit run app/streamlit_app.py [-- --checkpoint-dir DIR --data-root DIR --enable-training]``
(all options and their environment variables: ``app.common.parse_server_config``).

Routes with ``st.navigation`` and draws the sidebar model picker every page shares.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `streamlit run` puts app/ on the path, not the repository root
    sys.path.insert(0, str(REPO_ROOT))

import streamlit as st  # noqa: E402

from app.common import apply_torch_threads, render_sidebar, server_config  # noqa: E402

st.set_page_config(page_title="vitkd attention explorer", layout="wide")
apply_torch_threads(server_config())

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
