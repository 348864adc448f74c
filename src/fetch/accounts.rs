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
use crate::format::{Toc, TocEntry};

/// The files, as TOC entry names.
pub const ACCOUNT_FILES: [&str; 2] = ["etc/passwd", "etc/group"];

/// The most uncompressed or compressed bytes of account files one layer fetches this way (real
/// ones are a few KiB): a layer that states more, or names them many times, leaves them to its
/// reads, so a hostile TOC cannot make a mount fetch more than this.
pub const MAX_BYTES: u64 = 1 << 20;

impl LayerFetcher {
    /// Fetches the layer's account files, if it holds them within `MAX_BYTES` and
    /// [`super::FetchConfig::account_files`] is on. A failure is logged: the reads then fetch
    /// on demand.
    pub async fn prefetch_account_files(&self, toc: &Toc) {
        if !self.inner.config.account_files {
            return;
        }
        let entries: Vec<&TocEntry> = toc
            .entries
            .iter()
            .filter(|e| ACCOUNT_FILES.contains(&e.name.as_str()))
            .collect();
        let layer = self.inner.blob.short();
        let chunks = entries.iter().flat_map(|e| &e.chunks);
        let (size, compressed) = chunks.fold((0u64, 0u64), |(size, compressed), c| {
            let span = c.compressed_end.saturating_sub(c.compressed_start);
            (size.saturating_add(c.size), compressed.saturating_add(span))
        });
        if size > MAX_BYTES || compressed > MAX_BYTES {
            tracing::debug!(%layer, size, compressed, "account files too large to prefetch: read on demand");
            return;
        }
        if let Err(e) = self.prefetch_entries(entries.into_iter()).await {
            tracing::debug!(%layer, "account files prefetch failed (read on demand): {e}");
        }
    }
}
