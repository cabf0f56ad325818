//! Compiles `proto/corral/v1/*.proto` with protox (pure Rust, no system `protoc`) and generates
//! the prost messages and tonic clients/servers.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let files = [
        "proto/corral/v1/common.proto",
        "proto/corral/v1/agent.proto",
        "proto/corral/v1/policy.proto",
        "proto/corral/v1/sync.proto",
        "proto/corral/v1/grant.proto",
        "proto/corral/v1/events.proto",
        // The SPIFFE Workload API, vendored (proto/spiffe/README.md).
        "proto/spiffe/workload.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"]).context("compile .proto files")?;
    tonic_prost_build::configure()
        // Hand-written (src/shared.rs): same wire format, plus a pre-encoded event that a
        // server shares among subscribers.
        .extern_path(
            ".corral.v1.WatchEventsResponse",
            "crate::v1::WatchEventsResponse",
        )
        .compile_fds(fds)
        .context("generate Rust code")?;
    Ok(())
}
