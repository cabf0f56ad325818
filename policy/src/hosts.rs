//! Host names in zones (`hosts: [api.github.com, "*.githubusercontent.com"]`):
//! - an exact name matches itself only;
//! - `*.` followed by a name matches exactly one more label (`*.example.com` matches
//!   `a.example.com`, not `example.com`, not `a.b.example.com`);
//! - `**.` followed by a name matches one or more labels (`**.example.com` matches
//!   `a.example.com` and `a.b.example.com`, not `example.com`).
//!
//! A wildcard is a whole first label only, and must be followed by at least two labels (no
//! bare `*`, no `*.com`). Names are compared in lower case without the trailing dot.

use std::fmt;

/// Longest name in DNS (without the trailing dot).
const MAX_NAME: usize = 253;
/// Longest label.
const MAX_LABEL: usize = 63;

/// One host pattern of a zone.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    Exact(String),
    /// `*.suffix`: exactly one label before `suffix`.
    OneLabel(String),
    /// `**.suffix`: one or more labels before `suffix`.
    AnyDepth(String),
}

/// `name` lower-cased, without a trailing dot, if it is a valid DNS name.
pub fn normalize(name: &str) -> Option<String> {
    let n = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    valid_name(&n).then_some(n)
}

fn valid_label(l: &str) -> bool {
    !l.is_empty()
        && l.len() <= MAX_LABEL
        && l.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && !l.starts_with('-')
        && !l.ends_with('-')
}

fn valid_name(n: &str) -> bool {
    !n.is_empty() && n.len() <= MAX_NAME && n.split('.').all(valid_label)
}

impl HostPattern {
    /// Parses one pattern; the error says what to write instead.
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.strip_suffix('.').unwrap_or(text).to_ascii_lowercase();
        let (wild, rest) = if let Some(r) = t.strip_prefix("**.") {
            (Some(true), r)
        } else if let Some(r) = t.strip_prefix("*.") {
            (Some(false), r)
        } else {
            (None, t.as_str())
        };
        if rest.contains('*') || t == "*" || t == "**" {
            return Err(format!(
                "host `{text}` is not valid: a wildcard is a whole first label, `*.` (one \
                 label) or `**.` (any depth), followed by a name: `*.example.com`"
            ));
        }
        if !valid_name(rest) {
            return Err(format!(
                "host `{text}` is not a valid DNS name: labels of letters, digits, `-` or `_`, \
                 at most 63 bytes each and 253 in all, such as `api.github.com`"
            ));
        }
        match wild {
            None => Ok(Self::Exact(rest.to_owned())),
            Some(_) if rest.split('.').count() < 2 => Err(format!(
                "host `{text}` is too wide: a wildcard must be followed by at least two labels \
                 (`*.example.com`, not `*.com`)"
            )),
            Some(true) => Ok(Self::AnyDepth(rest.to_owned())),
            Some(false) => Ok(Self::OneLabel(rest.to_owned())),
        }
    }

    /// Whether `name` (normalized: [`normalize`]) matches.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            Self::Exact(n) => name == n,
            Self::OneLabel(s) | Self::AnyDepth(s) => {
                let Some(head) = name
                    .strip_suffix(s.as_str())
                    .and_then(|h| h.strip_suffix('.'))
                else {
                    return false;
                };
                !head.is_empty() && (matches!(self, Self::AnyDepth(_)) || !head.contains('.'))
            }
        }
    }

    /// How specific the pattern is: an exact name beats any wildcard, then the longer suffix,
    /// then `*.` over `**.`.
    pub fn specificity(&self) -> (u8, usize, u8) {
        match self {
            Self::Exact(n) => (2, n.len(), 0),
            Self::OneLabel(s) => (1, s.len(), 1),
            Self::AnyDepth(s) => (1, s.len(), 0),
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(n) => f.write_str(n),
            Self::OneLabel(s) => write!(f, "*.{s}"),
            Self::AnyDepth(s) => write!(f, "**.{s}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> HostPattern {
        HostPattern::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn wildcards_match_as_documented() {
        let one = p("*.githubusercontent.com");
        assert!(one.matches("raw.githubusercontent.com"));
        assert!(!one.matches("githubusercontent.com"));
        assert!(!one.matches("a.raw.githubusercontent.com"));
        assert!(!one.matches("evilgithubusercontent.com"));
        let any = p("**.example.com");
        assert!(any.matches("a.example.com") && any.matches("a.b.example.com"));
        assert!(!any.matches("example.com") && !any.matches("badexample.com"));
        let exact = p("API.GitHub.com.");
        assert_eq!(exact, HostPattern::Exact("api.github.com".into()));
        assert!(exact.matches("api.github.com") && !exact.matches("x.api.github.com"));
        assert_eq!(normalize("PyPI.org."), Some("pypi.org".into()));
        assert_eq!(normalize("bad..name"), None);
    }

    #[test]
    fn bad_patterns_are_refused_with_what_to_write() {
        for bad in [
            "*",
            "**",
            "*.com",
            "**.com",
            "api-*.example.com",
            "a.*.example.com",
            "exa mple.com",
            "-bad.example.com",
            "",
            &"a".repeat(64),
        ] {
            assert!(HostPattern::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn exact_beats_wildcards_and_longer_suffixes_win() {
        let mut v = [
            p("**.example.com"),
            p("api.example.com"),
            p("*.example.com"),
        ];
        v.sort_by_key(|x| std::cmp::Reverse(x.specificity()));
        assert_eq!(v[0], p("api.example.com"));
        assert_eq!(v[1], p("*.example.com"));
        assert!(p("*.a.example.com").specificity() > p("*.example.com").specificity());
    }
}
