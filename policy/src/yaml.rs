//! A YAML document tree that remembers where every node was written, built from yaml-rust2's
//! event stream (serde-style loaders drop positions, so they cannot locate semantic errors).
//!
//! Anchors, aliases and tags are refused: a policy is read by people and reviewed in diffs,
//! and aliases would let a small file expand without bound.

use yaml_rust2::{
    Event,
    parser::{MarkedEventReceiver, Parser},
    scanner::{Marker, TScalarStyle},
};

use super::diag::{Pos, Sink};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A scalar and whether it was written plain (unquoted): only plain scalars are numbers
    /// or null.
    Scalar {
        text: String,
        plain: bool,
    },
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: Kind,
    pub pos: Pos,
}

impl Node {
    /// A plain empty scalar, `~` or `null`: YAML's null.
    pub fn is_null(&self) -> bool {
        matches!(&self.kind, Kind::Scalar { text, plain: true } if text.is_empty() || text == "~" || text == "null")
    }

    /// What the node is, for messages ("a list", "a mapping", "a text value").
    pub fn describe(&self) -> &'static str {
        match &self.kind {
            _ if self.is_null() => "empty",
            Kind::Scalar { .. } => "a single value",
            Kind::Seq(_) => "a list",
            Kind::Map(_) => "a mapping",
        }
    }
}

fn pos(m: Marker) -> Pos {
    // yaml-rust2 markers: line 1-based, column 0-based.
    Pos {
        line: u32::try_from(m.line()).unwrap_or(u32::MAX),
        col: u32::try_from(m.col().saturating_add(1)).unwrap_or(u32::MAX),
    }
}

enum Frame {
    Seq(Pos, Vec<Node>),
    Map(Option<Pos>, Vec<(Node, Node)>, Option<Node>),
}

struct Builder<'a> {
    src: &'a str,
    sink: &'a mut Sink,
    stack: Vec<Frame>,
    docs: Vec<Node>,
    /// Set after the first refusal: later events are ignored (positions would be noise).
    failed: bool,
}

impl Builder<'_> {
    fn push(&mut self, node: Node) {
        match self.stack.last_mut() {
            None => self.docs.push(node),
            Some(Frame::Seq(_, items)) => items.push(node),
            Some(Frame::Map(_, entries, key)) => match key.take() {
                None => *key = Some(node),
                Some(k) => entries.push((k, node)),
            },
        }
    }

    fn refuse(&mut self, at: Pos, msg: &str) {
        if !self.failed {
            self.sink.error(at, msg);
            self.failed = true;
        }
    }
}

impl MarkedEventReceiver for Builder<'_> {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        if self.failed {
            return;
        }
        let at = pos(mark);
        match ev {
            Event::Alias(_) => self.refuse(
                at,
                "YAML aliases (`*name`) are not supported in policies: write the value out",
            ),
            Event::Scalar(_, _, anchor, _)
            | Event::SequenceStart(anchor, _)
            | Event::MappingStart(anchor, _)
                if anchor != 0 =>
            {
                self.refuse(
                    at,
                    "YAML anchors (`&name`) are not supported in policies: write the value out",
                );
            }
            Event::Scalar(_, _, _, Some(_))
            | Event::SequenceStart(_, Some(_))
            | Event::MappingStart(_, Some(_)) => self.refuse(
                at,
                "YAML tags (`!tag`) are not supported in policies: remove the tag",
            ),
            Event::Scalar(text, style, _, None) => self.push(Node {
                kind: Kind::Scalar {
                    text,
                    plain: style == TScalarStyle::Plain,
                },
                pos: at,
            }),
            Event::SequenceStart(..) => self.stack.push(Frame::Seq(at, Vec::new())),
            Event::MappingStart(..) => {
                // A block mapping's marker is not where anything was written: use its first
                // key instead (set when the mapping ends). A flow mapping keeps its `{`.
                let flow = self
                    .src
                    .get(mark.index()..)
                    .is_some_and(|r| r.starts_with('{'));
                let at = if flow { Some(at) } else { None };
                self.stack.push(Frame::Map(at, Vec::new(), None));
            }
            Event::SequenceEnd => {
                if let Some(Frame::Seq(p, items)) = self.stack.pop() {
                    self.push(Node {
                        kind: Kind::Seq(items),
                        pos: p,
                    });
                }
            }
            Event::MappingEnd => {
                if let Some(Frame::Map(p, entries, _)) = self.stack.pop() {
                    let pos = p
                        .or_else(|| entries.first().map(|(k, _)| k.pos))
                        .unwrap_or(at);
                    self.push(Node {
                        kind: Kind::Map(entries),
                        pos,
                    });
                }
            }
            Event::Nothing
            | Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart
            | Event::DocumentEnd => {}
        }
    }
}

/// Parses every document of `src`. Syntax errors go to `sink` (with their position) and give
/// `None`.
pub fn documents(src: &str, sink: &mut Sink) -> Option<Vec<Node>> {
    let mut b = Builder {
        src,
        sink,
        stack: Vec::new(),
        docs: Vec::new(),
        failed: false,
    };
    let mut parser = Parser::new_from_str(src);
    if let Err(e) = parser.load(&mut b, true) {
        let at = pos(*e.marker());
        let msg = format!("invalid YAML: {}", e.info());
        b.sink.error(at, msg);
        return None;
    }
    if b.failed {
        return None;
    }
    Some(b.docs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based() {
        let mut sink = Sink::new("t.yaml");
        let docs = documents("a:\n  b: [x, 'y']\n---\nc: 1\n", &mut sink).expect("parses");
        assert_eq!(docs.len(), 2);
        let Kind::Map(m) = &docs[0].kind else {
            panic!("map expected")
        };
        assert_eq!(m[0].0.pos, Pos { line: 1, col: 1 });
        let Kind::Map(inner) = &m[0].1.kind else {
            panic!("inner map expected")
        };
        assert_eq!(inner[0].0.pos, Pos { line: 2, col: 3 });
        let Kind::Seq(items) = &inner[0].1.kind else {
            panic!("seq expected")
        };
        assert_eq!(items[1].pos, Pos { line: 2, col: 10 });
        assert!(matches!(&items[1].kind, Kind::Scalar { plain: false, .. }));
    }

    #[test]
    fn refuses_aliases_with_position() {
        let mut sink = Sink::new("t.yaml");
        assert!(documents("a: &x [1]\nb: *x\n", &mut sink).is_none());
        let err = sink.finish(()).expect_err("refused");
        // At the anchored value.
        assert_eq!(err.diagnostics()[0].pos, Pos { line: 1, col: 7 });
    }
}
