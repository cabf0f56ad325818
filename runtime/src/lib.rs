//! The small runtime pieces Corral's daemons (`corral-agent`, `corral-server`) and the `corral`
//! CLI share. None of it touches the kernel, so the server and the CLI build on stable Rust
//! without the eBPF toolchain.
//!
//! - [`shutdown`]: one shutdown future for SIGTERM/SIGINT, broadcast to every task.
//! - [`logging`]: tracing setup, plain or JSON, with the `log` bridge.
//! - [`tls`]: mTLS certificate files and the loopback-only plaintext rule.
//! - [`errors`]: an error and its causes on one line.
//! - [`backoff`]: jittered exponential backoff.
//! - [`paths`]: well-known paths clients default to.
//! - [`oci`]: the OCI hook's annotations and fail-open records (hook and agent).
#![forbid(unsafe_code)]

pub mod backoff;
pub mod errors;
pub mod logging;
pub mod oci;
pub mod paths;
pub mod shutdown;
pub mod tls;

pub use errors::error_chain;
