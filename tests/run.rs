//! `lazysnap run` with real parts: a real registry, kernel FUSE and overlayfs, and real runc.
//! Images are real (busybox-static and Debian's python3, built from Debian packages by the
//! fixtures), converted by `lazysnap convert` and pushed to a registry on loopback. Every test
//! checks that no mount and no container directory is left behind, and a guard cleans up even
//! when a test fails.

mod common;
#[path = "common/containerd.rs"]
mod containerd;
#[path = "common/lazysnapd.rs"]
mod lazysnapd;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use common::image::{self, fixture, LayoutBuilder};
use common::mounts_below;
use common::registry::TestRegistry;
use common::run_root::Root;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const BIN: &str = env!("CARGO_BIN_EXE_lazysnap");

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The busybox-static image converted to zstd:chunked and pushed; returns its reference.
fn busybox(registry: &TestRegistry, work: &Path) -> Result<String> {
    let layout = fixture(
        "busybox-image.sh",
        &[work.join("bb").to_str().context("path")?, "v1"],
    )?;
    let reference = format!("{}/bb/lazy:v1", registry.addr);
    image::run(Command::new(BIN).args(["convert", &format!("oci:{layout}"), &reference]))?;
    Ok(reference)
}

/// The same busybox-static image pushed as it is (plain gzip); returns its reference.
fn busybox_plain(registry: &TestRegistry, work: &Path) -> Result<String> {
    let layout = fixture(
        "busybox-image.sh",
        &[work.join("bb").to_str().context("path")?, "v1"],
    )?;
    let plain = format!("{}/bb/plain:v1", registry.addr);
    fixture("push-layout.sh", &[&layout, &plain])?;
    Ok(plain)
}

/// The run printed exactly `want` on stdout.
fn expect_stdout(out: &Output, want: &str) -> Result<()> {
    ensure!(
        stdout(out) == want,
        "stdout {:?}, want {want:?}; stderr:\n{}",
        stdout(out),
        stderr(out)
    );
    Ok(())
}

#[test]
fn busybox_runs_with_the_image_defaults_and_the_command_line_overrides() -> Result<()> {
    let registry = TestRegistry::start()?;
    let work = tempfile::tempdir()?;
    let reference = busybox(&registry, work.path())?;
    let root = Root::new()?;

    // The image's Cmd: sh -c 'echo hello'.
    let out = root.run(&[&reference])?;
    ensure!(out.status.code() == Some(0), "{}", stderr(&out));
    expect_stdout(&out, "hello\n")?;
    let err = stderr(&out);
    ensure!(
        err.contains("@sha256:") && err.contains("first exec after"),
        "the report names the digest and the start-up time: {err}"
    );
    root.assert_clean()?;

    // Run by digest: the report names it once (it used to print `REF@sha256:..@sha256:..`).
    let digest = err
        .split("@sha256:")
        .nth(1)
        .and_then(|rest| rest.get(..64))
        .context("digest in the report")?;
    let repository = reference.rsplit_once(':').context("tag")?.0;
    let pinned = format!("{repository}@sha256:{digest}");
    let out = root.run(&[&pinned])?;
    expect_stdout(&out, "hello\n")?;
    let err = stderr(&out);
    ensure!(
        err.matches(digest).count() == 1 && err.contains(&format!("lazysnap: {pinned}\n")),
        "the digest is named once: {err}"
    );

    // A command, environment, working directory and user from the command line.
    let out = root.run(&[
        "-e",
        "GREETING=hi there",
        "-w",
        "/tmp",
        "-u",
        "nobody",
        &reference,
        "--",
        "sh",
        "-c",
        "echo \"$GREETING\"; pwd; id -u; id -g; echo $PATH",
    ])?;
    ensure!(out.status.success(), "{}", stderr(&out));
    expect_stdout(&out, "hi there\n/tmp\n65534\n65534\n/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n")?;
    let out = root.run(&["-u", "0:65534", &reference, "id", "-G"])?;
    expect_stdout(&out, "65534\n")?;

    // An image whose config sets Entrypoint, Cmd, Env, WorkingDir and User (written by umoci,
    // an independent tool): the defaults apply, a command replaces Cmd only.
    let layout = fixture(
        "busybox-image.sh",
        &[work.path().join("cfg").to_str().context("path")?, "v1"],
    )?;
    let dir = layout.rsplit_once(':').context("layout:tag")?.0;
    image::run(Command::new("umoci").args([
        "config",
        "--image",
        &layout,
        "--tag",
        "cfg",
        "--config.user",
        "nobody",
        "--config.workingdir",
        "/var/tmp",
        "--config.env",
        "FROM_IMAGE=yes",
        "--config.entrypoint",
        "/bin/sh",
        "--config.entrypoint",
        "-c",
        "--config.cmd",
        "echo $FROM_IMAGE; pwd; id -u",
    ]))?;
    let configured = format!("{}/bb/configured:v1", registry.addr);
    image::run(Command::new(BIN).args(["convert", &format!("oci:{dir}:cfg"), &configured]))?;
    let out = root.run(&[&configured])?;
    expect_stdout(&out, "yes\n/var/tmp\n65534\n")?;
    let out = root.run(&[&configured, "echo replaced Cmd; id -un"])?;
    expect_stdout(&out, "replaced Cmd\nnobody\n")?;
    let out = root.run(&["--entrypoint", "/bin/echo", &configured, "no", "shell"])?;
    expect_stdout(&out, "no shell\n")?;

    // A plain gzip image runs too: its layer is fetched whole, verified and unpacked first.
    let plain = busybox_plain(&registry, work.path())?;
    let out = root.run(&[&plain])?;
    expect_stdout(&out, "hello\n")?;
    ensure!(stderr(&out).contains("unpacked"), "{}", stderr(&out));

    // The container's exit status is ours.
    let out = root.run(&[&reference, "sh", "-c", "exit 7"])?;
    ensure!(out.status.code() == Some(7), "status {}", out.status);
    root.assert_clean()
}

#[test]
fn writes_land_in_the_upper_layer_only() -> Result<()> {
    let registry = TestRegistry::start()?;
    let work = tempfile::tempdir()?;
    let reference = busybox(&registry, work.path())?;
    let root = Root::new()?;

    let out = root.run(&[
        "--keep",
        "--name",
        "writer",
        &reference,
        "sh",
        "-c",
        "echo new > /newfile && rm /etc/group && echo changed >> /etc/passwd",
    ])?;
    ensure!(out.status.success(), "{}", stderr(&out));
    ensure!(
        mounts_below(root.path()).is_empty(),
        "--keep keeps files, not mounts"
    );
    let upper = root.path().join("containers/writer/upper");
    ensure!(std::fs::read_to_string(upper.join("newfile"))? == "new\n");
    let whiteout = std::fs::symlink_metadata(upper.join("etc/group"))?;
    ensure!(
        whiteout.file_type().is_char_device(),
        "a deletion is an overlay whiteout in the upper layer"
    );
    ensure!(std::fs::read_to_string(upper.join("etc/passwd"))?.ends_with("changed\n"));

    // A new container sees the image as it was: the layers were never written.
    let out = root.run(&[
        &reference,
        "sh",
        "-c",
        "test ! -e /newfile && test -s /etc/group && ! grep -q changed /etc/passwd && echo pristine",
    ])?;
    expect_stdout(&out, "pristine\n")?;
    std::fs::remove_dir_all(root.path().join("containers/writer"))?;
    root.assert_clean()
}

/// Waits until process `pid` has a handler for `signal` (its `SigCgt` mask in /proc).
fn wait_for_caught(pid: u32, signal: Signal) -> Result<()> {
    let bit = 1u64 << (signal as i32 - 1);
    let start = Instant::now();
    loop {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let caught = status
            .lines()
            .find_map(|l| l.strip_prefix("SigCgt:"))
            .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
            .unwrap_or(0);
        if caught & bit != 0 {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(10) {
            bail!("process {pid} did not catch {signal} within 10 s");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn signals_reach_the_containers_process() -> Result<()> {
    let registry = TestRegistry::start()?;
    let work = tempfile::tempdir()?;
    let reference = busybox(&registry, work.path())?;
    let root = Root::new()?;

    for (signal, code) in [(Signal::SIGTERM, 3), (Signal::SIGINT, 4)] {
        let script = "trap 'echo got TERM; exit 3' TERM; trap 'echo got INT; exit 4' INT; \
                      echo ready; while :; do sleep 0.1; done";
        let mut child = root
            .command(&[&reference, "sh", "-c", script])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        let first = lines.next().context("no output")??;
        ensure!(first == "ready", "first line {first:?}");
        kill(Pid::from_raw(child.id() as i32), signal)?;
        let start = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if start.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                bail!("lazysnap run did not exit 20 s after {signal}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let rest: Vec<String> = lines.map_while(Result::ok).collect();
        ensure!(
            rest.first().map(String::as_str) == Some(&*format!("got {}", &signal.as_str()[3..])),
            "{signal} reached the process: {rest:?}"
        );
        ensure!(status.code() == Some(code), "status {status}");
    }

    // A signal that arrives while the container is still being set up neither kills lazysnap
    // (which would leave mounts and a runc container behind) nor is lost: it reaches the
    // container's PID 1 once it runs (which, without a handler, ignores it as PID 1 does).
    let child = root
        .command(&[&reference, "sh", "-c", "sleep 1; echo survived"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // As soon as lazysnap catches SIGTERM (before that, any process dies of it: the window
    // between exec and the first line of `run` is the kernel's and the loader's, and on a loaded
    // machine it is longer than any fixed sleep), while the image is still being mounted.
    wait_for_caught(child.id(), Signal::SIGTERM)?;
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM)?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.code() == Some(0),
        "lazysnap must not die of an early signal: {} {}",
        out.status,
        stderr(&out)
    );
    expect_stdout(&out, "survived\n")?;
    root.assert_clean()?;

    // A process killed from outside (its PID 1 cannot be killed from inside) gives 128 + n.
    let mut child = root
        .command(&[
            "--name",
            "victim",
            &reference,
            "sh",
            "-c",
            "echo ready; sleep 60",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    ensure!(lines.next().context("no output")?? == "ready");
    let state = image::run(
        Command::new("runc")
            .arg("--root")
            .arg(&root.runc_state)
            .args(["state", "victim"]),
    )?;
    let state: serde_json::Value = serde_json::from_slice(&state)?;
    let pid = state["pid"].as_i64().context("runc state has a pid")?;
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL)?;
    let status = child.wait()?;
    ensure!(status.code() == Some(137), "status {status}");
    root.assert_clean()
}

#[test]
fn bad_input_exits_125_with_a_clear_message_and_leaves_nothing() -> Result<()> {
    let registry = TestRegistry::start()?;
    let work = tempfile::tempdir()?;
    let reference = busybox(&registry, work.path())?;
    let root = Root::new()?;

    // An image for another architecture is refused before anything runs.
    let trees = tempfile::tempdir()?;
    std::fs::create_dir_all(trees.path().join("bin"))?;
    std::fs::write(trees.path().join("bin/app"), "not really arm64\n")?;
    let layout = LayoutBuilder::new(&work.path().join("arm"))?;
    let desc = layout.image(&[image::tar_dir(trees.path())?], "arm64")?;
    layout.tags(&[("v1", desc)])?;
    let arm = format!("{}/arm/app:v1", registry.addr);
    image::run(Command::new(BIN).args([
        "convert",
        &format!("oci:{}:v1", layout.dir.display()),
        &arm,
    ]))?;

    let unknown = format!("{}/no/such:image", registry.addr);
    let cases: [(Vec<&str>, &str); 6] = [
        (
            vec![&arm, "/bin/app"],
            "image is linux/arm64, this host is linux/amd64",
        ),
        (
            vec![&reference, "/no/such/program"],
            "stat /no/such/program",
        ),
        (vec!["-u", "ghost", &reference], "unknown user \"ghost\""),
        (vec!["-w", "relative", &reference], "not an absolute path"),
        (vec![&unknown], "MANIFEST_UNKNOWN"),
        (vec!["127.0.0.1:1/refused:v1"], "Connection refused"),
    ];
    for (args, message) in cases {
        let out = root.run(&args)?;
        ensure!(
            out.status.code() == Some(125),
            "{args:?}: status {}",
            out.status
        );
        ensure!(
            stderr(&out).contains(message),
            "{args:?}: stderr lacks {message:?}: {}",
            stderr(&out)
        );
        ensure!(stdout(&out).is_empty(), "nothing ran: {:?}", stdout(&out));
        // Each cause once: not the reference twice, not reqwest's chain after our own.
        let err = stderr(&out);
        let line = err.lines().find(|l| l.contains(message)).unwrap_or("");
        ensure!(
            line.matches(message).count() == 1,
            "{args:?}: a cause named twice: {line}"
        );
        root.assert_clean()?;
    }
    let out = root.run(&["127.0.0.1:1/refused:v1"])?;
    let err = stderr(&out);
    ensure!(
        err.matches("127.0.0.1:1/refused:v1").count() == 1
            && err.matches("http://127.0.0.1:1/v2/").count() == 1,
        "the reference and the URL are named once: {err}"
    );
    Ok(())
}

#[test]
fn python_starts_before_the_image_is_downloaded() -> Result<()> {
    let registry = TestRegistry::start()?;
    let work = tempfile::tempdir()?;
    let layout = fixture(
        "debian-image.sh",
        &[
            "--packages",
            "python3",
            work.path().join("py").to_str().context("path")?,
            "v1",
        ],
    )?;
    let reference = format!("{}/debian/python3:v1", registry.addr);
    image::run(Command::new(BIN).args(["convert", &format!("oci:{layout}"), &reference]))?;
    let root = Root::new()?;
    let report = work.path().join("report.json");

    let out = root.run(&[
        "--no-background-fetch",
        "--report",
        report.to_str().context("path")?,
        "-e",
        "WHO=lazysnap",
        &reference,
        "python3",
        "-c",
        "import os, json; print('hello from', os.environ['WHO'], json.dumps([1]))",
    ])?;
    ensure!(out.status.success(), "{}", stderr(&out));
    expect_stdout(&out, "hello from lazysnap [1]\n")?;
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&report)?)?;
    let size = report["image_bytes"].as_u64().context("image_bytes")?;
    let at_exec = report["fetched_at_exec"].as_u64().context("fetched")?;
    let at_exit = report["fetched_at_exit"].as_u64().context("fetched")?;
    eprintln!(
        "python3 image {size} bytes: {at_exec} fetched at first exec, {at_exit} at exit, first exec after {} s",
        report["first_exec_seconds"]
    );
    ensure!(
        report["layers"]
            .as_array()
            .is_some_and(|l| l.iter().all(|l| l["mode"] == "zstd:chunked")),
        "every layer was mounted lazily: {report}"
    );
    ensure!(
        at_exec < size / 2,
        "the process started before half of the image was fetched ({at_exec} of {size})"
    );
    ensure!(
        at_exit < size / 2,
        "python3 -c reads a small part of the image ({at_exit} of {size})"
    );
    ensure!(report["digest"]
        .as_str()
        .is_some_and(|d| d.starts_with("sha256:")));
    root.assert_clean()
}

#[test]
fn with_lazysnapd_listening_the_root_comes_from_its_snapshots() -> Result<()> {
    let registry = TestRegistry::start()?;
    let work = tempfile::tempdir()?;
    let lazy = busybox(&registry, work.path())?;
    let plain = busybox_plain(&registry, work.path())?;
    let daemon = lazysnapd::Lazysnapd::start("")?;
    let root = Root::new()?;
    let socket = daemon.socket.to_str().context("path")?;
    let report = work.path().join("report.json");
    let run = |args: &[&str]| -> Result<Output> {
        let out = Command::new(BIN)
            .arg("--root")
            .arg(root.path())
            .args(["run", "--lazysnapd", socket, "--report"])
            .arg(&report)
            .args(args)
            .stdin(Stdio::null())
            .output()?;
        eprintln!("lazysnap run {args:?}: {}\n{}", out.status, stderr(&out));
        Ok(out)
    };
    let modes = || -> Result<Vec<String>> {
        let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report)?)?;
        ensure!(
            r["served_by"]
                .as_str()
                .is_some_and(|s| s.starts_with("lazysnapd at")),
            "{r}"
        );
        Ok(r["layers"]
            .as_array()
            .context("layers")?
            .iter()
            .map(|l| l["mode"].as_str().unwrap_or_default().to_owned())
            .collect())
    };

    // A lazy image: lazysnapd mounts its layer lazily (the remote handshake); a write lands in
    // the container's own snapshot only.
    let out = run(&[
        &lazy,
        "sh",
        "-c",
        "echo scratch > /etc/new; cat /etc/group | head -n1",
    ])?;
    expect_stdout(&out, "root:x:0:\n")?;
    ensure!(modes()? == ["lazy"], "{:?}", modes()?);
    // The next container reuses the committed layer snapshot, and sees none of the write.
    let out = run(&[&lazy, "sh", "-c", "test ! -e /etc/new && echo clean"])?;
    expect_stdout(&out, "clean\n")?;
    ensure!(modes()? == ["snapshot"], "{:?}", modes()?);

    // A plain image: lazysnapd hands back an empty snapshot, run unpacks the verified layer.
    let out = run(&[&plain])?;
    expect_stdout(&out, "hello\n")?;
    ensure!(modes()? == ["unpacked"], "{:?}", modes()?);

    // Failures still exit 125 and leave nothing.
    let out = run(&["-u", "ghost", &lazy])?;
    ensure!(out.status.code() == Some(125), "{}", stderr(&out));
    root.assert_clean()?;
    // The container snapshots are gone from lazysnapd: only layers stay, under its root.
    let active: Vec<_> = mounts_below(daemon.dir.path())
        .into_iter()
        .filter(|m| m.contains("lazysnap-run"))
        .collect();
    ensure!(active.is_empty(), "{active:?}");
    Ok(())
}

/// A static program that tries system calls the default seccomp filter must refuse, and prints
/// the errno each got (0: it worked).
const SECCOMP_PROBE_C: &str = r#"
#include <errno.h>
#include <stdio.h>
#include <unistd.h>
#include <sys/syscall.h>
static int attempt(long r) { return r < 0 ? errno : 0; }
int main(void) {
    /* KEYCTL_GET_KEYRING_ID of the session keyring: key rings are not namespaced. */
    printf("keyctl %d\n", attempt(syscall(SYS_keyctl, 0, -3, 0)));
    /* setns with a bad descriptor: EBADF when the call reaches the kernel. */
    printf("setns %d\n", attempt(syscall(SYS_setns, -1, 0)));
    /* clone3 with no arguments: EINVAL from the kernel, ENOSYS from the filter. */
    printf("clone3 %d\n", attempt(syscall(SYS_clone3, 0, 0)));
    return 0;
}
"#;

#[test]
fn the_default_seccomp_filter_refuses_host_reaching_calls_and_unconfined_lifts_it() -> Result<()> {
    let registry = TestRegistry::start()?;
    let work = tempfile::tempdir()?;
    let tree = work.path().join("tree");
    std::fs::create_dir_all(tree.join("bin"))?;
    let source = work.path().join("probe.c");
    std::fs::write(&source, SECCOMP_PROBE_C)?;
    image::run(
        Command::new("cc")
            .args(["-static", "-O1", "-o"])
            .arg(tree.join("bin/probe"))
            .arg(&source),
    )
    .context("compiling the probe (needs gcc and libc6-dev)")?;
    let layout = LayoutBuilder::new(&work.path().join("layout"))?;
    let desc = layout.image(&[image::tar_dir(&tree)?], "amd64")?;
    layout.tags(&[("v1", desc)])?;
    let reference = format!("{}/seccomp/probe:v1", registry.addr);
    image::run(Command::new(BIN).args([
        "convert",
        &format!("oci:{}:v1", layout.dir.display()),
        &reference,
    ]))?;
    let root = Root::new()?;

    let out = root.run(&[&reference, "/bin/probe"])?;
    ensure!(out.status.success(), "{}", stderr(&out));
    expect_stdout(&out, "keyctl 1\nsetns 1\nclone3 38\n")?;

    let out = root.run(&[
        "--security-opt",
        "seccomp=unconfined",
        &reference,
        "/bin/probe",
    ])?;
    ensure!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    ensure!(
        !text.contains("keyctl 1\n") && text.contains("setns 9\n") && !text.contains("clone3 38"),
        "without the filter the calls reach the kernel: {text}"
    );

    let out = root.run(&["--security-opt", "apparmor=x", &reference])?;
    ensure!(out.status.code() == Some(125), "{}", stderr(&out));
    ensure!(stderr(&out).contains("not supported"), "{}", stderr(&out));
    root.assert_clean()
}
