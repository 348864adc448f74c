//! Registry mirrors as containerd configures them: `CONFIG_PATH/<registry>/hosts.toml` (falling
//! back to `CONFIG_PATH/_default/hosts.toml`), the same files containerd's CRI `config_path` and
//! `ctr --hosts-dir` read, so a pull-through mirror or a P2P proxy serves lazy layers too.
//!
//! ```toml
//! server = "https://registry.example"        # the upstream, tried last (default: the registry)
//! [host."http://127.0.0.1:5001"]             # mirrors, tried in file order
//!   capabilities = ["pull", "resolve"]
//! ```
//!
//! Supported: mirror order, `capabilities` (a host without `pull` is skipped), `http://` hosts
//! (plain HTTP). Not supported: the `?ns=` query containerd adds for mirrors, path prefixes in host URLs other than `/v2`, `skip_verify`, `ca`,
//! client certificates and per-host headers (such a host is used without them). The file is read
//! at every lazy mount, so edits apply without a restart, as in containerd.

use std::path::{Path, PathBuf};

/// One place to fetch from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// `host[:port]`, what a reference's registry part would be.
    pub host: String,
    /// The host URL said `http://`.
    pub plain_http: bool,
}

/// Where to look for `hosts.toml` files; `None` for no mirrors.
#[derive(Debug, Clone, Default)]
pub struct Hosts {
    dir: Option<PathBuf>,
}

impl Hosts {
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self { dir }
    }

    /// The hosts to try for `registry`, in order: its mirrors, then its upstream. A file that
    /// cannot be read or parsed is logged and ignored (the registry itself is still tried).
    pub fn candidates(&self, registry: &str) -> Vec<Host> {
        let upstream = Host {
            host: registry.to_owned(),
            plain_http: false,
        };
        let Some(dir) = &self.dir else {
            return vec![upstream];
        };
        let file = [registry, "_default"]
            .iter()
            .map(|name| hosts_file(dir, name))
            .find(|p| p.is_file());
        let Some(file) = file else {
            return vec![upstream];
        };
        match std::fs::read_to_string(&file)
            .map_err(|e| e.to_string())
            .and_then(|text| parse(&text, registry))
        {
            Ok(hosts) => hosts,
            Err(e) => {
                tracing::warn!(file = %file.display(), "ignoring hosts.toml: {e}");
                vec![upstream]
            }
        }
    }
}

/// Parses one `hosts.toml` for `registry`.
fn parse(text: &str, registry: &str) -> Result<Vec<Host>, String> {
    let table: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    if let Some(hosts) = table.get("host") {
        let hosts = hosts.as_table().ok_or("`host` must be a table of tables")?;
        for (url, settings) in hosts {
            let pulls = settings
                .get("capabilities")
                .and_then(toml::Value::as_array)
                .is_none_or(|caps| caps.iter().any(|c| c.as_str() == Some("pull")));
            if pulls {
                out.push(host_of(url)?);
            }
        }
    }
    match table.get("server").and_then(toml::Value::as_str) {
        Some(server) => out.push(host_of(server)?),
        None => out.push(Host {
            host: registry.to_owned(),
            plain_http: false,
        }),
    }
    Ok(out)
}

/// `http://host:port[/v2]` → the host and whether it is plain HTTP.
fn host_of(url: &str) -> Result<Host, String> {
    let (plain_http, rest) = if let Some(rest) = url.strip_prefix("http://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("https://") {
        (false, rest)
    } else {
        (false, url)
    };
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let path = path.trim_end_matches('/');
    if host.is_empty() {
        return Err(format!("host URL {url:?} has no host"));
    }
    if !path.is_empty() && path != "v2" {
        return Err(format!(
            "host URL {url:?}: path prefixes other than /v2 are not supported"
        ));
    }
    Ok(Host {
        host: host.to_owned(),
        plain_http,
    })
}

/// Where `registry`'s file lives under `dir`: containerd names the directory after the
/// registry's `host[:port]` (`docker.io` for Docker Hub).
pub fn hosts_file(dir: &Path, registry: &str) -> PathBuf {
    dir.join(registry).join("hosts.toml")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(h: &str, plain_http: bool) -> Host {
        Host {
            host: h.into(),
            plain_http,
        }
    }

    #[test]
    fn mirrors_come_first_in_file_order_then_the_server() {
        let text = r#"
server = "https://upstream.example"
[host."http://127.0.0.1:5001"]
  capabilities = ["pull", "resolve"]
[host."https://b.example/v2"]
[host."http://push-only.example"]
  capabilities = ["push"]
[host."https://a.example"]
  capabilities = ["pull"]
"#;
        assert_eq!(
            parse(text, "reg.example").unwrap(),
            [
                host("127.0.0.1:5001", true),
                host("b.example", false),
                host("a.example", false),
                host("upstream.example", false),
            ]
        );
    }

    #[test]
    fn without_server_the_registry_is_the_upstream_and_bad_files_are_ignored() {
        assert_eq!(
            parse("[host.\"http://m:1\"]\n", "reg:5000").unwrap(),
            [host("m:1", true), host("reg:5000", false)]
        );
        assert!(parse("[host.\"http://m/prefix\"]\n", "r").is_err());
        let dir = tempfile::tempdir().unwrap();
        let file = hosts_file(dir.path(), "reg:5000");
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, "not toml [").unwrap();
        let hosts = Hosts::new(Some(dir.path().to_owned()));
        assert_eq!(hosts.candidates("reg:5000"), [host("reg:5000", false)]);
        std::fs::write(&file, "[host.\"http://m:1\"]\n").unwrap();
        assert_eq!(
            hosts.candidates("reg:5000"),
            [host("m:1", true), host("reg:5000", false)]
        );
        assert_eq!(hosts.candidates("other"), [host("other", false)]);
    }
}
