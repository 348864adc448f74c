//! What a lazy snapshot was made from, and whether its content is what its name claims.
//!
//! containerd names a layer's snapshot by its chain ID, computed from the `diff_id`s the image
//! config claims, and reuses any snapshot of that name. Its own snapshotter checks the claim when
//! it unpacks a layer (the applier hashes the uncompressed stream). A lazy layer is never
//! unpacked, so without this module a config that claims another image's `diff_id`s would hand
//! its files to that image. Two rules close that:
//!
//! - **Reuse by what was fetched:** every lazy snapshot records its *compressed chain*, a digest
//!   over its parent's compressed chain and its own blob digest (for a parent containerd unpacked,
//!   which containerd verified, the parent's name stands in). A Prepare that asks for an existing
//!   chain ID gets the existing lazy snapshot only if it asks for the same compressed chain, or if
//!   the snapshot is verified.
//! - **Verify in the background:** background completion streams the whole blob; the layer host
//!   decompresses and hashes it ([`crate::fetch::LayerFetcher::hash_uncompressed`]) and writes a
//!   [`Verification`] next to the snapshot's `fs` dir (`ROOT/snapshots/<id>/verdict`), so the
//!   verdict survives a restart of either process and needs no request of its own. The
//!   snapshotter picks it up, records it, and refuses a mismatching snapshot (and everything
//!   above it) to every later Stat, Prepare, View and Mounts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Weak;

use serde::{Deserialize, Serialize};

use super::metrics::METRICS;
use super::{Fallback, Record, RemoteLayer, SnapshotError, Store};
use crate::oci::Digest;

/// The file a layer host writes its verdict to, in the snapshot's directory.
const VERDICT_FILE: &str = "verdict";

/// What a lazy layer must decompress to, for the layer host: its snapshot's chain ID and its
/// parent's. The `diff_id` itself is not needed: the chain ID is `diff_id` for a base layer and
/// `sha256("<parent chain ID> <diff_id>")` above one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expected {
    pub chain_id: Digest,
    pub parent_chain_id: Option<Digest>,
}

impl Expected {
    /// The chain ID a layer whose uncompressed digest is `diff_id` has over this parent.
    pub fn chain_with(&self, diff_id: &Digest) -> Digest {
        match &self.parent_chain_id {
            None => *diff_id,
            Some(parent) => Digest::of(format!("{parent} {diff_id}").as_bytes()),
        }
    }

    /// The verdict for a layer that decompressed to `found` (or did not decompress).
    pub fn judge(&self, found: Result<Digest, String>) -> Verification {
        match found {
            Ok(diff_id) if self.chain_with(&diff_id) == self.chain_id => Verification::Verified {
                diff_id: diff_id.to_string(),
            },
            Ok(diff_id) => Verification::Mismatch {
                message: format!(
                    "the layer decompresses to {diff_id}, which does not give chain ID {} over {}: \
                     the image config claims another layer's diff_id",
                    self.chain_id,
                    self.parent_chain_id
                        .map_or("no parent".to_owned(), |p| format!("parent {p}"))
                ),
            },
            Err(e) => Verification::Mismatch {
                message: format!("the layer's uncompressed digest cannot be computed: {e}"),
            },
        }
    }
}

/// Whether a lazy snapshot's content was checked against the chain ID it is committed under.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Verification {
    /// Not checked yet (background completion has not finished, or is off).
    #[default]
    Pending,
    /// The whole blob decompressed to the `diff_id` its chain ID was computed from.
    Verified { diff_id: String },
    /// It did not: the snapshot is never handed out again.
    Mismatch { message: String },
}

impl Verification {
    pub fn is_pending(&self) -> bool {
        matches!(self, Self::Pending)
    }
}

/// Where the layer host writes the verdict of the layer mounted at `fs_dir`.
pub fn verdict_path(fs_dir: &Path) -> PathBuf {
    fs_dir.with_file_name(VERDICT_FILE)
}

/// Writes `verdict` for the layer mounted at `fs_dir` (whole or not at all: written beside, then
/// renamed).
pub fn write_verdict(fs_dir: &Path, verdict: &Verification) -> std::io::Result<()> {
    let path = verdict_path(fs_dir);
    let tmp = path.with_extension("tmp");
    let json = serde_json::to_vec(verdict).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, json)?;
    std::fs::rename(&tmp, &path)
}

/// The verdict written for the layer mounted at `fs_dir`, if any.
pub fn read_verdict(fs_dir: &Path) -> Option<Verification> {
    let bytes = std::fs::read(verdict_path(fs_dir)).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!(dir = %fs_dir.display(), "unreadable verdict, ignored: {e}");
            None
        }
    }
}

/// The chain ID a snapshot named `name` stands for: a lazy snapshot is committed under the chain
/// ID itself; containerd's metadata store names the snapshots it commits `<namespace>/<n>/<chain
/// ID>`; `lazysnap run` commits under the chain ID, or `<chain ID>@<layer digest>` for a layer it
/// unpacked (and verified) because another image's lazy layer held the chain ID.
pub fn chain_id_of(name: &str) -> Option<Digest> {
    if let Ok(d) = name
        .split_once('@')
        .map_or(name, |(chain, _)| chain)
        .parse()
    {
        return Some(d);
    }
    let mut parts = name.splitn(3, '/');
    let (_namespace, n, rest) = (parts.next()?, parts.next()?, parts.next()?);
    n.parse::<u64>().ok()?;
    rest.parse().ok()
}

/// The compressed chain of a layer `layer` over a parent whose compressed chain (or, for a parent
/// containerd unpacked, whose name) is `parent`.
pub fn compressed_chain(parent: &str, layer: &str) -> String {
    Digest::of(format!("{parent} {layer}").as_bytes()).to_string()
}

/// How often the snapshotter looks for verdicts nobody asked about yet (so a failure is logged
/// and counted soon after the layer host finds it, not at the next use).
const WATCH_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Records the verdicts layer hosts write, until the store is gone (it holds no reference, so
/// the store and its database close with the snapshotter).
pub(super) async fn watch(store: Weak<Store>) {
    let mut tick = tokio::time::interval(WATCH_EVERY);
    loop {
        tick.tick().await;
        let Some(store) = store.upgrade() else {
            return;
        };
        for name in store.pending_lazy() {
            let _ = current(&store, &name);
        }
    }
}

/// The record of `name`, with any verdict its layer host wrote since it was last looked at
/// recorded (and logged and counted, once).
pub(super) fn current(store: &Store, name: &str) -> Result<Record, SnapshotError> {
    let record = store.record(name)?;
    if record.remote.is_none() || !record.verification.is_pending() {
        return Ok(record);
    }
    let Some(verdict) = read_verdict(&store.fs_dir(record.id)).filter(|v| !v.is_pending()) else {
        return Ok(record);
    };
    match store.set_verification(name, record.id, verdict.clone()) {
        Ok((record, changed)) => {
            if changed {
                report(name, &record);
            }
            Ok(record)
        }
        Err(e) => {
            tracing::warn!(
                snapshot = name,
                "cannot record the verdict on its layer: {e}"
            );
            Ok(Record {
                verification: verdict,
                ..record
            })
        }
    }
}

fn report(name: &str, record: &Record) {
    let Some(layer) = &record.remote else {
        return;
    };
    match &record.verification {
        Verification::Verified { diff_id } => {
            METRICS.verified.inc();
            tracing::info!(snapshot = name, layer = %layer.layer, %diff_id, "lazy snapshot verified");
        }
        Verification::Mismatch { message } => {
            METRICS.verify_failures.inc();
            tracing::error!(
                snapshot = name,
                layer = %layer.layer,
                image = %layer.image,
                "lazy snapshot FAILED verification and is refused from now on: {message}"
            );
        }
        Verification::Pending => {}
    }
}

/// Why snapshot `name` must not be used, if it must not: it, or a snapshot below it, is a lazy
/// layer that failed verification.
pub(super) fn refused(store: &Store, name: &str) -> Option<String> {
    let mut next = name.to_owned();
    while !next.is_empty() {
        let record = current(store, &next).ok()?;
        if let (Some(layer), Verification::Mismatch { message }) =
            (&record.remote, &record.verification)
        {
            let below = if next == name {
                String::new()
            } else {
                format!("it lies on snapshot {next}, whose ")
            };
            return Some(format!(
                "{below}lazy layer {} of {} failed verification: {message}; it is never used \
                 again: remove the images that use it (containerd's GC then removes the snapshot) \
                 and pull again",
                layer.layer, layer.image
            ));
        }
        next = record.parent;
    }
    None
}

/// The compressed chain a Prepare of blob `layer` over `parent` asks for.
fn asked_chain(store: &Store, parent: &str, layer: &str) -> String {
    let base = if parent.is_empty() {
        String::new()
    } else {
        store
            .record(parent)
            .ok()
            .and_then(|r| r.remote)
            .map(|r| r.compressed_chain)
            .filter(|c| !c.is_empty())
            .unwrap_or_else(|| parent.to_owned())
    };
    compressed_chain(&base, layer)
}

/// `layer` with what it is made from and what it must decompress to, for a lazy snapshot
/// committed as `target` over `parent`; a layer that could not be verified is not mounted.
pub(super) fn with_facts(
    store: &Store,
    target: &str,
    parent: &str,
    mut layer: RemoteLayer,
) -> Result<RemoteLayer, Fallback> {
    let chain_id = target.parse().map_err(|e| {
        Fallback::new(
            "verify",
            format!("target {target} is not a chain ID ({e}): the layer could not be verified"),
        )
    })?;
    let parent_chain_id = if parent.is_empty() {
        None
    } else {
        Some(chain_id_of(parent).ok_or_else(|| {
            Fallback::new(
                "verify",
                format!(
                    "parent {parent} is not named by a chain ID: the layer could not be verified"
                ),
            )
        })?)
    };
    layer.compressed_chain = asked_chain(store, parent, &layer.layer);
    layer.expected = Some(Expected {
        chain_id,
        parent_chain_id,
    });
    Ok(layer)
}

/// Whether `existing`, committed as `target` over the parent a Prepare with `labels` names, may
/// be handed to it: a snapshot containerd filled (containerd checked it), a verified lazy layer,
/// or an unverified one made from the same compressed chain. A lazy layer that failed
/// verification never is.
pub(super) fn reusable(
    store: &Store,
    target: &str,
    existing: &Record,
    labels: &HashMap<String, String>,
) -> Result<(), Fallback> {
    let Some(ours) = &existing.remote else {
        return Ok(());
    };
    match &existing.verification {
        Verification::Verified { .. } => Ok(()),
        Verification::Mismatch { message } => Err(Fallback::new(
            "verify",
            format!("{target} failed verification ({message})"),
        )),
        Verification::Pending => {
            let asked = RemoteLayer::from_labels(labels).map_err(|_| {
                Fallback::new(
                    "verify",
                    format!(
                        "{target} is an unverified lazy layer and this Prepare names no layer to \
                         compare it with"
                    ),
                )
            })?;
            let our_chain = if ours.compressed_chain.is_empty() {
                asked_chain(store, &existing.parent, &ours.layer)
            } else {
                ours.compressed_chain.clone()
            };
            let their_chain = asked_chain(store, &existing.parent, &asked.layer);
            if our_chain == their_chain {
                return Ok(());
            }
            Err(Fallback::new(
                "verify",
                format!(
                    "{target} is an unverified lazy layer made from layer {} of {} (compressed \
                     chain {our_chain}); this Prepare asks for layer {} of {} (compressed chain \
                     {their_chain}): not the same bytes, so not the same snapshot",
                    ours.layer, ours.image, asked.layer, asked.image
                ),
            ))
        }
    }
}

/// The layer to mount for the lazy snapshot `name`: verification is asked for only while its
/// verdict is pending (a record from before verification existed gets its facts now).
pub(super) fn to_mount(store: &Store, name: &str, record: &Record) -> Option<RemoteLayer> {
    let mut layer = record.remote.clone()?;
    if !record.verification.is_pending() {
        layer.expected = None;
    } else if layer.expected.is_none() {
        if let Ok(with) = with_facts(store, name, &record.parent, layer.clone()) {
            layer = with;
        }
    }
    Some(layer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Digest {
        Digest::of(s.as_bytes())
    }

    #[test]
    fn chain_ids_follow_containerds_identity_package() {
        let (a, b) = (d("a"), d("b"));
        let base = Expected {
            chain_id: a,
            parent_chain_id: None,
        };
        assert_eq!(base.chain_with(&a), a);
        let above = Expected {
            chain_id: Digest::of(format!("{a} {b}").as_bytes()),
            parent_chain_id: Some(a),
        };
        assert!(matches!(above.judge(Ok(b)), Verification::Verified { .. }));
        let wrong = above.judge(Ok(d("other")));
        assert!(
            matches!(&wrong, Verification::Mismatch { message } if message.contains("claims another")),
            "{wrong:?}"
        );
        assert!(matches!(
            above.judge(Err("bad zstd".into())),
            Verification::Mismatch { .. }
        ));
    }

    #[test]
    fn chain_ids_come_from_lazy_and_containerd_names() {
        let c = d("c");
        assert_eq!(chain_id_of(&c.to_string()), Some(c));
        assert_eq!(chain_id_of(&format!("default/12/{c}")), Some(c));
        assert_eq!(chain_id_of(&format!("{c}@{}", d("layer"))), Some(c));
        assert_eq!(chain_id_of("default/12/extract-1 x"), None);
        assert_eq!(chain_id_of("default/x/sha256:zz"), None);
    }

    #[test]
    fn verdicts_round_trip_through_their_file() {
        let dir = tempfile::tempdir().unwrap();
        let fs = dir.path().join("fs");
        assert_eq!(read_verdict(&fs), None);
        let v = Verification::Mismatch {
            message: "no".into(),
        };
        write_verdict(&fs, &v).unwrap();
        assert_eq!(read_verdict(&fs), Some(v));
    }
}
