# vitkd explorer: the Streamlit app on CPU (python:3.11-slim, CPU-only torch wheels).
# Build: make docker-build   Run: make docker-run   then open http://localhost:8501
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    STREAMLIT_SERVER_HEADLESS=true \
    STREAMLIT_BROWSER_GATHER_USAGE_STATS=false \
    VITKD_ENABLE_TRAINING=0

WORKDIR /app

# torch and torchvision come from PyTorch's CPU index at the versions pinned in requirements.txt;
# installing them first means the rest of requirements.txt finds them and never pulls the CUDA build.
COPY requirements.txt ./
RUN grep -E '^(torch|torchvision)==' requirements.txt > /tmp/requirements-torch.txt \
    && grep -v -E '^(torch|torchvision)==' requirements.txt > /tmp/requirements-rest.txt \
    && pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu -r /tmp/requirements-torch.txt \
    && pip install --no-cache-dir -r /tmp/requirements-rest.txt \
    && rm /tmp/requirements-torch.txt /tmp/requirements-rest.txt

# An unprivileged user; it may write only its home (dataset cache) and /app/runs (browser training).
RUN groupadd --gid 1000 vitkd \
    && useradd --create-home --uid 1000 --gid 1000 --shell /usr/sbin/nologin vitkd \
    && mkdir -p /app/runs \
    && chown 1000:1000 /app/runs

COPY vitkd/ ./vitkd/
COPY app/ ./app/
COPY .streamlit/ ./.streamlit/
COPY checkpoints/ ./checkpoints/
# Labelled samples the Misclassifications page scans out of the box (scripts/make_samples.py).
COPY samples/ ./samples/

# Numeric, so that a runtime's runAsNonRoot check can verify it.
USER 1000:1000

EXPOSE 8501

# Streamlit's own health endpoint; python instead of curl keeps apt out of the image.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://localhost:8501/_stcore/health', timeout=4)"]

# Every interface, so a published port reaches it; browser training stays off (VITKD_ENABLE_TRAINING=0 above):
# it starts processes on the server, which only a local server (`make run`) allows by default.
ENTRYPOINT ["streamlit", "run", "app/streamlit_app.py", "--server.port=8501", "--server.address=0.0.0.0"]
