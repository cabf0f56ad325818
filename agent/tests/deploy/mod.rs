//! Checks for `deploy/`: YAML reading, strict Kubernetes typing, and the chart renderer.

pub mod template;
pub mod yaml;

use anyhow::{Context as _, bail};
use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment},
    core::v1::{ConfigMap, Namespace, PersistentVolumeClaim, Secret, Service, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

/// Paths where `a` (the input) and `b` (the typed round trip) differ: a field the Kubernetes
/// types do not know (a typo, a wrong nesting) is in the input and missing from the round trip.
fn diff(a: &Value, b: &Value, path: &str, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, v) in x {
                match y.get(k) {
                    Some(w) => diff(v, w, &format!("{path}.{k}"), out),
                    None => out.push(format!("{path}.{k}: unknown field")),
                }
            }
            for k in y.keys().filter(|k| !x.contains_key(*k)) {
                out.push(format!("{path}.{k}: added by the round trip"));
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (v, w)) in x.iter().zip(y).enumerate() {
                diff(v, w, &format!("{path}[{i}]"), out);
            }
        }
        _ if a == b => {}
        _ => out.push(format!("{path}: {a} became {b}")),
    }
}

fn round_trip<T: DeserializeOwned + Serialize>(v: &Value) -> anyhow::Result<()> {
    let typed: T = serde_json::from_value(v.clone()).context("does not deserialize")?;
    let back = serde_json::to_value(&typed).context("serialize")?;
    let mut out = Vec::new();
    diff(v, &back, "", &mut out);
    if !out.is_empty() {
        bail!(
            "not a faithful {}: {}",
            std::any::type_name::<T>(),
            out.join("; ")
        );
    }
    Ok(())
}

/// Deserializes one object into its k8s-openapi type (by `apiVersion` and `kind`), failing on
/// any field the type does not know. Returns `kind/name`.
pub fn strict(v: &Value) -> anyhow::Result<String> {
    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("");
    let (api, kind) = (s("apiVersion"), s("kind"));
    let name = v
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .context("no metadata.name")?;
    let r = match (api, kind) {
        ("v1", "Namespace") => round_trip::<Namespace>(v),
        ("v1", "ServiceAccount") => round_trip::<ServiceAccount>(v),
        ("v1", "Service") => round_trip::<Service>(v),
        ("v1", "ConfigMap") => round_trip::<ConfigMap>(v),
        ("v1", "Secret") => round_trip::<Secret>(v),
        ("v1", "PersistentVolumeClaim") => round_trip::<PersistentVolumeClaim>(v),
        ("apps/v1", "Deployment") => round_trip::<Deployment>(v),
        ("apps/v1", "DaemonSet") => round_trip::<DaemonSet>(v),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => round_trip::<ClusterRole>(v),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            round_trip::<ClusterRoleBinding>(v)
        }
        ("rbac.authorization.k8s.io/v1", "Role") => round_trip::<Role>(v),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => round_trip::<RoleBinding>(v),
        _ => bail!("{name}: unexpected apiVersion/kind `{api}` `{kind}`"),
    };
    r.with_context(|| format!("{kind}/{name}"))?;
    Ok(format!("{kind}/{name}"))
}
