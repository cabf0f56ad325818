//! A renderer for the subset of Helm's template language the chart is written in, so the chart
//! is rendered and checked in `cargo test` without a helm binary.
//!
//! Supported, with Go template / Helm semantics: text and `{{ pipeline }}` actions; `{{-` and
//! `-}}` whitespace trimming; `{{/* comments */}}`; `if` / `else if` / `else` / `end`;
//! `range` over lists (`.` is the element, `$` the root); paths (`.Values.a.b`, `$.Release.Name`,
//! `.`); string and integer literals; pipelines `a | f x`; the functions `quote`, `toYaml`,
//! `nindent`, `indent`, `eq`, `ne`, `not`, `default`. Go truthiness (false, 0, "", empty list
//! or map). Stricter than Helm on purpose: a path that names no value is an error, in a
//! condition too (Helm prints nothing, or takes it as false), so a misspelt value fails the
//! test; printing a list or map without `toYaml` is an error.
//! Anything outside the subset (another function, `with`, `define`/`include`, variables) is an
//! error, so the chart cannot silently drift out of what this renderer checks.

use anyhow::{Context as _, anyhow, bail};
use serde_json::Value;

#[derive(Debug)]
enum Node {
    Text(String),
    Action(String),
    If(Vec<(String, Vec<Node>)>, Vec<Node>),
    Range(String, Vec<Node>),
}

enum Tok {
    Text(String),
    Act(String),
}

fn lex(src: &str) -> anyhow::Result<Vec<Tok>> {
    let mut toks = Vec::new();
    let mut rest = src;
    let mut trim_next = false;
    while let Some(start) = rest.find("{{") {
        let mut text = &rest[..start];
        if trim_next {
            text = text.trim_start();
        }
        let after = &rest[start + 2..];
        let trim_left = after.starts_with("- ");
        let end = after.find("}}").context("unterminated {{")?;
        let mut inner = &after[..end];
        trim_next = inner.ends_with(" -");
        if trim_left {
            text = text.trim_end();
            inner = &inner[2..];
        }
        if trim_next {
            inner = &inner[..inner.len() - 2];
        }
        toks.push(Tok::Text(text.to_owned()));
        let inner = inner.trim();
        if !(inner.starts_with("/*") && inner.ends_with("*/")) {
            toks.push(Tok::Act(inner.to_owned()));
        }
        rest = &after[end + 2..];
    }
    toks.push(Tok::Text(if trim_next {
        rest.trim_start().to_owned()
    } else {
        rest.to_owned()
    }));
    Ok(toks)
}

/// Parses nodes up to an `end`/`else` (returned as the terminator) or the end of input.
fn parse(
    toks: &mut std::iter::Peekable<std::vec::IntoIter<Tok>>,
) -> anyhow::Result<(Vec<Node>, Option<String>)> {
    let mut nodes = Vec::new();
    while let Some(t) = toks.next() {
        match t {
            Tok::Text(s) => nodes.push(Node::Text(s)),
            Tok::Act(a) if a == "end" || a == "else" || a.starts_with("else if ") => {
                return Ok((nodes, Some(a)));
            }
            Tok::Act(a) => {
                if let Some(cond) = a.strip_prefix("if ") {
                    let mut branches = Vec::new();
                    let mut cond = cond.to_owned();
                    let otherwise = loop {
                        let (body, term) = parse(toks)?;
                        branches.push((cond.clone(), body));
                        match term.as_deref() {
                            Some("end") => break Vec::new(),
                            Some("else") => {
                                let (body, term) = parse(toks)?;
                                if term.as_deref() != Some("end") {
                                    bail!("`else` without `end`");
                                }
                                break body;
                            }
                            Some(t) if t.starts_with("else if ") => {
                                cond = t["else if ".len()..].to_owned()
                            }
                            _ => bail!("`if {cond}` without `end`"),
                        }
                    };
                    nodes.push(Node::If(branches, otherwise));
                } else if let Some(over) = a.strip_prefix("range ") {
                    let (body, term) = parse(toks)?;
                    if term.as_deref() != Some("end") {
                        bail!("`range {over}` without `end`");
                    }
                    nodes.push(Node::Range(over.to_owned(), body));
                } else {
                    for kw in ["with ", "define ", "template ", "include ", "block "] {
                        if a.starts_with(kw) {
                            bail!("`{a}`: `{}` is outside the supported subset", kw.trim());
                        }
                    }
                    nodes.push(Node::Action(a));
                }
            }
        }
    }
    Ok((nodes, None))
}

fn words(cmd: &str) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut chars = cmd.trim().chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c == '"' {
            let mut s = String::from('"');
            chars.next();
            loop {
                let c = chars.next().context("unterminated string")?;
                s.push(c);
                if c == '\\' {
                    s.push(chars.next().context("bad escape")?);
                } else if c == '"' {
                    break;
                }
            }
            out.push(s);
        } else {
            let mut s = String::new();
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                s.push(c);
                chars.next();
            }
            out.push(s);
        }
    }
    Ok(out)
}

fn split_pipes(p: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut in_str = false;
    let mut start = 0;
    let b = p.as_bytes();
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'"' if i == 0 || b[i - 1] != b'\\' => in_str = !in_str,
            b'|' if !in_str => {
                parts.push(&p[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&p[start..]);
    parts
}

pub fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(m) => !m.is_empty(),
    }
}

fn print(v: &Value) -> anyhow::Result<String> {
    Ok(match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => bail!("printing a missing value"),
        other => bail!("printing a list or map ({other}) needs toYaml"),
    })
}

struct Ctx<'a> {
    root: &'a Value,
    dot: &'a Value,
}

impl Ctx<'_> {
    fn term(&self, w: &str) -> anyhow::Result<Value> {
        if let Some(s) = w.strip_prefix('"') {
            let _ = s;
            return serde_json::from_str(w).with_context(|| format!("string literal {w}"));
        }
        if let Ok(i) = w.parse::<i64>() {
            return Ok(Value::from(i));
        }
        let (base, path) = if w == "." {
            (self.dot, "")
        } else if let Some(p) = w.strip_prefix("$.") {
            (self.root, p)
        } else if w == "$" {
            (self.root, "")
        } else if let Some(p) = w.strip_prefix('.') {
            (self.dot, p)
        } else {
            bail!("`{w}` is not a value, path or supported function");
        };
        let mut v = base;
        for key in path.split('.').filter(|k| !k.is_empty()) {
            v = v
                .get(key)
                .with_context(|| format!("`{w}` names no value (no `{key}`)"))?;
        }
        Ok(v.clone())
    }

    fn pipeline(&self, p: &str) -> anyhow::Result<Value> {
        let mut prev: Option<Value> = None;
        for cmd in split_pipes(p) {
            let w = words(cmd)?;
            let (head, rest) = w.split_first().context("empty command")?;
            let mut args = rest
                .iter()
                .map(|a| self.term(a))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let is_fn = !head.starts_with('.')
                && !head.starts_with('$')
                && !head.starts_with('"')
                && head.parse::<i64>().is_err();
            prev = Some(if is_fn {
                args.extend(prev.take());
                call(head, &args)?
            } else {
                if prev.is_some() || !args.is_empty() {
                    bail!("`{cmd}`: a value cannot take arguments");
                }
                self.term(head)?
            });
        }
        prev.context("empty pipeline")
    }

    fn render(&self, nodes: &[Node], out: &mut String) -> anyhow::Result<()> {
        for n in nodes {
            match n {
                Node::Text(s) => out.push_str(s),
                Node::Action(p) => out.push_str(&print(
                    &self.pipeline(p).with_context(|| format!("{{{{ {p} }}}}"))?,
                )?),
                Node::If(branches, otherwise) => {
                    let mut taken = None;
                    for (cond, body) in branches {
                        if truthy(&self.pipeline(cond).with_context(|| format!("if {cond}"))?) {
                            taken = Some(body);
                            break;
                        }
                    }
                    self.render(taken.unwrap_or(otherwise), out)?;
                }
                Node::Range(over, body) => match self.pipeline(over)? {
                    Value::Array(items) => {
                        for item in &items {
                            Ctx {
                                root: self.root,
                                dot: item,
                            }
                            .render(body, out)?;
                        }
                    }
                    Value::Null => {}
                    other => bail!("range over {other}: only lists are supported"),
                },
            }
        }
        Ok(())
    }
}

fn int(v: &Value) -> anyhow::Result<usize> {
    v.as_u64()
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| anyhow!("{v} is not a non-negative integer"))
}

fn call(f: &str, a: &[Value]) -> anyhow::Result<Value> {
    let arity = |n: usize| {
        if a.len() == n {
            Ok(())
        } else {
            Err(anyhow!("{f} takes {n} arguments, got {}", a.len()))
        }
    };
    Ok(match f {
        "quote" => {
            arity(1)?;
            // Go's %q on plain text is JSON's string quoting.
            Value::String(Value::String(print(&a[0])?).to_string())
        }
        "toYaml" => {
            arity(1)?;
            Value::String(super::yaml::to_yaml(&a[0]))
        }
        "indent" | "nindent" => {
            arity(2)?;
            let pad = " ".repeat(int(&a[0])?);
            let s = print(&a[1])?;
            let body = s
                .lines()
                .map(|l| format!("{pad}{l}"))
                .collect::<Vec<_>>()
                .join("\n");
            Value::String(if f == "nindent" {
                format!("\n{body}")
            } else {
                body
            })
        }
        // Helm's `fail`: the render stops with the message.
        "fail" => {
            arity(1)?;
            bail!("fail: {}", print(&a[0])?)
        }
        "eq" | "ne" => {
            arity(2)?;
            Value::Bool((a[0] == a[1]) == (f == "eq"))
        }
        "not" => {
            arity(1)?;
            Value::Bool(!truthy(&a[0]))
        }
        "default" => {
            arity(2)?;
            if truthy(&a[1]) {
                a[1].clone()
            } else {
                a[0].clone()
            }
        }
        other => bail!("function `{other}` is outside the supported subset"),
    })
}

/// Renders one template with `root` (`{Values, Release, Chart}`) as `.`.
pub fn render(src: &str, root: &Value) -> anyhow::Result<String> {
    let mut toks = lex(src)?.into_iter().peekable();
    let (nodes, term) = parse(&mut toks)?;
    if let Some(t) = term {
        bail!("unexpected `{t}`");
    }
    let mut out = String::new();
    Ctx { root, dot: root }.render(&nodes, &mut out)?;
    Ok(out)
}

/// Helm's values merge: maps merge key by key, anything else is replaced.
pub fn merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(bv) => merge(bv, v),
                    None => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}
