//! Compile-time benchmark: generated policies of a given number of connect rules, timed
//! through parse + validate + compile and through the expansion into map entries.
//! `cargo xtask bench` runs it (via `cargo bench -p corral-agent --bench compile`), and loads
//! the result into the real kernel maps when it runs as root.

use std::{fmt::Write as _, time::Duration, time::Instant};

use crate::compiled::{ExpandError, expand};

use super::{CompiledSet, PolicyError, compile_str};

/// A policy with `rules` connect rules over 32 zones, alternating allow/deny, with ports and
/// protocols, plus chaining and exec rules, as a YAML document.
pub fn generate(rules: usize) -> String {
    let zones = 32usize;
    let mut s = String::with_capacity(rules * 80 + 4096);
    s.push_str(
        "apiVersion: corral.dev/v1alpha1\nkind: AgentPolicy\nmetadata:\n  name: bench\nspec:\n  \
         identities: [spiffe://bench.corral/agent/*]\n  defaultAction: deny\n  zones:\n",
    );
    for z in 0..zones {
        let _ = writeln!(
            s,
            "    z{z}: {{ cidrs: [10.{z}.0.0/16, \"fd00:{z:x}::/32\"] }}"
        );
    }
    s.push_str("  connect:\n");
    for i in 0..rules {
        let action = if i % 5 == 4 { "deny" } else { "allow" };
        let port = 1 + (i % 60_000);
        let proto = if i % 2 == 0 { "tcp" } else { "udp" };
        let _ = writeln!(
            s,
            "    - {{ action: {action}, zones: [z{}], ports: [{port}], protocols: [{proto}] }}",
            i % zones
        );
    }
    s.push_str(
        "  exec:\n    - { action: allow, paths: [/usr/bin/git, /opt/agent/**] }\n  chaining:\n    \
         - { after: [z0], deny: [z1, z2] }\n",
    );
    s
}

/// One benchmark row.
#[derive(Debug, Clone)]
pub struct Row {
    pub rules: usize,
    /// Parse + validate + compile (best of the runs).
    pub compile: Duration,
    /// Expansion into kernel map entries (best of the runs).
    pub expand: Duration,
    /// Map entries produced: zones, rules, chaining.
    pub entries: (usize, usize, usize),
    pub compiled: CompiledSet,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("generated policy rejected")]
    Policy(#[from] PolicyError),
    #[error("expand generated policy")]
    Expand(#[from] ExpandError),
}

/// Times compiling a generated policy of `rules` rules, best of `runs`.
pub fn measure(rules: usize, runs: usize) -> Result<Row, BenchError> {
    let src = generate(rules);
    let mut best_c = Duration::MAX;
    let mut best_e = Duration::MAX;
    let mut last = None;
    let mut entries = (0, 0, 0);
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        let compiled = compile_str("bench.yaml", &src, 1)?;
        best_c = best_c.min(t.elapsed());
        let t = Instant::now();
        let mut n = (0, 0, 0);
        for p in &compiled.policies {
            let kp = expand(0, p, 1)?;
            n.0 += kp.zones.len();
            n.1 += kp.rules.len();
            n.2 += kp.chain.len();
        }
        best_e = best_e.min(t.elapsed());
        entries = n;
        last = Some(compiled);
    }
    let compiled = match last {
        Some(c) => c,
        None => compile_str("bench.yaml", &src, 1)?,
    };
    Ok(Row {
        rules,
        compile: best_c,
        expand: best_e,
        entries,
        compiled,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_policies_compile_with_every_rule() {
        let row = measure(100, 1).expect("bench policy compiles");
        let p = &row.compiled.policies[0];
        assert_eq!(p.connect.len(), 100);
        assert_eq!(row.entries.1, 100);
        assert_eq!(row.entries.0, 64);
    }
}
