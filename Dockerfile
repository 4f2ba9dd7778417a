# syntax=docker/dockerfile:1
# precision-serve images (see docs/observability.md):
#   gateway (default, last stage): the Triton-compatible gateway: core dependencies plus the
#                                  `openvino` extra (no torch, no onnx), so every engine the builder
#                                  may record for a variant runs; the repository is mounted at /models.
#   gateway-baked:                 the same with ./model_repository copied into /models.
#   loadtest:                      Locust with loadtest/locustfile.py (the compose "locust" service).
# Build: docker build -t precision-serve .        (or --target loadtest / --target gateway-baked)

FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system --gid 10001 serve \
    && useradd --system --uid 10001 --gid serve --home-dir /app --shell /usr/sbin/nologin serve \
    && mkdir -p /models \
    && chown serve:serve /models
WORKDIR /app
COPY pyproject.toml README.md ./
COPY common ./common
COPY builder ./builder
COPY server ./server
COPY loadtest ./loadtest
# The core (ONNX Runtime, tritonclient[grpc], grpcio, prometheus-client, aiohttp, pydantic...) and
# OpenVINO: the builder records `engine: openvino` for variants it measured faster there, and a
# gateway without it reports those variants unready. Envoy (the `envoy` extra): the front the
# gateway starts for Triton upstreams (docs/envoy.md). Never torch or onnx (the `build` extra).
RUN pip install '.[openvino,envoy]'

FROM base AS loadtest
RUN pip install ".[loadtest]"
USER serve
EXPOSE 8089
ENTRYPOINT ["locust", "-f", "/app/loadtest/locustfile.py"]

FROM base AS gateway
USER serve
VOLUME ["/models"]
# HTTP (KServe v2 REST), gRPC (Triton's GRPCInferenceService), Prometheus /metrics.
EXPOSE 8000 8001 8002
# No curl in slim images: ask the ready endpoint with the interpreter that is there anyway.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4).status == 200 else 1)"]
ENTRYPOINT ["precision-serve"]
CMD ["--repository", "/models", "--host", "0.0.0.0", "--ports", "http=8000,grpc=8001,metrics=8002"]

FROM gateway AS gateway-baked
COPY --chown=serve:serve model_repository/ /models/

# The default image is the gateway (a plain `docker build .` builds the last stage, so keep it last).
FROM gateway
