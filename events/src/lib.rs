//! Corral's decision events once they are protobuf `Event`s: what the agent's pipeline
//! publishes, the server's fleet stream forwards and the CLI prints.
//!
//! - [`hub`]: fan-out to subscribers, each with its own bounded queue and drop count, a
//!   bounded history, and the subscription filters (identity pattern, verdict, kind).
//! - [`render`]: an event as one text line or as a JSON object, and the names of verdicts,
//!   reasons and grant states.
#![forbid(unsafe_code)]

pub mod hub;
pub mod render;
