# syntax=docker/dockerfile:1.7
# One image for every role: `serve` (default), `worker`, `migrate`, and the
# one-shot commands; the command picks the role.
#
#   docker build -t blockremote .
#   docker run --read-only --tmpfs /tmp -v blockremote-data:/data -p 8000:8000 blockremote
#   docker run ... blockremote worker        # with DATABASE_URL and REDIS_URL
#
# Layers: dependencies are compiled from the manifests alone (cargo-chef's
# recipe), so a change to the sources rebuilds only the workspace crates.
# The final stage is distroless `cc` (glibc, libgcc, CA certificates; no
# shell, no package manager) running as the fixed non-root uid 65532.

ARG RUST_VERSION=1.95

FROM lukemathwalker/cargo-chef:latest-rust-${RUST_VERSION}-bookworm AS chef
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS build
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --locked --recipe-path recipe.json -p blockremote-server --bin blockremote
COPY . .
RUN cargo build --release --locked -p blockremote-server --bin blockremote \
 && install -d -o 65532 -g 65532 -m 0700 /out/data \
 && install -m 0755 target/release/blockremote /out/blockremote

FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=dev
ARG REVISION=unknown
LABEL org.opencontainers.image.title="blockremote" \
      org.opencontainers.image.description="Zero-trust backend for mobile fraud defense" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/blockremote/blockremote" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
COPY --from=build /out/blockremote /usr/local/bin/blockremote
# The only writable path the embedded default needs (SQLite, state.db, the
# generated KEK); with PostgreSQL + Redis nothing is written here but the
# mount keeps a read-only root filesystem workable either way.
COPY --from=build --chown=65532:65532 /out/data /data
USER 65532:65532
ENV BLOCKREMOTE_DATA_DIR=/data \
    BLOCKREMOTE_LISTEN=0.0.0.0:8000 \
    BLOCKREMOTE_WORKER_LISTEN=0.0.0.0:9100
VOLUME ["/data"]
EXPOSE 8000 9100
# No curl in the image: the binary probes itself. A worker's probe is
# http://127.0.0.1:9100/health/live (override HEALTHCHECK in Compose/K8s).
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
  CMD ["/usr/local/bin/blockremote", "healthcheck", "http://127.0.0.1:8000/health/live"]
# PID 1 is the binary itself: it handles SIGTERM (drain, exit 0 within the grace period).
ENTRYPOINT ["/usr/local/bin/blockremote"]
CMD ["serve"]
