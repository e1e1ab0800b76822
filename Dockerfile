# One image for the API and the worker; the command picks the role:
#   docker run IMAGE modelpress serve --host 0.0.0.0 --no-worker     (API)
#   docker run IMAGE modelpress worker --queues gpu,cpu              (worker)
# Build with the CUDA wheel index for GPU workers: --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    MODELPRESS_HOME=/data

WORKDIR /app
RUN useradd --create-home --uid 1000 modelpress && mkdir -p /data && chown modelpress /data

COPY pyproject.toml constraints.txt README.md alembic.ini ./
COPY api ./api
COPY worker ./worker
COPY models ./models
COPY storage ./storage
COPY migrations ./migrations
COPY client ./client

RUN pip install --index-url "$TORCH_INDEX" "torch==${TORCH_VERSION}" \
 && grep -v '^torch==' constraints.txt > /tmp/constraints.txt \
 && pip install -c /tmp/constraints.txt '.[worker]' \
 && pip install --no-deps onnx2torch==1.5.15

USER modelpress
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')" || exit 1
CMD ["modelpress", "serve", "--host", "0.0.0.0", "--port", "8000", "--no-worker"]
