//! `docker save` archives: a tar holding `manifest.json`, the config and the layers (plain tars in
//! older Docker, `blobs/sha256/<hex>` of an embedded OCI layout in newer ones). Layers are read in
//! place by offset, so a many-gigabyte archive is never unpacked to disk.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ConvertError;

/// Where each member of the archive lies.
#[derive(Debug)]
pub struct Archive {
    path: PathBuf,
    members: HashMap<String, (u64, u64)>,
}

/// One image of `manifest.json`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ArchiveImage {
    pub config: String,
    pub layers: Vec<String>,
}

impl Archive {
    /// Indexes the archive's members (headers only; data is skipped by seeking).
    pub fn open(path: &Path) -> Result<Self, ConvertError> {
        let what = || format!("docker archive {}", path.display());
        let file = File::open(path).map_err(|e| ConvertError::io(what(), e))?;
        let mut archive = tar::Archive::new(file);
        let mut members = HashMap::new();
        let entries = archive
            .entries_with_seek()
            .map_err(|e| ConvertError::io(what(), e))?;
        for entry in entries {
            let entry =
                entry.map_err(|e| ConvertError::io(format!("{}: reading tar", what()), e))?;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let name = entry
                .path()
                .map_err(|e| ConvertError::io(what(), e))?
                .to_string_lossy()
                .trim_start_matches("./")
                .to_owned();
            members.insert(name, (entry.raw_file_position(), entry.size()));
        }
        Ok(Self {
            path: path.to_owned(),
            members,
        })
    }

    /// The first image `manifest.json` lists (the archive of one `docker save IMAGE`).
    pub fn image(&self) -> Result<ArchiveImage, ConvertError> {
        let bytes = self.read_member("manifest.json")?;
        let mut images: Vec<ArchiveImage> = serde_json::from_slice(&bytes).map_err(|e| {
            ConvertError::Source(format!(
                "docker archive {}: invalid manifest.json: {e}",
                self.path.display()
            ))
        })?;
        match images.len() {
            1 => Ok(images.remove(0)),
            0 => Err(ConvertError::Source(format!(
                "docker archive {}: manifest.json lists no image",
                self.path.display()
            ))),
            n => Err(ConvertError::Source(format!(
                "docker archive {}: manifest.json lists {n} images; save one image per archive",
                self.path.display()
            ))),
        }
    }

    /// `(offset, size)` of a member's data within the archive file.
    pub fn member(&self, name: &str) -> Result<(u64, u64), ConvertError> {
        self.members
            .get(name.trim_start_matches("./"))
            .copied()
            .ok_or_else(|| {
                ConvertError::Source(format!(
                    "docker archive {}: no member {name:?}",
                    self.path.display()
                ))
            })
    }

    /// Reads a (small) member whole.
    pub fn read_member(&self, name: &str) -> Result<Vec<u8>, ConvertError> {
        let (offset, size) = self.member(name)?;
        let mut out = Vec::with_capacity(size as usize);
        open_range(&self.path, offset, size)?
            .read_to_end(&mut out)
            .map_err(|e| {
                ConvertError::io(
                    format!("docker archive {}: reading {name}", self.path.display()),
                    e,
                )
            })?;
        Ok(out)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A reader over `[offset, offset+len)` of a file.
pub fn open_range(path: &Path, offset: u64, len: u64) -> Result<impl Read + Send, ConvertError> {
    use std::io::{Seek, SeekFrom};
    let mut file =
        File::open(path).map_err(|e| ConvertError::io(format!("opening {}", path.display()), e))?;
    file.seek(SeekFrom::Start(offset))
        .map_err(|e| ConvertError::io(format!("seeking in {}", path.display()), e))?;
    Ok(file.take(len))
}
