# syntax=docker/dockerfile:1.7
# The audience server image: built with Rust's official image, run on distroless/cc (glibc
# and libgcc only; no shell, no package manager) as the non-root user 65532.
#
#   docker build -t audience:0.1.0 .
#   docker build --build-arg TARGET_CPU=x86-64-v2 -t audience:0.1.0-v2 .   # older x86 CPUs
#
# Nothing but Rust is needed: the .proto files are compiled by protox (pure Rust), so there is
# no protoc to install. The image is linux/amd64: TARGET_CPU is an x86-64 level.

ARG RUST_VERSION=1.95
ARG DEBIAN=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN} AS build
# The CPU level the binary is compiled for, as the README documents (.cargo/config.toml):
# x86-64-v3 (AVX2, BMI2, FMA), which every x86 server since 2013 has. RUSTFLAGS replaces the
# config file's flags, so this argument is the one source of the level (and of the label).
ARG TARGET_CPU=x86-64-v3
ENV RUSTFLAGS="-C target-cpu=${TARGET_CPU}" \
    CARGO_TERM_COLOR=never
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY .cargo .cargo
COPY proto proto
COPY src src
COPY benches benches
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin audience \
    && install -D -m 0755 target/release/audience /out/audience \
    && install -d -o 65532 -g 65532 -m 0750 /out/data

FROM gcr.io/distroless/cc-debian12:nonroot
ARG TARGET_CPU=x86-64-v3
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="audience" \
      org.opencontainers.image.description="Audience segmentation over gRPC; built for target-cpu=${TARGET_CPU} (linux/amd64)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot" \
      io.audience.target-cpu="${TARGET_CPU}"
COPY --from=build /out/audience /usr/local/bin/audience
COPY --from=build --chown=65532:65532 /out/data /data
USER 65532:65532
WORKDIR /data
EXPOSE 50051
# Embedded mode in /data (mount a volume there). The Helm chart replaces these arguments with
# `serve --config /etc/audience/audience.toml`.
ENTRYPOINT ["/usr/local/bin/audience"]
CMD ["serve", "--listen", "0.0.0.0:50051", "--data-dir", "/data"]
# Plaintext gRPC health (Kubernetes ignores this and uses the chart's probes).
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/usr/local/bin/audience", "health", "--addr", "http://127.0.0.1:50051", "--timeout-secs", "4"]
