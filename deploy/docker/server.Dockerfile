# corral-server. Build from the repository root:
#   docker build -f deploy/docker/server.Dockerfile -t corral-server .
# The server validates and compiles policies with corral-policy, which needs no kernel and no
# eBPF toolchain: stable Rust alone builds it (`cargo xtask deps` checks this in CI).
# SQLite is compiled in (rusqlite's `bundled` feature).
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p corral-server \
 && install -D -m 0755 target/release/corral-server /out/corral-server

# Stage 2: distroless `nonroot` (uid/gid 65532), no shell.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/corral-server /usr/local/bin/corral-server
USER 65532:65532
EXPOSE 7443
ENTRYPOINT ["/usr/local/bin/corral-server"]
