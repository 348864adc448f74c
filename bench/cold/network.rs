//! A shaped network of our own: a `docker-registry` in a network namespace made for this run,
//! behind a veth pair with link-local addresses, shaped with `tc tbf` (this kernel has no netem),
//! and a delaying TCP proxy on 127.0.0.1 that adds the round-trip time. Clients (containerd,
//! lazysnap) talk to the proxy, so to them the registry is on loopback over plain HTTP.
//!
//! Everything is torn down on drop: the proxy task, the registry process, the namespace (which
//! takes the veth pair and its qdiscs with it).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const HOST_ADDR: &str = "169.254.77.1";
const REGISTRY_ADDR: &str = "169.254.77.2";
const REGISTRY_PORT: u16 = 5000;

fn sh(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn ip(args: &[&str]) -> Result<()> {
    sh(Command::new("ip").args(args))
}

/// The namespace, the registry inside it and the proxy in front of it.
pub struct ShapedRegistry {
    netns: String,
    host_veth: String,
    ns_veth: String,
    registry: Option<Child>,
    proxy: tokio::task::JoinHandle<()>,
    delay_us: Arc<AtomicU64>,
    counters: Arc<Counters>,
    /// `127.0.0.1:PORT`: the address clients use.
    pub addr: String,
}

impl ShapedRegistry {
    /// Makes the namespace and starts the registry with its storage in `storage` (kept, so
    /// images pushed once are reused by later runs). No shaping yet: see [`Self::shape`].
    pub async fn start(storage: &Path) -> Result<Self> {
        let id = std::process::id() % 100_000;
        let netns = format!("lazysnap-bench-{id}");
        let (host_veth, ns_veth) = (format!("lzbh{id}"), format!("lzbn{id}"));
        ip(&["netns", "add", &netns])?;
        let mut me = Self {
            netns,
            host_veth,
            ns_veth,
            registry: None,
            proxy: tokio::spawn(async {}),
            delay_us: Arc::new(AtomicU64::new(0)),
            counters: Arc::default(),
            addr: String::new(),
        };
        let (ns, h, n) = (me.netns.clone(), me.host_veth.clone(), me.ns_veth.clone());
        ip(&["link", "add", &h, "type", "veth", "peer", "name", &n])?;
        ip(&["link", "set", &n, "netns", &ns])?;
        ip(&["addr", "add", &format!("{HOST_ADDR}/30"), "dev", &h])?;
        ip(&["link", "set", &h, "up"])?;
        let inside = |args: &[&str]| {
            sh(Command::new("ip")
                .args(["netns", "exec", &ns, "ip"])
                .args(args))
        };
        inside(&["addr", "add", &format!("{REGISTRY_ADDR}/30"), "dev", &n])?;
        inside(&["link", "set", &n, "up"])?;
        inside(&["link", "set", "lo", "up"])?;

        std::fs::create_dir_all(storage)?;
        let config = storage.with_extension("yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  \
                 delete:\n    enabled: true\nhttp:\n  addr: {REGISTRY_ADDR}:{REGISTRY_PORT}\n",
                storage.display()
            ),
        )?;
        let log = std::fs::File::create(storage.with_extension("log"))?;
        me.registry = Some(
            Command::new("ip")
                .args(["netns", "exec", &ns, "docker-registry", "serve"])
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("starting docker-registry in the namespace")?,
        );

        let listener = TcpListener::bind("127.0.0.1:0").await?;
        me.addr = listener.local_addr()?.to_string();
        let (delay, counters) = (me.delay_us.clone(), me.counters.clone());
        me.proxy = tokio::spawn(proxy(listener, delay, counters));
        me.wait_ready().await?;
        Ok(me)
    }

    async fn wait_ready(&self) -> Result<()> {
        let start = Instant::now();
        loop {
            if let Ok(mut s) = TcpStream::connect(&self.addr).await {
                let req = "GET /v2/ HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n";
                if s.write_all(req.as_bytes()).await.is_ok() {
                    let mut buf = vec![0; 64];
                    if let Ok(n) = s.read(&mut buf).await {
                        if buf[..n].starts_with(b"HTTP/1.1 200") {
                            return Ok(());
                        }
                    }
                }
            }
            if start.elapsed() > Duration::from_secs(20) {
                bail!("the registry in {} did not answer", self.netns);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Shapes both directions of the link to `rate` (a tc rate such as `100mbit`) and makes the
    /// proxy add `rtt` per round trip (half each way, plus one round trip per new connection).
    pub fn shape(&self, rate: &str, bps: f64, rtt: Duration) -> Result<()> {
        let burst = tbf_burst(bps);
        let tbf = [
            "root", "tbf", "rate", rate, "burst", &burst, "latency", "50ms",
        ];
        sh(Command::new("tc")
            .args(["qdisc", "replace", "dev", &self.host_veth])
            .args(tbf))?;
        sh(Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.netns,
                "tc",
                "qdisc",
                "replace",
                "dev",
            ])
            .arg(&self.ns_veth)
            .args(tbf))?;
        self.set_rtt(rtt);
        Ok(())
    }

    /// The rate a single download achieves through the shaped link and the proxy: the first
    /// `max_bytes` of the blob at `path` (`/v2/REPO/blobs/DIGEST`), timed from its first byte so
    /// that the round trips before it do not count. Returns bits per second.
    pub fn measured_rate(&self, path: &str, max_bytes: u64) -> Result<f64> {
        let out = Command::new("curl")
            .args(["-sS", "--noproxy", "*", "-o", "/dev/null", "-r"])
            .arg(format!("0-{}", max_bytes.saturating_sub(1)))
            .args([
                "-w",
                "%{http_code} %{size_download} %{time_starttransfer} %{time_total}",
            ])
            .arg(format!("http://{}{path}", self.addr))
            .output()
            .context("running curl")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let f: Vec<&str> = text.split_whitespace().collect();
        if !out.status.success() || f.len() != 4 || !f[0].starts_with('2') {
            bail!(
                "measuring the link with GET {path}: {text} {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let bytes: f64 = f[1].parse()?;
        let seconds = f[3].parse::<f64>()? - f[2].parse::<f64>()?;
        if seconds <= 0.0 {
            bail!("measuring the link: {bytes} bytes in no time");
        }
        Ok(bytes * 8.0 / seconds)
    }

    /// Sets the proxy's added round-trip time (for new connections).
    pub fn set_rtt(&self, rtt: Duration) {
        self.delay_us
            .store(rtt.as_micros() as u64 / 2, Ordering::Relaxed);
    }

    /// Bytes sent to clients and requests received since the last call, then zeroed.
    pub fn take_counts(&self) -> (u64, u64) {
        (
            self.counters.bytes.swap(0, Ordering::Relaxed),
            self.counters.requests.swap(0, Ordering::Relaxed),
        )
    }
}

/// tbf's bucket: at least the 128 KiB that gives ~95 % of 100 Mbit/s, and at least 10 ms of
/// traffic at the rate, so that the bucket outlasts the gaps between the qdisc's wake-ups at any
/// rate (1 Gbit/s: 1.25 MB; measured 986 Mbit/s through the veth and the proxy).
fn tbf_burst(bps: f64) -> String {
    let bytes = (bps / 8.0 / 100.0).max(128.0 * 1024.0);
    format!("{}", bytes.ceil() as u64)
}

impl Drop for ShapedRegistry {
    fn drop(&mut self) {
        self.proxy.abort();
        if let Some(mut r) = self.registry.take() {
            // `ip netns exec` execs the registry, so this is the registry's own pid.
            let _ = r.kill();
            let _ = r.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_veth])
            .stderr(Stdio::null())
            .status();
    }
}

/// Accepts on `listener` and forwards each connection to the registry, each direction delayed
/// by `delay_us`: data is timestamped when read and written `delay` later, so the delay adds
/// latency without limiting throughput.
async fn proxy(listener: TcpListener, delay_us: Arc<AtomicU64>, counters: Arc<Counters>) {
    while let Ok((client, _)) = listener.accept().await {
        let delay = Duration::from_micros(delay_us.load(Ordering::Relaxed));
        let counters = counters.clone();
        tokio::spawn(async move {
            let Ok(upstream) = TcpStream::connect((REGISTRY_ADDR, REGISTRY_PORT)).await else {
                return;
            };
            // A new TCP connection costs a round trip (SYN, SYN-ACK) before the request goes.
            tokio::time::sleep(delay * 2).await;
            let _ = client.set_nodelay(true);
            let _ = upstream.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (ur, uw) = upstream.into_split();
            tokio::join!(
                pump(cr, uw, delay, Direction::Up, &counters),
                pump(ur, cw, delay, Direction::Down, &counters)
            );
        });
    }
}

/// What the proxy saw: the independent count of bytes fetched and requests made by any client.
#[derive(Debug, Default)]
struct Counters {
    bytes: AtomicU64,
    requests: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Up,
    Down,
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
    direction: Direction,
    counters: &Counters,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Instant, Vec<u8>)>(1024);
    let writer = async move {
        while let Some((at, data)) = rx.recv().await {
            tokio::time::sleep_until((at + delay).into()).await;
            if to.write_all(&data).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    };
    let reader = async move {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    match direction {
                        // Request lines end in " HTTP/1.1\r\n"; header values do not.
                        Direction::Up => counters.requests.fetch_add(
                            buf[..n]
                                .windows(11)
                                .filter(|w| w == b" HTTP/1.1\r\n")
                                .count() as u64,
                            Ordering::Relaxed,
                        ),
                        Direction::Down => counters.bytes.fetch_add(n as u64, Ordering::Relaxed),
                    };
                    if tx.send((Instant::now(), buf[..n].to_vec())).await.is_err() {
                        break;
                    }
                }
            }
        }
    };
    tokio::join!(reader, writer);
}
