//! Reading a source image, wherever it is: its config, and each layer as a stream of the bytes the
//! manifest names, checked against the manifest's digest as they pass.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::path::PathBuf;

use serde_json::Value;

use crate::oci::{self, Digest, HashingReader, ImageDocument, Platform, Reference};
use crate::registry::Client;

use super::archive::{open_range, Archive};
use super::layout::Layout;
use super::{ConvertError, ImageLocation};

/// A source image: config and layers, ready to be read.
#[derive(Debug)]
pub struct SourceImage {
    /// Digest of the source manifest, when it has one (an archive does not).
    pub manifest_digest: Option<Digest>,
    /// The source manifest's annotations, carried to the converted manifest.
    pub annotations: BTreeMap<String, String>,
    /// The config, as stored (verified against its digest where one is known).
    pub config: Vec<u8>,
    pub layers: Vec<SourceLayer>,
    origin: Origin,
}

/// One source layer.
#[derive(Debug, Clone)]
pub struct SourceLayer {
    pub media_type: String,
    /// Digest of the stored blob; `None` for a plain tar in an older docker archive, which is
    /// checked against its `diff_id` instead.
    pub digest: Option<Digest>,
    pub size: Option<u64>,
    pub annotations: BTreeMap<String, String>,
    /// The uncompressed tar's digest, from the config.
    pub diff_id: Digest,
    place: Place,
}

#[derive(Debug, Clone)]
enum Place {
    File {
        path: PathBuf,
        offset: u64,
        len: u64,
    },
    Registry,
}

#[derive(Debug)]
enum Origin {
    Local,
    Registry {
        client: Client,
        reference: Reference,
    },
}

impl SourceImage {
    /// Loads the manifest and config of the image at `location`, choosing `platform` from an index.
    pub async fn load(
        location: &ImageLocation,
        client: &Client,
        platform: &Platform,
    ) -> Result<Self, ConvertError> {
        match location {
            ImageLocation::OciLayout { dir, tag } => {
                let layout = Layout::open(dir)?;
                let mut descriptor = layout.find(tag.as_deref())?;
                loop {
                    let digest = descriptor_digest(&descriptor)?;
                    let media_type = descriptor
                        .get("mediaType")
                        .and_then(Value::as_str)
                        .map(str::to_owned);
                    let bytes = layout.read_blob(&digest)?;
                    match oci::parse_document(media_type.as_deref(), &bytes)? {
                        ImageDocument::Index(index) => {
                            let chosen = oci::select_platform(&index, platform)?;
                            descriptor = serde_json::to_value(&chosen)
                                .map_err(|e| ConvertError::Source(e.to_string()))?;
                        }
                        ImageDocument::Manifest(manifest) => {
                            let manifest = serde_json::to_value(&manifest)
                                .map_err(|e| ConvertError::Source(e.to_string()))?;
                            let place = |d: &Digest, size: u64| Place::File {
                                path: layout.blob_path(d),
                                offset: 0,
                                len: size,
                            };
                            let config_digest = descriptor_digest(&manifest["config"])?;
                            let config = layout.read_blob(&config_digest)?;
                            return Self::from_manifest(
                                Some(digest),
                                &manifest,
                                config,
                                Origin::Local,
                                place,
                            );
                        }
                    }
                }
            }
            ImageLocation::DockerArchive { file } => load_archive(file),
            ImageLocation::Registry(reference) => {
                let mut fetched = client.get_manifest(reference).await?;
                let manifest =
                    match oci::parse_document(fetched.media_type.as_deref(), &fetched.bytes)? {
                        ImageDocument::Manifest(m) => m,
                        ImageDocument::Index(index) => {
                            let chosen = oci::select_platform(&index, platform)?;
                            let digest = descriptor_digest(
                                &serde_json::to_value(&chosen)
                                    .map_err(|e| ConvertError::Source(e.to_string()))?,
                            )?;
                            fetched = client.get_manifest(&reference.with_digest(digest)).await?;
                            match oci::parse_document(
                                fetched.media_type.as_deref(),
                                &fetched.bytes,
                            )? {
                                ImageDocument::Manifest(m) => m,
                                ImageDocument::Index(_) => {
                                    return Err(ConvertError::Source(format!(
                                    "{reference}: the index entry for {platform} is itself an index"
                                )))
                                }
                            }
                        }
                    };
                let manifest = serde_json::to_value(&manifest)
                    .map_err(|e| ConvertError::Source(e.to_string()))?;
                let config_digest = descriptor_digest(&manifest["config"])?;
                let config = client.get_blob(reference, &config_digest).await?.to_vec();
                let origin = Origin::Registry {
                    client: client.clone(),
                    reference: reference.clone(),
                };
                Self::from_manifest(Some(fetched.digest), &manifest, config, origin, |_, _| {
                    Place::Registry
                })
            }
        }
    }

    fn from_manifest(
        manifest_digest: Option<Digest>,
        manifest: &Value,
        config: Vec<u8>,
        origin: Origin,
        place: impl Fn(&Digest, u64) -> Place,
    ) -> Result<Self, ConvertError> {
        let diff_ids = diff_ids(&config)?;
        let descriptors = manifest
            .get("layers")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if descriptors.len() != diff_ids.len() {
            return Err(ConvertError::Source(format!(
                "the manifest lists {} layers but the config has {} diff_ids",
                descriptors.len(),
                diff_ids.len()
            )));
        }
        let mut layers = Vec::with_capacity(descriptors.len());
        for (d, diff_id) in descriptors.iter().zip(diff_ids) {
            let digest = descriptor_digest(d)?;
            let size = d.get("size").and_then(Value::as_u64).unwrap_or(0);
            let media_type = d
                .get("mediaType")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            if media_type.contains("foreign") || media_type.contains("nondistributable") {
                return Err(ConvertError::Unsupported(format!(
                    "layer {digest} has media type {media_type}: non-distributable layers cannot be converted"
                )));
            }
            layers.push(SourceLayer {
                media_type,
                digest: Some(digest),
                size: Some(size),
                annotations: oci::string_map(d.get("annotations")),
                diff_id,
                place: place(&digest, size),
            });
        }
        Ok(Self {
            manifest_digest,
            annotations: oci::string_map(manifest.get("annotations")),
            config,
            layers,
            origin,
        })
    }

    /// Opens a layer's stored bytes. The stream fails at its end if they do not match the digest.
    pub async fn open_layer(
        &self,
        layer: &SourceLayer,
    ) -> Result<Box<dyn Read + Send>, ConvertError> {
        match (&layer.place, &self.origin) {
            (Place::File { path, offset, len }, _) => {
                let reader = open_range(path, *offset, *len)?;
                Ok(match layer.digest {
                    Some(digest) => Box::new(VerifyingReader::new(
                        reader,
                        digest,
                        *len,
                        path.display().to_string(),
                    )),
                    None => Box::new(reader),
                })
            }
            (Place::Registry, Origin::Registry { client, reference }) => {
                let digest = layer
                    .digest
                    .ok_or_else(|| ConvertError::Source("registry layer without digest".into()))?;
                let reader = client.blob_reader(reference, &digest).await?;
                Ok(Box::new(tokio_util::io::SyncIoBridge::new(reader)))
            }
            (Place::Registry, Origin::Local) => Err(ConvertError::Source(
                "registry layer in a local image".into(),
            )),
        }
    }

    /// The registry and repository the image came from, if it came from one.
    pub fn registry_reference(&self) -> Option<&Reference> {
        match &self.origin {
            Origin::Registry { reference, .. } => Some(reference),
            Origin::Local => None,
        }
    }
}

fn load_archive(file: &std::path::Path) -> Result<SourceImage, ConvertError> {
    let archive = Archive::open(file)?;
    let image = archive.image()?;
    let config = archive.read_member(&image.config)?;
    if let Some(named) = blob_name_digest(&image.config) {
        let got = Digest::of(&config);
        if got != named {
            return Err(ConvertError::DigestMismatch {
                what: format!("{}: {}", file.display(), image.config),
                expected: named,
                got,
            });
        }
    }
    let diff_ids = diff_ids(&config)?;
    if image.layers.len() != diff_ids.len() {
        return Err(ConvertError::Source(format!(
            "docker archive {}: manifest.json lists {} layers but the config has {} diff_ids",
            file.display(),
            image.layers.len(),
            diff_ids.len()
        )));
    }
    let mut layers = Vec::new();
    for (name, diff_id) in image.layers.iter().zip(diff_ids) {
        let (offset, len) = archive.member(name)?;
        layers.push(SourceLayer {
            media_type: String::new(),
            digest: blob_name_digest(name),
            size: Some(len),
            annotations: BTreeMap::new(),
            diff_id,
            place: Place::File {
                path: archive.path().to_owned(),
                offset,
                len,
            },
        });
    }
    Ok(SourceImage {
        manifest_digest: None,
        annotations: BTreeMap::new(),
        config,
        layers,
        origin: Origin::Local,
    })
}

/// `blobs/sha256/<hex>` names its own digest.
fn blob_name_digest(name: &str) -> Option<Digest> {
    let hex = name
        .trim_start_matches("./")
        .strip_prefix("blobs/sha256/")?;
    format!("sha256:{hex}").parse().ok()
}

/// The `rootfs.diff_ids` of a config.
pub fn diff_ids(config: &[u8]) -> Result<Vec<Digest>, ConvertError> {
    let v: Value = serde_json::from_slice(config)
        .map_err(|e| ConvertError::Source(format!("invalid image config: {e}")))?;
    let ids = v
        .pointer("/rootfs/diff_ids")
        .and_then(Value::as_array)
        .ok_or_else(|| ConvertError::Source("image config has no rootfs.diff_ids".into()))?;
    ids.iter()
        .map(|id| {
            id.as_str()
                .ok_or_else(|| {
                    ConvertError::Source("image config: a diff_id is not a string".into())
                })?
                .parse::<Digest>()
                .map_err(|e| ConvertError::Source(format!("image config: {e}")))
        })
        .collect()
}

/// The digest field of a descriptor.
pub fn descriptor_digest(descriptor: &Value) -> Result<Digest, ConvertError> {
    let s = descriptor
        .get("digest")
        .and_then(Value::as_str)
        .ok_or_else(|| ConvertError::Source("descriptor without digest".into()))?;
    Ok(s.parse()?)
}

/// A reader that fails at its end unless exactly `len` bytes hashing to `digest` passed.
#[derive(Debug)]
pub struct VerifyingReader<R> {
    inner: Option<HashingReader<R>>,
    digest: Digest,
    len: u64,
    what: String,
}

impl<R: Read> VerifyingReader<R> {
    pub fn new(inner: R, digest: Digest, len: u64, what: String) -> Self {
        Self {
            inner: Some(HashingReader::new(inner)),
            digest,
            len,
            what,
        }
    }
}

impl<R: Read> Read for VerifyingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(inner) = self.inner.as_mut() else {
            return Ok(0);
        };
        let n = inner.read(buf)?;
        if n > 0 || buf.is_empty() {
            return Ok(n);
        }
        let Some(done) = self.inner.take() else {
            return Ok(0);
        };
        let (_, got, len) = done.finish();
        if len != self.len || got != self.digest {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: content does not match its digest (expected {} bytes {}, got {len} bytes {got})",
                    self.what, self.len, self.digest
                ),
            ));
        }
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifying_reader_fails_at_eof_on_mismatch() {
        let good = Digest::of(b"abc");
        let mut ok = VerifyingReader::new(&b"abc"[..], good, 3, "t".into());
        io::copy(&mut ok, &mut io::sink()).unwrap();
        let mut bad = VerifyingReader::new(&b"abd"[..], good, 3, "t".into());
        let err = io::copy(&mut bad, &mut io::sink()).unwrap_err();
        assert!(
            err.to_string().contains("does not match its digest"),
            "{err}"
        );
        let mut short = VerifyingReader::new(&b"ab"[..], good, 3, "t".into());
        assert!(io::copy(&mut short, &mut io::sink()).is_err());
    }
}
