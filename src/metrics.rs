//! Prometheus metrics for the lazy data path, and a minimal `GET /metrics` endpoint.
//!
//! One process-wide registry: the fetcher, the cache and the file system record into it, and an
//! operator scrapes it. Label values are bounded (fetch kinds, FUSE operation names); per-layer
//! figures are labelled by the short layer digest, one series per mounted layer.

use std::sync::LazyLock;
use std::time::Instant;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Every metric lazysnap exports.
#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    /// Bytes received from registries, by kind: `on_demand`, `prefetch` (the TOC's start-up set),
    /// `profile` (a start-up profile's chunks), `background`.
    pub fetch_bytes: IntCounterVec,
    /// Range requests made, by kind.
    pub fetch_requests: IntCounterVec,
    /// Seconds from asking a registry for a range to having it verified.
    pub fetch_seconds: Histogram,
    pub cache_hits: IntCounter,
    pub cache_misses: IntCounter,
    /// Chunks whose bytes did not match their TOC digest (dropped, never served).
    pub verify_failures: IntCounter,
    /// Per mounted layer: bytes of its blob fetched so far, and the blob's size.
    pub layer_fetched_bytes: IntGaugeVec,
    pub layer_size_bytes: IntGaugeVec,
    /// Per layer: 1 once its background fetch finished and the blob matched its digest.
    pub layer_complete: IntGaugeVec,
    /// Background completions that failed and were tried again after a backoff.
    pub background_retries: IntCounter,
    /// FUSE operations served, by operation, and their latency.
    pub fuse_ops: IntCounterVec,
    pub fuse_seconds: HistogramVec,
    /// Opens answered with FUSE passthrough (the kernel then reads the file without us).
    pub passthrough_opens: IntCounter,
    /// Files made ready for passthrough: checked, or assembled from their verified chunks.
    pub passthrough_files: IntCounter,
    /// Start-up profile lookups at mount, by result: `found`, `none`, `error`.
    pub profile_lookups: IntCounterVec,
    /// Profiles not used, by reason: `unreachable`, `invalid`, `too_large`, `foreign`, `unreadable`.
    pub profile_ignored: IntCounterVec,
    /// Profile entries at prefetch, by result: `fetched`, `held` (cached or already on their way),
    /// `unknown` (the layer's TOC has no such chunk: ignored).
    pub profile_chunks: IntCounterVec,
    /// ELF objects the loader prefetch met, by result: `parsed` (its headers were read),
    /// `found` (a loader or library it names was found in the image and is being fetched),
    /// `missing` (one it names is not in the image).
    pub loader_objects: IntCounterVec,
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help).namespace("lazysnap"), labels)
        .expect("valid metric definition")
}

/// The process-wide metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    // The definitions below are constants: a failure here is a programming error, caught by the
    // unit test, not something input can cause.
    let buckets = vec![
        0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ];
    let m = Metrics {
        registry: Registry::new(),
        fetch_bytes: counter_vec(
            "fetch_bytes_total",
            "Bytes received from registries, by kind.",
            &["kind"],
        ),
        fetch_requests: counter_vec(
            "fetch_requests_total",
            "Registry range requests, by kind.",
            &["kind"],
        ),
        fetch_seconds: Histogram::with_opts(
            HistogramOpts::new("fetch_seconds", "Range request latency, to verified bytes.")
                .namespace("lazysnap")
                .buckets(buckets.clone()),
        )
        .expect("valid metric definition"),
        cache_hits: IntCounter::with_opts(
            Opts::new("cache_hits_total", "Chunk reads served from the cache.")
                .namespace("lazysnap"),
        )
        .expect("valid metric definition"),
        cache_misses: IntCounter::with_opts(
            Opts::new("cache_misses_total", "Chunk reads that needed a fetch.")
                .namespace("lazysnap"),
        )
        .expect("valid metric definition"),
        verify_failures: IntCounter::with_opts(
            Opts::new(
                "verify_failures_total",
                "Chunks that failed digest verification (never served).",
            )
            .namespace("lazysnap"),
        )
        .expect("valid metric definition"),
        layer_fetched_bytes: IntGaugeVec::new(
            Opts::new(
                "layer_fetched_bytes",
                "Bytes of a layer blob fetched so far.",
            )
            .namespace("lazysnap"),
            &["layer"],
        )
        .expect("valid metric definition"),
        layer_size_bytes: IntGaugeVec::new(
            Opts::new("layer_size_bytes", "Size of a mounted layer blob.").namespace("lazysnap"),
            &["layer"],
        )
        .expect("valid metric definition"),
        layer_complete: IntGaugeVec::new(
            Opts::new(
                "layer_complete",
                "1 once a layer is fetched whole and verified against its digest.",
            )
            .namespace("lazysnap"),
            &["layer"],
        )
        .expect("valid metric definition"),
        background_retries: IntCounter::with_opts(
            Opts::new(
                "background_retries_total",
                "Background layer completions that failed and were tried again.",
            )
            .namespace("lazysnap"),
        )
        .expect("valid metric definition"),
        fuse_ops: counter_vec(
            "fuse_operations_total",
            "FUSE operations served, by operation.",
            &["op"],
        ),
        fuse_seconds: HistogramVec::new(
            HistogramOpts::new("fuse_operation_seconds", "FUSE operation latency.")
                .namespace("lazysnap")
                .buckets(buckets),
            &["op"],
        )
        .expect("valid metric definition"),
        passthrough_opens: IntCounter::with_opts(
            Opts::new(
                "fuse_passthrough_opens_total",
                "Opens answered with FUSE passthrough.",
            )
            .namespace("lazysnap"),
        )
        .expect("valid metric definition"),
        passthrough_files: IntCounter::with_opts(
            Opts::new(
                "passthrough_files_total",
                "Files made ready for passthrough from verified chunks.",
            )
            .namespace("lazysnap"),
        )
        .expect("valid metric definition"),
        profile_lookups: counter_vec(
            "profile_lookups_total",
            "Start-up profile lookups at mount, by result.",
            &["result"],
        ),
        profile_ignored: counter_vec(
            "profile_ignored_total",
            "Start-up profiles not used, by reason.",
            &["reason"],
        ),
        profile_chunks: counter_vec(
            "profile_chunks_total",
            "Start-up profile entries at prefetch, by result.",
            &["result"],
        ),
        loader_objects: counter_vec(
            "loader_objects_total",
            "ELF objects the loader prefetch met, by result.",
            &["result"],
        ),
    };
    let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
        Box::new(m.fetch_bytes.clone()),
        Box::new(m.fetch_requests.clone()),
        Box::new(m.fetch_seconds.clone()),
        Box::new(m.cache_hits.clone()),
        Box::new(m.cache_misses.clone()),
        Box::new(m.verify_failures.clone()),
        Box::new(m.layer_fetched_bytes.clone()),
        Box::new(m.layer_size_bytes.clone()),
        Box::new(m.layer_complete.clone()),
        Box::new(m.background_retries.clone()),
        Box::new(m.fuse_ops.clone()),
        Box::new(m.fuse_seconds.clone()),
        Box::new(m.passthrough_opens.clone()),
        Box::new(m.passthrough_files.clone()),
        Box::new(m.profile_lookups.clone()),
        Box::new(m.profile_ignored.clone()),
        Box::new(m.profile_chunks.clone()),
        Box::new(m.loader_objects.clone()),
    ];
    for c in collectors {
        m.registry.register(c).expect("metric names are unique");
    }
    m
});

/// The FUSE operations the layer file system serves, as labelled in the metrics.
pub const FUSE_OPS: [&str; 12] = [
    "lookup",
    "getattr",
    "readlink",
    "open",
    "read",
    "release",
    "opendir",
    "readdir",
    "statfs",
    "getxattr",
    "listxattr",
    "access",
];

/// Each FUSE operation's counter and histogram, looked up once: operations are the hottest
/// thing counted (a `find` makes hundreds of thousands).
static FUSE_OP_METRICS: LazyLock<Vec<(IntCounter, Histogram)>> = LazyLock::new(|| {
    FUSE_OPS
        .iter()
        .map(|op| {
            (
                METRICS.fuse_ops.with_label_values(&[op]),
                METRICS.fuse_seconds.with_label_values(&[op]),
            )
        })
        .collect()
});

/// One FUSE operation being served: counted when it starts, its latency recorded when dropped
/// (for a reply sent from a task, move it into the task).
#[derive(Debug)]
pub struct FuseOp {
    histogram: &'static Histogram,
    started: Instant,
}

impl FuseOp {
    /// Starts `op`, one of [`FUSE_OPS`] (others are counted as `other`).
    pub fn start(op: &str) -> Self {
        let metrics = &*FUSE_OP_METRICS;
        let index = FUSE_OPS.iter().position(|o| *o == op);
        let (counter, histogram) = match index {
            Some(i) => (&metrics[i].0, &metrics[i].1),
            None => {
                static OTHER: LazyLock<(IntCounter, Histogram)> = LazyLock::new(|| {
                    (
                        METRICS.fuse_ops.with_label_values(&["other"]),
                        METRICS.fuse_seconds.with_label_values(&["other"]),
                    )
                });
                (&OTHER.0, &OTHER.1)
            }
        };
        counter.inc();
        Self {
            histogram,
            started: Instant::now(),
        }
    }
}

impl Drop for FuseOp {
    fn drop(&mut self) {
        self.histogram.observe(self.started.elapsed().as_secs_f64());
    }
}

/// The metrics in Prometheus text format.
pub fn render() -> String {
    let mut out = Vec::new();
    let _ = TextEncoder::new().encode(&METRICS.registry.gather(), &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Serves `GET /metrics` on `listener` until the task is dropped. Anything else gets 404.
pub async fn serve(listener: tokio::net::TcpListener) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let mut request = [0u8; 2048];
            let n = stream.read(&mut request).await.unwrap_or(0);
            let head = String::from_utf8_lossy(&request[..n]);
            let (status, body) =
                if head.starts_with("GET /metrics ") || head.starts_with("GET /metrics?") {
                    ("200 OK", render())
                } else {
                    ("404 Not Found", "try GET /metrics\n".to_owned())
                };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_registers_and_renders() {
        METRICS
            .fetch_bytes
            .with_label_values(&["on_demand"])
            .inc_by(3);
        METRICS.verify_failures.inc();
        let text = render();
        assert!(
            text.contains("lazysnap_fetch_bytes_total{kind=\"on_demand\"}"),
            "{text}"
        );
        assert!(text.contains("lazysnap_verify_failures_total"), "{text}");
    }

    #[test]
    fn a_fuse_op_is_counted_and_timed() {
        let count = || METRICS.fuse_ops.with_label_values(&["statfs"]).get();
        let timed = || {
            METRICS
                .fuse_seconds
                .with_label_values(&["statfs"])
                .get_sample_count()
        };
        let (c, t) = (count(), timed());
        let op = FuseOp::start("statfs");
        assert_eq!((count(), timed()), (c + 1, t), "counted at the start");
        drop(op);
        assert_eq!(timed(), t + 1, "timed when done");
        drop(FuseOp::start("no-such-op"));
        assert!(METRICS.fuse_ops.with_label_values(&["other"]).get() >= 1);
    }

    #[tokio::test]
    async fn the_endpoint_answers_get_metrics_and_404_otherwise() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener));
        METRICS.cache_hits.inc();
        for (path, want) in [("/metrics", "200 OK"), ("/other", "404")] {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            assert!(out.contains(want), "{path}: {out}");
        }
        server.abort();
    }
}
