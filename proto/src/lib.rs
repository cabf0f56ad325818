//! Corral's gRPC API, package `corral.v1`: messages and tonic clients/servers generated at build
//! time from `proto/corral/v1/*.proto` (pure-Rust protobuf compiler, no system `protoc`).
#![forbid(unsafe_code)]

/// `corral.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs, reason = "generated code")]
    tonic::include_proto!("corral.v1");

    pub use crate::shared::WatchEventsResponse;
}

/// The SPIFFE Workload API (`SpiffeWorkloadAPI`; the standard's file has no package).
pub mod spiffe {
    #![allow(clippy::all, missing_docs, reason = "generated code")]
    tonic::include_proto!("_");
}

mod shared;
