//! Unpacking a plain (non-lazy) layer into a directory that overlayfs can use as a lower layer:
//! OCI whiteouts become overlay whiteouts and opaque directories, and no entry can write outside
//! the directory.

use std::io::Read;
use std::path::Path;

/// Errors name the entry concerned.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("{0}")]
    Other(String),
}

/// What was unpacked.
#[derive(Debug, Clone, Copy, Default)]
pub struct Unpacked {
    pub entries: u64,
    pub bytes: u64,
}

/// Unpacks the uncompressed tar stream `tar` into the empty directory `dir`.
pub fn unpack_layer<R: Read>(tar: R, dir: &Path) -> Result<Unpacked, UnpackError> {
    let _ = (tar, dir);
    todo!("unpack helper")
}
