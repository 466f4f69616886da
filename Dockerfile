# syntax=docker/dockerfile:1
# The operator image: built from source, run from distroless's cc base (glibc, libgcc, CA
# certificates, the `nonroot` user) as a non-root user, with no shell and no package manager.
#
#   docker build -t gcp-token-operator:0.1.0 .
#
# CI builds this same file offline (scripts/image.sh, README "Container image"): it passes
# RUNTIME_BASE, the same distroless cc-debian12 contents assembled from the same Debian 12
# packages, and BINARY_FROM, an image holding the binary it built with this stage's command. The
# runtime stage, the last one, is the same for both.
ARG RUNTIME_BASE=gcr.io/distroless/cc-debian12:nonroot
ARG BINARY_FROM=build

# Debian 12 (bookworm), as the runtime base: the binary links the glibc it runs with.
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# The test substrate is a crate of its own (testkit/), so the release build holds none of it.
# The cache mounts keep the crate registry and the build between image builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin gcp-token-operator \
    && cp target/release/gcp-token-operator /gcp-token-operator

FROM ${BINARY_FROM} AS binary

FROM ${RUNTIME_BASE}
COPY --from=binary /gcp-token-operator /gcp-token-operator
# distroless's nonroot user; the chart's podSecurityContext uses the same ids.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/gcp-token-operator"]
CMD ["run"]
