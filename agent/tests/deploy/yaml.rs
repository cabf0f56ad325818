//! YAML → JSON values (one per document), and a `toYaml` emitter for the template renderer.

use anyhow::{Context as _, bail};
use serde_json::{Map, Number, Value};
use yaml_rust2::{Yaml, YamlLoader};

/// Plain scalars that YAML 1.1 (the Kubernetes API machinery's YAML) reads as booleans while
/// YAML 1.2 reads them as strings: never allowed unquoted-or-not in the manifests, so both
/// readings always agree.
const YAML11_BOOLS: [&str; 8] = ["y", "n", "yes", "no", "on", "off", "~", "null"];

fn to_json(y: &Yaml, path: &str) -> anyhow::Result<Value> {
    Ok(match y {
        Yaml::Null => Value::Null,
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Integer(i) => Value::Number(Number::from(*i)),
        Yaml::Real(r) => Value::Number(
            r.parse::<f64>()
                .ok()
                .and_then(Number::from_f64)
                .with_context(|| format!("{path}: bad number {r}"))?,
        ),
        Yaml::String(s) => {
            if YAML11_BOOLS.contains(&s.to_ascii_lowercase().as_str()) {
                bail!(
                    "{path}: `{s}` means a boolean or null to YAML 1.1 readers: rename or restructure"
                );
            }
            Value::String(s.clone())
        }
        Yaml::Array(a) => Value::Array(
            a.iter()
                .enumerate()
                .map(|(i, v)| to_json(v, &format!("{path}[{i}]")))
                .collect::<anyhow::Result<_>>()?,
        ),
        Yaml::Hash(h) => {
            let mut m = Map::new();
            for (k, v) in h {
                let Yaml::String(k) = k else {
                    bail!("{path}: non-string key {k:?}");
                };
                let child = format!("{path}.{k}");
                if m.insert(k.clone(), to_json(v, &child)?).is_some() {
                    bail!("{child}: duplicate key");
                }
            }
            Value::Object(m)
        }
        Yaml::Alias(_) | Yaml::BadValue => bail!("{path}: aliases and bad values are not allowed"),
    })
}

/// Every non-empty document of a (multi-document) YAML text.
pub fn documents(text: &str) -> anyhow::Result<Vec<Value>> {
    let docs = YamlLoader::load_from_str(text).context("parse YAML")?;
    docs.iter()
        .filter(|d| !matches!(d, Yaml::Null | Yaml::BadValue))
        .enumerate()
        .map(|(i, d)| to_json(d, &format!("doc{i}")))
        .collect()
}

/// One YAML document as a JSON value.
pub fn document(text: &str) -> anyhow::Result<Value> {
    let mut d = documents(text)?;
    match d.len() {
        0 => Ok(Value::Object(Map::new())),
        1 => Ok(d.remove(0)),
        n => bail!("{n} documents where one was expected"),
    }
}

fn plain_ok(s: &str) -> bool {
    let first = s.chars().next();
    first.is_some_and(|c| c.is_ascii_alphabetic() || c == '/')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._/-".contains(c))
        && !["true", "false"]
            .iter()
            .chain(YAML11_BOOLS.iter())
            .any(|w| w.eq_ignore_ascii_case(s))
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) if plain_ok(s) => s.clone(),
        Value::Object(m) if m.is_empty() => "{}".into(),
        Value::Array(a) if a.is_empty() => "[]".into(),
        other => other.to_string(),
    }
}

fn block(v: &Value) -> bool {
    match v {
        Value::Object(m) => !m.is_empty(),
        Value::Array(a) => !a.is_empty(),
        _ => false,
    }
}

fn emit(v: &Value, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, val) in m {
                out.push_str(&format!("{pad}{}:", scalar(&Value::String(k.clone()))));
                match val {
                    Value::Object(_) if block(val) => {
                        out.push('\n');
                        emit(val, indent + 2, out);
                    }
                    // Like go-yaml: list items at the key's indentation.
                    Value::Array(_) if block(val) => {
                        out.push('\n');
                        emit(val, indent, out);
                    }
                    _ => out.push_str(&format!(" {}\n", scalar(val))),
                }
            }
        }
        Value::Array(a) if !a.is_empty() => {
            for item in a {
                if block(item) {
                    let mut inner = String::new();
                    emit(item, indent + 2, &mut inner);
                    out.push_str(&format!("{pad}- {}", &inner[indent + 2..]));
                } else {
                    out.push_str(&format!("{pad}- {}\n", scalar(item)));
                }
            }
        }
        other => out.push_str(&format!("{pad}{}\n", scalar(other))),
    }
}

/// Helm's `toYaml`: block YAML, sorted keys, no trailing newline.
pub fn to_yaml(v: &Value) -> String {
    let mut out = String::new();
    emit(v, 0, &mut out);
    out.trim_end_matches('\n').to_owned()
}
