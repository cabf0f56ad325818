//! Corral's policy language, with no kernel in sight: `AgentPolicy` YAML (see `DESIGN.md`) →
//! validated documents → the compiled form the agent writes into the kernel maps, plus the
//! reference evaluator and `explain`. The agent, the server and the CLI all compile with this
//! one crate, so node and server agree on every verdict and every `file:line:col`.
//!
//! - [`identity`]: SPIFFE ID patterns and matching.
//! - [`compiled`]: the compiled form ([`CompiledSet`], one [`CompiledPolicy`] per policy) and
//!   its expansion into kernel map entries.
//! - [`snapshot`]: a server snapshot's policy set as one source text, node limits.
//! - [`yaml`]: YAML with node positions; [`parse`] and [`fields`]: shape and values;
//!   [`validate`]: references and cross-document rules; [`diag`]: `file:line:col: message`.
//! - [`compile`]: documents → [`CompiledSet`] with stable rule indices and a
//!   source table.
//! - [`eval`]: the reference evaluator; [`model`]: the kernel lookups modelled in userspace;
//!   [`explain`]: why a call gets its verdict.
//! - [`bench`]: compile-time benchmark.
//!
//! A file is accepted whole or not at all: any diagnostic rejects it.

pub mod ast;
pub mod bench;
pub mod compile;
pub mod compiled;
pub mod diag;
pub mod dns_bypass;
pub mod eval;
pub mod explain;
pub mod fields;
pub mod hosts;
pub mod identity;
pub mod model;
pub mod parse;
pub mod simulate;
pub mod snapshot;
pub mod suggest;
pub mod validate;
pub mod yaml;

#[cfg(test)]
mod tests_accept;
#[cfg(test)]
mod tests_props;
#[cfg(test)]
mod tests_reject;

use std::path::Path;

pub use compiled::Sources;
pub use compiled::{CompiledPolicy, CompiledSet};
pub use diag::{Diagnostic, PolicyError, Pos};

use ast::PolicyDoc;
use diag::{Pos as P, Sink};

/// Parses and validates every document of `src` (named `file` in diagnostics).
pub fn parse_str(file: &str, src: &str) -> Result<Vec<PolicyDoc>, PolicyError> {
    let mut sink = Sink::new(file);
    let Some(nodes) = yaml::documents(src, &mut sink) else {
        return sink.finish(Vec::new());
    };
    let docs = parse::documents(&nodes, &mut sink);
    if sink.is_empty() && docs.is_empty() {
        sink.error(
            P { line: 1, col: 1 },
            format!(
                "no policy in this file: write at least one document with `apiVersion: {}` and \
                 `kind: {}`",
                parse::API_VERSION,
                parse::KIND
            ),
        );
    }
    if sink.is_empty() {
        validate::check(&docs, &mut sink);
    }
    sink.finish(docs)
}

/// Parses, validates and compiles `src` at `revision`.
pub fn compile_str(file: &str, src: &str, revision: u64) -> Result<CompiledSet, PolicyError> {
    let docs = parse_str(file, src)?;
    Ok(compile::compile(file, &docs, revision))
}

/// Reads, parses, validates and compiles the policy file at `path`.
pub fn compile_file(path: &Path, revision: u64) -> Result<CompiledSet, PolicyError> {
    let file = path.display().to_string();
    let src = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
        file: file.clone(),
        source,
    })?;
    compile_str(&file, &src, revision)
}
