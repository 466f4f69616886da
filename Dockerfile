# syntax=docker/dockerfile:1
# The operator image: built from source, run from a distroless static base as a non-root user,
# with no shell and no package manager.
#
#   docker build -t gcp-token-operator:0.1.0 .

# Alpine's Rust targets musl and links statically, which the static runtime image needs.
# build-base: the C/C++ compiler aws-lc-rs (the TLS crypto provider) builds with.
FROM rust:1.95-alpine AS build
RUN apk add --no-cache build-base
WORKDIR /src
COPY . .
# The test substrate is a crate of its own (testkit/), so the release build holds none of it.
# The cache mounts keep the crate registry and the build between image builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin gcp-token-operator \
    && cp target/release/gcp-token-operator /gcp-token-operator

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /gcp-token-operator /gcp-token-operator
# distroless's nonroot user; the chart's podSecurityContext uses the same ids.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/gcp-token-operator"]
CMD ["run"]
