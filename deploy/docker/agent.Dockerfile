# corral-agent (+ the `corral` CLI for `corral status` / `corral run` and the readiness probe).
# Build from the repository root:  docker build -f deploy/docker/agent.Dockerfile -t corral-agent .
#
# Stage 1 needs nightly + rust-src + bpf-linker for the kernel programs (agent/build.rs builds
# agent-ebpf); `cargo xtask setup` installs exactly what CI installs.
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo xtask setup \
 && cargo build --release --locked -p corral-agent -p corral-cli \
 && install -D -m 0755 target/release/corral-agent /out/corral-agent \
 && install -D -m 0755 target/release/corral /out/corral

# Stage 2: glibc and CA certificates, no shell, no package manager. The agent runs as root
# inside with only the capabilities the DaemonSet adds (see deploy/manifests/30-agent.yaml).
FROM gcr.io/distroless/cc-debian12:latest
COPY --from=build /out/corral-agent /out/corral /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/corral-agent"]
