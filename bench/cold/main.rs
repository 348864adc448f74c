//! `bench/coldstart`: cold-start latency of real workloads, lazysnap side by side with a full
//! pull and with the physical limit, on a shaped network of the benchmark's own.
//!
//! ```text
//! bench/coldstart [--quick] [--rate 100mbit] [--rtt-ms 20] [--runs N] [--out FILE]
//!                  [--workload NAME]... [--skip METHOD]... [--containerd DIR|BINARY] [--prepare-only]
//!                  [--lazysnapd-config FILE] [--render JSON]
//! ```
//!
//! The registry runs in a network namespace made for the run, behind a veth pair shaped with
//! `tc tbf`, and a delaying proxy on loopback adds the round-trip time (see `network.rs`). Each
//! run of each method starts with every cache dropped: the page cache, lazysnap's state root,
//! containerd's content store and snapshots (a fresh containerd root). Methods alternate within
//! each round so that the machine's noise falls on all of them alike.
//!
//! `lazysnap-profile` needs a start-up profile in the registry: before a workload's timed runs
//! (not timed), its image is copied into a repository of its own (same manifest digest) and
//! `lazysnap profile record --push` records and pushes the profile there, on a root of its own.
//! The other methods read the image's own repository, which never holds a profile.
//!
//! `lazysnap-cri` and `lazysnap-cri-profile` take the Kubernetes path: kubelet's CRI calls, by
//! hand, to containerd's CRI plugin and lazysnapd's CRI proxy, after a pod sandbox made untimed
//! (see `cri.rs`).
//!
//! The oracle is the physical limit: the compressed bytes of the chunks the workload's reads
//! needed (lazysnap's own count), sent at the link rate, plus one round trip, plus the time the
//! same start takes when all of those bytes are already local.

mod cri;
mod methods;
mod network;
mod report;
mod workloads;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::json;

use methods::{Containerd, ContainerdBin, Sample};
use network::ShapedRegistry;
use report::Row;

const LAZYSNAP: &str = env!("CARGO_BIN_EXE_lazysnap");
const LAZYSNAPD: Option<&str> = option_env!("CARGO_BIN_EXE_lazysnapd");

#[derive(Debug, Parser)]
#[command(
    name = "coldstart",
    about = "Cold-start latency: lazysnap vs a full pull vs the physical limit"
)]
struct Args {
    /// Only python-hello.
    #[arg(long)]
    quick: bool,
    /// Link rate, as tc writes it (kbit, mbit, gbit).
    #[arg(long, default_value = "100mbit")]
    rate: String,
    /// Round-trip time added by the proxy, in milliseconds.
    #[arg(long, default_value_t = 20)]
    rtt_ms: u64,
    /// Runs per workload and method.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// JSON results; the markdown table and the SVG chart go beside it (.md, .svg).
    #[arg(long, default_value = "bench/results/coldstart.json")]
    out: PathBuf,
    /// Skip methods by name (full-pull, lazysnap, lazysnap-profile, lazysnap-cri,
    /// lazysnap-cri-profile, lazysnap-run, lazysnap-run-profile).
    #[arg(long)]
    skip: Vec<String>,
    /// Only these workloads (repeat the flag; default: all, or python-hello with --quick).
    #[arg(long)]
    workload: Vec<String>,
    /// Another containerd: an unpacked package's directory (its `ctr` and shim are used too) or
    /// its binary. Default: Debian's, on PATH.
    #[arg(long, value_name = "DIR|BINARY")]
    containerd: Option<PathBuf>,
    /// Build and push the workload images (cached), then exit without measuring.
    #[arg(long)]
    prepare_only: bool,
    /// lazysnapd's config file for the `lazysnap` methods (default: none, all defaults); named in
    /// the conditions with its contents.
    #[arg(long, value_name = "FILE")]
    lazysnapd_config: Option<PathBuf>,
    /// An option for `lazysnap convert` when the lazy images are made (repeat the flag; e.g.
    /// `--convert-arg=--startup-elf`): measures what a conversion option buys. Named in the
    /// conditions.
    #[arg(long = "convert-arg", value_name = "ARG", allow_hyphen_values = true)]
    convert_args: Vec<String>,
    /// Write the table and chart (.md, .svg) again from the results in JSON, measuring nothing.
    #[arg(long, value_name = "JSON")]
    render: Option<PathBuf>,
}

/// Every method, in the order each round runs them.
const METHODS: [&str; 7] = [
    "full-pull",
    "lazysnap",
    "lazysnap-profile",
    "lazysnap-cri",
    "lazysnap-cri-profile",
    "lazysnap-run",
    "lazysnap-run-profile",
];

/// What every measurement needs to know besides the workload.
struct Setup<'a> {
    addr: &'a str,
    lazysnapd: Option<&'a Path>,
    lazysnapd_config: Option<&'a Path>,
    containerd: &'a ContainerdBin,
    /// The workload's image in its own repository, with a profile pushed.
    profiled: Option<String>,
    /// The pod sandbox image of the `lazysnap-cri` methods.
    sandbox: Option<&'a str>,
    /// Whose counts the `lazysnap-cri` methods reset after making the sandbox.
    registry: &'a ShapedRegistry,
}

/// `100mbit` → bits per second.
fn rate_bps(rate: &str) -> Result<f64> {
    let r = rate.to_ascii_lowercase();
    let (num, mult) = if let Some(n) = r.strip_suffix("gbit") {
        (n, 1e9)
    } else if let Some(n) = r.strip_suffix("mbit") {
        (n, 1e6)
    } else if let Some(n) = r.strip_suffix("kbit") {
        (n, 1e3)
    } else if let Some(n) = r.strip_suffix("bit") {
        (n, 1.0)
    } else {
        bail!("rate {rate:?}: use a tc rate such as 100mbit")
    };
    Ok(num.trim().parse::<f64>().context("rate")? * mult)
}

fn main() -> Result<()> {
    // cargo bench passes `--bench`; the harness has no use for it.
    let argv = std::env::args().filter(|a| a != "--bench");
    let args = Args::parse_from(argv);
    if let Some(json) = &args.render {
        return render(json);
    }
    if !nix::unistd::Uid::effective().is_root() {
        bail!("run as root: the benchmark makes a network namespace, mounts, and drops caches");
    }
    let repo_root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = if args.out.is_absolute() {
        args.out.clone()
    } else {
        repo_root.join(&args.out)
    };
    let bps = rate_bps(&args.rate)?;
    let rtt = Duration::from_millis(args.rtt_ms);
    let runtime = tokio::runtime::Runtime::new()?;
    let _guard = runtime.enter();

    let cache = workloads::cache_dir();
    let registry = runtime.block_on(ShapedRegistry::start(&cache.join("registry-r1")))?;
    eprintln!(
        "coldstart: registry in its namespace, proxied at {}",
        registry.addr
    );
    let mut workloads = workloads::all(args.quick && args.workload.is_empty());
    if !args.workload.is_empty() {
        workloads.retain(|w| args.workload.iter().any(|n| n == w.name));
        if workloads.len() != args.workload.len() {
            bail!("--workload {:?}: unknown name among them", args.workload);
        }
    }
    workloads::publish(
        &workloads,
        &registry.addr,
        Path::new(LAZYSNAP),
        &args.convert_args,
        repo_root,
        &cache,
    )?;
    if args.prepare_only {
        eprintln!("coldstart: images built and pushed (--prepare-only)");
        return Ok(());
    }
    let containerd = ContainerdBin::find(args.containerd.as_deref())?;
    eprintln!(
        "coldstart: containerd {} ({})",
        containerd.version,
        containerd.containerd.display()
    );
    registry.shape(&args.rate, bps, rtt)?;
    // One download through the shaped link and the proxy: the rate a client actually gets.
    let (blob, size) = workloads::largest_blob(
        &registry.addr,
        &format!("bench/{}", workloads[0].image.repo_tag("plain")),
    )?;
    let measured_bps = registry.measured_rate(&blob, size.min((bps / 8.0 * 3.0) as u64))?;
    registry.take_counts(); // publishing is not part of any measurement
    eprintln!(
        "coldstart: link shaped to {} with {} ms RTT; one download gets {:.0} Mbit/s",
        args.rate,
        args.rtt_ms,
        measured_bps / 1e6
    );

    let scratch = tempfile::Builder::new().prefix("coldstart-").tempdir()?;
    let lazysnapd = LAZYSNAPD.map(PathBuf::from).filter(|p| p.exists());
    let mut methods: Vec<&str> = METHODS.to_vec();
    if lazysnapd.is_none() {
        methods.retain(|m| !m.starts_with("lazysnap") || m.starts_with("lazysnap-run"));
    }
    methods.retain(|m| !args.skip.iter().any(|s| s == m));
    let sandbox = if methods.iter().any(|m| m.starts_with("lazysnap-cri")) {
        let image = cri::publish_pause(repo_root, &registry.addr, scratch.path())
            .context("publishing the pod sandbox image")?;
        registry.take_counts();
        Some(image)
    } else {
        None
    };
    let run_id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        .to_string();
    let mut profiles = serde_json::Map::new();
    let mut rows = Vec::new();
    for (wi, w) in workloads.iter().enumerate() {
        let mut seconds: Vec<Vec<f64>> = vec![Vec::new(); methods.len()];
        let mut bytes: Vec<Vec<u64>> = vec![Vec::new(); methods.len()];
        let mut requests: Vec<Vec<u64>> = vec![Vec::new(); methods.len()];
        let mut needed = Vec::new();
        let mut last_root = None;
        let mut setup = Setup {
            addr: &registry.addr,
            lazysnapd: lazysnapd.as_deref(),
            lazysnapd_config: args.lazysnapd_config.as_deref(),
            containerd: &containerd,
            profiled: None,
            sandbox: sandbox.as_deref(),
            registry: &registry,
        };
        if methods.iter().any(|m| m.ends_with("-profile")) {
            let reference = w.profiled_reference(&registry.addr, wi, &run_id);
            let summary = profile(w, &registry.addr, &reference, &scratch.path().join(w.name))
                .with_context(|| format!("{}: recording its profile", w.name))?;
            let (b, r) = registry.take_counts();
            eprintln!(
                "coldstart: {} profile pushed to {reference}: {summary} (recorded with {:.1} MB, {r} requests; not timed)",
                w.name,
                b as f64 / 1e6
            );
            profiles.insert(w.name.to_owned(), summary.into());
            setup.profiled = Some(reference);
        }
        for run in 0..args.runs {
            for (mi, method) in methods.iter().enumerate() {
                let dir = scratch.path().join(format!("{}-{method}-{run}", w.name));
                let id = format!("cs-{}-{run}", w.name);
                let sample = measure(method, w, &setup, &dir, &id)
                    .with_context(|| format!("{} / {method} run {run}", w.name))?;
                let (b, r) = registry.take_counts();
                eprintln!(
                    "coldstart: {} {method} run {}: {:.2} s, {:.1} MB, {r} requests",
                    w.name,
                    run + 1,
                    sample.seconds,
                    b as f64 / 1e6
                );
                seconds[mi].push(sample.seconds);
                bytes[mi].push(b);
                requests[mi].push(r);
                if *method == "lazysnap-run" {
                    needed.extend(sample.needed_bytes);
                    last_root = Some(dir);
                }
            }
        }
        for (mi, method) in methods.iter().enumerate() {
            rows.push(Row::new(
                w.name,
                method,
                &seconds[mi],
                &bytes[mi],
                &requests[mi],
            ));
        }
        if let (Some(root), false) = (last_root, needed.is_empty()) {
            rows.push(oracle(w, &registry, &root, &needed, bps, rtt, args.runs)?);
        }
    }

    let conditions = json!({
        "rate": args.rate,
        "measured_rate_mbit": (measured_bps / 1e5).round() / 10.0,
        "rtt_ms": args.rtt_ms,
        "containerd": containerd.version,
        "runs": args.runs,
        "quick": args.quick,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "date": chrono_free_now(),
        "lazysnap_run": "--no-background-fetch --net none",
        "convert_args": args.convert_args,
        "lazysnapd_config": args
            .lazysnapd_config
            .as_ref()
            .map(|p| std::fs::read_to_string(p).unwrap_or_default()),
        "profiles": profiles,
    });
    let doc = json!({ "conditions": conditions, "results": rows });
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, serde_json::to_vec_pretty(&doc)?)?;
    let table = report::markdown(&conditions, &rows);
    std::fs::write(out.with_extension("md"), &table)?;
    std::fs::write(out.with_extension("svg"), report::svg(&rows))?;
    println!("{table}");
    eprintln!("coldstart: wrote {} (.md, .svg)", out.display());
    Ok(())
}

/// Copies the workload's converted image into its own repository and records and pushes its
/// start-up profile there (`root`: the recording's own state root). Returns a summary.
fn profile(w: &workloads::Workload, addr: &str, reference: &str, root: &Path) -> Result<String> {
    let to_repo = reference
        .strip_prefix(&format!("{addr}/"))
        .and_then(|r| r.rsplit_once(':'))
        .map(|(repo, _)| repo)
        .context("profiled reference")?;
    workloads::copy_image(
        addr,
        &format!("bench/{}", w.image.repo_tag("lazy")),
        to_repo,
    )?;
    methods::drop_page_cache()?;
    methods::record_profile(Path::new(LAZYSNAP), root, reference, w)
}

/// One cold start of `w` by `method`, after dropping every cache.
fn measure(
    method: &str,
    w: &workloads::Workload,
    setup: &Setup,
    dir: &Path,
    id: &str,
) -> Result<Sample> {
    let plain = w.image.reference(setup.addr, "plain");
    // The lazy methods read the image itself, their `-profile` twins the copy with a profile.
    let lazy = || {
        if method.ends_with("-profile") {
            setup.profiled.clone().context("no profiled image")
        } else {
            Ok(w.image.reference(setup.addr, "lazy"))
        }
    };
    match method {
        "full-pull" => {
            let containerd = Containerd::start(setup.containerd, dir, None)?;
            methods::drop_page_cache()?;
            containerd.full_pull(&plain, w, id)
        }
        "lazysnap" | "lazysnap-profile" => {
            let reference = lazy()?;
            let lazysnapd = setup.lazysnapd.context("no lazysnapd binary")?;
            let daemon = methods::Lazysnapd::start(
                lazysnapd,
                setup.lazysnapd_config,
                &dir.join("lazysnapd"),
            )?;
            let containerd = Containerd::start(
                setup.containerd,
                &dir.join("containerd"),
                Some(&daemon.socket),
            )?;
            methods::drop_page_cache()?;
            let sample = containerd.lazy_pull(&reference, w, id);
            drop(containerd);
            sample
        }
        "lazysnap-cri" | "lazysnap-cri-profile" => {
            let reference = lazy()?;
            let lazysnapd = setup.lazysnapd.context("no lazysnapd binary")?;
            let containerd_dir = dir.join("containerd");
            let (daemon, proxy) = methods::Lazysnapd::start_cri(
                lazysnapd,
                setup.lazysnapd_config,
                &dir.join("lazysnapd"),
                &Containerd::socket_in(&containerd_dir),
            )?;
            let containerd = Containerd::start_cri(
                setup.containerd,
                &containerd_dir,
                &daemon.socket,
                setup.sandbox.context("no sandbox image")?,
            )?;
            let sample = cri::cold_start(
                &containerd.socket,
                &proxy,
                &reference,
                w,
                &dir.join("logs"),
                || {
                    setup.registry.take_counts();
                    methods::drop_page_cache()
                },
            );
            drop(containerd);
            drop(daemon);
            sample
        }
        "lazysnap-run" | "lazysnap-run-profile" => {
            let reference = lazy()?;
            methods::drop_page_cache()?;
            methods::lazysnap_run(Path::new(LAZYSNAP), dir, &reference, w)
        }
        other => bail!("unknown method {other}"),
    }
}

/// The physical limit: needed bytes at the link rate, one round trip, and the start itself with
/// those bytes already local (the last lazysnap-run root again, page cache dropped).
fn oracle(
    w: &workloads::Workload,
    registry: &ShapedRegistry,
    warm_root: &Path,
    needed: &[u64],
    bps: f64,
    rtt: Duration,
    runs: usize,
) -> Result<Row> {
    let needed = report::median_u(needed);
    // "Local": no added round trips (the warm runs still read the manifest and TOCs).
    registry.set_rtt(Duration::ZERO);
    let mut local = Vec::new();
    for _ in 0..runs.clamp(1, 3) {
        methods::drop_page_cache()?;
        let s = methods::lazysnap_run(
            Path::new(LAZYSNAP),
            warm_root,
            &w.image.reference(&registry.addr, "lazy"),
            w,
        )?;
        local.push(s.seconds);
    }
    registry.set_rtt(rtt);
    let (fetched, _) = registry.take_counts();
    let local = report::median_f(&local);
    let seconds = needed as f64 * 8.0 / bps + rtt.as_secs_f64() + local;
    eprintln!(
        "coldstart: {} oracle: {:.1} MB needed, {local:.2} s local start ({:.1} MB fetched by the warm runs) -> {seconds:.2} s",
        w.name,
        needed as f64 / 1e6,
        fetched as f64 / 1e6
    );
    Ok(Row::new(w.name, "oracle", &[seconds], &[needed], &[1]))
}

/// `--render JSON`: the .md and .svg beside `json`, from its conditions and results.
fn render(json: &Path) -> Result<()> {
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(json)?)
        .with_context(|| format!("reading {}", json.display()))?;
    let rows: Vec<Row> = serde_json::from_value(doc["results"].clone())?;
    let table = report::markdown(&doc["conditions"], &rows);
    std::fs::write(json.with_extension("md"), &table)?;
    std::fs::write(json.with_extension("svg"), report::svg(&rows))?;
    println!("{table}");
    Ok(())
}

/// UTC date and time without a date crate.
fn chrono_free_now() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}
