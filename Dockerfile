# syntax=docker/dockerfile:1
#
# tether container image.
#
#   docker build -t tether:dev .
#   docker run --rm -p 3128:3128 -p 9901:9901 \
#     -e TETHER_PROXY__LISTEN=0.0.0.0:3128 -e TETHER_ADMIN__LISTEN=0.0.0.0:9901 tether:dev
#
# The image ships config/tether.toml as /etc/tether/tether.toml. That file binds
# loopback only, so `docker run -p` needs the two TETHER_* overrides above (or a
# config of your own mounted over /etc/tether/tether.toml). In Kubernetes the
# ConfigMaps under deploy/ replace the file; no TETHER_* variable is set in the
# image, because environment variables outrank the config file.

ARG RUST_VERSION=1

# ---------------------------------------------------------------------------
# Builder
# ---------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /build

# 1. Dependencies only. This layer is rebuilt when Cargo.toml or Cargo.lock
#    change, not when the sources do. Cargo refuses a manifest whose declared
#    targets have no file, so every target in Cargo.toml gets a stub here
#    (src/main.rs, src/lib.rs and the `pool` bench today): add one when a new
#    [[bin]], [[bench]], [[test]] or [[example]] is declared.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && echo 'fn main() {}' > benches/pool.rs \
    && cargo build --release --locked \
    && rm -rf src

# 2. The real sources and build.rs. config/ is copied because the default configuration is
#    compiled into the binary. COPY keeps the files' own mtimes, which can be
#    older than the stub build above, so touch them: otherwise cargo could
#    consider the stub `tether` crate fresh and ship an empty binary.
# The commit `tether --version` names (build.rs): the context has no .git, so pass
# it, e.g. --build-arg BUILD_COMMIT=$(git rev-parse --short=12 HEAD).
ARG BUILD_COMMIT=unknown
COPY build.rs ./
COPY src ./src
COPY config ./config
# [profile.release] strips the binary (no symbols, no debug info: under 10 MB);
# tests/release.rs checks the same build for it.
RUN find src build.rs -type f -exec touch {} + \
    && cargo build --release --locked \
    && install -D -m 0755 target/release/tether /out/tether

# ---------------------------------------------------------------------------
# iptables-init: the init container of deploy/sidecar/transparent, which runs
# `tether iptables apply` once in the pod's network namespace and exits.
#   docker build --target iptables-init -t tether-iptables-init:dev .
# Debian slim, because the rules are installed by the iptables program (the
# distroless runtime below has none). Debian's default is the nf_tables backend.
# ---------------------------------------------------------------------------
FROM debian:bookworm-slim AS iptables-init

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables \
    && rm -rf /var/lib/apt/lists/*

COPY --from=builder /out/tether /usr/local/bin/tether

# Runs as root (the image's default user): changing nat rules needs uid 0 with
# NET_ADMIN and NET_RAW, which the manifest grants to this container alone.
ENTRYPOINT ["tether"]
CMD ["iptables", "--help"]

# ---------------------------------------------------------------------------
# Runtime: glibc + libgcc + CA certificates, no shell, uid/gid 65532.
# ---------------------------------------------------------------------------
FROM gcr.io/distroless/cc-debian12:nonroot

LABEL org.opencontainers.image.title="tether" \
      org.opencontainers.image.description="A connection-governing egress proxy: capped keep-alive pools, idle reaping, truthful gauges." \
      org.opencontainers.image.licenses="Apache-2.0"

COPY --from=builder /out/tether /usr/local/bin/tether
COPY config/tether.toml /etc/tether/tether.toml

# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 65532:65532

# 3128: forward proxy / CONNECT. 9901: admin (/metrics, /healthz, /readyz).
# Route listeners (e.g. 32402, 32612) are whatever the config declares.
EXPOSE 3128 9901

# No HEALTHCHECK: Kubernetes probes /healthz and /readyz on the admin port.
ENTRYPOINT ["tether"]
CMD ["run", "--config", "/etc/tether/tether.toml"]
