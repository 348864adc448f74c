//! Image references (`HOST[:PORT]/REPO[:TAG][@DIGEST]`), normalised as docker does.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use super::{Digest, OciError};

/// Docker Hub's canonical name.
const DOCKER_HUB: &str = "docker.io";
/// Longest `HOST/REPO` docker accepts.
const MAX_NAME_LEN: usize = 255;
/// Longest tag docker accepts.
const MAX_TAG_LEN: usize = 128;

/// `HOST[:PORT]/REPO[:TAG][@DIGEST]`, normalised as docker does (`debian` is
/// `docker.io/library/debian:latest`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// Registry host with optional port, e.g. `127.0.0.1:5000`.
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

impl Reference {
    /// The same repository, pinned to `digest` (tag kept for display).
    pub fn with_digest(&self, digest: Digest) -> Self {
        Self {
            digest: Some(digest),
            ..self.clone()
        }
    }

    /// True for a registry on loopback (`localhost`, `127.0.0.0/8`, `[::1]`), spoken to over plain
    /// HTTP without a flag.
    pub fn is_loopback(&self) -> bool {
        host_is_loopback(&self.registry)
    }

    /// What to ask the registry for: the digest if pinned, else the tag (`latest` if neither).
    pub fn tag_or_digest(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(digest), _) => digest.to_string(),
            (None, Some(tag)) => tag.clone(),
            (None, None) => "latest".to_owned(),
        }
    }
}

/// True if `registry` (`host[:port]`) names the loopback interface.
fn host_is_loopback(registry: &str) -> bool {
    if let Some(rest) = registry.strip_prefix('[') {
        let Some((ip, _port)) = rest.split_once(']') else {
            return false;
        };
        return ip.parse::<Ipv6Addr>().is_ok_and(|ip| ip.is_loopback());
    }
    let host = registry
        .split_once(':')
        .map_or(registry, |(host, _port)| host);
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
}

impl FromStr for Reference {
    type Err = OciError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fail = |reason: &str| OciError::Reference {
            reference: s.to_owned(),
            reason: reason.to_owned(),
        };
        if s.is_empty() {
            return Err(fail("empty"));
        }
        let (name_tag, digest) = match s.split_once('@') {
            Some((name_tag, digest)) => {
                let digest = digest.parse::<Digest>().map_err(|e| fail(&e.to_string()))?;
                (name_tag, Some(digest))
            }
            None => (s, None),
        };
        // A `:` after the last `/` starts the tag; one before it belongs to the host's port.
        let last_slash = name_tag.rfind('/');
        let (name, tag) = match name_tag.rfind(':') {
            Some(colon) if last_slash.is_none_or(|slash| colon > slash) => {
                (&name_tag[..colon], Some(&name_tag[colon + 1..]))
            }
            _ => (name_tag, None),
        };
        if name.len() > MAX_NAME_LEN {
            return Err(fail(&format!("name longer than {MAX_NAME_LEN} characters")));
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, rest)) if is_host_component(first) => (first, rest),
            _ => (DOCKER_HUB, name),
        };
        let registry = if registry == "index.docker.io" {
            DOCKER_HUB
        } else {
            registry
        };
        validate_host(registry).map_err(|reason| fail(&reason))?;
        validate_path(path).map_err(|reason| fail(&reason))?;
        let repository = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path.to_owned()
        };
        if let Some(tag) = tag {
            validate_tag(tag).map_err(|reason| fail(&reason))?;
        }
        let tag = match (tag, &digest) {
            (Some(tag), _) => Some(tag.to_owned()),
            (None, Some(_)) => None,
            (None, None) => Some("latest".to_owned()),
        };
        Ok(Self {
            registry: registry.to_owned(),
            repository,
            tag,
            digest,
        })
    }
}

/// Docker's rule: the first component names a host if it has a `.` or `:`, is `localhost`, or has
/// upper case (repository names never do).
fn is_host_component(first: &str) -> bool {
    first.contains(['.', ':'])
        || first == "localhost"
        || first.bytes().any(|b| b.is_ascii_uppercase())
}

fn validate_host(registry: &str) -> Result<(), String> {
    let (host, port) = if let Some(rest) = registry.strip_prefix('[') {
        let (ip, after) = rest
            .split_once(']')
            .ok_or("unclosed `[` in registry host")?;
        if ip.is_empty() || !ip.bytes().all(|b| b.is_ascii_hexdigit() || b == b':') {
            return Err(format!("registry host [{ip}] is not an IPv6 address"));
        }
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or("unexpected text after `]` in registry host")?,
            ),
        };
        (None, port)
    } else {
        match registry.split_once(':') {
            Some((host, port)) => (Some(host), Some(port)),
            None => (Some(registry), None),
        }
    };
    if let Some(host) = host {
        let label_ok = |label: &str| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        };
        if !host.split('.').all(label_ok) {
            return Err(format!("registry host {host:?} is not a valid host name"));
        }
    }
    if let Some(port) = port {
        if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("registry port {port:?} is not a number"));
        }
    }
    Ok(())
}

/// Path components: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`, joined by `/`.
fn validate_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("empty repository name".to_owned());
    }
    if path.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err("repository name must be lowercase".to_owned());
    }
    for component in path.split('/') {
        if !component_ok(component) {
            return Err(format!(
                "repository component {component:?} must be lower-case letters and digits, \
                 separated by `.`, `_`, `__` or dashes"
            ));
        }
    }
    Ok(())
}

fn component_ok(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let (Some(&first), Some(&last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    if !alnum(first) || !alnum(last) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        // A separator run: `.`, `_`, `__` or one or more `-`.
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &component[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
fn validate_tag(tag: &str) -> Result<(), String> {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let ok = match tag.as_bytes().split_first() {
        Some((&first, rest)) => {
            word(first)
                && rest.iter().all(|&b| word(b) || b == b'.' || b == b'-')
                && tag.len() <= MAX_TAG_LEN
        }
        None => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "tag {tag:?} must be 1 to {MAX_TAG_LEN} letters, digits, `_`, `.` or `-`, not starting with `.` or `-`"
        ))
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn parse(s: &str) -> Reference {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn normalises_docker_hub_names() {
        let r = parse("debian");
        assert_eq!(r.registry, "docker.io");
        assert_eq!(r.repository, "library/debian");
        assert_eq!(r.tag.as_deref(), Some("latest"));
        assert_eq!(r.to_string(), "docker.io/library/debian:latest");
        assert_eq!(parse("user/app:1.0").to_string(), "docker.io/user/app:1.0");
        assert_eq!(
            parse("index.docker.io/debian").to_string(),
            "docker.io/library/debian:latest"
        );
    }

    #[test]
    fn recognises_hosts_by_dot_colon_or_localhost() {
        let r = parse("127.0.0.1:5000/app/web:v1");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("127.0.0.1:5000", "app/web")
        );
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert_eq!(parse("localhost/app").registry, "localhost");
        assert_eq!(parse("ghcr.io/o/app").registry, "ghcr.io");
        assert_eq!(parse("[::1]:5000/app").registry, "[::1]:5000");
        // `foo` has no dot or colon: a docker hub user.
        assert_eq!(parse("foo/app").to_string(), "docker.io/foo/app:latest");
    }

    #[test]
    fn digest_without_tag_gets_no_default_tag() {
        let d = Digest::of(b"x");
        let r = parse(&format!("localhost:5000/app@{d}"));
        assert_eq!(r.tag, None);
        assert_eq!(r.digest, Some(d));
        assert_eq!(r.tag_or_digest(), d.to_string());
        let r = parse(&format!("localhost:5000/app:v2@{d}"));
        assert_eq!(r.tag.as_deref(), Some("v2"));
        assert_eq!(r.tag_or_digest(), d.to_string());
        assert_eq!(r.to_string(), format!("localhost:5000/app:v2@{d}"));
    }

    #[test]
    fn with_digest_keeps_the_tag() {
        let d = Digest::of(b"y");
        let r = parse("localhost:5000/app:v1").with_digest(d);
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert_eq!(r.digest, Some(d));
    }

    #[test]
    fn rejects_bad_names() {
        for bad in [
            "",
            "UPPER",
            "localhost:5000/App",
            "app:",
            "app:-x",
            "a//b",
            "/app",
            "app/",
            "app@sha256:abc",
            "app@md5:00",
            "host.io:port/app",
            "a..b",
            "-a",
        ] {
            assert!(bad.parse::<Reference>().is_err(), "{bad:?} parsed");
        }
        let err = "localhost:5000/App"
            .parse::<Reference>()
            .unwrap_err()
            .to_string();
        assert!(err.contains("lowercase"), "{err}");
    }

    #[test]
    fn loopback_detection() {
        for lo in [
            "localhost",
            "localhost:5000",
            "127.0.0.1",
            "127.1.2.3:80",
            "[::1]",
            "[::1]:5000",
        ] {
            let r = Reference {
                registry: lo.into(),
                repository: "a".into(),
                tag: None,
                digest: None,
            };
            assert!(r.is_loopback(), "{lo}");
        }
        for remote in [
            "docker.io",
            "10.0.0.1:5000",
            "[::2]:5000",
            "localhost.example.com",
        ] {
            let r = Reference {
                registry: remote.into(),
                repository: "a".into(),
                tag: None,
                digest: None,
            };
            assert!(!r.is_loopback(), "{remote}");
        }
    }

    fn reference_strategy() -> impl Strategy<Value = String> {
        let host = prop_oneof![
            Just(String::new()),
            "[a-z0-9]{1,6}(\\.[a-z0-9]{1,4}){0,2}(:[0-9]{1,5})?/",
            "localhost(:[0-9]{1,4})?/",
            "\\[::1\\](:[0-9]{1,4})?/",
        ];
        let component = "[a-z0-9]{1,5}(([._]|__|-{1,2})[a-z0-9]{1,3}){0,2}";
        let path = prop::collection::vec(component, 1..4).prop_map(|c| c.join("/"));
        let tag = prop::option::of("[A-Za-z0-9_][A-Za-z0-9_.-]{0,12}");
        let digest = prop::option::of(any::<[u8; 32]>().prop_map(Digest::from_bytes));
        (host, path, tag, digest).prop_map(|(host, path, tag, digest)| {
            // Without a host, a first component with a dot would be read as one.
            let first_is_host =
                host.is_empty() && path.split('/').next().is_some_and(|c| c.contains('.'));
            let host = if first_is_host {
                "localhost/".to_owned()
            } else {
                host
            };
            let mut s = format!("{host}{path}");
            if let Some(tag) = tag {
                s.push(':');
                s.push_str(&tag);
            }
            if let Some(digest) = digest {
                s.push('@');
                s.push_str(&digest.to_string());
            }
            s
        })
    }

    proptest! {
        #[test]
        fn valid_references_round_trip(s in reference_strategy()) {
            let r: Reference = s.parse().map_err(|e| TestCaseError::fail(format!("{s}: {e}")))?;
            let again: Reference = r.to_string().parse().map_err(|e| TestCaseError::fail(format!("{r}: {e}")))?;
            prop_assert_eq!(&again, &r);
            prop_assert_eq!(again.to_string(), r.to_string());
        }

        #[test]
        fn parse_never_panics_and_round_trips_when_ok(s in "\\PC{0,80}") {
            if let Ok(r) = s.parse::<Reference>() {
                let again: Reference = r.to_string().parse().map_err(|e| TestCaseError::fail(format!("{r}: {e}")))?;
                prop_assert_eq!(again, r);
            }
        }

        #[test]
        fn parse_never_panics_on_reference_like_noise(s in "[a-zA-Z0-9:/@.\\[\\]_-]{0,40}") {
            if let Ok(r) = s.parse::<Reference>() {
                let again: Reference = r.to_string().parse().map_err(|e| TestCaseError::fail(format!("{r}: {e}")))?;
                prop_assert_eq!(again, r);
            }
        }
    }
}
