//! The containerd path of a cold start: a lazy pull through Debian's containerd 1.6 and
//! `lazysnapd`, with a real registry behind a delaying proxy so round trips are visible.
//!
//! containerd prepares an image's layers one after another; lazysnapd must not make each of them
//! wait for its own manifest and TOC round trips: the first layer's Prepare names the image's
//! layers, and every lazy layer's TOC is read at once. The proxy's request log shows when each
//! layer's first range read reached the registry. Every daemon is stopped by its PID and every
//! mount detached by a guard, even when a test fails.

mod common;
#[path = "common/containerd.rs"]
mod containerd;
#[path = "common/delayproxy.rs"]
mod delayproxy;
#[path = "common/lazysnapd.rs"]
mod lazysnapd;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use common::image::{self, LayoutBuilder};
use common::registry::TestRegistry;
use containerd::{cri_images, mounts_below, TestContainerd, UnmountOnDrop};
use delayproxy::DelayProxy;
use lazysnapd::Lazysnapd;

const LAZYSNAP: &str = env!("CARGO_BIN_EXE_lazysnap");
const SNAPSHOTTER: &str = "lazysnap";
/// Each direction's delay at the proxy: a 100 ms round trip, far above this machine's noise.
const ONE_WAY: Duration = Duration::from_millis(50);
/// Lazy layers above busybox in the test image.
const EXTRA_LAYERS: usize = 3;

/// A lazy (zstd:chunked) image of four layers: busybox, then three layers each holding
/// `/data/layerN/file` (incompressible) and `/data/layerN/msg`. Returns the repository path
/// (`multi:lazy`, pushed to `registry`) and the md5 of each file, as `md5sum` prints them.
fn multi_layer_image(registry: &TestRegistry, work: &Path) -> Result<(String, String)> {
    let busybox = image::fixture(
        "busybox-image.sh",
        &[&work.join("busybox").to_string_lossy()],
    )?;
    let (dir, tag) = busybox.rsplit_once(':').context("layout:tag")?;
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(Path::new(dir).join("index.json"))?)?;
    let manifest_digest = index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .and_then(|m| m["digest"].as_str())
        .context("busybox manifest")?;
    let blob = |digest: &str| {
        std::fs::read(
            Path::new(dir)
                .join("blobs/sha256")
                .join(digest.trim_start_matches("sha256:")),
        )
    };
    let manifest: serde_json::Value = serde_json::from_slice(&blob(manifest_digest)?)?;
    let base = manifest["layers"][0]["digest"]
        .as_str()
        .context("busybox layer")?;
    let mut tars = vec![image::decompress(&blob(base)?)?];
    let mut files = Vec::new();
    for n in 1..=EXTRA_LAYERS {
        let tree = work.join(format!("tree{n}"));
        let data = tree.join(format!("data/layer{n}"));
        std::fs::create_dir_all(&data)?;
        std::fs::write(data.join("file"), image::noise(300_000, n as u64))?;
        std::fs::write(data.join("msg"), format!("layer {n}\n"))?;
        tars.push(image::tar_dir(&tree)?);
        files.push(format!("/data/layer{n}/file"));
        files.push(format!("/data/layer{n}/msg"));
    }
    let layout = LayoutBuilder::new(&work.join("multi"))?;
    let desc = layout.image(&tars, "amd64")?;
    layout.tags(&[("v1", desc)])?;
    let mut md5 = Command::new("md5sum");
    for f in &files {
        md5.arg(work.join(format!("tree{}", &f[11..12])).join(&f[1..]));
    }
    let want = String::from_utf8(image::run(&mut md5)?)?
        .lines()
        .map(|l| {
            let (sum, path) = l.split_once("  ").unwrap_or((l, ""));
            let inside = path.find("/data/").map_or(path, |i| &path[i..]);
            format!("{sum}  {inside}")
        })
        .collect::<Vec<_>>()
        .join("\n");
    let repo = "multi:lazy".to_owned();
    image::run(Command::new(LAZYSNAP).args([
        "convert",
        &format!("oci:{}:v1", layout.dir.display()),
        &format!("{}/{repo}", registry.addr),
    ]))?;
    Ok((repo, want))
}

/// The layer digests of `reference`'s manifest, straight from the registry with curl.
fn layer_digests(reference: &str) -> Result<Vec<String>> {
    let (host, rest) = reference.split_once('/').context("reference has no host")?;
    let (repo, tag) = rest.rsplit_once(':').context("reference has no tag")?;
    let out = image::run(Command::new("curl").args([
        "-fsS",
        "-H",
        "Accept: application/vnd.oci.image.manifest.v1+json",
        &format!("http://{host}/v2/{repo}/manifests/{tag}"),
    ]))?;
    let manifest: serde_json::Value = serde_json::from_slice(&out)?;
    Ok(manifest["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["digest"].as_str().map(str::to_owned))
        .collect())
}

fn rpull(ctd: &TestContainerd, reference: &str) -> Result<()> {
    ctd.ctr_remote(&[
        "image",
        "rpull",
        "--plain-http",
        "--snapshotter",
        SNAPSHOTTER,
        reference,
    ])
    .map(drop)
}

/// The first range read of each blob in `layers` at the proxy (a lazy layer's TOC read).
fn first_range_reads(proxy: &DelayProxy, layers: &[String]) -> BTreeMap<String, Duration> {
    let mut first = BTreeMap::new();
    for r in proxy.requests() {
        if let (Some(blob), Some(_)) = (r.blob(), &r.range) {
            if layers.iter().any(|l| l == blob) {
                first.entry(blob.to_owned()).or_insert(r.at);
            }
        }
    }
    first
}

/// Fails on main: each Prepare read its own manifest and TOC only when containerd asked for its
/// layer, so the four TOC reads reached the registry two round trips (200 ms here) apart.
#[test]
fn a_lazy_pull_reads_every_layers_toc_at_once_and_the_container_sees_every_layer() -> Result<()> {
    let registry = TestRegistry::start()?;
    let work = tempfile::tempdir()?;
    let (repo, want) = multi_layer_image(&registry, work.path())?;
    let proxy = DelayProxy::start(&registry.addr, ONE_WAY)?;
    let reference = format!("{}/{repo}", proxy.addr);
    let layers = layer_digests(&format!("{}/{repo}", registry.addr))?;
    ensure!(layers.len() == EXTRA_LAYERS + 1, "layers: {layers:?}");
    let daemon = Lazysnapd::start("background = false\n")?;
    let ctd = TestContainerd::start(&[(SNAPSHOTTER, &daemon.socket)])?;

    proxy.clear();
    let start = Instant::now();
    rpull(&ctd, &reference).with_context(|| daemon.log())?;
    let pulled = start.elapsed();
    let requests = proxy.requests();
    let first = first_range_reads(&proxy, &layers);
    let log = || {
        format!(
            "pull took {pulled:?}; requests at the proxy:\n{}\nlazysnapd:\n{}",
            requests
                .iter()
                .map(|r| format!("{:>8.3} s {} {:?}", r.at.as_secs_f64(), r.line, r.range))
                .collect::<Vec<_>>()
                .join("\n"),
            daemon.log()
        )
    };
    ensure!(
        first.len() == layers.len(),
        "not every layer's TOC was read by a range request: {first:?}\n{}",
        log()
    );
    ensure!(
        !requests
            .iter()
            .any(|r| r.range.is_none() && r.blob().is_some_and(|b| layers.iter().any(|l| l == b))),
        "a layer blob was downloaded whole\n{}",
        log()
    );
    // The layers above the bottom one are found ahead, from the manifest. In series each
    // layer's TOC read waits for the layer below to be found and mounted: its manifest and TOC,
    // two round trips at least, so three layers spread over four or more. At once, they are apart
    // by at most the round trip of a new connection's handshake. (The bottom layer's read goes
    // out earlier still: checked below.)
    let ahead = first.iter().filter(|(blob, _)| **blob != layers[0]);
    let (earliest, latest) = (
        ahead.clone().map(|(_, at)| *at).min().unwrap_or_default(),
        ahead.map(|(_, at)| *at).max().unwrap_or_default(),
    );
    ensure!(
        latest - earliest < ONE_WAY * 4,
        "the upper layers' TOC reads were spread over {:?} (a round trip is {:?}): not in \
         parallel\n{}",
        latest - earliest,
        ONE_WAY * 2,
        log()
    );
    // The bottom layer's Prepare labels say where its TOC lies (lazysnap's
    // `containerd.io/snapshot/lazysnap/...` annotations, which containerd passes on): its TOC
    // read goes out beside lazysnapd's manifest request, not a round trip after it.
    let manifest_asked = requests
        .iter()
        .find(|r| r.line.starts_with("GET ") && r.line.ends_with("/manifests/lazy"))
        .map(|r| r.at)
        .with_context(log)?;
    let bottom = first.get(&layers[0]).copied().unwrap_or_default();
    ensure!(
        bottom < manifest_asked + ONE_WAY,
        "the bottom layer's TOC read came {:?} after lazysnapd asked for the manifest (a round \
         trip is {:?}): it waited for the manifest\n{}",
        bottom.saturating_sub(manifest_asked),
        ONE_WAY * 2,
        log()
    );
    ensure!(
        daemon.metric("lazysnap_snapshot_lazy_layers_total")? == layers.len() as f64,
        "{}",
        daemon.metrics()?
    );
    ensure!(
        daemon.metric("lazysnap_layers_found_ahead_total")? >= EXTRA_LAYERS as f64,
        "later Prepares did not find their layers located ahead:\n{}",
        daemon.metrics()?
    );

    let mut args = vec!["/bin/busybox", "md5sum"];
    let files: Vec<String> = want
        .lines()
        .filter_map(|l| l.split_once("  ").map(|(_, p)| p.to_owned()))
        .collect();
    args.extend(files.iter().map(String::as_str));
    let got = ctd
        .run_in(&ctd.namespace, SNAPSHOTTER, &reference, "cp", &args)
        .with_context(|| daemon.log())?;
    ensure!(
        got.trim() == want.trim(),
        "the container saw\n{got}\nthe layers hold\n{want}"
    );
    Ok(())
}

/// Found ahead, or by its Prepare from the TOC its labels locate, a layer gets the same checks
/// and the same verdict: a TOC that does not match the digest the manifest pins falls back
/// (reason `toc`) and containerd unpacks that layer itself. The bottom layer's labels still name
/// its real TOC (they come from lazysnap's own copy of the annotation): read early, it must not
/// be used, since the manifest pins another.
#[test]
fn a_layer_found_ahead_that_fails_its_checks_falls_back_and_the_image_still_runs() -> Result<()> {
    let registry = TestRegistry::start()?;
    let work = tempfile::tempdir()?;
    let (repo, want) = multi_layer_image(&registry, work.path())?;
    // The same image with the bottom and top layers' pinned TOC digests pointing elsewhere.
    let (_, mut manifest) = manifest_of(&format!("{}/{repo}", registry.addr))?;
    for n in [0, EXTRA_LAYERS] {
        let annotations = manifest["layers"][n]["annotations"]
            .as_object_mut()
            .context("layer annotations")?;
        let key = "io.github.containers.zstd-chunked.manifest-checksum";
        ensure!(
            annotations.contains_key(key),
            "no TOC checksum annotation in {annotations:?}"
        );
        annotations.insert(key.into(), image::digest_of(b"another TOC").into());
    }
    let bytes = serde_json::to_vec(&manifest)?;
    let body = work.path().join("tampered.json");
    std::fs::write(&body, &bytes)?;
    let (name, _) = repo.split_once(':').context("repo:tag")?;
    image::run(Command::new("curl").args([
        "-fsS",
        "-X",
        "PUT",
        "-H",
        "Content-Type: application/vnd.oci.image.manifest.v1+json",
        "--data-binary",
        &format!("@{}", body.display()),
        &format!("http://{}/v2/{name}/manifests/tampered", registry.addr),
    ]))?;
    let proxy = DelayProxy::start(&registry.addr, ONE_WAY)?;
    let reference = format!("{}/{name}:tampered", proxy.addr);
    let daemon = Lazysnapd::start("background = false\n")?;
    let ctd = TestContainerd::start(&[(SNAPSHOTTER, &daemon.socket)])?;
    rpull(&ctd, &reference).with_context(|| daemon.log())?;

    let metric = |name: &str| daemon.metric(name);
    ensure!(
        metric("lazysnap_snapshot_lazy_layers_total")? == (EXTRA_LAYERS - 1) as f64
            && metric("lazysnap_snapshot_fallbacks_total{reason=\"toc\"}")? == 2.0
            && metric("lazysnap_layers_found_ahead_total")? >= (EXTRA_LAYERS - 1) as f64,
        "{}\n{}",
        daemon.metrics()?,
        daemon.log()
    );
    let mut args = vec!["/bin/busybox", "md5sum"];
    let files: Vec<String> = want
        .lines()
        .filter_map(|l| l.split_once("  ").map(|(_, p)| p.to_owned()))
        .collect();
    args.extend(files.iter().map(String::as_str));
    let got = ctd
        .run_in(&ctd.namespace, SNAPSHOTTER, &reference, "fb", &args)
        .with_context(|| daemon.log())?;
    ensure!(
        got.trim() == want.trim(),
        "the container saw\n{got}\nthe layers hold\n{want}"
    );
    Ok(())
}

/// The manifest of `reference` straight from the registry with curl: its digest and document.
fn manifest_of(reference: &str) -> Result<(String, serde_json::Value)> {
    let (host, rest) = reference.split_once('/').context("reference has no host")?;
    let (repo, tag) = rest.rsplit_once(':').context("reference has no tag")?;
    let bytes = image::run(Command::new("curl").args([
        "-fsS",
        "-H",
        "Accept: application/vnd.oci.image.manifest.v1+json",
        &format!("http://{host}/v2/{repo}/manifests/{tag}"),
    ]))?;
    Ok((image::digest_of(&bytes), serde_json::from_slice(&bytes)?))
}

/// Pushes a start-up profile for `reference` (at the registry itself) naming every file of the
/// extra layers, as `lazysnap profile push` would: an artifact whose subject is the manifest.
fn push_profile(reference: &str, work: &Path) -> Result<()> {
    use lazysnap::profile::{Access, LayerProfile, Profile};
    let (manifest, document) = manifest_of(reference)?;
    let blobs: Vec<&str> = document["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["digest"].as_str())
        .collect();
    let mut layers = Vec::new();
    for n in 1..=EXTRA_LAYERS {
        let mut accesses = Vec::new();
        for name in ["file", "msg"] {
            let path = format!("data/layer{n}/{name}");
            let content = std::fs::read(work.join(format!("tree{n}")).join(&path))?;
            accesses.push(Access {
                name: path,
                offset: 0,
                // One chunk each (they are far below the chunk size): the chunk is the file.
                chunk: image::digest_of(&content).parse()?,
                at_ms: 0,
            });
        }
        layers.push(LayerProfile {
            digest: blobs.get(n).context("layer")?.parse()?,
            diff_id: None,
            accesses,
        });
    }
    let profile = Profile {
        version: 1,
        image: manifest.parse()?,
        command: vec!["md5sum".into()],
        layers,
    };
    let client = lazysnap::registry::Client::new(lazysnap::registry::ClientConfig::default())?;
    let at: lazysnap::oci::Reference = reference.parse()?;
    tokio::runtime::Runtime::new()?
        .block_on(lazysnap::profile::store::push(&client, &at, &profile))?;
    Ok(())
}

/// Fails on main: lazysnapd looked up no profile, so every file of the extra layers was fetched
/// on demand when the container read it.
#[test]
fn a_pulled_images_profile_is_fetched_before_the_container_reads_it() -> Result<()> {
    let registry = TestRegistry::start()?;
    let work = tempfile::tempdir()?;
    let (repo, want) = multi_layer_image(&registry, work.path())?;
    push_profile(&format!("{}/{repo}", registry.addr), work.path())?;
    let proxy = DelayProxy::start(&registry.addr, ONE_WAY)?;
    let reference = format!("{}/{repo}", proxy.addr);
    let layers = layer_digests(&format!("{}/{repo}", registry.addr))?;
    let daemon = Lazysnapd::start("background = false\n")?;
    let ctd = TestContainerd::start(&[(SNAPSHOTTER, &daemon.socket)])?;
    rpull(&ctd, &reference).with_context(|| daemon.log())?;

    let fetched = "lazysnap_profile_chunks_total{result=\"fetched\"}";
    let start = Instant::now();
    while daemon.metric(fetched)? < (EXTRA_LAYERS * 2) as f64 {
        ensure!(
            start.elapsed() < Duration::from_secs(20),
            "the profile's chunks were not fetched:\n{}\n{}",
            daemon.metrics()?,
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    ensure!(
        daemon.metric("lazysnap_profile_lookups_total{result=\"found\"}")? == 1.0,
        "one lookup per image, not per layer:\n{}",
        daemon.metrics()?
    );
    ensure!(
        daemon.metric("lazysnap_profile_chunks_total{result=\"unknown\"}")? == 0.0,
        "{}",
        daemon.metrics()?
    );

    proxy.clear();
    let mut args = vec!["/bin/busybox", "md5sum"];
    let files: Vec<String> = want
        .lines()
        .filter_map(|l| l.split_once("  ").map(|(_, p)| p.to_owned()))
        .collect();
    args.extend(files.iter().map(String::as_str));
    let got = ctd
        .run_in(&ctd.namespace, SNAPSHOTTER, &reference, "pf", &args)
        .with_context(|| daemon.log())?;
    ensure!(
        got.trim() == want.trim(),
        "the container saw\n{got}\nthe layers hold\n{want}"
    );
    let late: Vec<_> = proxy
        .requests()
        .into_iter()
        .filter(|r| r.blob().is_some_and(|b| layers[1..].iter().any(|l| l == b)))
        .collect();
    ensure!(
        late.is_empty(),
        "the container's reads of profiled files went to the registry: {late:?}\n{}",
        daemon.log()
    );
    Ok(())
}

/// The image the measurements here run: `LAZYSNAP_BREAKDOWN_LAYOUT` (an OCI layout, converted and
/// pushed as `big:lazy`; its command `LAZYSNAP_BREAKDOWN_CMD`, default python's hello) or the
/// multi-layer busybox image. Returns its repository and tag, and the command.
fn measured_image(registry: &TestRegistry, work: &Path) -> Result<(String, String)> {
    match std::env::var("LAZYSNAP_BREAKDOWN_LAYOUT") {
        Ok(layout) => {
            image::run(Command::new(LAZYSNAP).args([
                "convert",
                &format!("oci:{layout}"),
                &format!("{}/big:lazy", registry.addr),
            ]))?;
            let cmd = std::env::var("LAZYSNAP_BREAKDOWN_CMD")
                .unwrap_or_else(|_| "python3 -c print('hello')".into());
            Ok(("big:lazy".to_owned(), cmd))
        }
        Err(_) => {
            let (repo, _) = multi_layer_image(registry, work)?;
            Ok((repo, "/bin/busybox cat /data/layer3/msg".to_owned()))
        }
    }
}

/// The number in the environment variable `name`, else `default`.
fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Not a check: where the time of a cold start through containerd goes, next to `lazysnap run`
/// (`cargo test --test containerd_path -- --ignored --nocapture breakdown`). Uses the busybox
/// image above, or `LAZYSNAP_BREAKDOWN_LAYOUT=DIR:TAG` (e.g. the python image of
/// `tests/fixtures/debian-image.sh --packages python3`) with `LAZYSNAP_BREAKDOWN_CMD`;
/// `LAZYSNAP_BREAKDOWN_PROFILE=1` records and pushes the command's start-up profile first.
#[test]
#[ignore]
fn breakdown() -> Result<()> {
    let registry = TestRegistry::start()?;
    let work = tempfile::tempdir()?;
    let (repo, command) = measured_image(&registry, work.path())?;
    let rtt_ms = env_or("LAZYSNAP_BREAKDOWN_RTT_MS", 20);
    let proxy = DelayProxy::start(&registry.addr, Duration::from_millis(rtt_ms / 2))?;
    let reference = format!("{}/{repo}", proxy.addr);
    let args: Vec<&str> = command.split(' ').collect();
    // `LAZYSNAP_BREAKDOWN_PROFILE=1`: record and push a start-up profile of the command first.
    if std::env::var_os("LAZYSNAP_BREAKDOWN_PROFILE").is_some() {
        let root = work.path().join("record-root");
        let guard = UnmountOnDrop(root.clone());
        image::run(
            Command::new(LAZYSNAP)
                .arg("--root")
                .arg(&root)
                .args([
                    "profile",
                    "record",
                    "--push",
                    "--net",
                    "none",
                    "--quiet-ms",
                    "500",
                ])
                .arg(format!("{}/{repo}", registry.addr))
                .args(&args),
        )?;
        drop(guard);
    }

    for round in 0..2 {
        let daemon = Lazysnapd::start("background = false\n")?;
        let ctd = TestContainerd::start(&[(SNAPSHOTTER, &daemon.socket)])?;
        proxy.clear();
        let t0 = Instant::now();
        rpull(&ctd, &reference).with_context(|| daemon.log())?;
        let pulled = t0.elapsed();
        let out = ctd.run_in(&ctd.namespace, SNAPSHOTTER, &reference, "bd", &args)?;
        let total = t0.elapsed();
        println!(
            "round {round}: containerd: rpull {:.3} s, then ctr run {:.3} s, total {:.3} s ({})",
            pulled.as_secs_f64(),
            (total - pulled).as_secs_f64(),
            total.as_secs_f64(),
            out.trim()
        );
        for r in proxy.requests() {
            println!("  {:>8.3} s {} {:?}", r.at.as_secs_f64(), r.line, r.range);
        }
        println!("--- lazysnapd log ---\n{}", daemon.log());
        drop(ctd);
        drop(daemon);

        let root = work.path().join(format!("run-root-{round}"));
        let guard = UnmountOnDrop(root.clone());
        proxy.clear();
        let t0 = Instant::now();
        let mut cmd = Command::new(LAZYSNAP);
        cmd.arg("--root")
            .arg(&root)
            .args([
                "run",
                "--no-lazysnapd",
                "--net",
                "none",
                "--no-background-fetch",
            ])
            .arg(&reference)
            .args(&args);
        let out = image::run(&mut cmd)?;
        println!(
            "round {round}: lazysnap run {:.3} s ({})",
            t0.elapsed().as_secs_f64(),
            String::from_utf8_lossy(&out).trim()
        );
        for r in proxy.requests() {
            println!("  {:>8.3} s {} {:?}", r.at.as_secs_f64(), r.line, r.range);
        }
        drop(guard);
        ensure!(
            mounts_below(&root).is_empty(),
            "left mounted under {}",
            root.display()
        );
    }
    Ok(())
}

/// Where kubelet's path gains from the CRI proxy's find-ahead (`[cri] find_ahead`): `PullImage`
/// through lazysnapd's proxy, timed, with the proxy's find-ahead off and on in turn, each round
/// on a fresh lazysnapd and containerd (the CRI plugin, the snippet `systemd/` ships), the
/// registry behind the delaying proxy. Prints each pull's seconds, its layers found ahead, and
/// the registry's requests. `LAZYSNAP_BREAKDOWN_LAYOUT` as for `breakdown`;
/// `LAZYSNAP_CRI_ROUNDS` (default 3). Run with
/// `cargo test --release --test containerd_path -- --ignored --nocapture cri_pull`.
#[test]
#[ignore = "a measurement: prints timings, asserts only that the pulls were lazy"]
fn cri_pull() -> Result<()> {
    let registry = TestRegistry::start()?;
    let work = tempfile::tempdir()?;
    let (repo, _) = measured_image(&registry, work.path())?;
    let rtt_ms = env_or("LAZYSNAP_BREAKDOWN_RTT_MS", 20);
    let rounds = env_or("LAZYSNAP_CRI_ROUNDS", 3) as usize;
    let proxy = DelayProxy::start(&registry.addr, Duration::from_millis(rtt_ms / 2))?;
    let reference = format!("{}/{repo}", proxy.addr);
    let runtime = tokio::runtime::Runtime::new()?;
    let mut seconds: BTreeMap<bool, Vec<f64>> = BTreeMap::new();
    for round in 0..rounds {
        for find_ahead in [false, true] {
            let links = tempfile::tempdir()?;
            let (cri, containerd_link) =
                (links.path().join("cri.sock"), links.path().join("ctd.sock"));
            let daemon = Lazysnapd::start(&format!(
                "[cri]\naddress = \"{}\"\ncontainerd_address = \"{}\"\nfind_ahead = {find_ahead}\n",
                cri.display(),
                containerd_link.display()
            ))?;
            // The sandbox image is never pulled: no pod here.
            let ctd = TestContainerd::start_cri_shipped(&daemon.socket, "unused.invalid/pause:1")?;
            std::os::unix::fs::symlink(&ctd.socket, &containerd_link)?;
            let mut client = runtime.block_on(cri_images(&cri))?;
            proxy.clear();
            let t0 = Instant::now();
            runtime
                .block_on(client.pull_image(k8s_cri::v1::PullImageRequest {
                    image: Some(k8s_cri::v1::ImageSpec {
                        image: reference.clone(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }))
                .with_context(|| daemon.log())?;
            let pulled = t0.elapsed().as_secs_f64();
            let lazy = daemon.metric("lazysnap_snapshot_lazy_layers_total")?;
            ensure!(lazy >= 1.0, "no lazy layer\n{}", daemon.log());
            let ahead = daemon.metric("lazysnap_layers_found_ahead_total")?;
            println!(
                "round {round}: find_ahead = {find_ahead}: PullImage {pulled:.3} s, {lazy} lazy layers, {ahead} found ahead"
            );
            for r in proxy.requests() {
                println!("  {:>8.3} s {} {:?}", r.at.as_secs_f64(), r.line, r.range);
            }
            seconds.entry(find_ahead).or_default().push(pulled);
            drop(ctd);
            drop(daemon);
        }
    }
    for (find_ahead, mut s) in seconds {
        s.sort_by(f64::total_cmp);
        println!(
            "find_ahead = {find_ahead}: PullImage median {:.3} s of {s:?}",
            s[s.len() / 2]
        );
    }
    Ok(())
}
