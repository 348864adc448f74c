//! `lazysnap inspect`: what an image is made of, and for each lazy layer whether its TOC can be
//! found and verified the way the lazy mount will find it (the footer, then the TOC, by range).

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;

use serde::Serialize;
use serde_json::Value;

use crate::convert::{ConvertError, ImageLocation, Layout, SourceImage};
use crate::format::{self, LayerFormat};
use crate::oci::{Digest, Platform, Reference};
use crate::registry::{Client, ClientConfig};

/// One layer as `inspect` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct LayerInfo {
    pub digest: Option<Digest>,
    pub size: Option<u64>,
    pub media_type: String,
    pub diff_id: Digest,
    /// `zstd:chunked`, `estargz`, or `None` for a plain layer.
    pub format: Option<&'static str>,
    pub toc_digest: Option<Digest>,
    /// The TOC was read and matched its pinned digest.
    pub toc_verified: bool,
    pub entries: Option<usize>,
    pub chunks: Option<usize>,
    pub prefetch_entries: Option<usize>,
    /// Why the TOC could not be read, if it could not.
    pub toc_error: Option<String>,
    pub annotations: std::collections::BTreeMap<String, String>,
}

/// What `inspect` reports about an image.
#[derive(Debug, Clone, Serialize)]
pub struct ImageInfo {
    pub location: String,
    pub manifest_digest: Option<Digest>,
    pub platform: Option<String>,
    pub config_digest: Digest,
    pub layers: Vec<LayerInfo>,
}

/// Inspects the image at `location`.
pub async fn inspect(
    location: &ImageLocation,
    platform: &Platform,
    config: ClientConfig,
) -> Result<ImageInfo, ConvertError> {
    let client = Client::new(config)?;
    let source = SourceImage::load(location, &client, platform).await?;
    let config_json: Value = serde_json::from_slice(&source.config)
        .map_err(|e| ConvertError::Source(format!("invalid image config: {e}")))?;
    let platform = match (
        config_json.get("os").and_then(Value::as_str),
        config_json.get("architecture").and_then(Value::as_str),
    ) {
        (Some(os), Some(arch)) => Some(format!("{os}/{arch}")),
        _ => None,
    };
    let mut layers = Vec::new();
    for layer in &source.layers {
        let lazy = format::detect(&layer.media_type, &layer.annotations);
        let mut info = LayerInfo {
            digest: layer.digest,
            size: layer.size,
            media_type: layer.media_type.clone(),
            diff_id: layer.diff_id,
            format: lazy.as_ref().map(|l| format_name(l.format)),
            toc_digest: lazy.as_ref().map(|l| l.toc_digest),
            toc_verified: false,
            entries: None,
            chunks: None,
            prefetch_entries: None,
            toc_error: None,
            annotations: layer.annotations.clone(),
        };
        if let (Some(lazy), Some(digest), Some(size)) = (&lazy, layer.digest, layer.size) {
            let access = match location {
                ImageLocation::Registry(r) => BlobAccess::Registry(client.clone(), r.clone()),
                ImageLocation::OciLayout { dir, .. } => {
                    BlobAccess::File(Layout::open(dir)?.blob_path(&digest))
                }
                ImageLocation::DockerArchive { .. } => BlobAccess::None,
            };
            match crate::fetch::read_toc(&digest, lazy, size, &Default::default(), |start, end| {
                access.range(&digest, start, end)
            })
            .await
            {
                Ok(toc) => {
                    info.toc_verified = true;
                    info.entries = Some(toc.entries.len());
                    info.chunks = Some(toc.entries.iter().map(|e| e.chunks.len()).sum());
                    info.prefetch_entries = Some(toc.prefetch.len());
                }
                Err(e) => info.toc_error = Some(e.to_string()),
            }
        }
        layers.push(info);
    }
    Ok(ImageInfo {
        location: location.to_string(),
        manifest_digest: source.manifest_digest,
        platform,
        config_digest: Digest::of(&source.config),
        layers,
    })
}

/// The name the command line and reports use for a format.
pub fn format_name(format: LayerFormat) -> &'static str {
    match format {
        LayerFormat::ZstdChunked => "zstd:chunked",
        LayerFormat::Estargz => "estargz",
    }
}

#[derive(Debug)]
enum BlobAccess {
    Registry(Client, Reference),
    File(PathBuf),
    None,
}

impl BlobAccess {
    async fn range(&self, digest: &Digest, start: u64, end: u64) -> Result<Vec<u8>, ConvertError> {
        match self {
            Self::Registry(client, reference) => Ok(client
                .get_blob_range(reference, digest, start..end)
                .await?
                .to_vec()),
            Self::File(path) => {
                let mut file = std::fs::File::open(path)
                    .map_err(|e| ConvertError::io(format!("opening {}", path.display()), e))?;
                file.seek(SeekFrom::Start(start))
                    .map_err(|e| ConvertError::io(format!("seeking {}", path.display()), e))?;
                let mut out = vec![0; (end - start) as usize];
                file.read_exact(&mut out)
                    .map_err(|e| ConvertError::io(format!("reading {}", path.display()), e))?;
                Ok(out)
            }
            Self::None => Err(ConvertError::Unsupported(
                "this source cannot be read by range".into(),
            )),
        }
    }
}
