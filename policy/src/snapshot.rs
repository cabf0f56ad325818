//! A server snapshot's policy set as the one text both sides compile: the server validates
//! exactly what a node will compile, so they agree on every verdict and every position. Also
//! the node's limits on a set (`corral-agent --max-rules`).

use crate::{CompiledSet, PolicyError, compile_str};

/// The text a snapshot's policies compile from: the documents in order, `---`-separated.
pub fn snapshot_source(policies: &[String]) -> String {
    let mut s = String::new();
    for (i, p) in policies.iter().enumerate() {
        if i > 0 {
            s.push_str("---\n");
        }
        s.push_str(p);
        if !p.ends_with('\n') {
            s.push('\n');
        }
    }
    s
}

/// The 1-based line of [`snapshot_source`] on which each document starts.
pub fn snapshot_starts(policies: &[String]) -> Vec<u32> {
    let mut starts = Vec::with_capacity(policies.len());
    let mut line = 1u32;
    for (i, p) in policies.iter().enumerate() {
        if i > 0 {
            line += 1;
        }
        starts.push(line);
        let n = u32::try_from(p.lines().count().max(1)).unwrap_or(u32::MAX);
        line = line.saturating_add(n);
    }
    starts
}

/// Compiles a snapshot's policy set at `revision`. No policies is a valid set: enrolled
/// principals are denied everything.
pub fn compile_snapshot(
    file: &str,
    revision: u64,
    policies: &[String],
) -> Result<CompiledSet, PolicyError> {
    if policies.is_empty() {
        return Ok(CompiledSet::empty(revision));
    }
    compile_str(file, &snapshot_source(policies), revision)
}

/// Connect and exec rules in a compiled set (what `--max-rules` limits).
pub fn rule_count(set: &CompiledSet) -> usize {
    set.policies
        .iter()
        .map(|p| p.connect.len() + p.exec.len())
        .sum()
}

/// A set over a node's limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "node limit exceeded: the policy set has {rules} connect and exec rules, this node allows \
     at most {max} (--max-rules)"
)]
pub struct LimitError {
    pub rules: usize,
    pub max: usize,
}

/// This node's limits; a snapshot over one is NACKed.
pub fn check_limits(set: &CompiledSet, max_rules: Option<usize>) -> Result<(), LimitError> {
    let rules = rule_count(set);
    match max_rules {
        Some(max) if rules > max => Err(LimitError { rules, max }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_text_and_starts_agree() {
        let p = vec![
            "a: 1\nb: 2\n".to_owned(),
            "c: 3".to_owned(),
            "d: 4\n".to_owned(),
        ];
        let s = snapshot_source(&p);
        assert_eq!(s, "a: 1\nb: 2\n---\nc: 3\n---\nd: 4\n");
        let starts = snapshot_starts(&p);
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(starts, [1, 4, 6]);
        for (i, st) in starts.iter().enumerate() {
            assert_eq!(lines[*st as usize - 1], p[i].lines().next().unwrap_or(""));
        }
    }

    #[test]
    fn an_empty_set_compiles_and_limits_count_rules() {
        let c = compile_snapshot("s", 7, &[]).expect("empty set");
        assert_eq!(c.revision, 7);
        assert!(check_limits(&c, Some(0)).is_ok());
        let doc = "apiVersion: corral.dev/v1alpha1\nkind: AgentPolicy\nmetadata: { name: p }\nspec:\n  identities: [spiffe://t/a]\n  zones: { z: { cidrs: [10.0.0.0/8] } }\n  connect:\n    - { action: allow, zones: [z] }\n    - { action: deny, zones: [z], ports: [25] }\n  exec:\n    - { action: allow, paths: [/bin/true] }\n";
        let c = compile_snapshot("s", 1, &[doc.into()]).expect("valid");
        assert_eq!(rule_count(&c), 3);
        assert!(check_limits(&c, Some(3)).is_ok());
        assert!(check_limits(&c, Some(2)).is_err_and(|e| e.to_string().contains("at most 2")));
        assert!(check_limits(&c, None).is_ok());
    }
}
