//! Network faults between a lazy mount and its registry: a fault-injecting proxy
//! (`common::faultproxy`) in front of a real docker-registry, a real `lazysnap mount` (kernel FUSE
//! and overlayfs) behind it. For each fault: no wrong byte is ever read, a read fails with EIO
//! within the configured read timeout (the kernel's retry of the failed read included), the same
//! read succeeds once the fault ends, and background completion finishes once the fault ends.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use common::faultproxy::{Fault, FaultProxy};
use common::image::{self, LayoutBuilder};
use common::mount_process::MountProcess;
use common::registry::TestRegistry;
use common::scrape;
use common::UnmountOnDrop;

const BIN: &str = env!("CARGO_BIN_EXE_lazysnap");
const EIO: i32 = 5;
/// The read timeout the mounts under test are given.
const READ_TIMEOUT: Duration = Duration::from_secs(3);
/// What a read may take beyond the timeout (scheduling on a loaded 2-core machine); less than a
/// second timeout, so a read that waits twice fails the test.
const SLACK: Duration = Duration::from_millis(1500);

/// The test image's files: a large one of many chunks and a few small ones.
fn files() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("data/big", image::noise(1_500_000, 1)),
        ("data/small-a", image::noise(3_000, 2)),
        ("data/small-b", image::noise(70_000, 3)),
        ("etc/hostname", b"faulty\n".to_vec()),
    ]
}

/// The registry, the proxy in front of it, and a one-layer zstd:chunked image pushed to the
/// registry directly; `reference` names it through the proxy.
struct Setup {
    // Field order is drop order: unmount, then stop the proxy and registry, then remove files.
    _cleanup: UnmountOnDrop,
    proxy: FaultProxy,
    registry: TestRegistry,
    reference: String,
    work: tempfile::TempDir,
}

impl Setup {
    fn new(name: &str) -> Result<Self> {
        let registry = TestRegistry::start()?;
        let work = tempfile::tempdir()?;
        let cleanup = UnmountOnDrop(work.path().to_owned());
        let tree = work.path().join("tree");
        for (path, data) in files() {
            let path = tree.join(path);
            std::fs::create_dir_all(path.parent().context("parent")?)?;
            std::fs::write(path, data)?;
        }
        let layout = LayoutBuilder::new(&work.path().join("layout"))?;
        let desc = layout.image(&[image::tar_dir(&tree)?], "amd64")?;
        layout.tags(&[("src", desc)])?;
        convert(
            &format!("oci:{}:src", layout.dir.display()),
            &format!("{}/faults/{name}:v1", registry.addr),
        )?;
        let proxy = FaultProxy::start(&registry.addr)?;
        let reference = format!("{}/faults/{name}:v1", proxy.addr);
        Ok(Self {
            work,
            _cleanup: cleanup,
            proxy,
            registry,
            reference,
        })
    }

    fn mount(&self, extra: &[&str]) -> Result<MountProcess> {
        let timeout = READ_TIMEOUT.as_secs().to_string();
        let mut args = vec!["--read-timeout", &timeout];
        args.extend_from_slice(extra);
        MountProcess::start(
            &self.work.path().join("root"),
            &self.reference,
            &self.work.path().join("mnt"),
            &args,
        )
    }

    fn path(&self, name: &str) -> PathBuf {
        self.work.path().join("mnt").join(name)
    }
}

fn convert(src: &str, dst: &str) -> Result<()> {
    image::run(Command::new(BIN).args([
        "convert",
        "--format",
        "zstd-chunked",
        "--chunk-size",
        "65536",
        src,
        dst,
    ]))?;
    Ok(())
}

/// Reads `path` whole; a successful read must return exactly `want`.
fn read_checked(path: &Path, want: &[u8]) -> std::io::Result<()> {
    let got = std::fs::read(path)?;
    assert!(
        got == want,
        "{}: wrong bytes read ({} bytes, expected {}; first difference at {:?})",
        path.display(),
        got.len(),
        want.len(),
        got.iter().zip(want).position(|(a, b)| a != b)
    );
    Ok(())
}

/// With `fault` on every blob request: the big file's read fails with EIO within the read
/// timeout and never returns a wrong byte; once the fault ends the same read succeeds.
fn on_demand_reads_survive(name: &str, fault: Fault) -> Result<()> {
    let setup = Setup::new(name)?;
    let process = setup.mount(&["--no-background-fetch"])?;
    let (_, big) = files().remove(0);
    setup.proxy.set(fault);
    let start = Instant::now();
    let result = read_checked(&setup.path("data/big"), &big);
    let took = start.elapsed();
    eprintln!("{fault:?}: the read ended after {took:?}");
    let err = match result {
        Ok(()) => bail!("{fault:?}: the read succeeded through the fault"),
        Err(e) => e,
    };
    ensure!(
        err.raw_os_error() == Some(EIO),
        "{fault:?}: expected EIO, got {err}"
    );
    ensure!(
        took < READ_TIMEOUT + SLACK,
        "{fault:?}: EIO after {took:?}, the read timeout is {READ_TIMEOUT:?}: {}",
        process.log()
    );
    ensure!(
        setup.proxy.faulted() > 0,
        "{fault:?}: the fault was applied"
    );
    // A stalled request is abandoned at its deadline, not left holding a connection.
    let start = Instant::now();
    while setup.proxy.stalled_open() > 0 {
        ensure!(
            start.elapsed() < Duration::from_secs(5),
            "{fault:?}: {} stalled requests still open {:?} after the EIO",
            setup.proxy.stalled_open(),
            start.elapsed()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    setup.proxy.set(Fault::None);
    // A failed request answers the kernel's immediate retry for a moment (see fetch's
    // FAILED_GRACE); a read after that starts a new request.
    std::thread::sleep(Duration::from_millis(500));
    read_checked(&setup.path("data/big"), &big)
        .with_context(|| format!("{fault:?}: the read after the fault: {}", process.log()))?;
    for (file, data) in files() {
        read_checked(&setup.path(file), &data).with_context(|| file.to_owned())?;
    }
    drop(process);
    drop(setup.registry);
    Ok(())
}

/// Fails on main of 2026-12-03 (EIO at the read timeout): a reader waited for its whole range
/// request, read-ahead included, so a registry that stalls after the first half of an answer
/// failed a read whose own bytes had come. Reading `data/small-a` asks for it and, as read-ahead,
/// `data/small-b` and `etc/hostname` behind it; the proxy sends the first half of that and stalls.
#[test]
fn a_read_is_answered_once_its_own_bytes_are_in_while_the_read_ahead_stalls() -> Result<()> {
    let setup = Setup::new("early")?;
    let process = setup.mount(&["--no-background-fetch"])?;
    let files = files();
    setup.proxy.set(Fault::StallBody);
    read_checked(&setup.path("data/small-a"), &files[1].1)
        .with_context(|| format!("small-a, its bytes in the first half: {}", process.log()))?;
    ensure!(setup.proxy.faulted() == 1, "one stalled request");
    // Answered at once, not by the kernel's retry after a first read timed out (the chunk is
    // cached as soon as it verifies, so a retry would find it too).
    let log = process.log();
    ensure!(
        !log.lines().any(|l| l.contains("file=data/small-a")),
        "a read of small-a failed before one succeeded: {log}"
    );
    // The read-ahead's bytes never came: a read of them fails at the deadline, no wrong byte.
    let err = match read_checked(&setup.path("data/small-b"), &files[2].1) {
        Ok(()) => bail!("small-b was read although its bytes were stalled"),
        Err(e) => e,
    };
    ensure!(err.raw_os_error() == Some(EIO), "expected EIO, got {err}");
    ensure!(
        setup.proxy.faulted() == 1,
        "small-b's read joined the stalled request instead of asking again"
    );
    setup.proxy.set(Fault::None);
    std::thread::sleep(Duration::from_millis(500));
    for (file, data) in files {
        read_checked(&setup.path(file), &data).with_context(|| file.to_owned())?;
    }
    drop(process);
    Ok(())
}

#[test]
fn a_flipped_byte_is_never_served_and_reads_recover() -> Result<()> {
    on_demand_reads_survive("flip", Fault::Flip)
}

#[test]
fn a_truncated_body_gives_eio_and_reads_recover() -> Result<()> {
    on_demand_reads_survive("truncate", Fault::Truncate)
}

#[test]
fn a_registry_that_never_answers_gives_eio_within_the_read_timeout() -> Result<()> {
    on_demand_reads_survive("stall", Fault::StallHeaders)
}

#[test]
fn a_body_that_stops_midway_gives_eio_within_the_read_timeout() -> Result<()> {
    on_demand_reads_survive("stall-body", Fault::StallBody)
}

#[test]
fn server_errors_give_eio_within_the_read_timeout_and_reads_recover() -> Result<()> {
    on_demand_reads_survive("status", Fault::Status(503))
}

#[test]
fn a_reset_connection_gives_eio_and_reads_recover() -> Result<()> {
    on_demand_reads_survive("reset", Fault::Reset)
}

#[test]
fn an_oversized_body_is_refused_and_reads_recover() -> Result<()> {
    on_demand_reads_survive("oversize", Fault::Oversize)
}

#[test]
fn a_wrong_content_range_is_refused_and_reads_recover() -> Result<()> {
    on_demand_reads_survive("wrong-range", Fault::WrongRange)
}

#[test]
fn bytes_of_another_range_are_never_served() -> Result<()> {
    on_demand_reads_survive("shifted", Fault::ShiftedBody)
}

fn free_addr() -> Result<String> {
    let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(probe.local_addr()?.to_string())
}

/// With `fault` on the background stream from its start: completion fails and is retried (and
/// counted), never completes through the fault, and completes (whole-blob digest checked) once
/// the fault ends; afterwards every file reads right with the registry gone.
fn background_completes_after(name: &str, fault: Fault) -> Result<()> {
    let mut setup = Setup::new(name)?;
    let addr = free_addr()?;
    let process = setup.mount(&["--metrics-addr", &addr])?;
    // The stream starts only after a quiet second following the mount: the fault is in place.
    setup.proxy.set(fault);
    let complete = || scrape(&addr, "lazysnap_layer_complete");
    let retries = || scrape(&addr, "lazysnap_background_retries_total");
    let start = Instant::now();
    while setup.proxy.faulted() == 0 {
        ensure!(
            start.elapsed() < Duration::from_secs(30),
            "{fault:?}: no background request within 30 s: {}",
            process.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Long enough for a stalled attempt to be given up (the read timeout) and tried again.
    std::thread::sleep(READ_TIMEOUT * 2);
    ensure!(
        complete()? == 0.0,
        "{fault:?}: the layer completed through the fault"
    );
    setup.proxy.set(Fault::None);
    let start = Instant::now();
    while complete()? < 1.0 {
        ensure!(
            start.elapsed() < Duration::from_secs(60),
            "{fault:?}: not complete 60 s after the fault ended: {}",
            process.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Complete means the registry is no longer needed: stop it and read everything.
    setup.registry.stop()?;
    for (file, data) in files() {
        read_checked(&setup.path(file), &data)
            .with_context(|| format!("{fault:?}: {file} with the registry gone"))?;
    }
    let log = process.log();
    ensure!(
        retries()? >= 1.0 && log.contains("trying again"),
        "{fault:?}: the retries are counted and logged: {log}"
    );
    Ok(())
}

#[test]
fn background_completion_survives_a_flipped_byte() -> Result<()> {
    background_completes_after("bg-flip", Fault::Flip)
}

#[test]
fn background_completion_survives_a_truncated_stream() -> Result<()> {
    background_completes_after("bg-truncate", Fault::Truncate)
}

#[test]
fn background_completion_survives_a_stalled_stream() -> Result<()> {
    background_completes_after("bg-stall", Fault::StallBody)
}

#[test]
fn background_completion_survives_server_errors() -> Result<()> {
    background_completes_after("bg-status", Fault::Status(502))
}

#[test]
fn background_completion_survives_resets() -> Result<()> {
    background_completes_after("bg-reset", Fault::Reset)
}

/// Not a check, a measurement (run with `--ignored --nocapture`): how long background completion
/// of many small lazy layers takes on plain loopback, from the mount to the last complete layer.
/// `LAZYSNAP_SMALL_LAYERS` sets the layer count (default 80: the overlay's options, one path per
/// layer, must fit in a page, hence also the short state root).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_background_completion_of_many_small_layers() -> Result<()> {
    let count: usize = std::env::var("LAZYSNAP_SMALL_LAYERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(80);
    let registry = TestRegistry::start()?;
    let work = tempfile::tempdir()?;
    let _cleanup = UnmountOnDrop(work.path().to_owned());
    let mut tars = Vec::new();
    for i in 0..count {
        let tree = work.path().join(format!("tree-{i}"));
        std::fs::create_dir_all(tree.join("layer"))?;
        std::fs::write(
            tree.join(format!("layer/file-{i}")),
            image::noise(20_000, i as u64 + 7),
        )?;
        tars.push(image::tar_dir(&tree)?);
    }
    let layout = LayoutBuilder::new(&work.path().join("layout"))?;
    let desc = layout.image(&tars, "amd64")?;
    layout.tags(&[("src", desc)])?;
    let reference = format!("{}/faults/many:v1", registry.addr);
    convert(&format!("oci:{}:src", layout.dir.display()), &reference)?;

    let target = work.path().join("mnt");
    std::fs::create_dir_all(&target)?;
    let root = tempfile::Builder::new().prefix("m").tempdir_in("/tmp")?;
    let _cleanup_root = UnmountOnDrop(root.path().to_owned());
    let config = lazysnap::mount::MountConfig::new(root.path().to_owned());
    let start = Instant::now();
    let mut mounted = lazysnap::mount::mount_image(&reference.parse()?, &target, &config).await?;
    let mount_time = start.elapsed();
    ensure!(
        lazysnap::mount::wait_background(&mut mounted, Duration::from_secs(600)).await,
        "background completion within 10 minutes"
    );
    let total = start.elapsed();
    ensure!(mounted.fetchers().all(|f| f.is_complete()));
    eprintln!(
        "{count} lazy layers of 20 kB: mounted in {mount_time:?}, all complete {total:?} after the mount began ({:.1} layers/s)",
        count as f64 / total.as_secs_f64()
    );
    mounted.unmount()?;
    Ok(())
}
