//! containerd's snapshot filters, as far as containerd 1.6 sends them to a proxy snapshotter.
//!
//! A filter is a comma-separated conjunction of selectors; a list of filters is a disjunction
//! (an empty list matches everything). A selector is a field path (`name`, `parent`, `kind`,
//! `labels.KEY`, with path segments optionally in double quotes), then optionally an operator
//! (`==`, `!=`, or `~=` for a substring match) and a value, bare or double-quoted with Go escapes.
//! A selector without an operator tests that the field is present and non-empty.
//!
//! The one containerd 1.6 really sends (after a remote snapshotter answered `ALREADY_EXISTS`):
//! `labels."containerd.io/snapshot.ref"==sha256:…,parent=="default/4/sha256:…"`.
//! `~=` is a regular expression in containerd; here it matches as a substring, which covers
//! literal patterns without pulling in a regex engine for a call nobody makes.

use super::{Info, SnapshotError};

/// One parsed filter: every selector must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    selectors: Vec<Selector>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Present,
    Equal(String),
    NotEqual(String),
    Contains(String),
}

impl Filter {
    /// Parses one filter string.
    pub fn parse(text: &str) -> Result<Self, SnapshotError> {
        let mut scanner = Scanner {
            text,
            chars: text.char_indices().peekable(),
        };
        let mut selectors = Vec::new();
        loop {
            scanner.skip_spaces();
            if scanner.peek().is_none() {
                break;
            }
            selectors.push(scanner.selector()?);
            scanner.skip_spaces();
            match scanner.next() {
                None => break,
                Some(',') => continue,
                Some(c) => return Err(scanner.error(&format!("unexpected {c:?}"))),
            }
        }
        if selectors.is_empty() {
            return Err(SnapshotError::InvalidArgument(format!(
                "filter {text:?} is empty"
            )));
        }
        Ok(Self { selectors })
    }

    /// Whether `info` passes every selector.
    pub fn matches(&self, info: &Info) -> bool {
        self.selectors.iter().all(|s| s.matches(info))
    }
}

/// Whether `info` passes any of `filters` (all snapshots pass an empty list).
pub fn matches_any(filters: &[Filter], info: &Info) -> bool {
    filters.is_empty() || filters.iter().any(|f| f.matches(info))
}

impl Selector {
    fn field<'a>(&self, info: &'a Info) -> Option<&'a str> {
        match self.path.iter().map(String::as_str).collect::<Vec<_>>()[..] {
            ["name"] => Some(&info.name),
            ["parent"] => Some(&info.parent),
            ["kind"] => Some(info.kind.as_str()),
            // Label keys contain dots: everything after `labels.` is the key.
            ["labels", ..] => info
                .labels
                .get(&self.path[1..].join("."))
                .map(String::as_str),
            _ => None,
        }
    }

    fn matches(&self, info: &Info) -> bool {
        let value = self.field(info);
        match &self.op {
            Op::Present => value.is_some_and(|v| !v.is_empty()),
            Op::Equal(want) => value == Some(want.as_str()),
            Op::NotEqual(want) => value != Some(want.as_str()),
            Op::Contains(want) => value.is_some_and(|v| v.contains(want.as_str())),
        }
    }
}

struct Scanner<'a> {
    text: &'a str,
    chars: std::iter::Peekable<std::str::CharIndices<'a>>,
}

impl Scanner<'_> {
    fn peek(&mut self) -> Option<char> {
        self.chars.peek().map(|&(_, c)| c)
    }

    fn next(&mut self) -> Option<char> {
        self.chars.next().map(|(_, c)| c)
    }

    fn error(&self, what: &str) -> SnapshotError {
        SnapshotError::InvalidArgument(format!("filter {:?}: {what}", self.text))
    }

    fn skip_spaces(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.next();
        }
    }

    fn selector(&mut self) -> Result<Selector, SnapshotError> {
        let mut path = vec![self.segment()?];
        while self.peek() == Some('.') {
            self.next();
            path.push(self.segment()?);
        }
        self.skip_spaces();
        let op = match self.peek() {
            None | Some(',') => Op::Present,
            Some(c @ ('=' | '!' | '~')) => {
                self.next();
                if self.next() != Some('=') {
                    return Err(self.error(&format!("expected '=' after {c:?}")));
                }
                self.skip_spaces();
                let value = self.value()?;
                match c {
                    '=' => Op::Equal(value),
                    '!' => Op::NotEqual(value),
                    _ => Op::Contains(value),
                }
            }
            Some(c) => return Err(self.error(&format!("unexpected {c:?} after a field"))),
        };
        Ok(Selector { path, op })
    }

    /// A field path segment: an identifier, or a quoted string.
    fn segment(&mut self) -> Result<String, SnapshotError> {
        if self.peek() == Some('"') {
            return self.quoted();
        }
        let mut out = String::new();
        while let Some(c) = self.peek() {
            if c.is_alphanumeric() || c == '_' || c == '-' {
                out.push(c);
                self.next();
            } else {
                break;
            }
        }
        if out.is_empty() {
            return Err(self.error("expected a field name"));
        }
        Ok(out)
    }

    /// A value: quoted, or bare up to the next comma.
    fn value(&mut self) -> Result<String, SnapshotError> {
        if self.peek() == Some('"') {
            return self.quoted();
        }
        let mut out = String::new();
        while let Some(c) = self.peek() {
            if c == ',' {
                break;
            }
            out.push(c);
            self.next();
        }
        Ok(out.trim_end().to_owned())
    }

    /// A double-quoted string with Go's common escapes.
    fn quoted(&mut self) -> Result<String, SnapshotError> {
        self.next(); // the opening quote
        let mut out = String::new();
        loop {
            match self.next() {
                None => return Err(self.error("unterminated quoted string")),
                Some('"') => return Ok(out),
                Some('\\') => match self.next() {
                    Some('n') => out.push('\n'),
                    Some('t') => out.push('\t'),
                    Some(c @ ('\\' | '"' | '\'')) => out.push(c),
                    other => {
                        return Err(self.error(&format!("unsupported escape \\{other:?}")));
                    }
                },
                Some(c) => out.push(c),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::Kind;

    fn info(name: &str, parent: &str, kind: Kind, labels: &[(&str, &str)]) -> Info {
        Info {
            name: name.into(),
            parent: parent.into(),
            kind,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            created: std::time::SystemTime::UNIX_EPOCH,
            updated: std::time::SystemTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn the_filter_containerd_sends_after_already_exists_matches_only_the_target() {
        let filter = Filter::parse(
            r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent=="default/4/sha256:def""#,
        )
        .unwrap();
        let target = info(
            "sha256:abc",
            "default/4/sha256:def",
            Kind::Committed,
            &[("containerd.io/snapshot.ref", "sha256:abc")],
        );
        assert!(filter.matches(&target));
        let other_parent = info(
            "sha256:abc",
            "",
            Kind::Committed,
            &[("containerd.io/snapshot.ref", "sha256:abc")],
        );
        assert!(!filter.matches(&other_parent));
        let no_label = info("sha256:abc", "default/4/sha256:def", Kind::Committed, &[]);
        assert!(!filter.matches(&no_label));
    }

    #[test]
    fn selectors_cover_kind_presence_inequality_and_or_of_filters() {
        let active = info("a", "", Kind::Active, &[("x.y", "1")]);
        let committed = info("c", "a", Kind::Committed, &[]);
        let kind = Filter::parse("kind==committed").unwrap();
        assert!(kind.matches(&committed) && !kind.matches(&active));
        let present = Filter::parse("labels.x.y").unwrap();
        assert!(present.matches(&active) && !present.matches(&committed));
        let not = Filter::parse("name!=a").unwrap();
        assert!(!not.matches(&active) && not.matches(&committed));
        let contains = Filter::parse(r#"name~="c""#).unwrap();
        assert!(contains.matches(&committed));
        assert!(matches_any(&[kind.clone(), present], &active));
        assert!(matches_any(&[], &active));
        assert!(!matches_any(&[kind], &active));
    }

    #[test]
    fn malformed_filters_are_invalid_arguments() {
        for bad in ["", "name=", r#"labels."unterminated"#, "name==a,,", "=a"] {
            assert!(
                matches!(Filter::parse(bad), Err(SnapshotError::InvalidArgument(_))),
                "{bad:?}"
            );
        }
    }
}
