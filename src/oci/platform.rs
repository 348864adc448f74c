//! Platforms (`os/arch[/variant]`) in the GOOS/GOARCH names image indexes use.

use std::fmt;
use std::str::FromStr;

use super::OciError;

/// `os/arch[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    /// The platform this process runs on, in OCI (GOARCH) names: `linux/amd64`, `linux/arm64`, ...
    pub fn host() -> Self {
        let os = match std::env::consts::OS {
            "macos" => "darwin",
            other => other,
        };
        let (architecture, variant) = match std::env::consts::ARCH {
            "arm" => ("arm", Some("v7")),
            other => (go_arch(other), None),
        };
        Self {
            os: os.to_owned(),
            architecture: architecture.to_owned(),
            variant: variant.map(str::to_owned),
        }
    }

    /// True if a descriptor's `os`, `architecture` and `variant` satisfy this platform: os and
    /// architecture must be equal; the variant only when this platform names one (`arm64` without
    /// a variant is the same as `arm64/v8`).
    pub fn matches(&self, os: &str, architecture: &str, variant: Option<&str>) -> bool {
        if self.os != os || self.architecture != go_arch(architecture) {
            return false;
        }
        match &self.variant {
            None => true,
            Some(wanted) => {
                let default = default_variant(&self.architecture);
                let offered = variant.or(default);
                Some(wanted.as_str()) == offered
            }
        }
    }
}

/// Rust / uname architecture names to GOARCH names; GOARCH names pass through.
fn go_arch(arch: &str) -> &str {
    match arch {
        "x86_64" | "x86-64" => "amd64",
        "aarch64" => "arm64",
        "x86" | "i386" | "i686" => "386",
        "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
        "powerpc64le" => "ppc64le",
        "powerpc64" => "ppc64",
        "powerpc" => "ppc",
        "loongarch64" => "loong64",
        "armv7l" | "armhf" => "arm",
        other => other,
    }
}

/// The variant an index means when it names none.
fn default_variant(arch: &str) -> Option<&'static str> {
    match arch {
        "arm64" => Some("v8"),
        _ => None,
    }
}

impl FromStr for Platform {
    type Err = OciError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fail = |reason: &str| OciError::Platform {
            platform: s.to_owned(),
            reason: reason.to_owned(),
        };
        let parts: Vec<&str> = s.split('/').collect();
        if !(2..=3).contains(&parts.len()) {
            return Err(fail("wrong number of `/`-separated parts"));
        }
        let ok = |p: &str| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        };
        if !parts.iter().all(|p| ok(p)) {
            return Err(fail(
                "each part must be non-empty letters, digits, `_` or `-`",
            ));
        }
        let os = parts[0].to_ascii_lowercase();
        let architecture = go_arch(&parts[1].to_ascii_lowercase()).to_owned();
        let variant = parts.get(2).map(|v| v.to_ascii_lowercase());
        Ok(Self {
            os,
            architecture,
            variant,
        })
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_uses_go_names() {
        let host = Platform::host();
        assert_eq!(host.os, "linux");
        #[cfg(target_arch = "x86_64")]
        assert_eq!(host.architecture, "amd64");
        #[cfg(target_arch = "aarch64")]
        assert_eq!(host.architecture, "arm64");
    }

    #[test]
    fn parses_and_prints() {
        let p: Platform = "linux/arm64/v8".parse().unwrap();
        assert_eq!(p.variant.as_deref(), Some("v8"));
        assert_eq!(p.to_string(), "linux/arm64/v8");
        let p: Platform = "linux/x86_64".parse().unwrap();
        assert_eq!(p.to_string(), "linux/amd64");
        for bad in ["linux", "linux/", "/amd64", "a/b/c/d", "linux/am d64"] {
            let err = bad.parse::<Platform>().unwrap_err().to_string();
            assert!(err.contains("os/arch"), "{bad}: {err}");
        }
    }

    #[test]
    fn variant_matters_only_when_asked() {
        let any_arm: Platform = "linux/arm".parse().unwrap();
        assert!(any_arm.matches("linux", "arm", Some("v6")));
        let v7: Platform = "linux/arm/v7".parse().unwrap();
        assert!(!v7.matches("linux", "arm", Some("v6")));
        assert!(v7.matches("linux", "arm", Some("v7")));
        let v8: Platform = "linux/arm64/v8".parse().unwrap();
        assert!(v8.matches("linux", "arm64", None));
        assert!(!v8.matches("windows", "arm64", None));
    }
}
