//! The OCI runtime spec for one container, from the image config and the command line.
//!
//! The rules are the ones users know from `docker run`: the command line's command replaces the
//! image's `Cmd` and keeps its `Entrypoint`; `--entrypoint` replaces the entrypoint and drops
//! `Cmd`; `-e` overrides the image's `Env`; `-w` and `-u` override `WorkingDir` and `User`.
//! The process runs in exec form (it is PID 1), with docker's default capability set.

use std::collections::HashSet;
use std::path::Path;

use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxDeviceCgroupBuilder,
    LinuxNamespaceBuilder, LinuxNamespaceType, LinuxResourcesBuilder, Mount, MountBuilder,
    ProcessBuilder, RootBuilder, Spec, UserBuilder,
};
use serde_json::Value;

use super::user::ResolvedUser;

const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Which network the container gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Network {
    /// The host's network namespace: the container sees the host's interfaces.
    #[default]
    Host,
    /// A new network namespace with only a loopback interface (down until something raises it).
    None,
}

/// What the image config says about the process, with the image's defaults applied.
#[derive(Debug, Clone, Default)]
pub struct ImageProcess {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
    pub user: String,
}

impl ImageProcess {
    /// Reads the `config` object of an image configuration.
    pub fn from_config(config: &Value) -> Self {
        let c = config.get("config").cloned().unwrap_or(Value::Null);
        let strings = |key: &str| -> Vec<String> {
            c.get(key)
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        let string = |key: &str| c.get(key).and_then(Value::as_str).unwrap_or("").to_owned();
        Self {
            entrypoint: strings("Entrypoint"),
            cmd: strings("Cmd"),
            env: strings("Env"),
            working_dir: string("WorkingDir"),
            user: string("User"),
        }
    }
}

/// What the command line asks for.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--entrypoint`: replaces the image's entrypoint (an empty string clears it) and its Cmd.
    pub entrypoint: Option<String>,
    /// The command after the image reference.
    pub command: Vec<String>,
    /// `-e K=V` (or `-e K`, taking K from lazysnap's own environment).
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
}

/// Why no spec could be made.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("no command to run: the image has no Entrypoint or Cmd and none was given")]
    NoCommand,
    #[error("working directory {0:?} is not an absolute path")]
    RelativeWorkingDir(String),
    #[error("building the runtime spec: {0}")]
    Build(#[from] oci_spec::OciSpecError),
}

/// The process's argv by docker's rules.
pub fn command(image: &ImageProcess, overrides: &Overrides) -> Result<Vec<String>, SpecError> {
    let args: Vec<String> = match &overrides.entrypoint {
        Some(ep) => (!ep.is_empty())
            .then(|| ep.clone())
            .into_iter()
            .chain(overrides.command.iter().cloned())
            .collect(),
        None if !overrides.command.is_empty() => image
            .entrypoint
            .iter()
            .chain(&overrides.command)
            .cloned()
            .collect(),
        None => image.entrypoint.iter().chain(&image.cmd).cloned().collect(),
    };
    if args.is_empty() {
        return Err(SpecError::NoCommand);
    }
    Ok(args)
}

/// The environment: the image's, then `-e` overrides by key, plus PATH, HOSTNAME and HOME when
/// missing.
pub fn environment(
    image: &ImageProcess,
    overrides: &Overrides,
    hostname: &str,
    home: &str,
) -> Vec<String> {
    let mut env: Vec<String> = Vec::new();
    let mut set = |entry: String| {
        let key = entry.split('=').next().unwrap_or_default().to_owned();
        env.retain(|e| e.split('=').next() != Some(key.as_str()));
        env.push(entry);
    };
    for e in &image.env {
        set(e.clone());
    }
    for e in &overrides.env {
        if e.contains('=') {
            set(e.clone());
        } else if let Ok(v) = std::env::var(e) {
            set(format!("{e}={v}"));
        }
    }
    let has = |env: &[String], key: &str| env.iter().any(|e| e.split('=').next() == Some(key));
    let mut extra = Vec::new();
    if !has(&env, "PATH") {
        extra.push(DEFAULT_PATH.to_owned());
    }
    if !has(&env, "HOSTNAME") {
        extra.push(format!("HOSTNAME={hostname}"));
    }
    if !has(&env, "HOME") {
        extra.push(format!("HOME={home}"));
    }
    extra.extend(env);
    extra
}

/// Everything the spec is made of.
#[derive(Debug)]
pub struct SpecInput<'a> {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub user: &'a ResolvedUser,
    pub rootfs: &'a Path,
    pub hostname: &'a str,
    pub network: Network,
    /// Apply the default seccomp filter ([`super::seccomp`]); off only when asked for.
    pub seccomp: bool,
}

/// The runtime spec: a writable rootfs at `rootfs`, the default mounts (/proc, /dev, /sys, ...),
/// new pid, ipc, uts and mount namespaces (and network with [`Network::None`]).
pub fn runtime_spec(input: &SpecInput<'_>) -> Result<Spec, SpecError> {
    if !input.cwd.starts_with('/') {
        return Err(SpecError::RelativeWorkingDir(input.cwd.clone()));
    }
    let caps: HashSet<Capability> = DEFAULT_CAPABILITIES.iter().copied().collect();
    let capabilities = LinuxCapabilitiesBuilder::default()
        .bounding(caps.clone())
        .effective(caps.clone())
        .permitted(caps)
        .build()?;
    let user = UserBuilder::default()
        .uid(input.user.uid)
        .gid(input.user.gid)
        .additional_gids(input.user.additional_gids.clone())
        .build()?;
    let process = ProcessBuilder::default()
        .terminal(false)
        .args(input.args.clone())
        .env(input.env.clone())
        .cwd(input.cwd.clone())
        .user(user)
        .capabilities(capabilities)
        .no_new_privileges(false)
        .build()?;
    let mut namespaces = vec![
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Mount,
    ];
    if input.network == Network::None {
        namespaces.push(LinuxNamespaceType::Network);
    }
    let namespaces = namespaces
        .into_iter()
        .map(|typ| LinuxNamespaceBuilder::default().typ(typ).build())
        .collect::<Result<Vec<_>, _>>()?;
    // Deny every device, then runc adds its defaults (null, zero, full, tty, random, urandom).
    let devices = vec![LinuxDeviceCgroupBuilder::default()
        .allow(false)
        .access("rwm")
        .build()?];
    let mut linux = LinuxBuilder::default();
    if input.seccomp {
        linux = linux.seccomp(super::seccomp::default_profile()?);
    }
    let linux = linux
        .namespaces(namespaces)
        .resources(LinuxResourcesBuilder::default().devices(devices).build()?)
        .masked_paths(
            oci_spec::runtime::get_default_maskedpaths()
                .into_iter()
                .collect::<Vec<_>>(),
        )
        .readonly_paths(oci_spec::runtime::get_default_readonly_paths())
        .build()?;
    let mut spec = Spec::default();
    spec.set_process(Some(process))
        .set_root(Some(
            RootBuilder::default()
                .path(input.rootfs)
                .readonly(false)
                .build()?,
        ))
        .set_hostname(Some(input.hostname.to_owned()))
        .set_mounts(Some(mounts(input.network)?))
        .set_linux(Some(linux));
    Ok(spec)
}

/// The default mounts without the cgroup mount (these machines' hybrid cgroups make a cgroup
/// mount inside the container fail), plus the host's name resolution with the host network.
fn mounts(network: Network) -> Result<Vec<Mount>, SpecError> {
    let mut mounts: Vec<Mount> = oci_spec::runtime::get_default_mounts()
        .into_iter()
        .filter(|m| m.destination() != Path::new("/sys/fs/cgroup"))
        .collect();
    if network == Network::Host {
        for file in ["/etc/resolv.conf", "/etc/hosts"] {
            if Path::new(file).is_file() {
                mounts.push(
                    MountBuilder::default()
                        .destination(file)
                        .typ("bind")
                        .source(file)
                        .options(vec!["rbind".into(), "ro".into()])
                        .build()?,
                );
            }
        }
    }
    Ok(mounts)
}

/// docker's default capability set: enough for package managers and setuid tools, nothing that
/// reaches beyond the container.
const DEFAULT_CAPABILITIES: &[Capability] = &[
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fowner,
    Capability::Fsetid,
    Capability::Kill,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::NetRaw,
    Capability::SysChroot,
    Capability::Mknod,
    Capability::AuditWrite,
    Capability::Setfcap,
];

#[cfg(test)]
mod tests {
    use super::*;

    fn image(entrypoint: &[&str], cmd: &[&str]) -> ImageProcess {
        ImageProcess {
            entrypoint: entrypoint.iter().map(|s| s.to_string()).collect(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn over(entrypoint: Option<&str>, command: &[&str]) -> Overrides {
        Overrides {
            entrypoint: entrypoint.map(str::to_owned),
            command: command.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn command_follows_docker_rules() {
        let img = image(&["/ep", "-x"], &["default"]);
        assert_eq!(
            command(&img, &over(None, &[])).unwrap(),
            ["/ep", "-x", "default"]
        );
        assert_eq!(
            command(&img, &over(None, &["mine"])).unwrap(),
            ["/ep", "-x", "mine"]
        );
        assert_eq!(
            command(&img, &over(Some("/other"), &[])).unwrap(),
            ["/other"]
        );
        assert_eq!(
            command(&img, &over(Some(""), &["sh", "-c", "true"])).unwrap(),
            ["sh", "-c", "true"]
        );
        assert!(matches!(
            command(&image(&[], &[]), &over(None, &[])),
            Err(SpecError::NoCommand)
        ));
        assert!(matches!(
            command(&img, &over(Some(""), &[])),
            Err(SpecError::NoCommand)
        ));
    }

    #[test]
    fn environment_overrides_by_key_and_fills_defaults() {
        let img = ImageProcess {
            env: vec!["A=1".into(), "B=2".into()],
            ..Default::default()
        };
        let o = Overrides {
            env: vec!["B=3".into(), "C=x=y".into()],
            ..Default::default()
        };
        let env = environment(&img, &o, "box", "/root");
        assert!(env.contains(&"A=1".to_owned()));
        assert!(env.contains(&"B=3".to_owned()));
        assert!(!env.contains(&"B=2".to_owned()));
        assert!(env.contains(&"C=x=y".to_owned()));
        assert!(env.contains(&DEFAULT_PATH.to_owned()));
        assert!(env.contains(&"HOSTNAME=box".to_owned()));
        assert!(env.contains(&"HOME=/root".to_owned()));
    }

    #[test]
    fn spec_has_the_process_namespaces_and_seccomp() {
        let user = ResolvedUser {
            uid: 1000,
            gid: 1000,
            additional_gids: vec![44],
            home: "/home/a".into(),
        };
        let input = SpecInput {
            args: vec!["/bin/true".into()],
            env: vec!["A=1".into()],
            cwd: "/srv".into(),
            user: &user,
            rootfs: Path::new("/tmp/rootfs"),
            hostname: "box",
            network: Network::None,
            seccomp: true,
        };
        let spec = runtime_spec(&input).unwrap();
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["process"]["args"][0], "/bin/true");
        assert_eq!(json["process"]["user"]["uid"], 1000);
        assert_eq!(json["process"]["user"]["additionalGids"][0], 44);
        assert_eq!(json["process"]["cwd"], "/srv");
        assert_eq!(json["root"]["path"], "/tmp/rootfs");
        assert_eq!(json["root"]["readonly"], false);
        let ns: Vec<&str> = json["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert!(ns.contains(&"network") && ns.contains(&"pid"), "{ns:?}");
        assert_eq!(json["linux"]["seccomp"]["defaultAction"], "SCMP_ACT_ERRNO");
        let unconfined = SpecInput {
            seccomp: false,
            args: input.args.clone(),
            env: input.env.clone(),
            ..input
        };
        let json = serde_json::to_value(runtime_spec(&unconfined).unwrap()).unwrap();
        assert!(json["linux"].get("seccomp").is_none());
        let input = SpecInput {
            network: Network::Host,
            cwd: "rel".into(),
            ..input
        };
        assert!(matches!(
            runtime_spec(&input),
            Err(SpecError::RelativeWorkingDir(_))
        ));
    }
}
