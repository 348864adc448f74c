//! `bench/coldstart`: cold-start latency of real workloads, lazysnap side by side with a full
//! pull and with the physical limit, on a shaped network of the benchmark's own.
//!
//! ```text
//! bench/coldstart [--quick] [--rate 100mbit] [--rtt-ms 20] [--runs N] [--out FILE]
//! ```
//!
//! The registry runs in a network namespace made for the run, behind a veth pair shaped with
//! `tc tbf`, and a delaying proxy on loopback adds the round-trip time (see `network.rs`). Each
//! run of each method starts with every cache dropped: the page cache, lazysnap's state root,
//! containerd's content store and snapshots (a fresh containerd root). Methods alternate within
//! each round so that the machine's noise falls on all of them alike.
//!
//! The oracle is the physical limit: the compressed bytes of the chunks the workload's reads
//! needed (lazysnap's own count), sent at the link rate, plus one round trip, plus the time the
//! same start takes when all of those bytes are already local.

mod methods;
mod network;
mod report;
mod workloads;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::json;

use methods::{Containerd, Sample};
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
    /// Skip methods by name (full-pull, lazysnap, lazysnap-run).
    #[arg(long)]
    skip: Vec<String>,
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
    let workloads = workloads::all(args.quick);
    workloads::publish(
        &workloads,
        &registry.addr,
        Path::new(LAZYSNAP),
        repo_root,
        &cache,
    )?;
    registry.shape(&args.rate, rtt)?;
    registry.take_counts(); // publishing is not part of any measurement
    eprintln!(
        "coldstart: link shaped to {} with {} ms RTT",
        args.rate, args.rtt_ms
    );

    let scratch = tempfile::Builder::new().prefix("coldstart-").tempdir()?;
    let lazysnapd = LAZYSNAPD.map(PathBuf::from).filter(|p| p.exists());
    let mut methods = vec!["full-pull", "lazysnap-run"];
    if lazysnapd.is_some() {
        methods.insert(1, "lazysnap");
    }
    methods.retain(|m| !args.skip.iter().any(|s| s == m));
    let mut rows = Vec::new();
    for w in &workloads {
        let mut seconds: Vec<Vec<f64>> = vec![Vec::new(); methods.len()];
        let mut bytes: Vec<Vec<u64>> = vec![Vec::new(); methods.len()];
        let mut requests: Vec<Vec<u64>> = vec![Vec::new(); methods.len()];
        let mut needed = Vec::new();
        let mut last_root = None;
        for run in 0..args.runs {
            for (mi, method) in methods.iter().enumerate() {
                let dir = scratch.path().join(format!("{}-{method}-{run}", w.name));
                let id = format!("cs-{}-{run}", w.name);
                let sample = measure(method, w, &registry.addr, &dir, &id, lazysnapd.as_deref())
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
        "rtt_ms": args.rtt_ms,
        "runs": args.runs,
        "quick": args.quick,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "date": chrono_free_now(),
        "lazysnap_run": "--no-background-fetch --net none",
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

/// One cold start of `w` by `method`, after dropping every cache.
fn measure(
    method: &str,
    w: &workloads::Workload,
    addr: &str,
    dir: &Path,
    id: &str,
    lazysnapd: Option<&Path>,
) -> Result<Sample> {
    match method {
        "full-pull" => {
            let containerd = Containerd::start(dir, None)?;
            methods::drop_page_cache()?;
            containerd.full_pull(&w.image.reference(addr, "plain"), w, id)
        }
        "lazysnap" => {
            let lazysnapd = lazysnapd.context("no lazysnapd binary")?;
            let daemon = methods::Lazysnapd::start(lazysnapd, &dir.join("lazysnapd"))?;
            let containerd = Containerd::start(&dir.join("containerd"), Some(&daemon.socket))?;
            methods::drop_page_cache()?;
            let sample = containerd.lazy_pull(&w.image.reference(addr, "lazy"), w, id);
            drop(containerd);
            sample
        }
        "lazysnap-run" => {
            methods::drop_page_cache()?;
            methods::lazysnap_run(
                Path::new(LAZYSNAP),
                dir,
                &w.image.reference(addr, "lazy"),
                w,
            )
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

/// UTC date and time without a date crate.
fn chrono_free_now() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}
