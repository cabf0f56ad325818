//! Library target so that `agent` can name this crate as a build-dependency (cargo then rebuilds
//! the agent when the kernel programs change). The programs themselves are in `main.rs`.
#![no_std]
