//! What a profile holds, for people: per layer, the accesses, the distinct files in first-read
//! order, and (when the layer's TOC can be read) the bytes those chunks are, uncompressed and as
//! prefetch would fetch them. Also the two ways to get a profile to show or push: a file, read
//! bounded, and an image reference, resolved to its manifest.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::Path;

use serde::Serialize;

use super::{Profile, ProfileError, MAX_BYTES};
use crate::fetch::read_toc_at;
use crate::format::{self, Chunk, Toc};
use crate::mount::{self, MountError};
use crate::oci::{self, Digest, Platform, Reference};
use crate::registry::Client;

/// A profile file that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Profile {
        path: String,
        #[source]
        source: ProfileError,
    },
}

/// Reads and decodes the profile document at `path`, at most [`MAX_BYTES`] of it.
pub fn read_file(path: &Path) -> Result<Profile, FileError> {
    let shown = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| FileError::Io {
        path: shown.clone(),
        source,
    })?;
    let mut bytes = Vec::new();
    file.take(MAX_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| FileError::Io {
            path: shown.clone(),
            source,
        })?;
    Profile::decode(&bytes).map_err(|source| FileError::Profile {
        path: shown,
        source,
    })
}

/// The manifest digest `reference` names for `platform` (an index is resolved).
pub async fn resolve_image(
    client: &Client,
    reference: &Reference,
    platform: &Platform,
) -> Result<Digest, MountError> {
    Ok(mount::resolve(client, reference, platform).await?.0)
}

/// One layer of a profile, summed up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LayerSummary {
    pub digest: Digest,
    pub accesses: usize,
    /// Distinct files, in the order of their first read.
    pub files: Vec<String>,
    /// Uncompressed bytes of the accessed chunks, if the layer's TOC was read.
    pub bytes: Option<u64>,
    /// Compressed bytes of the frames holding them: what prefetch fetches.
    pub compressed_bytes: Option<u64>,
    /// Accesses whose chunk the TOC does not hold (prefetch ignores them).
    pub unknown: Option<usize>,
}

/// Sums up each layer of `profile`, with sizes from `tocs` (by layer blob digest) where given.
pub fn summarize(profile: &Profile, tocs: &HashMap<Digest, Toc>) -> Vec<LayerSummary> {
    profile
        .layers
        .iter()
        .map(|layer| {
            let mut seen = HashSet::new();
            let files = layer
                .accesses
                .iter()
                .filter(|a| seen.insert(a.name.as_str()))
                .map(|a| a.name.clone())
                .collect();
            let mut summary = LayerSummary {
                digest: layer.digest,
                accesses: layer.accesses.len(),
                files,
                bytes: None,
                compressed_bytes: None,
                unknown: None,
            };
            if let Some(toc) = tocs.get(&layer.digest) {
                let chunks: HashMap<Digest, &Chunk> = toc
                    .entries
                    .iter()
                    .flat_map(|e| e.chunks.iter())
                    .filter(|c| !c.zeros)
                    .map(|c| (c.digest, c))
                    .collect();
                let (mut bytes, mut unknown) = (0, 0);
                let mut frames = HashSet::new();
                let mut compressed = 0;
                for a in &layer.accesses {
                    match chunks.get(&a.chunk) {
                        Some(c) => {
                            bytes += c.size;
                            if frames.insert(c.compressed_start) {
                                compressed += c.compressed_end - c.compressed_start;
                            }
                        }
                        None => unknown += 1,
                    }
                }
                summary.bytes = Some(bytes);
                summary.compressed_bytes = Some(compressed);
                summary.unknown = Some(unknown);
            }
            summary
        })
        .collect()
}

/// How many files of each layer [`render`] names.
pub const FIRST_FILES: usize = 8;

/// The human text of `lazysnap profile show`: the image and command, then per layer the
/// accesses, files, bytes and the first [`FIRST_FILES`] files in the order start-up read them.
pub fn render(profile: &Profile, summaries: &[LayerSummary]) -> String {
    use std::fmt::Write as _;
    let human = crate::convert::human;
    let mut out = String::new();
    let files: usize = summaries.iter().map(|s| s.files.len()).sum();
    let _ = writeln!(
        out,
        "start-up profile of image {}: {} layers, {} accesses, {files} files",
        profile.image,
        profile.layers.len(),
        profile.accesses()
    );
    if !profile.command.is_empty() {
        let _ = writeln!(out, "recorded running: {}", profile.command.join(" "));
    }
    for (i, s) in summaries.iter().enumerate() {
        let bytes = match (s.bytes, s.compressed_bytes) {
            (Some(b), Some(c)) => format!(", {} ({} compressed)", human(b), human(c)),
            _ => String::new(),
        };
        let unknown = match s.unknown {
            Some(n) if n > 0 => format!(", {n} not in the layer's TOC (ignored by prefetch)"),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "layer {}/{} {}: {} accesses, {} files{bytes}{unknown}",
            i + 1,
            summaries.len(),
            s.digest.short(),
            s.accesses,
            s.files.len()
        );
        for name in s.files.iter().take(FIRST_FILES) {
            let _ = writeln!(out, "    {name}");
        }
        if s.files.len() > FIRST_FILES {
            let _ = writeln!(out, "    ... and {} more", s.files.len() - FIRST_FILES);
        }
    }
    out
}

/// The TOCs of the profiled layers of image `manifest` in `reference`'s repository, read and
/// verified as a mount does; a layer whose TOC cannot be read is left out (and logged).
pub async fn layer_tocs(
    client: &Client,
    reference: &Reference,
    manifest: &Digest,
    profile: &Profile,
) -> HashMap<Digest, Toc> {
    let mut tocs = HashMap::new();
    let fetched = match client.get_manifest(&reference.with_digest(*manifest)).await {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!("cannot read the image manifest for sizes: {e}");
            return tocs;
        }
    };
    let parsed: serde_json::Value = serde_json::from_slice(&fetched.bytes).unwrap_or_default();
    let descriptors = parsed["layers"].as_array().cloned().unwrap_or_default();
    for d in descriptors {
        let Some(digest) = d["digest"].as_str().and_then(|s| s.parse::<Digest>().ok()) else {
            continue;
        };
        if profile.layer(&digest).is_none() {
            continue;
        }
        let media_type = d["mediaType"].as_str().unwrap_or_default();
        let Some(lazy) = format::detect(media_type, &oci::string_map(d.get("annotations"))) else {
            continue;
        };
        let size = d["size"].as_u64().unwrap_or(0);
        let limits = format::Limits::default();
        let scheduler = Default::default();
        match read_toc_at(client, reference, &digest, &lazy, size, &limits, &scheduler).await {
            Ok(toc) => {
                tocs.insert(digest, toc);
            }
            Err(e) => tracing::warn!("cannot read the TOC of {}: {e}", digest.short()),
        }
    }
    tocs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{EntryKind, LayerFormat, TocEntry};
    use crate::profile::{Access, LayerProfile};

    #[test]
    fn a_summary_counts_files_in_order_and_bytes_from_the_toc() {
        let chunk = |data: &[u8], start: u64| Chunk {
            file_offset: 0,
            size: 100,
            compressed_start: start,
            compressed_end: start + 10,
            inner_offset: 0,
            digest: Digest::of(data),
            zeros: false,
        };
        let (a, b, c) = (chunk(b"a", 0), chunk(b"b", 10), chunk(b"c", 20));
        let access = |name: &str, c: &Chunk| Access {
            name: name.into(),
            offset: 0,
            chunk: c.digest,
            at_ms: 0,
        };
        let blob = Digest::of(b"blob");
        let profile = Profile {
            version: 1,
            image: Digest::of(b"image"),
            command: Vec::new(),
            layers: vec![LayerProfile {
                digest: blob,
                diff_id: None,
                accesses: vec![
                    access("bin/z", &b),
                    access("lib/a", &a),
                    access("bin/z", &c),
                    access("gone", &chunk(b"not in toc", 99)),
                ],
            }],
        };
        let without = summarize(&profile, &HashMap::new());
        assert_eq!(without[0].files, vec!["bin/z", "lib/a", "gone"]);
        assert_eq!((without[0].accesses, without[0].bytes), (4, None));
        let entry = TocEntry {
            size: 300,
            mode: 0o755,
            chunks: vec![a, b, c],
            ..TocEntry::new("bin/z", EntryKind::Reg)
        };
        let toc = Toc {
            format: LayerFormat::ZstdChunked,
            entries: vec![entry],
            prefetch: Vec::new(),
        };
        let with = summarize(&profile, &HashMap::from([(blob, toc)]));
        assert_eq!(with[0].bytes, Some(300));
        assert_eq!(with[0].compressed_bytes, Some(30));
        assert_eq!(with[0].unknown, Some(1));
        let text = render(&profile, &with);
        assert!(text.contains("1 layers, 4 accesses, 3 files"), "{text}");
        assert!(
            text.contains("4 accesses, 3 files, 300 B (30 B compressed), 1 not in"),
            "{text}"
        );
        let z = text.find("    bin/z").unwrap();
        assert!(z < text.find("    lib/a").unwrap(), "{text}");
    }
}
