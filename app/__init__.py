"""The Streamlit explorer: pages arrange widgets and call ``vitkd``; ``common`` holds the shared loaders."""
