//! Start-up profiles at mount, with real parts: a real registry, `lazysnap mount` (kernel FUSE and
//! overlayfs) and `lazysnap run` (runc). A mount given a profile fetches the profiled chunks
//! before anything reads them, so the reads are cache hits with no on-demand request; a broken,
//! oversized or foreign profile is logged, counted and skipped, and the mount or container still
//! works and reads the right bytes. Every mount and process is torn down by a guard.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use common::image::{self, fixture, LayoutBuilder};
use common::mount_process::MountProcess;
use common::registry::TestRegistry;
use common::{scrape, unmount_below, UnmountOnDrop};
use lazysnap::format::Toc;
use lazysnap::oci::Digest;
use lazysnap::profile::{Access, LayerProfile, Profile};

const BIN: &str = env!("CARGO_BIN_EXE_lazysnap");

/// The test image's files: what start-up reads (in this order), and one file it never reads.
fn files() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("app/conf", b"threads = 4\n".to_vec()),
        ("app/big", image::noise(1_500_000, 11)),
        ("app/lib", image::noise(200_000, 12)),
        ("other/unread", image::noise(300_000, 13)),
    ]
}
const PROFILED: [&str; 3] = ["app/conf", "app/big", "app/lib"];

/// An image converted (64 KiB chunks, so files span many) and pushed, with what a profile needs.
struct Image {
    reference: String,
    manifest: Digest,
    layer: Digest,
    toc: Toc,
}

fn lazy_image(registry: &TestRegistry, work: &Path, name: &str) -> Result<Image> {
    let tree = work.join("tree");
    for (path, data) in files() {
        let path = tree.join(path);
        std::fs::create_dir_all(path.parent().context("parent")?)?;
        std::fs::write(path, data)?;
    }
    let layout = LayoutBuilder::new(&work.join("layout"))?;
    let desc = layout.image(&[image::tar_dir(&tree)?], "amd64")?;
    layout.tags(&[("src", desc)])?;
    let reference = format!("{}/prefetch/{name}:v1", registry.addr);
    image::run(Command::new(BIN).args([
        "convert",
        "--chunk-size",
        "65536",
        &format!("oci:{}:src", layout.dir.display()),
        &reference,
    ]))?;
    let (manifest, layer, toc) = registry_toc(registry, &reference)?;
    Ok(Image {
        reference,
        manifest,
        layer,
        toc,
    })
}

/// The image's manifest digest, first layer digest, and that layer's TOC read from the
/// registry's stored blob (not through the fetch path under test).
fn registry_toc(registry: &TestRegistry, reference: &str) -> Result<(Digest, Digest, Toc)> {
    let out = image::run(Command::new(BIN).args(["inspect", "--json", reference]))?;
    let info: serde_json::Value = serde_json::from_slice(&out)?;
    let manifest: Digest = info["manifest_digest"]
        .as_str()
        .context("manifest digest")?
        .parse()?;
    let layer = &info["layers"][0];
    let digest: Digest = layer["digest"].as_str().context("digest")?.parse()?;
    let annotations = layer["annotations"]
        .as_object()
        .context("annotations")?
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
        .collect();
    let media_type = layer["media_type"].as_str().context("media type")?;
    let blob = std::fs::File::open(registry.blob_data_path(&digest))?;
    let (_, toc) = lazysnap::format::read_toc(blob, media_type, &annotations)?;
    Ok((manifest, digest, toc))
}

/// A profile of `names`' chunks in `layer` (file order, then chunk order), plus `extra` accesses.
fn profile_of(
    image: Digest,
    layer: Digest,
    toc: &Toc,
    names: &[&str],
    extra: Vec<Access>,
) -> Result<Profile> {
    let mut accesses = Vec::new();
    for name in names {
        let entry = toc
            .entries
            .iter()
            .find(|e| e.name == *name)
            .with_context(|| format!("{name} in the TOC"))?;
        for c in entry.chunks.iter().filter(|c| !c.zeros) {
            accesses.push(Access {
                name: entry.name.clone(),
                offset: c.file_offset,
                chunk: c.digest,
                at_ms: accesses.len() as u64,
            });
        }
    }
    accesses.extend(extra);
    Ok(Profile {
        version: 1,
        image,
        command: vec![],
        layers: vec![LayerProfile {
            digest: layer,
            diff_id: None,
            accesses,
        }],
    })
}

fn free_addr() -> Result<String> {
    let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(probe.local_addr()?.to_string())
}

fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> Result<bool>) -> Result<()> {
    let start = Instant::now();
    while !done()? {
        ensure!(start.elapsed() < limit, "not within {limit:?}: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Reads every file of [`files`] named in `names` through the mount and checks its bytes.
fn check_reads(target: &Path, names: &[&str]) -> Result<()> {
    for (name, want) in files().into_iter().filter(|(n, _)| names.contains(n)) {
        let got = std::fs::read(target.join(name)).with_context(|| format!("reading {name}"))?;
        ensure!(got == want, "{name}: wrong bytes through the mount");
    }
    Ok(())
}

#[test]
fn a_profile_is_fetched_before_any_read_and_the_reads_are_cache_hits() -> Result<()> {
    let registry = TestRegistry::start()?;
    let work = tempfile::tempdir()?;
    let _cleanup = UnmountOnDrop(work.path().to_owned());
    let image = lazy_image(&registry, work.path(), "good")?;
    // One entry the TOC does not hold: a hint that is ignored, not an error.
    let stranger = Access {
        name: "app/gone".into(),
        offset: 0,
        chunk: Digest::of(b"a chunk no layer has"),
        at_ms: 0,
    };
    let profile = profile_of(
        image.manifest,
        image.layer,
        &image.toc,
        &PROFILED,
        vec![stranger],
    )?;
    let chunks = profile.layers[0].accesses.len() - 1;
    ensure!(
        chunks > 20,
        "the profiled files span many chunks ({chunks})"
    );
    let file = work.path().join("profile.json");
    std::fs::write(&file, profile.encode()?)?;

    let addr = free_addr()?;
    let target = work.path().join("mnt");
    let process = MountProcess::start(
        &work.path().join("root"),
        &image.reference,
        &target,
        &[
            "--no-background-fetch",
            "--metrics-addr",
            &addr,
            "--profile",
            file.to_str().context("path")?,
        ],
    )?;
    let metric = |name: &str| scrape(&addr, name);
    let fetched_chunks = r#"lazysnap_profile_chunks_total{result="fetched"}"#;
    let on_demand = r#"lazysnap_fetch_requests_total{kind="on_demand"}"#;
    wait_until(Duration::from_secs(30), "the profile prefetched", || {
        Ok(metric(fetched_chunks)? >= chunks as f64)
    })?;
    // Nothing has read yet: every byte so far is the profile's, in a few large requests.
    ensure!(metric(fetched_chunks)? == chunks as f64);
    ensure!(metric(r#"lazysnap_profile_chunks_total{result="unknown"}"#)? == 1.0);
    ensure!(metric(r#"lazysnap_profile_lookups_total{result="found"}"#)? == 1.0);
    let profile_bytes = metric(r#"lazysnap_fetch_bytes_total{kind="profile"}"#)?;
    let requests = metric(r#"lazysnap_fetch_requests_total{kind="profile"}"#)?;
    ensure!(
        profile_bytes >= 1_700_000.0,
        "profile bytes {profile_bytes}"
    );
    ensure!(
        (1.0..=6.0).contains(&requests),
        "{chunks} chunks in {requests} requests"
    );
    ensure!(metric(on_demand)? == 0.0);

    // The container's reads: all served from the cache, none goes to the registry.
    let hits = metric("lazysnap_cache_hits_total")?;
    check_reads(&target, &PROFILED)?;
    ensure!(
        metric(on_demand)? == 0.0,
        "a profiled read went to the registry"
    );
    ensure!(metric("lazysnap_cache_misses_total")? == 0.0);
    ensure!(metric("lazysnap_cache_hits_total")? > hits);
    // A file outside the profile is fetched on demand (the counters above can move).
    check_reads(&target, &["other/unread"])?;
    ensure!(metric(on_demand)? >= 1.0);
    process.stop()?;
    Ok(())
}

#[test]
fn a_profile_in_the_registry_is_found_and_used_by_default() -> Result<()> {
    let registry = TestRegistry::start()?;
    let work = tempfile::tempdir()?;
    let _cleanup = UnmountOnDrop(work.path().to_owned());
    let image = lazy_image(&registry, work.path(), "stored")?;
    let mount = |name: &str, extra: &[&str]| -> Result<(MountProcess, String)> {
        let addr = free_addr()?;
        let mut args = vec!["--no-background-fetch", "--metrics-addr", &addr];
        args.extend_from_slice(extra);
        let process = MountProcess::start(
            &work.path().join(format!("root-{name}")),
            &image.reference,
            &work.path().join(format!("mnt-{name}")),
            &args,
        )?;
        Ok((process, addr))
    };
    let lookups = |addr: &str, result: &str| {
        scrape(
            addr,
            &format!("lazysnap_profile_lookups_total{{result=\"{result}\"}}"),
        )
    };

    // No profile stored yet: the lookup finds none, and the mount reads as always.
    let (process, addr) = mount("before", &[])?;
    wait_until(Duration::from_secs(10), "the lookup answered", || {
        Ok(lookups(&addr, "none")? == 1.0)
    })?;
    check_reads(&process.target, &PROFILED)?;
    process.stop()?;

    // Stored next to the image (the image itself is untouched): found and prefetched.
    let profile = profile_of(image.manifest, image.layer, &image.toc, &PROFILED, vec![])?;
    let chunks = profile.layers[0].accesses.len() as f64;
    let client = lazysnap::registry::Client::new(Default::default())?;
    let reference: lazysnap::oci::Reference = image.reference.parse()?;
    tokio::runtime::Runtime::new()?.block_on(lazysnap::profile::store::push(
        &client, &reference, &profile,
    ))?;
    let (process, addr) = mount("after", &[])?;
    wait_until(Duration::from_secs(30), "the profile prefetched", || {
        Ok(scrape(&addr, r#"lazysnap_profile_chunks_total{result="fetched"}"#)? == chunks)
    })?;
    ensure!(lookups(&addr, "found")? == 1.0);
    check_reads(&process.target, &PROFILED)?;
    ensure!(scrape(&addr, r#"lazysnap_fetch_requests_total{kind="on_demand"}"#)? == 0.0);
    process.stop()?;

    // `--profile none`: not even looked up.
    let (process, addr) = mount("off", &["--profile", "none"])?;
    check_reads(&process.target, &PROFILED)?;
    ensure!(scrape(&addr, "lazysnap_profile_lookups_total")? == 0.0);
    ensure!(scrape(&addr, r#"lazysnap_fetch_bytes_total{kind="profile"}"#)? == 0.0);
    process.stop()?;
    Ok(())
}

#[test]
fn broken_oversized_and_foreign_profiles_are_ignored_and_the_mount_reads_right() -> Result<()> {
    let registry = TestRegistry::start()?;
    let work = tempfile::tempdir()?;
    let _cleanup = UnmountOnDrop(work.path().to_owned());
    let image = lazy_image(&registry, work.path(), "broken")?;
    let good = profile_of(image.manifest, image.layer, &image.toc, &PROFILED, vec![])?;
    let mut foreign = good.clone();
    foreign.image = Digest::of(b"some other image");
    let mut truncated = good.encode()?;
    truncated.truncate(truncated.len() / 2);
    let cases: [(&str, Vec<u8>, &str); 4] = [
        ("corrupt", truncated, "invalid"),
        (
            "oversized",
            vec![b' '; lazysnap::profile::MAX_BYTES as usize + 1],
            "too_large",
        ),
        ("foreign", foreign.encode()?, "foreign"),
        ("missing", Vec::new(), "unreadable"),
    ];
    for (name, bytes, reason) in cases {
        let file = work.path().join(format!("{name}.json"));
        if name != "missing" {
            std::fs::write(&file, &bytes)?;
        }
        let addr = free_addr()?;
        let target = work.path().join(format!("mnt-{name}"));
        let process = MountProcess::start(
            &work.path().join(format!("root-{name}")),
            &image.reference,
            &target,
            &[
                "--no-background-fetch",
                "--metrics-addr",
                &addr,
                "--profile",
                file.to_str().context("path")?,
            ],
        )?;
        let ignored = format!("lazysnap_profile_ignored_total{{reason=\"{reason}\"}}");
        wait_until(Duration::from_secs(10), "the profile ignored", || {
            Ok(scrape(&addr, &ignored)? == 1.0)
        })?;
        check_reads(&target, &PROFILED)?;
        check_reads(&target, &["other/unread"])?;
        ensure!(scrape(&addr, r#"lazysnap_fetch_bytes_total{kind="profile"}"#)? == 0.0);
        ensure!(scrape(&addr, r#"lazysnap_fetch_requests_total{kind="on_demand"}"#)? >= 1.0);
        let log = process.stop()?;
        ensure!(
            log.matches("start-up profile").count() == 1 && log.contains("ignored"),
            "{name}: logged once: {log}"
        );
    }
    Ok(())
}

/// A state root for `lazysnap run`; whatever a failed test left is removed on drop.
struct RunRoot(tempfile::TempDir);

impl RunRoot {
    fn run(&self, args: &[&str]) -> Result<(bool, String, String)> {
        let out = Command::new(BIN)
            .arg("--root")
            .arg(self.0.path())
            .args(["-v", "run", "--no-lazysnapd", "--no-background-fetch"])
            .args(args)
            .stdin(Stdio::null())
            .output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }
}

impl Drop for RunRoot {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(self.0.path().join("containers")) {
            for e in entries.flatten() {
                let _ = Command::new("runc")
                    .args(["--root", "/run/lazysnap/runc", "delete", "--force"])
                    .arg(e.file_name())
                    .output();
            }
        }
        unmount_below(self.0.path());
    }
}

#[test]
fn a_container_starts_with_a_profile_and_with_a_broken_one() -> Result<()> {
    let registry = TestRegistry::start()?;
    let work = tempfile::tempdir()?;
    let layout = fixture(
        "busybox-image.sh",
        &[work.path().join("bb").to_str().context("path")?, "v1"],
    )?;
    let reference = format!("{}/prefetch/bb:v1", registry.addr);
    image::run(Command::new(BIN).args(["convert", &format!("oci:{layout}"), &reference]))?;
    let (manifest, layer, toc) = registry_toc(&registry, &reference)?;
    let profile = profile_of(manifest, layer, &toc, &["bin/busybox"], vec![])?;
    let good: PathBuf = work.path().join("good.json");
    std::fs::write(&good, profile.encode()?)?;
    let bad: PathBuf = work.path().join("bad.json");
    std::fs::write(&bad, b"{\"version\": 1, \"image\": 7}")?;

    for (file, expect) in [
        (&good, "prefetching the start-up profile"),
        (&bad, "ignored"),
    ] {
        let root = RunRoot(tempfile::tempdir()?);
        let (ok, out, err) = root.run(&[
            "--profile",
            file.to_str().context("path")?,
            &reference,
            "sh",
            "-c",
            "echo started",
        ])?;
        ensure!(
            ok && out == "started\n",
            "{}: {out:?}\n{err}",
            file.display()
        );
        ensure!(err.contains(expect), "{}: {err}", file.display());
    }
    Ok(())
}
