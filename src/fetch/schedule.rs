//! Who gets the link: on-demand reads first, background completion with what is left.
//!
//! One [`Scheduler`] per node (per `lazysnap mount`/`run` process, per layer host), handed to every
//! [`super::LayerFetcher`] through [`super::FetchConfig`], so a reader of `fetch` sees the policy
//! it obeys and two mounts in one test process do not steer each other.
//!
//! The policy: a background stream starts, and resumes after a pause, only once no on-demand read
//! is waiting and none began (and no layer was mounted) for the quiet period: a container's
//! start-up reads come in bursts, and a stream that fills the link between them delays each next
//! burst by the data queued ahead of it. The quiet period is a property of the node's recent
//! activity, not a toll per stream: once the node is quiet, stream after stream starts at once.
//! Streams share a budget of bytes in flight rather than a fixed count, so many small layers
//! stream side by side (their cost is round trips, not bandwidth) while a few large ones share the
//! link as before; each stream holds a read block and up to one compressed chunk in memory, and
//! the stream count cap keeps that independent of how many layers are mounted.
//!
//! A start-up profile's prefetch sits between the two: it runs ahead of the container's reads, so
//! it starts at once (no quiet period) on a few connections ([`ScheduleConfig::profile_requests`]
//! node-wide), but it starts no new request while an on-demand request of its own is in flight
//! (a read that joined a prefetch request waits on that request, which is already on the wire,
//! so it does not hold prefetch back), and background streams wait until no profile is being
//! prefetched.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::turns::{Turn, Turns};

/// TOCs decoded at once on a node.
pub const TOC_DECODES: usize = 2;

/// How the background shares the link.
#[derive(Debug, Clone, Copy)]
pub struct ScheduleConfig {
    /// How long no on-demand read (and no mount) must have begun before a stream starts or resumes.
    pub quiet: Duration,
    /// Blob bytes that background streams may have outstanding at once; a stream counts its blob
    /// size, up to `stream_weight_cap`.
    pub budget_bytes: u64,
    /// The most one stream counts against the budget, so that a large layer does not wait for
    /// the whole budget and two large layers still stream side by side.
    pub stream_weight_cap: u64,
    /// The most streams at once, however small their layers.
    pub max_streams: usize,
    /// Profile prefetch range requests in flight at once on the node: enough connections to keep
    /// the link busy across round trips, few enough that each arrives soon. 8: a profile's early
    /// windows are many small ranges (python-import: ~75 requests), each mostly round trip; at
    /// 100 Mbit/s and 20 ms RTT, 8 took python-import's profiled start from 1.44 to 1.35 s
    /// through containerd (4 before; 16 measured no better; python-hello, link-bound, unchanged).
    pub profile_requests: usize,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            quiet: Duration::from_millis(1000),
            budget_bytes: 32 << 20,
            stream_weight_cap: 16 << 20,
            max_streams: 16,
            profile_requests: 8,
        }
    }
}

/// The node's link policy; clones share it.
#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

struct Inner {
    config: ScheduleConfig,
    /// On-demand reads waiting now.
    busy: AtomicU64,
    /// When the last on-demand read (or mount) began, in ms since `epoch`.
    last_ms: AtomicU64,
    epoch: Instant,
    /// The byte budget, in KiB (a semaphore counts in u32 units).
    budget: Arc<Semaphore>,
    streams: Arc<Semaphore>,
    /// TOCs being decoded at once (see [`Scheduler::toc_decode`]).
    toc_decodes: Arc<Semaphore>,
    /// On-demand range requests on the wire now (not the reads joined to them).
    demand_requests: AtomicU64,
    /// Woken when `demand_requests` drops to zero.
    demand_idle: Notify,
    /// Profile prefetches running now (calls, not requests): background streams wait for them.
    profiles: AtomicU64,
    /// Profile prefetch requests in flight (see [`ScheduleConfig::profile_requests`]), handed
    /// out earliest access first.
    profile_turns: Turns,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("config", &self.inner.config)
            .field("busy", &self.inner.busy.load(Ordering::Relaxed))
            .finish()
    }
}

impl Default for Scheduler {
    fn default() -> Self {
        Self::new(ScheduleConfig::default())
    }
}

/// An on-demand read in progress; background streams pause until it is dropped.
#[derive(Debug)]
pub struct DemandGuard(Arc<Inner>);

impl Drop for DemandGuard {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner").finish_non_exhaustive()
    }
}

/// An on-demand range request on the wire; profile prefetch starts nothing new until it is dropped.
#[derive(Debug)]
pub struct DemandRequest(Arc<Inner>);

impl Drop for DemandRequest {
    fn drop(&mut self) {
        if self.0.demand_requests.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.demand_idle.notify_waiters();
        }
    }
}

/// A profile prefetch in progress; background streams wait until it is dropped.
#[derive(Debug)]
pub struct ProfileGuard(Arc<Inner>);

impl Drop for ProfileGuard {
    fn drop(&mut self) {
        self.0.profiles.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A background stream's share of the link, given back when dropped.
#[derive(Debug)]
pub struct StreamSlot {
    _stream: OwnedSemaphorePermit,
    _budget: OwnedSemaphorePermit,
}

impl Scheduler {
    pub fn new(config: ScheduleConfig) -> Self {
        let kib = u32::try_from(config.budget_bytes.div_ceil(1024).max(1)).unwrap_or(u32::MAX);
        Self {
            inner: Arc::new(Inner {
                config,
                busy: AtomicU64::new(0),
                last_ms: AtomicU64::new(0),
                epoch: Instant::now(),
                budget: Arc::new(Semaphore::new(kib as usize)),
                streams: Arc::new(Semaphore::new(config.max_streams.max(1))),
                toc_decodes: Arc::new(Semaphore::new(TOC_DECODES)),
                demand_requests: AtomicU64::new(0),
                demand_idle: Notify::new(),
                profiles: AtomicU64::new(0),
                profile_turns: Turns::new(config.profile_requests),
            }),
        }
    }

    /// A turn to decode a TOC. Decoding a TOC at the limits holds several hundred MiB and seconds
    /// of CPU (docs/configuration.md), and every image on the node may bring one: taking turns
    /// bounds what hostile TOCs can hold at once to `TOC_DECODES` of them, whatever arrives.
    pub async fn toc_decode(&self) -> Option<OwnedSemaphorePermit> {
        self.inner.toc_decodes.clone().acquire_owned().await.ok()
    }

    pub fn config(&self) -> &ScheduleConfig {
        &self.inner.config
    }

    fn now_ms(&self) -> u64 {
        self.inner.epoch.elapsed().as_millis() as u64
    }

    /// An on-demand read begins; it counts as waiting until the guard is dropped.
    pub fn begin_demand(&self) -> DemandGuard {
        self.inner.busy.fetch_add(1, Ordering::Relaxed);
        self.touch();
        DemandGuard(self.inner.clone())
    }

    /// Demand is about to come (a layer was just mounted: its container reads next), so the quiet
    /// period starts again from now.
    pub fn touch(&self) {
        self.inner
            .last_ms
            .fetch_max(self.now_ms(), Ordering::Relaxed);
    }

    /// Whether an on-demand read is waiting, or a profile is being prefetched, now: what a
    /// background stream pauses for.
    pub fn busy(&self) -> bool {
        self.inner.busy.load(Ordering::Relaxed) > 0
            || self.inner.profiles.load(Ordering::Relaxed) > 0
    }

    /// Whether a start-up profile is being prefetched on the node now: the heuristics for starts
    /// without one (directory read-ahead, the loader prefetch) stand aside, since their requests
    /// in blob order would take chunks out of the profile's access order.
    pub fn profiling(&self) -> bool {
        self.inner.profiles.load(Ordering::Relaxed) > 0
    }

    /// An on-demand range request goes on the wire; it counts until the guard is dropped.
    pub fn begin_demand_request(&self) -> DemandRequest {
        self.inner.demand_requests.fetch_add(1, Ordering::AcqRel);
        DemandRequest(self.inner.clone())
    }

    /// A profile prefetch begins; background streams wait until the guard is dropped.
    pub fn begin_profile(&self) -> ProfileGuard {
        self.inner.profiles.fetch_add(1, Ordering::Relaxed);
        ProfileGuard(self.inner.clone())
    }

    /// A turn to put one profile prefetch request on the wire: waits for one of the node's
    /// [`ScheduleConfig::profile_requests`] turns (the waiter whose request start-up reads first,
    /// by `at_ms`, goes first, whatever its layer), then until no on-demand request is in flight
    /// (an on-demand read goes first). Hold the turn until the request is done.
    pub async fn profile_turn(&self, at_ms: u64) -> Turn {
        let turn = self.inner.profile_turns.take(at_ms).await;
        self.wait_no_demand_request().await;
        turn
    }

    /// Returns once no on-demand range request is in flight.
    async fn wait_no_demand_request(&self) {
        loop {
            let idle = self.inner.demand_idle.notified();
            tokio::pin!(idle);
            // Registered before the check, so a drop to zero in between still wakes us.
            idle.as_mut().enable();
            if self.inner.demand_requests.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }

    /// Waits until no on-demand read is waiting, no profile is being prefetched, and no read
    /// began for the quiet period. Returns at once on a node that has been quiet that long.
    pub async fn wait_quiet(&self) {
        let quiet = self.inner.config.quiet.as_millis() as u64;
        loop {
            let since = self
                .now_ms()
                .saturating_sub(self.inner.last_ms.load(Ordering::Relaxed));
            if !self.busy() && since >= quiet {
                return;
            }
            tokio::time::sleep(Duration::from_millis((quiet - since.min(quiet)).max(5))).await;
        }
    }

    /// What a stream of a `blob_size`-byte blob counts against the budget, in KiB.
    fn weight_kib(&self, blob_size: u64) -> u32 {
        let config = &self.inner.config;
        let bytes = blob_size
            .min(config.stream_weight_cap)
            .min(config.budget_bytes);
        u32::try_from(bytes.div_ceil(1024).max(1)).unwrap_or(u32::MAX)
    }

    /// Waits for room to stream a `blob_size`-byte blob.
    pub async fn stream_slot(&self, blob_size: u64) -> StreamSlot {
        let weight = self.weight_kib(blob_size);
        // Neither semaphore is ever closed, so acquiring cannot fail; the count first, so a
        // stream waiting for a count does not sit on budget that others could use.
        let stream = loop {
            if let Ok(p) = self.inner.streams.clone().acquire_owned().await {
                break p;
            }
        };
        let budget = loop {
            if let Ok(p) = self.inner.budget.clone().acquire_many_owned(weight).await {
                break p;
            }
        };
        StreamSlot {
            _stream: stream,
            _budget: budget,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tocs_are_decoded_a_bounded_few_at_a_time() {
        let s = Scheduler::default();
        let mut turns = Vec::new();
        for _ in 0..TOC_DECODES {
            turns.push(s.toc_decode().await.expect("a turn"));
        }
        let waiting = tokio::time::timeout(Duration::from_millis(50), s.toc_decode()).await;
        assert!(waiting.is_err(), "a decode past the bound must wait");
        drop(turns.pop());
        let next = tokio::time::timeout(Duration::from_secs(5), s.toc_decode()).await;
        assert!(
            matches!(next, Ok(Some(_))),
            "a finished decode gives its turn"
        );
    }

    #[tokio::test]
    async fn the_quiet_period_follows_activity_not_each_stream() {
        let s = Scheduler::new(ScheduleConfig {
            quiet: Duration::from_millis(500),
            ..ScheduleConfig::default()
        });
        tokio::time::sleep(Duration::from_millis(550)).await;
        // A node quiet for the period: one stream after another starts at once.
        let start = Instant::now();
        for _ in 0..5 {
            s.wait_quiet().await;
        }
        assert!(
            start.elapsed() < Duration::from_millis(400),
            "{:?}",
            start.elapsed()
        );
        // A mount (or a read) starts the period again.
        s.touch();
        let start = Instant::now();
        s.wait_quiet().await;
        assert!(
            start.elapsed() >= Duration::from_millis(450),
            "{:?}",
            start.elapsed()
        );
        // A read still waiting holds every stream back, however long it waits.
        let guard = s.begin_demand();
        let waiter = tokio::spawn({
            let s = s.clone();
            async move { s.wait_quiet().await }
        });
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(!waiter.is_finished(), "a stream waits for a waiting read");
        drop(guard);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the stream goes on after the read")
            .unwrap();
    }

    #[tokio::test]
    async fn small_streams_share_the_budget_and_large_ones_take_their_cap() {
        let s = Scheduler::new(ScheduleConfig {
            quiet: Duration::ZERO,
            budget_bytes: 1 << 20,
            stream_weight_cap: 512 << 10,
            max_streams: 8,
            ..ScheduleConfig::default()
        });
        // Eight 64 KiB layers stream at once (the count, not the budget, limits them).
        let mut small = Vec::new();
        for _ in 0..8 {
            small.push(s.stream_slot(64 << 10).await);
        }
        assert_eq!(s.inner.streams.available_permits(), 0);
        drop(small);
        // Two large layers fill the budget; a third waits.
        let a = s.stream_slot(1 << 30).await;
        let _b = s.stream_slot(1 << 30).await;
        let third = tokio::time::timeout(Duration::from_millis(50), s.stream_slot(1 << 30)).await;
        assert!(third.is_err(), "the budget is spent");
        drop(a);
        let third = tokio::time::timeout(Duration::from_millis(500), s.stream_slot(1 << 30)).await;
        assert!(third.is_ok(), "a finished stream gives its share back");
    }

    #[tokio::test]
    async fn profile_requests_wait_for_on_demand_requests_and_hold_streams_back() {
        let s = Scheduler::new(ScheduleConfig {
            quiet: Duration::ZERO,
            profile_requests: 2,
            ..ScheduleConfig::default()
        });
        // At most `profile_requests` turns at once.
        let a = s.profile_turn(0).await;
        let b = s.profile_turn(0).await;
        let third = tokio::time::timeout(Duration::from_millis(50), s.profile_turn(0)).await;
        assert!(
            third.is_err(),
            "the node's profile connections are all busy"
        );
        drop(a);
        // An on-demand request on the wire goes first: no new profile request until it is done.
        let wire = s.begin_demand_request();
        let waiter = tokio::spawn({
            let s = s.clone();
            async move {
                {
                    let _t = s.profile_turn(0).await;
                    true
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !waiter.is_finished(),
            "a profile request waits for the on-demand one"
        );
        drop(wire);
        let got = tokio::time::timeout(Duration::from_secs(5), waiter).await;
        assert!(matches!(got, Ok(Ok(true))), "and goes once it is done");
        // A reader joined to a profile request does not hold profile requests back.
        let _reader = s.begin_demand();
        drop(b);
        let turn = tokio::time::timeout(Duration::from_millis(500), s.profile_turn(0)).await;
        assert!(turn.is_ok());
        drop(_reader);
        // While a profile is prefetched, background streams wait, and the heuristics for
        // starts without one stand aside.
        assert!(!s.profiling());
        let profile = s.begin_profile();
        assert!(s.profiling());
        let stream = tokio::spawn({
            let s = s.clone();
            async move { s.wait_quiet().await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!stream.is_finished(), "a stream waits for the profile");
        drop(profile);
        assert!(!s.profiling());
        tokio::time::timeout(Duration::from_secs(5), stream)
            .await
            .expect("the stream goes after the profile")
            .unwrap();
    }
}
