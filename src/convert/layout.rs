//! OCI image layouts on disk (`oci-layout`, `index.json`, `blobs/sha256/<hex>`): finding a tagged
//! manifest in one, and writing converted images into one.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::oci::Digest;

use super::ConvertError;

/// The annotation an OCI layout's `index.json` names tags with.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// An OCI image layout directory.
#[derive(Debug, Clone)]
pub struct Layout {
    dir: PathBuf,
}

impl Layout {
    /// Opens an existing layout, checking its `oci-layout` marker.
    pub fn open(dir: &Path) -> Result<Self, ConvertError> {
        let marker = dir.join("oci-layout");
        let text = fs::read_to_string(&marker).map_err(|e| {
            ConvertError::io(
                format!(
                    "{}: not an OCI image layout (reading oci-layout)",
                    dir.display()
                ),
                e,
            )
        })?;
        let v: Value = serde_json::from_str(&text).map_err(|e| {
            ConvertError::Source(format!(
                "{}: invalid oci-layout file: {e}",
                marker.display()
            ))
        })?;
        if v.get("imageLayoutVersion")
            .and_then(Value::as_str)
            .is_none()
        {
            return Err(ConvertError::Source(format!(
                "{}: oci-layout has no imageLayoutVersion",
                marker.display()
            )));
        }
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// Opens the layout at `dir`, creating an empty one if there is none.
    pub fn create(dir: &Path) -> Result<Self, ConvertError> {
        let blobs = dir.join("blobs").join("sha256");
        fs::create_dir_all(&blobs)
            .map_err(|e| ConvertError::io(format!("creating {}", blobs.display()), e))?;
        let marker = dir.join("oci-layout");
        if !marker.exists() {
            write_atomically(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        let index = dir.join("index.json");
        if !index.exists() {
            let empty = json!({"schemaVersion": 2, "mediaType": crate::oci::MEDIA_TYPE_OCI_INDEX, "manifests": []});
            write_atomically(&index, empty.to_string().as_bytes())?;
        }
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the blob `digest` lives.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join("blobs").join("sha256").join(digest.hex())
    }

    /// Reads a blob whole and checks it against its name.
    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>, ConvertError> {
        let path = self.blob_path(digest);
        let bytes = fs::read(&path)
            .map_err(|e| ConvertError::io(format!("reading blob {}", path.display()), e))?;
        let got = Digest::of(&bytes);
        if got != *digest {
            return Err(ConvertError::DigestMismatch {
                what: path.display().to_string(),
                expected: *digest,
                got,
            });
        }
        Ok(bytes)
    }

    /// The layout's `index.json`.
    pub fn index(&self) -> Result<Value, ConvertError> {
        let path = self.dir.join("index.json");
        let text = fs::read(&path)
            .map_err(|e| ConvertError::io(format!("reading {}", path.display()), e))?;
        serde_json::from_slice(&text).map_err(|e| {
            ConvertError::Source(format!("{}: invalid index.json: {e}", path.display()))
        })
    }

    /// The descriptor `tag` names in `index.json` (the only one, when no tag is given).
    pub fn find(&self, tag: Option<&str>) -> Result<Value, ConvertError> {
        let index = self.index()?;
        let manifests = index
            .get("manifests")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let name_of = |d: &Value| {
            d.pointer(&format!("/annotations/{}", REF_NAME.replace('/', "~1")))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        let found: Vec<&Value> = match tag {
            Some(tag) => manifests
                .iter()
                .filter(|d| name_of(d).as_deref() == Some(tag))
                .collect(),
            None => manifests.iter().collect(),
        };
        match found.as_slice() {
            [one] => Ok((*one).clone()),
            _ => {
                let tags: Vec<String> = manifests.iter().filter_map(name_of).collect();
                Err(ConvertError::Source(format!(
                    "{}: {} (tags here: {})",
                    self.dir.display(),
                    match tag {
                        Some(t) => format!("no manifest tagged {t:?}"),
                        None if found.is_empty() => "index.json lists no manifest".to_owned(),
                        None => "several manifests; name one with oci:DIR:TAG".to_owned(),
                    },
                    if tags.is_empty() {
                        "none".to_owned()
                    } else {
                        tags.join(", ")
                    }
                )))
            }
        }
    }

    /// A temporary file inside the layout's blob directory, renamed into place by [`Self::commit`].
    pub fn temp_blob(&self) -> Result<tempfile::NamedTempFile, ConvertError> {
        let dir = self.dir.join("blobs").join("sha256");
        tempfile::Builder::new()
            .prefix(".partial-")
            .tempfile_in(&dir)
            .map_err(|e| {
                ConvertError::io(format!("creating a temporary blob in {}", dir.display()), e)
            })
    }

    /// Moves a finished blob into place under its digest. Returns false if it was already there.
    pub fn commit(
        &self,
        file: tempfile::NamedTempFile,
        digest: &Digest,
    ) -> Result<bool, ConvertError> {
        let path = self.blob_path(digest);
        if path.exists() {
            return Ok(false);
        }
        file.as_file()
            .sync_all()
            .map_err(|e| ConvertError::io(format!("syncing blob {digest}"), e))?;
        file.persist(&path)
            .map_err(|e| ConvertError::io(format!("writing blob {}", path.display()), e.error))?;
        Ok(true)
    }

    /// Writes a small blob. Returns false if it was already there.
    pub fn write_blob(&self, digest: &Digest, bytes: &[u8]) -> Result<bool, ConvertError> {
        let path = self.blob_path(digest);
        if path.exists() {
            return Ok(false);
        }
        write_atomically(&path, bytes)?;
        Ok(true)
    }

    /// Records `descriptor` in `index.json` under `tag`, replacing what that tag named before.
    pub fn tag(&self, mut descriptor: Value, tag: Option<&str>) -> Result<(), ConvertError> {
        let mut index = self.index()?;
        if let Some(tag) = tag {
            descriptor["annotations"] = json!({ REF_NAME: tag });
        }
        let manifests = index
            .get_mut("manifests")
            .and_then(Value::as_array_mut)
            .ok_or_else(|| {
                ConvertError::Source(format!(
                    "{}: index.json has no manifests array",
                    self.dir.display()
                ))
            })?;
        manifests.retain(|d| match tag {
            Some(tag) => {
                d.pointer("/annotations")
                    .and_then(|a| a.get(REF_NAME))
                    .and_then(Value::as_str)
                    != Some(tag)
            }
            None => d.get("digest") != descriptor.get("digest"),
        });
        manifests.push(descriptor);
        let bytes = serde_json::to_vec(&index).map_err(|e| ConvertError::Source(e.to_string()))?;
        write_atomically(&self.dir.join("index.json"), &bytes)
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename, so readers never see half a file.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), ConvertError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| {
        ConvertError::io(format!("creating a temporary file in {}", dir.display()), e)
    })?;
    tmp.write_all(bytes)
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(|e| ConvertError::io(format!("writing {}", path.display()), e))?;
    tmp.persist(path)
        .map_err(|e| ConvertError::io(format!("writing {}", path.display()), e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_replace_and_find() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::create(dir.path()).unwrap();
        let d1 = json!({"mediaType": "m", "digest": Digest::of(b"1").to_string(), "size": 1});
        let d2 = json!({"mediaType": "m", "digest": Digest::of(b"2").to_string(), "size": 1});
        layout.tag(d1.clone(), Some("v1")).unwrap();
        layout.tag(d2.clone(), Some("v2")).unwrap();
        layout.tag(d2.clone(), Some("v1")).unwrap();
        let layout = Layout::open(dir.path()).unwrap();
        assert_eq!(layout.find(Some("v1")).unwrap()["digest"], d2["digest"]);
        assert!(layout
            .find(None)
            .unwrap_err()
            .to_string()
            .contains("several manifests"));
        let missing = layout.find(Some("v3")).unwrap_err().to_string();
        assert!(
            missing.contains("v1") && missing.contains("v2"),
            "{missing}"
        );
    }

    #[test]
    fn blobs_are_checked_against_their_names() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::create(dir.path()).unwrap();
        let d = Digest::of(b"hello");
        assert!(layout.write_blob(&d, b"hello").unwrap());
        assert!(!layout.write_blob(&d, b"hello").unwrap());
        assert_eq!(layout.read_blob(&d).unwrap(), b"hello");
        fs::write(layout.blob_path(&d), b"hellO").unwrap();
        assert!(matches!(
            layout.read_blob(&d),
            Err(ConvertError::DigestMismatch { .. })
        ));
    }
}
