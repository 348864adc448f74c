//! The image's account files, fetched when a layer is found.
//!
//! Before a container's first instruction, the runtimes on every path read the image's
//! `/etc/passwd` and `/etc/group`: containerd's client and its CRI plugin read `/etc/group` (and
//! `/etc/passwd` for a named user) through a temporary mount of the container's root to fill in
//! the spec's groups, runc's init reads both to set up the user, and `lazysnap run` reads both
//! to resolve `--user` and the groups. On a lazy layer each read is a miss, a round trip the start
//! waits for before the container exists (python-hello's through containerd waited 40-60 ms for
//! `/etc/group` alone), and a profile recorded through another runtime does not list them. So a
//! layer that holds them fetches them as soon as its TOC is read: a few hundred bytes, in one
//! request, beside the TOC reads of the layers above it.
//!
//! Each layer holding them fetches its own copies: the layers of an image are found in parallel,
//! so which copy an image's merged tree shows is not known yet; a lower layer's copy that an upper
//! one replaces costs its own few hundred bytes. Fetched chunks are verified like any other;
//! they count as `prefetch`, and are not reads (a recorded profile does not list them).
//!
//! Owns: which files every runtime reads before the container starts. Does not own: the fetch
//! ([`LayerFetcher::prefetch`]).

use super::LayerFetcher;
use crate::format::Toc;

/// The files, as TOC entry names.
pub const ACCOUNT_FILES: [&str; 2] = ["etc/passwd", "etc/group"];

impl LayerFetcher {
    /// Fetches the layer's account files, if it holds them and [`super::FetchConfig::
    /// account_files`] is on. A failure is logged: the reads then fetch on demand.
    pub async fn prefetch_account_files(&self, toc: &Toc) {
        if !self.inner.config.account_files {
            return;
        }
        if let Err(e) = self.prefetch(toc, &ACCOUNT_FILES).await {
            let layer = self.inner.blob.short();
            tracing::debug!(%layer, "account files prefetch failed (read on demand): {e}");
        }
    }
}
