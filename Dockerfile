# syntax=docker/dockerfile:1
# The Ferry image: `ferry serve` with the pinned ONNX Runtime library, as a non-root user, on a read-only root
# filesystem. Build it from the repository root:
#
#   docker build -t ferry .
#   docker run --rm --read-only --tmpfs /tmp -p 8500:8500 -p 8501:8501 \
#       -v "$PWD/examples/models:/models:ro" ferry
#
# Configuration is by environment (every `ferry serve` flag has a FERRY_* variable) or by a TOML file named with
# FERRY_CONFIG. The variables set below take precedence over that file, so they hold only paths inside the image.
# tests/python/test_deploy.py checks this file against the binary's own defaults.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

# 1. The binary.
FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build
# llama.cpp (language models) is built from source by cmake, with bindgen reading its header through libclang.
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends cmake g++ libclang-dev \
    && rm -rf /var/lib/apt/lists/*
# llama.cpp for any x86-64 CPU with AVX2 (.cargo/config.toml would build it for the building machine's CPU).
ENV CFLAGS_x86_64_unknown_linux_gnu=-march=x86-64-v3 CXXFLAGS_x86_64_unknown_linux_gnu=-march=x86-64-v3
WORKDIR /src
COPY .cargo ./.cargo
COPY Cargo.toml Cargo.lock ./
COPY proto ./proto
COPY crates ./crates
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p ferry \
    && install -m 0755 target/release/ferry /usr/local/bin/ferry

# 2. The ONNX Runtime library, from the onnxruntime wheel on PyPI, by the script that pins its version.
FROM python:3.11-slim-${DEBIAN_RELEASE} AS onnxruntime
WORKDIR /src
COPY scripts/fetch-onnxruntime ./scripts/fetch-onnxruntime
RUN scripts/fetch-onnxruntime

# 3. The runtime: Debian slim, with nothing installed. Its bash answers the health check (no curl needed), and it
#    already has the C++ runtime ONNX Runtime links against.
FROM debian:${DEBIAN_RELEASE}-slim
COPY --from=build /usr/local/bin/ferry /usr/local/bin/ferry
COPY --from=onnxruntime /src/.ferry/lib/libonnxruntime.so.1.32.0 /usr/local/lib/libonnxruntime.so.1.32.0
# CA certificates for HTTPS to S3-compatible model repositories.
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
# /models is read-only to the server; /var/cache/ferry is its one writable place (versions fetched from S3).
RUN mkdir -p /models /var/cache/ferry && chown 65532:65532 /var/cache/ferry
VOLUME ["/var/cache/ferry"]

ENV FERRY_MODEL_REPOSITORY=/models \
    FERRY_ONNXRUNTIME_LIB=/usr/local/lib/libonnxruntime.so.1.32.0 \
    FERRY_CACHE_DIR=/var/cache/ferry

# gRPC (KServe v2, TF Serving) and REST (KServe v2 under /v2, TF Serving under /v1, /metrics).
EXPOSE 8500 8501
USER 65532:65532

# 200 from the readiness endpoint, asked over bash's /dev/tcp.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/bin/bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${FERRY_REST_PORT:-8501} && printf 'GET /v2/health/ready HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' >&3 && read -r -t 4 _ status _ <&3 && [ \"$status\" = 200 ]"]

# Ferry drains in-flight requests for --shutdown-grace-period (30s) after SIGTERM: stop it with `docker stop -t 40`.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/ferry"]
CMD ["serve"]
