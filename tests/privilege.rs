//! Privilege boundaries, tried as a local attacker would, with real parts: a real registry, kernel
//! FUSE and overlayfs, `lazysnapd` with its layer host, and runc. The image is hostile to the
//! host: a setuid-root program, a program with `security.capability` (cap_setuid, cap_sys_admin)
//! and a block device node `b 254 0` with mode 0666 (on this VM the host's disk). An unprivileged
//! host user (`setpriv` to uid/gid 65534, no groups) must not reach anything under a state root,
//! must gain nothing through the setuid file or the capability at a `lazysnap mount` mount point,
//! and must not open the device node there; the sockets are 0600 and the layer host answers only
//! root and mounts only below its own root. Every mount and process is cleaned up by a guard.

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use common::image::{self, LayoutBuilder};
use common::mount_process::MountProcess;
use common::registry::TestRegistry;
use common::{mounts_below, unmount_below, UnmountOnDrop};

const LAZYSNAP: &str = env!("CARGO_BIN_EXE_lazysnap");
const LAZYSNAPD: &str = env!("CARGO_BIN_EXE_lazysnapd");
const NOBODY: &str = "65534";
const EACCES: &str = "13";

/// A tiny static program: its effective uid and effective capabilities, as the kernel gave them.
const PROBE_C: &str = r#"#include <stdio.h>
#include <string.h>
#include <unistd.h>
int main(void) {
    char line[256];
    FILE *status = fopen("/proc/self/status", "r");
    printf("euid=%d\n", (int)geteuid());
    while (status && fgets(line, sizeof line, status))
        if (strncmp(line, "CapEff:", 7) == 0)
            fputs(line, stdout);
    return 0;
}
"#;

/// No effective capabilities.
const NO_CAPS: &str = "CapEff:\t0000000000000000";

/// The hostile tree: `bin/suid-probe` (root, 04755), `bin/cap-probe` (cap_setuid and
/// cap_sys_admin, effective), `dev/disk` (block 254:0, 0666), `dev/null` (char 1:3, 0666), plus a readable `etc/hostname` and
/// the passwd and group files a container needs. Its root is 0755, so a host user can reach the
/// files of a mount point of it: what stops them must be the mount flags, not the image.
fn hostile_tree(dir: &Path) -> Result<()> {
    for sub in ["bin", "etc", "dev", "srv", "tmp"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    let scratch = tempfile::tempdir()?;
    let source = scratch.path().join("probe.c");
    std::fs::write(&source, PROBE_C)?;
    let suid = dir.join("bin/suid-probe");
    image::run(
        Command::new("cc")
            .args(["-static", "-O1", "-o"])
            .arg(&suid)
            .arg(&source),
    )
    .context("compiling the probe (needs gcc and libc6-dev)")?;
    let caps = dir.join("bin/cap-probe");
    std::fs::copy(&suid, &caps)?;
    std::os::unix::fs::chown(&suid, Some(0), Some(0))?;
    std::fs::set_permissions(&suid, std::fs::Permissions::from_mode(0o4755))?;
    image::run(
        Command::new("setcap")
            .arg("cap_setuid,cap_sys_admin+ep")
            .arg(&caps),
    )
    .context("setcap (Debian package libcap2-bin)")?;
    let disk = dir.join("dev/disk");
    image::run(Command::new("mknod").arg(&disk).args(["b", "254", "0"]))?;
    std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(0o666))?;
    // A harmless node the host lets anyone open where devices are allowed (1:3 is /dev/null),
    // so `nodev` is seen to be what refuses it (the disk may be refused by a device cgroup).
    let null = dir.join("dev/null");
    image::run(Command::new("mknod").arg(&null).args(["c", "1", "3"]))?;
    std::fs::set_permissions(&null, std::fs::Permissions::from_mode(0o666))?;
    std::fs::write(dir.join("etc/hostname"), "privilege-test\n")?;
    std::fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n",
    )?;
    std::fs::write(dir.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
    std::fs::set_permissions(dir.join("tmp"), std::fs::Permissions::from_mode(0o1777))?;
    Ok(())
}

/// The hostile image, converted to zstd:chunked and pushed: its reference.
fn hostile_image(registry: &TestRegistry, work: &Path) -> Result<String> {
    let tree = work.join("tree");
    hostile_tree(&tree)?;
    let layout = LayoutBuilder::new(&work.join("layout"))?;
    let desc = layout.image(&[image::tar_dir(&tree)?], "amd64")?;
    layout.tags(&[("src", desc)])?;
    let reference = format!("{}/hostile:zstd", registry.addr);
    image::run(Command::new(LAZYSNAP).args([
        "convert",
        "--format",
        "zstd-chunked",
        &format!("oci:{}:src", layout.dir.display()),
        &reference,
    ]))?;
    Ok(reference)
}

/// A directory a host user may enter (a temp dir is 0700): mount points and sockets go here.
fn open_workdir() -> Result<tempfile::TempDir> {
    let work = tempfile::Builder::new()
        .prefix("lazysnap-priv-")
        .tempdir()?;
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755))?;
    Ok(work)
}

/// Runs `args` as uid and gid 65534 with no supplementary groups.
fn as_nobody(args: &[&std::ffi::OsStr]) -> Result<Output> {
    Command::new("setpriv")
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            "--",
        ])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("setpriv (util-linux)")
}

/// What uid 65534 gets when it lists (directories) or opens read-only (everything else) each
/// path: `OPENED` or `DENIED <errno>`, one line per path, in order.
fn nobody_opens(paths: &[PathBuf]) -> Result<Vec<String>> {
    let script = "import os, sys\n\
        for p in sys.argv[1:]:\n\
        \x20   try:\n\
        \x20       os.listdir(p) if os.path.isdir(p) else os.close(os.open(p, os.O_RDONLY))\n\
        \x20       print('OPENED', p)\n\
        \x20   except OSError as e:\n\
        \x20       print('DENIED', e.errno, p)\n";
    let mut args: Vec<&std::ffi::OsStr> =
        vec!["/usr/bin/python3".as_ref(), "-c".as_ref(), script.as_ref()];
    args.extend(paths.iter().map(|p| p.as_os_str()));
    let out = as_nobody(&args)?;
    ensure!(
        out.status.success(),
        "the probe script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?
        .lines()
        .map(str::to_owned)
        .collect())
}

/// Fails unless uid 65534 was refused (EACCES) every one of `paths`.
fn ensure_denied(paths: &[PathBuf]) -> Result<()> {
    let results = nobody_opens(paths)?;
    ensure!(results.len() == paths.len(), "probe output: {results:?}");
    let reached: Vec<&String> = results
        .iter()
        .filter(|r| !r.starts_with(&format!("DENIED {EACCES} ")))
        .collect();
    ensure!(
        reached.is_empty(),
        "uid 65534 was not refused (EACCES) by:\n{}",
        reached
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
    Ok(())
}

/// Runs the probe at `path` as uid 65534: its output (`euid=N` and the `CapEff:` line).
fn nobody_runs(path: &Path) -> Result<String> {
    let out = as_nobody(&[path.as_os_str()])?;
    ensure!(
        out.status.success(),
        "{} as uid 65534: {} {}",
        path.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// The per-mount options (`ro,nosuid,...`) of the mount at `path`, from mountinfo.
fn mount_options(path: &Path) -> Result<Vec<String>> {
    let wanted = path.to_string_lossy();
    let table = std::fs::read_to_string("/proc/self/mountinfo")?;
    // The last mount at the path is the one in effect.
    let line = table
        .lines()
        .rfind(|l| l.split(' ').nth(4) == Some(&*wanted))
        .with_context(|| format!("{wanted} is not a mount point"))?;
    Ok(line
        .split(' ')
        .nth(5)
        .unwrap_or_default()
        .split(',')
        .map(str::to_owned)
        .collect())
}

fn mode(path: &Path) -> Result<u32> {
    Ok(std::fs::symlink_metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .permissions()
        .mode()
        & 0o7777)
}

/// The image as root sees it at `dir`: the hostile entries are there, so refusals are not an
/// accident of a missing file.
fn ensure_hostile_entries(dir: &Path) -> Result<()> {
    let suid = std::fs::metadata(dir.join("bin/suid-probe"))?;
    ensure!(
        suid.mode() & 0o4000 != 0 && suid.uid() == 0,
        "bin/suid-probe is not setuid root at {}",
        dir.display()
    );
    let caps = image::run(Command::new("getcap").arg(dir.join("bin/cap-probe")))?;
    ensure!(
        String::from_utf8_lossy(&caps).contains("cap_setuid"),
        "bin/cap-probe has no capability at {}: {}",
        dir.display(),
        String::from_utf8_lossy(&caps)
    );
    let disk = std::fs::metadata(dir.join("dev/disk"))?;
    ensure!(
        disk.file_type().is_block_device()
            && nix::sys::stat::major(disk.rdev()) == 254
            && mode(&dir.join("dev/disk"))? == 0o666,
        "dev/disk is not block 254:0 mode 0666 at {}",
        dir.display()
    );
    Ok(())
}

/// The lazy layer's FUSE mount point, `ROOT/run/mount-*/layer-0`.
fn layer_dir(mount: &MountProcess) -> Result<PathBuf> {
    let run = mount.root.join("run");
    let mount_dir = std::fs::read_dir(&run)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("mount-"))
        })
        .with_context(|| format!("no mount directory in {}", run.display()))?;
    Ok(mount_dir.join("layer-0"))
}

#[test]
fn a_user_mount_point_is_nosuid_nodev_and_the_state_root_is_root_only() -> Result<()> {
    let registry = TestRegistry::start()?;
    let work = open_workdir()?;
    let _cleanup = UnmountOnDrop(work.path().to_owned());
    let reference = hostile_image(&registry, work.path())?;
    let root = work.path().join("root");
    let target = work.path().join("mnt");
    let mount = MountProcess::start(&root, &reference, &target, &[])?;
    ensure_hostile_entries(&target)?;

    // The mount point itself is the user's: they may read the image's files...
    let readable = nobody_opens(&[target.clone(), target.join("etc/hostname")])?;
    ensure!(
        readable.iter().all(|r| r.starts_with("OPENED")),
        "uid 65534 cannot read the mount point at all, so the checks below would prove nothing: {readable:?}"
    );
    // ...but gains nothing by them.
    let options = mount_options(&target)?;
    ensure!(
        options.iter().any(|o| o == "nosuid") && options.iter().any(|o| o == "nodev"),
        "the overlay at the mount point is not nosuid,nodev: {options:?}"
    );
    let suid = nobody_runs(&target.join("bin/suid-probe"))?;
    ensure!(
        suid.contains(&format!("euid={NOBODY}\n")),
        "the setuid-root probe raised uid 65534's privileges: {suid}"
    );
    let caps = nobody_runs(&target.join("bin/cap-probe"))?;
    ensure!(
        caps.contains(NO_CAPS),
        "the probe with file capabilities gave uid 65534 capabilities: {caps}"
    );
    // EACCES is nodev's answer (a device cgroup would say EPERM).
    ensure_denied(&[target.join("dev/disk"), target.join("dev/null")])?;

    // The state root, and everything under it that holds image content, is root's alone.
    let layer = layer_dir(&mount)?;
    ensure_hostile_entries(&layer)?;
    for dir in [&root, &root.join("run"), &root.join("cache")] {
        ensure!(
            mode(dir)? == 0o700,
            "{} is mode {:o}, not 0700",
            dir.display(),
            mode(dir)?
        );
    }
    ensure_denied(&[
        root.clone(),
        root.join("run"),
        root.join("cache"),
        layer.clone(),
        layer.join("etc/hostname"),
        layer.join("bin/suid-probe"),
        layer.join("bin/cap-probe"),
        layer.join("dev/disk"),
    ])?;
    Ok(())
}

#[test]
fn allow_suid_and_allow_dev_honour_the_image_as_asked() -> Result<()> {
    // The same checks as above must fail when the user asks for suid and dev: they can.
    let registry = TestRegistry::start()?;
    let work = open_workdir()?;
    let _cleanup = UnmountOnDrop(work.path().to_owned());
    let reference = hostile_image(&registry, work.path())?;
    let target = work.path().join("mnt");
    let _mount = MountProcess::start(
        &work.path().join("root"),
        &reference,
        &target,
        &["--allow-suid", "--allow-dev"],
    )?;
    let options = mount_options(&target)?;
    ensure!(
        !options.iter().any(|o| o == "nosuid" || o == "nodev"),
        "asked for suid and dev, got {options:?}"
    );
    let suid = nobody_runs(&target.join("bin/suid-probe"))?;
    ensure!(suid.contains("euid=0\n"), "setuid was not honoured: {suid}");
    let caps = nobody_runs(&target.join("bin/cap-probe"))?;
    ensure!(
        !caps.contains(NO_CAPS),
        "file capabilities were not honoured: {caps}"
    );
    // Opening (read-only, at once closed) a device node is what --allow-dev allows; the disk
    // may still be refused, by a device cgroup (EPERM), but not by the mount (EACCES).
    let opened = nobody_opens(&[target.join("dev/null"), target.join("dev/disk")])?;
    ensure!(
        opened.len() == 2
            && opened[0].starts_with("OPENED")
            && !opened[1].starts_with(&format!("DENIED {EACCES} ")),
        "with --allow-dev the device nodes were refused as by nodev: {opened:?}"
    );
    Ok(())
}

/// A `lazysnapd` (and the layer host it starts) with its root and socket in `dir`; stopped,
/// with its layer host and every mount below `dir`, when dropped.
struct Lazysnapd {
    child: Child,
    dir: PathBuf,
}

impl Lazysnapd {
    fn start(dir: &Path) -> Result<Self> {
        std::fs::write(
            dir.join("lazysnapd.toml"),
            format!(
                "root = \"{}\"\naddress = \"{}\"\nmetrics_address = \"\"\n",
                dir.join("root").display(),
                Self::socket(dir).display()
            ),
        )?;
        let log = std::fs::File::create(dir.join("lazysnapd.log"))?;
        let child = Command::new(LAZYSNAPD)
            .arg("--config")
            .arg(dir.join("lazysnapd.toml"))
            .env("LAZYSNAP_LOG", "info,lazysnap=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let mut daemon = Self {
            child,
            dir: dir.to_owned(),
        };
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(Self::socket(dir)).is_err() {
            if let Some(status) = daemon.child.try_wait()? {
                bail!("lazysnapd exited ({status}): {}", daemon.log());
            }
            ensure!(
                start.elapsed() < Duration::from_secs(30),
                "lazysnapd not serving after 30 s: {}",
                daemon.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(daemon)
    }

    fn socket(dir: &Path) -> PathBuf {
        dir.join("run/lazysnapd.sock")
    }

    fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("lazysnapd.log")).unwrap_or_default()
            + "\n--- layer host ---\n"
            + &std::fs::read_to_string(self.root().join("layer-host.log")).unwrap_or_default()
    }

    /// One request to the layer host, as root; its answer (JSON).
    fn ask_layer_host(&self, request: &serde_json::Value) -> Result<serde_json::Value> {
        use std::io::{BufRead, BufReader, Write};
        let mut stream =
            std::os::unix::net::UnixStream::connect(self.root().join("layer-host.sock"))?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        stream.write_all(format!("{request}\n").as_bytes())?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line)?;
        serde_json::from_str(&line).with_context(|| format!("layer host answered {line:?}"))
    }
}

impl Drop for Lazysnapd {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let start = Instant::now();
            while matches!(self.child.try_wait(), Ok(None))
                && start.elapsed() < Duration::from_secs(10)
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // Stops the layer host (by its socket) and detaches what is left.
        let _ = Command::new(LAZYSNAPD)
            .arg("--config")
            .arg(self.dir.join("lazysnapd.toml"))
            .arg("--cleanup")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        unmount_below(&self.dir);
    }
}

/// The layer host's `mount` request for the hostile image's layer at `dir`.
fn mount_request(reference: &str, id: u64, dir: &Path) -> Result<serde_json::Value> {
    let out = image::run(Command::new(LAZYSNAP).args(["inspect", "--json", reference]))?;
    let info: serde_json::Value = serde_json::from_slice(&out)?;
    Ok(serde_json::json!({
        "op": "mount",
        "id": id,
        "layer": {
            "image": reference,
            "manifest": info["manifest_digest"].as_str().context("manifest digest")?,
            "layer": info["layers"][0]["digest"].as_str().context("layer digest")?,
        },
        "dir": dir,
    }))
}

#[test]
fn lazysnapd_state_and_sockets_are_root_only_and_the_layer_host_mounts_only_in_its_root(
) -> Result<()> {
    let registry = TestRegistry::start()?;
    let work = open_workdir()?;
    let _cleanup = UnmountOnDrop(work.path().to_owned());
    let reference = hostile_image(&registry, work.path())?;
    let daemon = Lazysnapd::start(work.path())?;
    let root = daemon.root();
    let host_socket = root.join("layer-host.sock");
    let grpc_socket = Lazysnapd::socket(work.path());

    for (path, want) in [
        (&root, 0o700),
        (&root.join("snapshots"), 0o700),
        (&root.join("cache"), 0o700),
        (&grpc_socket, 0o600),
        (&host_socket, 0o600),
    ] {
        let got = mode(path)?;
        ensure!(
            got == want,
            "{} is mode {got:o}, not {want:o}",
            path.display()
        );
    }

    // A lazy layer of the hostile image, where the snapshotter would mount it.
    let inside = root.join("snapshots/900/fs");
    let answer = daemon.ask_layer_host(&mount_request(&reference, 900, &inside)?)?;
    ensure!(
        answer["result"] == "mounted",
        "mount in the root: {answer}\n{}",
        daemon.log()
    );
    ensure_hostile_entries(&inside)?;
    ensure_denied(&[
        root.clone(),
        root.join("snapshots"),
        root.join("cache"),
        inside.clone(),
        inside.join("etc/hostname"),
        inside.join("bin/suid-probe"),
        inside.join("dev/disk"),
        grpc_socket.clone(),
        host_socket.clone(),
    ])?;

    // Mounts anywhere else are refused, through a symlink below the root too.
    let outside = work.path().join("outside");
    std::fs::create_dir_all(&outside)?;
    std::os::unix::fs::symlink(&outside, root.join("snapshots/901"))?;
    for (id, dir) in [
        (902, outside.clone()),
        (901, root.join("snapshots/901/fs")),
        (903, root.join("snapshots/../../outside")),
    ] {
        let answer = daemon.ask_layer_host(&mount_request(&reference, id, &dir)?)?;
        ensure!(
            answer["result"] == "fallback"
                && answer["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("not a directory below")),
            "a mount at {} was not refused: {answer}",
            dir.display()
        );
    }
    let stray = mounts_below(&outside);
    ensure!(stray.is_empty(), "mounted outside the root: {stray:?}");

    // Were the file modes loosened, the layer host would still answer only root: uid 65534
    // connects and is hung up on without an answer (an empty read, or a reset when the host
    // closed before reading the request).
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o711))?;
    std::fs::set_permissions(&host_socket, std::fs::Permissions::from_mode(0o666))?;
    let script = "import socket, sys\n\
        s = socket.socket(socket.AF_UNIX)\n\
        s.connect(sys.argv[1])\n\
        s.settimeout(20)\n\
        try:\n\
        \x20   s.sendall(b'{\"op\":\"mounted\"}\\n')\n\
        \x20   answer = s.recv(4096)\n\
        except (ConnectionResetError, BrokenPipeError):\n\
        \x20   answer = b''\n\
        print('ANSWER', repr(answer))\n";
    let out = as_nobody(&[
        "/usr/bin/python3".as_ref(),
        "-c".as_ref(),
        script.as_ref(),
        host_socket.as_os_str(),
    ])?;
    std::fs::set_permissions(&host_socket, std::fs::Permissions::from_mode(0o600))?;
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))?;
    let answer = String::from_utf8_lossy(&out.stdout);
    ensure!(
        answer.trim() == "ANSWER b''",
        "the layer host answered uid 65534: {answer} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Logged, after the refused connection was accepted and dropped.
    let start = Instant::now();
    while !daemon.log().contains("refused a connection") {
        ensure!(
            start.elapsed() < Duration::from_secs(5),
            "the refusal was not logged:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // And root is still served.
    let answer = daemon.ask_layer_host(&serde_json::json!({"op": "mounted"}))?;
    ensure!(
        answer["ids"] == serde_json::json!([900]),
        "mounted: {answer}"
    );
    Ok(())
}

#[test]
fn a_container_keeps_setuid_inside_behind_root_only_directories() -> Result<()> {
    let registry = TestRegistry::start()?;
    let work = open_workdir()?;
    let _cleanup = UnmountOnDrop(work.path().to_owned());
    let reference = hostile_image(&registry, work.path())?;
    let root = work.path().join("root");
    let name = format!("priv-{}", std::process::id());
    let out = Command::new(LAZYSNAP)
        .arg("--root")
        .arg(&root)
        .args(["run", "--no-lazysnapd", "--keep", "--name", &name, "-u"])
        .arg(NOBODY)
        .arg(&reference)
        .arg("/bin/suid-probe")
        .stdin(Stdio::null())
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && stdout.contains("euid=0\n"),
        "inside the container a setuid-root program runs as root (runc needs suid): {} {stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let container = root.join("containers").join(&name);
    for dir in [&root, &container, &PathBuf::from("/run/lazysnap/runc")] {
        ensure!(
            mode(dir)? == 0o700,
            "{} is mode {:o}, not 0700",
            dir.display(),
            mode(dir)?
        );
    }
    ensure_denied(&[root.clone(), container.clone()])?;
    ensure!(
        mounts_below(&root).is_empty(),
        "left mounted: {:?}",
        mounts_below(&root)
    );
    Ok(())
}
