//! lazysnapd's configuration file (TOML). Every key is optional; `docs/configuration.md` is the
//! reference and must list the same defaults as [`Config::default`].
//!
//! ```toml
//! root = "/var/lib/lazysnap"
//! address = "/run/lazysnap/lazysnapd.sock"
//! metrics_address = "127.0.0.1:9464"   # "" turns the endpoint off
//! separate_layer_host = true           # FUSE layers outlive restarts of the gRPC service
//! socket_group = ""                    # a group name or gid: socket 0660 for it (default 0600)
//!
//! [cache]
//! disk_budget_bytes = 0                # 0: unlimited
//! memory_budget_bytes = 16777216
//!
//! [fetch]
//! lazy = true                          # false: every layer is unpacked by containerd
//! background = true
//! read_timeout_secs = 30
//! max_request_bytes = 4194304
//! read_ahead_bytes = 262144            # other files a miss takes along
//! fuse_threads = 2
//! loader_prefetch = true               # fetch the libraries a program links when it starts
//! directory_read_ahead = true          # two missed files of a directory fetch its small files
//! account_files = true                 # fetch /etc/passwd and /etc/group when a layer is found
//!
//! [registry]
//! plain_http = false                   # loopback registries always get plain HTTP
//! docker_config_dir = "/root/.docker"  # default: $DOCKER_CONFIG, else ~/.docker
//! max_retries = 3
//! config_path = "/etc/containerd/certs.d"  # hosts.toml mirrors; default: none
//!
//! [cri]                                # kubelet's image service, proxied to containerd's
//! address = ""                         # e.g. "/run/lazysnap/cri.sock"; empty: off
//! containerd_address = "/run/containerd/containerd.sock"
//! credentials_ttl_secs = 43200         # how long a PullImage's credentials are kept
//! find_ahead = true                    # a PullImage starts finding the image's lazy layers
//!
//! [limits]                             # what a layer's TOC may state (hostile images)
//! max_toc_compressed_bytes = 67108864
//! max_toc_json_bytes = 134217728
//! max_toc_entries = 1000000
//! max_name_bytes = 4096
//! max_path_depth = 1024
//! max_chunk_bytes = 67108864
//! max_xattrs_per_entry = 128
//! max_xattr_value_bytes = 65536
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ServiceError;
use crate::fetch::FetchConfig;
use crate::format;
use crate::fs::MountOptions;
use crate::registry::ClientConfig;
use crate::snapshot::RemoteConfig;

/// Default state directory.
pub const DEFAULT_ROOT: &str = "/var/lib/lazysnap";
/// Default gRPC socket (what containerd's `[proxy_plugins.lazysnap] address` names).
pub const DEFAULT_ADDRESS: &str = "/run/lazysnap/lazysnapd.sock";
/// The FUSE session serving every lazy layer, under `ROOT/snapshots` (numeric names there are
/// snapshots; this one is not, and `--cleanup` detaches it with the rest).
const SESSION_DIR: &str = "fuse-session";

/// The whole file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub root: PathBuf,
    pub address: PathBuf,
    /// `host:port` for `GET /metrics`; empty for none.
    pub metrics_address: String,
    /// Serve lazy layers from a separate, long-lived `lazysnapd --layer-host` process, so the
    /// gRPC snapshotter can restart without unmounting the layers running containers read.
    pub separate_layer_host: bool,
    /// The group (name or number) that may also connect to the gRPC socket (mode 0660);
    /// empty: root only (0600).
    pub socket_group: String,
    pub cache: CacheSection,
    pub fetch: FetchSection,
    pub registry: RegistrySection,
    pub limits: LimitsSection,
    pub cri: CriSection,
}

/// The CRI image service proxy (kubelet's `--image-service-endpoint`): every call is forwarded
/// to containerd's CRI, and the credentials of each PullImage (the pod's image pull secret) are
/// kept for that repository's lazy layers, which containerd would not hand to a snapshotter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CriSection {
    /// The unix socket to serve the proxy on (mode 0600); empty: no proxy.
    pub address: PathBuf,
    /// containerd's socket, whose CRI plugin serves the calls.
    pub containerd_address: PathBuf,
    /// How long a PullImage's credentials are used for that repository's layers (a later pull
    /// renews them); at most a week.
    pub credentials_ttl_secs: u64,
    /// On a PullImage, start finding the image's lazy layers (manifest, TOCs, start-up profile)
    /// before forwarding it, while containerd resolves the image itself.
    pub find_ahead: bool,
}

impl Default for CriSection {
    fn default() -> Self {
        Self {
            address: PathBuf::new(),
            containerd_address: PathBuf::from("/run/containerd/containerd.sock"),
            credentials_ttl_secs: 12 * 3600,
            find_ahead: true,
        }
    }
}

impl CriSection {
    /// Where to serve the proxy, if it is on.
    pub fn address(&self) -> Option<&Path> {
        (!self.address.as_os_str().is_empty()).then_some(self.address.as_path())
    }

    pub fn credentials_ttl(&self) -> Duration {
        Duration::from_secs(self.credentials_ttl_secs).min(crate::registry::MAX_PULL_SECRET_TTL)
    }
}

/// Bounds on what a layer's footer and TOC may state, checked before memory is spent on them
/// (see [`format::Limits`] and docs/configuration.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSection {
    pub max_toc_compressed_bytes: u64,
    pub max_toc_json_bytes: u64,
    pub max_toc_entries: u64,
    pub max_name_bytes: usize,
    pub max_path_depth: usize,
    pub max_chunk_bytes: u64,
    pub max_xattrs_per_entry: usize,
    pub max_xattr_value_bytes: usize,
}

impl Default for LimitsSection {
    fn default() -> Self {
        let l = format::Limits::default();
        Self {
            max_toc_compressed_bytes: l.max_toc_compressed,
            max_toc_json_bytes: l.max_toc_json,
            max_toc_entries: l.max_entries,
            max_name_bytes: l.max_name_len,
            max_path_depth: l.max_depth,
            max_chunk_bytes: l.max_chunk,
            max_xattrs_per_entry: l.max_xattrs,
            max_xattr_value_bytes: l.max_xattr_value,
        }
    }
}

impl LimitsSection {
    /// The limits the format reader applies.
    pub fn to_format(&self) -> format::Limits {
        format::Limits {
            max_toc_compressed: self.max_toc_compressed_bytes,
            max_toc_json: self.max_toc_json_bytes,
            max_entries: self.max_toc_entries,
            max_name_len: self.max_name_bytes,
            max_depth: self.max_path_depth,
            max_chunk: self.max_chunk_bytes,
            max_xattrs: self.max_xattrs_per_entry,
            max_xattr_value: self.max_xattr_value_bytes,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheSection {
    /// Bytes of chunk data kept on disk before the least recently used unpinned chunks are
    /// evicted; 0 for no limit.
    pub disk_budget_bytes: u64,
    /// Bytes of hot chunks kept in memory.
    pub memory_budget_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FetchSection {
    /// Mount layers in a lazy format lazily; off makes lazysnapd a plain overlayfs snapshotter.
    pub lazy: bool,
    /// After the start-up set, fetch the rest of each lazy layer in the background.
    pub background: bool,
    /// A read waiting longer than this for the registry fails with EIO.
    pub read_timeout_secs: u64,
    /// Largest coalesced range request.
    pub max_request_bytes: u64,
    /// How far a miss reads ahead into the files after the missed one.
    pub read_ahead_bytes: u64,
    /// FUSE event-loop threads per layer.
    pub fuse_threads: usize,
    /// When a read reaches an ELF program's head, fetch its loader and libraries at once.
    pub loader_prefetch: bool,
    /// When reads miss two files of one directory, fetch the rest of its small files at once.
    pub directory_read_ahead: bool,
    /// Fetch a layer's `/etc/passwd` and `/etc/group` when it is found: every runtime reads
    /// them before the container starts.
    pub account_files: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistrySection {
    pub plain_http: bool,
    pub docker_config_dir: Option<PathBuf>,
    pub max_retries: u32,
    /// containerd's registry `config_path` (e.g. `/etc/containerd/certs.d`): mirrors from its
    /// `<registry>/hosts.toml` files. None: registries are reached directly.
    pub config_path: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            root: PathBuf::from(DEFAULT_ROOT),
            address: PathBuf::from(DEFAULT_ADDRESS),
            metrics_address: "127.0.0.1:9464".into(),
            separate_layer_host: true,
            socket_group: String::new(),
            cache: CacheSection::default(),
            fetch: FetchSection::default(),
            registry: RegistrySection::default(),
            limits: LimitsSection::default(),
            cri: CriSection::default(),
        }
    }
}

impl Default for CacheSection {
    fn default() -> Self {
        Self {
            disk_budget_bytes: 0,
            memory_budget_bytes: 16 << 20,
        }
    }
}

impl Default for FetchSection {
    fn default() -> Self {
        let fs = MountOptions::default();
        Self {
            lazy: true,
            background: true,
            read_timeout_secs: fs.read_timeout.as_secs(),
            max_request_bytes: FetchConfig::default().max_request,
            read_ahead_bytes: FetchConfig::default().max_neighbours,
            fuse_threads: fs.threads,
            loader_prefetch: FetchConfig::default().loader_prefetch,
            directory_read_ahead: FetchConfig::default().directory_read_ahead,
            account_files: FetchConfig::default().account_files,
        }
    }
}

impl Default for RegistrySection {
    fn default() -> Self {
        let c = ClientConfig::default();
        Self {
            plain_http: c.plain_http,
            docker_config_dir: c.docker_config_dir,
            max_retries: c.max_retries,
            config_path: None,
        }
    }
}

impl Config {
    /// Reads `path`; a missing file is an error (the operator named it), an empty one means
    /// all defaults.
    pub fn load(path: &Path) -> Result<Self, ServiceError> {
        let text = std::fs::read_to_string(path).map_err(|e| ServiceError::Config {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        Self::parse(&text).map_err(|message| ServiceError::Config {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses the TOML text of a config file.
    pub fn parse(text: &str) -> Result<Self, String> {
        let config: Self = toml::from_str(text).map_err(|e| e.to_string())?;
        config.limits.to_format().validate()?;
        if config.cri.address().is_some() && config.cri.address() == Some(config.address.as_path())
        {
            return Err("cri.address: must differ from address (the snapshots socket)".into());
        }
        if config.fetch.read_timeout_secs == 0 {
            return Err("fetch.read_timeout_secs must be at least 1".into());
        }
        if config.fetch.max_request_bytes < 4096 {
            return Err("fetch.max_request_bytes must be at least 4096".into());
        }
        config.metrics()?;
        Ok(config)
    }

    /// The metrics address, if the endpoint is on.
    pub fn metrics(&self) -> Result<Option<SocketAddr>, String> {
        if self.metrics_address.is_empty() {
            return Ok(None);
        }
        self.metrics_address.parse().map(Some).map_err(|e| {
            format!(
                "metrics_address {:?}: {e} (want HOST:PORT, or \"\" for none)",
                self.metrics_address
            )
        })
    }

    /// The gRPC socket's group, if one is configured: a number, or a name in the group database.
    pub fn socket_gid(&self) -> Result<Option<nix::unistd::Gid>, String> {
        let name = self.socket_group.trim();
        if name.is_empty() {
            return Ok(None);
        }
        if let Ok(gid) = name.parse::<u32>() {
            return Ok(Some(nix::unistd::Gid::from_raw(gid)));
        }
        match nix::unistd::Group::from_name(name) {
            Ok(Some(group)) => Ok(Some(group.gid)),
            Ok(None) => Err(format!("socket_group {name:?}: no such group")),
            Err(e) => Err(format!("socket_group {name:?}: looking it up: {e}")),
        }
    }

    /// How the snapshotter fetches and serves lazy layers.
    pub fn remote(&self) -> RemoteConfig {
        RemoteConfig {
            enabled: self.fetch.lazy,
            registry: ClientConfig {
                plain_http: self.registry.plain_http,
                docker_config_dir: self.registry.docker_config_dir.clone(),
                max_retries: self.registry.max_retries,
                pull_secrets: Default::default(),
            },
            fetch: FetchConfig {
                max_request: self.fetch.max_request_bytes,
                max_neighbours: self.fetch.read_ahead_bytes,
                loader_prefetch: self.fetch.loader_prefetch,
                directory_read_ahead: self.fetch.directory_read_ahead,
                account_files: self.fetch.account_files,
                ..FetchConfig::default()
            },
            fs: MountOptions {
                read_timeout: Duration::from_secs(self.fetch.read_timeout_secs),
                threads: self.fetch.fuse_threads.max(1),
            },
            background_fetch: self.fetch.background,
            limits: self.limits.to_format(),
            hosts_dir: self.registry.config_path.clone(),
            session_dir: Some(self.root.join("snapshots").join(SESSION_DIR)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_means_the_documented_defaults() {
        let config = Config::parse("").unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.root, Path::new("/var/lib/lazysnap"));
        assert_eq!(config.address, Path::new("/run/lazysnap/lazysnapd.sock"));
        assert_eq!(config.cache.memory_budget_bytes, 16 << 20);
        assert_eq!(config.fetch.read_timeout_secs, 30);
        assert!(config.fetch.lazy && config.fetch.background);
    }

    #[test]
    fn the_shipped_example_config_is_the_defaults() {
        let shipped = Config::parse(include_str!("../../systemd/lazysnapd.toml")).unwrap();
        assert_eq!(shipped, Config::default());
    }

    #[test]
    fn keys_override_defaults_and_unknown_or_bad_keys_are_errors() {
        let config = Config::parse(
            "root = \"/srv/ls\"\nmetrics_address = \"\"\n[cache]\ndisk_budget_bytes = 1000\n[fetch]\nbackground = false\n",
        )
        .unwrap();
        assert_eq!(config.root, Path::new("/srv/ls"));
        assert_eq!(config.metrics().unwrap(), None);
        assert_eq!(config.cache.disk_budget_bytes, 1000);
        assert!(!config.remote().background_fetch);
        assert!(Config::parse("[cache]\ndisk_budget = 1\n").is_err());
        assert!(Config::parse("metrics_address = \"nowhere\"\n").is_err());
        assert!(Config::parse("[fetch]\nread_timeout_secs = 0\n").is_err());
    }

    #[test]
    fn limits_reach_the_reader_and_are_validated() {
        let config =
            Config::parse("[limits]\nmax_toc_entries = 5000\nmax_chunk_bytes = 1048576\n").unwrap();
        let limits = config.remote().limits;
        assert_eq!(limits.max_entries, 5000);
        assert_eq!(limits.max_chunk, 1 << 20);
        assert_eq!(limits.max_toc_json, format::Limits::default().max_toc_json);
        let err = Config::parse("[limits]\nmax_chunk_bytes = 4294967296\n").unwrap_err();
        assert!(err.contains("limits.max_chunk_bytes"), "{err}");
        assert!(Config::parse("[limits]\nmax_toc_entries = 0\n").is_err());
        assert!(Config::parse("[limits]\nmax_entries = 1\n").is_err());
    }

    #[test]
    fn the_socket_group_is_a_number_or_a_known_name() {
        assert_eq!(Config::default().socket_gid(), Ok(None));
        let numeric = Config::parse("socket_group = \"4242\"\n").unwrap();
        assert_eq!(
            numeric.socket_gid(),
            Ok(Some(nix::unistd::Gid::from_raw(4242)))
        );
        let root = Config::parse("socket_group = \"root\"\n").unwrap();
        assert_eq!(root.socket_gid(), Ok(Some(nix::unistd::Gid::from_raw(0))));
        let unknown = Config::parse("socket_group = \"no-such-group-here\"\n").unwrap();
        assert!(unknown.socket_gid().unwrap_err().contains("no such group"));
    }
}
