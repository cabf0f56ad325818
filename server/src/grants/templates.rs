//! Which grant templates an identity may request: the policy set nodes receive, compiled with
//! the node's own compiler ([`compile_snapshot`]) once per revision, and the governing policy
//! found as nodes find it ([`corral_policy::compiled::CompiledSet::policy_for`]).

use std::sync::{Arc, Mutex, PoisonError};

use corral_policy::{CompiledSet, PolicyError, compiled::Approval, snapshot::compile_snapshot};

use super::GrantError;
use crate::fleet::Current;

/// A template as an identity's policy offers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    /// The policy that offers it.
    pub policy: String,
    pub max_ttl_seconds: u64,
    pub approval: Approval,
}

/// The compiled policy set, cached by revision.
#[derive(Default)]
pub struct Templates {
    cache: Mutex<Option<(u64, Arc<CompiledSet>)>>,
}

impl Templates {
    fn compiled(&self, cur: &Current) -> Result<Arc<CompiledSet>, GrantError> {
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((rev, c)) = cache.as_ref()
            && *rev == cur.revision
        {
            return Ok(c.clone());
        }
        let c =
            compile_snapshot("policy set", cur.revision, &cur.policies_yaml).map_err(
                |e| match e {
                    PolicyError::Invalid(d) => GrantError::Policy(
                        d.iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join("; "),
                    ),
                    e => GrantError::Policy(e.to_string()),
                },
            )?;
        let c = Arc::new(c);
        *cache = Some((cur.revision, c.clone()));
        Ok(c)
    }

    /// The template `grant` in the policy that governs `identity` in `cur`.
    pub fn offer(&self, cur: &Current, identity: &str, grant: &str) -> Result<Offer, GrantError> {
        let c = self.compiled(cur)?;
        let Some(policy) = c.governing(identity) else {
            return Err(GrantError::NotCovered {
                identity: identity.to_owned(),
            });
        };
        let Some(t) = policy.grants.iter().find(|t| t.name == grant) else {
            let names: Vec<&str> = policy.grants.iter().map(|t| t.name.as_str()).collect();
            return Err(GrantError::UnknownTemplate {
                identity: identity.to_owned(),
                policy: policy.name.clone(),
                grant: grant.to_owned(),
                offered: if names.is_empty() {
                    "none".to_owned()
                } else {
                    names.join(", ")
                },
            });
        };
        Ok(Offer {
            policy: policy.name.clone(),
            max_ttl_seconds: t.max_ttl.as_secs(),
            approval: t.approval,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A policy for `spiffe://t/agent/*` offering `crm-write` (required, 15m) and `peek`
    /// (auto, 1m).
    pub(crate) const POLICY: &str = "apiVersion: corral.dev/v1alpha1
kind: AgentPolicy
metadata:
  name: agents
spec:
  identities: [\"spiffe://t/agent/*\"]
  zones:
    data: { cidrs: [10.20.0.0/16] }
  connect:
    - { action: allow, zones: [data], ports: [5432] }
  grants:
    - name: crm-write
      zones: [data]
      ports: [5433]
      maxTtl: 15m
      approval: required
    - name: peek
      zones: [data]
      ports: [5434]
      maxTtl: 1m
      approval: auto
";

    pub(crate) fn current(revision: u64) -> Current {
        Current {
            revision,
            policies_yaml: vec![POLICY.to_owned()],
            ..Current::default()
        }
    }

    #[test]
    fn offers_come_from_the_governing_policy() -> Result<(), GrantError> {
        let t = Templates::default();
        let cur = current(3);
        let o = t.offer(&cur, "spiffe://t/agent/a", "crm-write")?;
        assert_eq!(
            o,
            Offer {
                policy: "agents".into(),
                max_ttl_seconds: 900,
                approval: Approval::Required,
            }
        );
        assert_eq!(
            t.offer(&cur, "spiffe://t/agent/a", "peek")?.approval,
            Approval::Auto
        );
        let e = t
            .offer(&cur, "spiffe://t/agent/a", "nope")
            .expect_err("unknown");
        assert!(
            e.to_string()
                .contains("offers no grant named `nope` (it offers: crm-write, peek)"),
            "{e}"
        );
        assert!(matches!(
            t.offer(&cur, "spiffe://t/other/a", "crm-write"),
            Err(GrantError::NotCovered { .. })
        ));
        // No policies at all: nothing is covered.
        assert!(matches!(
            t.offer(&Current::default(), "spiffe://t/agent/a", "crm-write"),
            Err(GrantError::NotCovered { .. })
        ));
        Ok(())
    }
}
