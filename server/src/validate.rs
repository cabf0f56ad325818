//! Validation with the node's own compiler: a change is accepted only if the whole policy set
//! it produces compiles exactly as the nodes will compile it
//! ([`corral_policy::snapshot::compile_snapshot`]). Errors are `file:line:col: message`,
//! with positions mapped back to the file the user applied (or to the stored policy they are
//! in).

use std::collections::BTreeMap;

use corral_policy::{
    self as policy, PolicyError,
    snapshot::{compile_snapshot, snapshot_starts},
};

use crate::error::ServerError;

/// One document of an applied file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Doc {
    pub name: String,
    pub yaml: String,
    /// Where it starts in the applied file (1-based line).
    pub line: u32,
}

/// A document of the resulting set, and where its lines come from (for error positions).
#[derive(Debug, Clone)]
pub struct SetDoc {
    pub yaml: String,
    pub origin: String,
    pub line: u32,
}

fn is_separator(line: &str) -> bool {
    let t = line.trim_end();
    t == "---" || t.starts_with("--- #")
}

fn is_blank(chunk: &str) -> bool {
    chunk
        .lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#') || l.trim() == "...")
}

/// Splits an applied file into its named documents (the file must be valid on its own).
pub fn split_file(file: &str, src: &str) -> Result<Vec<Doc>, ServerError> {
    let docs = policy::parse_str(file, src).map_err(|e| ServerError::Invalid(e.to_string()))?;
    let mut chunks: Vec<(u32, String)> = Vec::new();
    let mut cur = String::new();
    let mut start = 1u32;
    for (i, line) in src.lines().enumerate() {
        let n = u32::try_from(i + 1).unwrap_or(u32::MAX);
        if is_separator(line) {
            chunks.push((start, std::mem::take(&mut cur)));
            start = n + 1;
        } else {
            cur.push_str(line);
            cur.push('\n');
        }
    }
    chunks.push((start, cur));
    chunks.retain(|(_, c)| !is_blank(c));
    let mut out = Vec::with_capacity(chunks.len());
    for (line, yaml) in chunks {
        let one = policy::parse_str(file, &yaml).ok().filter(|d| d.len() == 1);
        let Some(d) = one else {
            return Err(ServerError::BadRequest(format!(
                "{file}:{line}: put each policy document in its own section after a `---` line"
            )));
        };
        out.push(Doc {
            name: d[0].name.value.clone(),
            yaml,
            line,
        });
    }
    if out.len() != docs.len() {
        return Err(ServerError::BadRequest(format!(
            "{file}: found {} documents but {} `---` sections: put each policy document in its \
             own section",
            docs.len(),
            out.len()
        )));
    }
    Ok(out)
}

/// Compiles the set as nodes will; maps every diagnostic back to its origin.
pub fn check_set(revision: u64, set: &[SetDoc]) -> Result<(), ServerError> {
    let yaml: Vec<String> = set.iter().map(|d| d.yaml.clone()).collect();
    match compile_snapshot("policy set", revision, &yaml) {
        Ok(_) => Ok(()),
        Err(PolicyError::Invalid(diags)) => {
            let starts = snapshot_starts(&yaml);
            let lines: Vec<String> = diags
                .iter()
                .map(|d| {
                    let idx = starts.iter().rposition(|s| *s <= d.pos.line).unwrap_or(0);
                    match (set.get(idx), starts.get(idx)) {
                        (Some(doc), Some(s)) => format!(
                            "{}:{}:{}: {}",
                            doc.origin,
                            doc.line + (d.pos.line - s),
                            d.pos.col,
                            d.message
                        ),
                        _ => d.to_string(),
                    }
                })
                .collect();
            Err(ServerError::Invalid(lines.join("\n")))
        }
        Err(e) => Err(ServerError::Invalid(e.to_string())),
    }
}

/// The set after applying `docs` from `file` over `current` (name → (yaml, revision)).
pub fn merged(
    current: &BTreeMap<String, (String, u64)>,
    file: &str,
    docs: &[Doc],
    deletes: &[String],
) -> Vec<SetDoc> {
    let mut set: BTreeMap<&str, SetDoc> = current
        .iter()
        .filter(|(n, _)| !deletes.contains(n))
        .map(|(n, (y, r))| {
            (
                n.as_str(),
                SetDoc {
                    yaml: y.clone(),
                    origin: format!("policy {n} (revision {r})"),
                    line: 1,
                },
            )
        })
        .collect();
    for d in docs {
        set.insert(
            &d.name,
            SetDoc {
                yaml: d.yaml.clone(),
                origin: file.to_owned(),
                line: d.line,
            },
        );
    }
    set.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(name: &str, identity: &str) -> String {
        format!(
            "apiVersion: corral.dev/v1alpha1\nkind: AgentPolicy\nmetadata:\n  name: {name}\nspec:\n  identities: [\"{identity}\"]\n  zones: {{ z: {{ cidrs: [10.0.0.0/8] }} }}\n  connect:\n    - {{ action: allow, zones: [z] }}\n"
        )
    }

    #[test]
    fn a_file_splits_into_named_documents_with_their_lines() -> Result<(), ServerError> {
        let src = format!(
            "# header\n---\n{}---\n{}",
            doc("a", "spiffe://t/a"),
            doc("b", "spiffe://t/b")
        );
        let docs = split_file("f.yaml", &src)?;
        assert_eq!(docs.len(), 2);
        assert_eq!((docs[0].name.as_str(), docs[0].line), ("a", 3));
        assert_eq!((docs[1].name.as_str(), docs[1].line), ("b", 13));
        assert!(
            src.lines()
                .nth(12)
                .is_some_and(|l| l.starts_with("apiVersion"))
        );
        Ok(())
    }

    #[test]
    fn invalid_files_are_rejected_with_positions_in_the_file() {
        let bad = doc("a", "spiffe://t/a").replace("  connect:", "  bogus: 1\n  connect:");
        let e = split_file("f.yaml", &bad).expect_err("invalid");
        assert!(
            matches!(&e, ServerError::Invalid(m) if m.contains("f.yaml:8:") && m.contains("bogus")),
            "{e}"
        );
    }

    #[test]
    fn a_conflict_with_a_stored_policy_names_both_origins() -> Result<(), ServerError> {
        // Same identity pattern in two policies: a tie, rejected by the set check.
        let mut cur = BTreeMap::new();
        cur.insert("a".to_owned(), (doc("a", "spiffe://t/x"), 4));
        let new = split_file("new.yaml", &format!("\n\n{}", doc("b", "spiffe://t/x")))?;
        let set = merged(&cur, "new.yaml", &new, &[]);
        let e = check_set(5, &set).expect_err("tie");
        let m = e.to_string();
        assert!(
            m.contains("new.yaml:") || m.contains("policy a (revision 4):"),
            "mapped origin: {m}"
        );
        // Replacing `a` itself is fine; deleting it leaves `b` alone.
        let set = merged(
            &cur,
            "new.yaml",
            &split_file("n", &doc("a", "spiffe://t/x"))?,
            &[],
        );
        check_set(5, &set)?;
        let set = merged(&cur, "new.yaml", &new, &["a".to_owned()]);
        assert_eq!(set.len(), 1);
        check_set(5, &set)?;
        check_set(6, &[])?;
        Ok(())
    }
}
