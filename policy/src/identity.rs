//! SPIFFE ID patterns: `*` matches one path segment, `**` (last) any suffix of one or more
//! segments. Among several matching patterns the most specific wins.

/// A parsed pattern: trust domain and path segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityPattern {
    raw: String,
    domain: String,
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    One,
    Rest,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("`{0}` is not a SPIFFE ID: it must start with spiffe://")]
    Scheme(String),
    #[error(
        "`{0}` has an empty or invalid trust domain (lowercase letters, digits, `.`, `-`, `_`)"
    )]
    Domain(String),
    #[error(
        "`{0}` has an empty or invalid path segment (letters, digits, `.`, `-`, `_`; not `.` or `..`)"
    )]
    Segment(String),
    #[error("`{0}`: `**` may only be the last segment")]
    RestNotLast(String),
}

fn valid_domain(d: &str) -> bool {
    !d.is_empty()
        && d.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b".-_".contains(&c))
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b".-_".contains(&c))
}

/// Splits `spiffe://domain/a/b` into the domain and the path segments, checking the syntax.
fn split(raw: &str) -> Result<(&str, Vec<&str>), IdentityError> {
    let rest = raw
        .strip_prefix("spiffe://")
        .ok_or_else(|| IdentityError::Scheme(raw.into()))?;
    let (domain, path) = rest.split_once('/').unwrap_or((rest, ""));
    if !valid_domain(domain) {
        return Err(IdentityError::Domain(raw.into()));
    }
    let segs: Vec<&str> = if path.is_empty() {
        Vec::new()
    } else {
        path.split('/').collect()
    };
    Ok((domain, segs))
}

/// Checks a concrete SPIFFE ID (no wildcards).
pub fn validate_id(raw: &str) -> Result<(), IdentityError> {
    let (_, segs) = split(raw)?;
    if segs.iter().any(|s| !valid_segment(s)) {
        return Err(IdentityError::Segment(raw.into()));
    }
    Ok(())
}

impl IdentityPattern {
    pub fn parse(raw: &str) -> Result<Self, IdentityError> {
        let (domain, segs) = split(raw)?;
        let mut segments = Vec::with_capacity(segs.len());
        for (i, s) in segs.iter().enumerate() {
            segments.push(match *s {
                "*" => Segment::One,
                "**" if i + 1 == segs.len() => Segment::Rest,
                "**" => return Err(IdentityError::RestNotLast(raw.into())),
                s if valid_segment(s) => Segment::Literal(s.into()),
                _ => return Err(IdentityError::Segment(raw.into())),
            });
        }
        Ok(Self {
            raw: raw.into(),
            domain: domain.into(),
            segments,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.raw
    }

    pub fn matches(&self, id: &str) -> bool {
        let Ok((domain, segs)) = split(id) else {
            return false;
        };
        if domain != self.domain {
            return false;
        }
        let mut i = 0;
        for p in &self.segments {
            match p {
                Segment::Rest => return segs.len() > i,
                Segment::One => {
                    if i >= segs.len() {
                        return false;
                    }
                }
                Segment::Literal(l) => {
                    if segs.get(i) != Some(&l.as_str()) {
                        return false;
                    }
                }
            }
            i += 1;
        }
        i == segs.len()
    }

    /// Whether some SPIFFE ID matches both patterns.
    pub fn overlaps(&self, other: &Self) -> bool {
        if self.domain != other.domain {
            return false;
        }
        let fixed = |p: &Self| -> (usize, bool) {
            let rest = matches!(p.segments.last(), Some(Segment::Rest));
            (p.segments.len() - usize::from(rest), rest)
        };
        let (na, ra) = fixed(self);
        let (nb, rb) = fixed(other);
        // Lengths some ID could have for both: `**` stands for one or more segments.
        let lengths_meet = match (ra, rb) {
            (false, false) => na == nb,
            (true, false) => nb > na,
            (false, true) => na > nb,
            (true, true) => true,
        };
        lengths_meet
            && self
                .segments
                .iter()
                .zip(&other.segments)
                .all(|pair| match pair {
                    (Segment::Literal(a), Segment::Literal(b)) => a == b,
                    _ => true,
                })
    }

    /// Ordering key for "most specific": more literal segments first, then fewer wildcards
    /// (`*` before `**`), then longer patterns. Equal keys are a tie.
    pub fn specificity(&self) -> (usize, bool, usize) {
        let literals = self
            .segments
            .iter()
            .filter(|s| matches!(s, Segment::Literal(_)))
            .count();
        let no_rest = !self.segments.iter().any(|s| matches!(s, Segment::Rest));
        (literals, no_rest, self.segments.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> IdentityPattern {
        IdentityPattern::parse(s).expect("valid pattern")
    }

    #[test]
    fn star_matches_one_segment() {
        let pat = p("spiffe://example.org/agent/research/*");
        assert!(pat.matches("spiffe://example.org/agent/research/a1"));
        assert!(!pat.matches("spiffe://example.org/agent/research/a1/b"));
        assert!(!pat.matches("spiffe://example.org/agent/research"));
        assert!(!pat.matches("spiffe://other.org/agent/research/a1"));
    }

    #[test]
    fn double_star_matches_any_suffix() {
        let pat = p("spiffe://example.org/agent/**");
        assert!(pat.matches("spiffe://example.org/agent/a"));
        assert!(pat.matches("spiffe://example.org/agent/a/b/c"));
        assert!(!pat.matches("spiffe://example.org/agent"));
    }

    #[test]
    fn exact_is_more_specific_than_wildcards() {
        let exact = p("spiffe://example.org/agent/research/a1");
        let one = p("spiffe://example.org/agent/research/*");
        let rest = p("spiffe://example.org/agent/**");
        assert!(exact.specificity() > one.specificity());
        assert!(one.specificity() > rest.specificity());
    }

    #[test]
    fn overlap() {
        let o = |a: &str, b: &str| p(a).overlaps(&p(b)) && p(b).overlaps(&p(a));
        assert!(o("spiffe://e/a/*", "spiffe://e/*/b"));
        assert!(!o("spiffe://e/a/*", "spiffe://e/b/*"));
        assert!(!o("spiffe://e/a/*", "spiffe://f/a/*"));
        assert!(!o("spiffe://e/a/*", "spiffe://e/a/*/c"));
        assert!(o("spiffe://e/a/**", "spiffe://e/a/b/c"));
        assert!(!o("spiffe://e/a/**", "spiffe://e/a"));
        assert!(o("spiffe://e/a/**", "spiffe://e/*/b/**"));
        assert!(!o("spiffe://e/a/**", "spiffe://e/b/**"));
    }

    #[test]
    fn rejects_bad_syntax() {
        assert!(matches!(
            IdentityPattern::parse("http://x/y"),
            Err(IdentityError::Scheme(_))
        ));
        assert!(matches!(
            IdentityPattern::parse("spiffe://Ex/y"),
            Err(IdentityError::Domain(_))
        ));
        assert!(matches!(
            IdentityPattern::parse("spiffe://ex/**/y"),
            Err(IdentityError::RestNotLast(_))
        ));
        assert!(matches!(
            IdentityPattern::parse("spiffe://ex/a//b"),
            Err(IdentityError::Segment(_))
        ));
    }
}
