# syntax=docker/dockerfile:1
# ELDR gateway image: a slim runtime with only the gateway's runtime dependencies.
#   docker build -t eldr-gateway .
#   docker run --rm -p 30000:30000 -p 29000:29000 eldr-gateway \
#       --pd-disaggregation --prefill http://prefill:30000 8998 --decode http://decode:30000

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build stage: build the wheel and install it into a self-contained virtual environment ----
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Pure Python (numpy does the numeric work), so no compiler: the runtime stage copies the built
# virtual environment.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY zones ./zones
COPY loadtest ./loadtest
# Runtime extras only (no [dev]/[tools]): the gateway needs aiohttp, orjson, numpy,
# prometheus-client and uvloop. loadtest ships in the same distribution but is not imported at
# runtime; it is kept so `python -m loadtest` works inside the image for smoke tests.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-compile . \
    && /opt/venv/bin/python -m compileall -q /opt/venv/lib

# ---- runtime stage ----
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="eldr-gateway" \
      org.opencontainers.image.description="Expert-locality decode routing gateway for SGLang PD clusters" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed numeric uid so Kubernetes `runAsNonRoot` can verify it without a passwd lookup.
RUN groupadd --system --gid 10001 eldr \
    && useradd --system --uid 10001 --gid eldr --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin eldr
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    OPENBLAS_NUM_THREADS=1 \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=30000 \
    GATEWAY_PROMETHEUS_HOST=0.0.0.0 \
    GATEWAY_PROMETHEUS_PORT=29000
# OPENBLAS_NUM_THREADS=1: a locality decision is one small matrix-vector product on the event
# loop's thread; letting BLAS fan it out adds thread wake-up jitter (docs/benchmarks.md).
# Zone tables are mounted here (Kubernetes ConfigMap volume / compose bind mount).
WORKDIR /var/lib/eldr
USER 10001:10001
# 30000: the gateway's HTTP API (same default as sglang-router); 29000: Prometheus metrics.
EXPOSE 30000 29000
# slim has no curl; the standard library is enough. /liveness answers while the event loop runs,
# independent of upstream worker health (that is /readiness).
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/liveness' % os.environ.get('GATEWAY_PORT', '30000'), timeout=4)"]
# SIGTERM starts the gateway's graceful drain of in-flight streams.
STOPSIGNAL SIGTERM
ENTRYPOINT ["eldr-gateway"]
CMD ["--help"]
