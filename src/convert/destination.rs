//! Where a conversion's blobs go: an OCI layout or a registry, blobs first and the manifest last.

use std::path::PathBuf;

use serde_json::json;

use super::{ConvertError, ImageLocation, Layout, SourceImage, SourceLayer};
use crate::oci::{self, Digest, Reference};
use crate::registry::{Client, PushedBlob};

/// Where converted blobs go.
// One per conversion, cloned once per layer: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub(super) enum Destination {
    Layout {
        layout: Layout,
        tag: Option<String>,
    },
    Registry {
        client: Client,
        reference: Reference,
        mount_from: Option<Reference>,
        staging: PathBuf,
    },
}

impl Destination {
    pub(super) fn open(
        dst: &ImageLocation,
        client: &Client,
        source: Option<&Reference>,
    ) -> Result<Self, ConvertError> {
        match dst {
            ImageLocation::OciLayout { dir, tag } => Ok(Self::Layout {
                layout: Layout::create(dir)?,
                tag: tag.clone(),
            }),
            ImageLocation::DockerArchive { .. } => Err(ConvertError::Location(
                "docker-archive: is a source only; write to oci:DIR[:TAG] or a registry".into(),
            )),
            ImageLocation::Registry(reference) => Ok(Self::Registry {
                client: client.clone(),
                reference: reference.clone(),
                mount_from: source
                    .filter(|s| {
                        s.registry == reference.registry && s.repository != reference.repository
                    })
                    .cloned(),
                staging: std::env::temp_dir(),
            }),
        }
    }

    /// An anonymous temporary file (gone when closed) for a decompressed source layer, beside
    /// the converted blobs.
    pub(super) fn new_spool(&self) -> Result<std::fs::File, ConvertError> {
        Ok(self.new_blob()?.into_file())
    }

    /// A temporary file for a converted blob, on the disk the blob will end up on.
    pub(super) fn new_blob(&self) -> Result<tempfile::NamedTempFile, ConvertError> {
        match self {
            Self::Layout { layout, .. } => layout.temp_blob(),
            Self::Registry { staging, .. } => tempfile::Builder::new()
                .prefix("lazysnap-layer-")
                .tempfile_in(staging)
                .map_err(|e| {
                    ConvertError::io(
                        format!("creating a temporary file in {}", staging.display()),
                        e,
                    )
                }),
        }
    }

    /// For a layer carried over unchanged: `None` if the destination can get it without a copy
    /// (it has it, or a registry mount serves), else a verified local copy to put.
    pub(super) async fn stage_existing(
        &self,
        source: &SourceImage,
        layer: &SourceLayer,
        digest: &Digest,
    ) -> Result<Option<tempfile::NamedTempFile>, ConvertError> {
        match self {
            Self::Layout { layout, .. } if layout.blob_path(digest).exists() => return Ok(None),
            Self::Registry {
                client, reference, ..
            } if client.blob_size(reference, digest).await?.is_some() => return Ok(None),
            _ => {}
        }
        let mut stored = source.open_layer(layer).await?;
        let mut out = self.new_blob()?;
        let label = digest.short();
        tokio::task::spawn_blocking(move || {
            std::io::copy(&mut stored, out.as_file_mut())
                .map_err(|e| ConvertError::io(format!("layer {label}: copying"), e))?;
            Ok::<_, ConvertError>(Some(out))
        })
        .await
        .map_err(|e| ConvertError::Source(format!("copy task failed: {e}")))?
    }

    /// Stores a finished blob; `file` is `None` when the destination already has it.
    pub(super) async fn put_blob(
        &self,
        file: Option<tempfile::NamedTempFile>,
        digest: &Digest,
    ) -> Result<&'static str, ConvertError> {
        let Some(file) = file else {
            return Ok("existed");
        };
        match self {
            Self::Layout { layout, .. } => Ok(if layout.commit(file, digest)? {
                "written"
            } else {
                "existed"
            }),
            Self::Registry {
                client,
                reference,
                mount_from,
                ..
            } => {
                let pushed = client
                    .push_blob(reference, digest, file.path(), mount_from.as_ref())
                    .await?;
                Ok(outcome_name(pushed))
            }
        }
    }

    pub(super) async fn put_small_blob(
        &self,
        digest: &Digest,
        bytes: Vec<u8>,
    ) -> Result<&'static str, ConvertError> {
        match self {
            Self::Layout { layout, .. } => Ok(if layout.write_blob(digest, &bytes)? {
                "written"
            } else {
                "existed"
            }),
            Self::Registry {
                client, reference, ..
            } => Ok(outcome_name(
                client
                    .push_blob_bytes(reference, digest, bytes.into())
                    .await?,
            )),
        }
    }

    pub(super) async fn put_manifest(&self, manifest: Vec<u8>) -> Result<Digest, ConvertError> {
        let digest = Digest::of(&manifest);
        match self {
            Self::Layout { layout, tag } => {
                layout.write_blob(&digest, &manifest)?;
                let descriptor = json!({
                    "mediaType": oci::MEDIA_TYPE_OCI_MANIFEST,
                    "digest": digest.to_string(),
                    "size": manifest.len(),
                });
                layout.tag(descriptor, tag.as_deref())?;
                Ok(digest)
            }
            Self::Registry {
                client, reference, ..
            } => {
                let pushed = client
                    .push_manifest(reference, oci::MEDIA_TYPE_OCI_MANIFEST, manifest.into())
                    .await?;
                if pushed != digest {
                    return Err(ConvertError::DigestMismatch {
                        what: format!("{reference}: pushed manifest"),
                        expected: digest,
                        got: pushed,
                    });
                }
                Ok(digest)
            }
        }
    }
}

fn outcome_name(pushed: PushedBlob) -> &'static str {
    match pushed {
        PushedBlob::Existed => "existed",
        PushedBlob::Mounted => "mounted",
        PushedBlob::Uploaded => "uploaded",
    }
}
