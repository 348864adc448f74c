//! The snapshotter's metrics, registered in the process-wide registry (`crate::metrics`) on first
//! use so `GET /metrics` shows them beside the data path's.

use std::sync::LazyLock;

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts};

#[derive(Debug)]
pub(super) struct SnapshotMetrics {
    /// Layers mounted lazily through the remote handshake.
    pub lazy_layers: IntCounter,
    /// Layers containerd had to download and unpack, by reason (bounded set, see `remote`).
    pub fallbacks: IntCounterVec,
    /// Lazy layers mounted again after a restart, and those that could not be.
    pub restored: IntCounter,
    pub restore_failures: IntCounter,
    /// Lazy layers mounted now.
    pub mounted: IntGauge,
    /// Lazy layers whose uncompressed digest matched the chain ID they were committed under, and
    /// those whose did not (their snapshots are refused from then on).
    pub verified: IntCounter,
    pub verify_failures: IntCounter,
    /// Lazy layers whose Prepare found them already found (manifest and TOC read at the image's
    /// first Prepare, with the other layers, or at the CRI proxy's PullImage). Counted where
    /// layers are served (the layer host), so not named `snapshot_`: the service's page shows
    /// the host's.
    pub located_ahead: IntCounter,
}

pub(super) static METRICS: LazyLock<SnapshotMetrics> = LazyLock::new(|| {
    // Constant definitions: a failure is a programming error, caught by the unit test.
    let opts = |name: &str, help: &str| Opts::new(name, help).namespace("lazysnap");
    let m = SnapshotMetrics {
        lazy_layers: IntCounter::with_opts(opts(
            "snapshot_lazy_layers_total",
            "Layers mounted lazily instead of being downloaded by containerd.",
        ))
        .expect("valid metric"),
        fallbacks: IntCounterVec::new(
            opts(
                "snapshot_fallbacks_total",
                "Layers containerd downloaded and unpacked itself, by reason.",
            ),
            &["reason"],
        )
        .expect("valid metric"),
        restored: IntCounter::with_opts(opts(
            "snapshot_restored_layers_total",
            "Lazy layers mounted again when lazysnapd started.",
        ))
        .expect("valid metric"),
        restore_failures: IntCounter::with_opts(opts(
            "snapshot_restore_failures_total",
            "Lazy layers that could not be mounted again when lazysnapd started.",
        ))
        .expect("valid metric"),
        mounted: IntGauge::with_opts(opts("snapshot_mounted_layers", "Lazy layers mounted now."))
            .expect("valid metric"),
        verified: IntCounter::with_opts(opts(
            "snapshot_verified_layers_total",
            "Lazy layers whose uncompressed digest matched the diff_id their image config claims.",
        ))
        .expect("valid metric"),
        verify_failures: IntCounter::with_opts(opts(
            "snapshot_verify_failures_total",
            "Lazy layers whose uncompressed digest did not match the diff_id their image config \
             claims; their snapshots are refused.",
        ))
        .expect("valid metric"),
        located_ahead: IntCounter::with_opts(opts(
            "layers_found_ahead_total",
            "Lazy layers whose manifest and TOC were read ahead of their own Prepare, with the \
             image's other layers or at the CRI proxy's PullImage.",
        ))
        .expect("valid metric"),
    };
    let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
        Box::new(m.lazy_layers.clone()),
        Box::new(m.fallbacks.clone()),
        Box::new(m.restored.clone()),
        Box::new(m.restore_failures.clone()),
        Box::new(m.mounted.clone()),
        Box::new(m.verified.clone()),
        Box::new(m.verify_failures.clone()),
        Box::new(m.located_ahead.clone()),
    ];
    for c in collectors {
        if let Err(e) = crate::metrics::METRICS.registry.register(c) {
            tracing::warn!("cannot register a snapshot metric: {e}");
        }
    }
    m
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_metrics_render_in_the_shared_registry() {
        METRICS.fallbacks.with_label_values(&["not_lazy"]).inc();
        let text = crate::metrics::render();
        assert!(
            text.contains("lazysnap_snapshot_fallbacks_total{reason=\"not_lazy\"}"),
            "{text}"
        );
    }
}
