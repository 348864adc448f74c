//! Bounds on every size, count and depth a layer's footer and TOC state, checked before memory is
//! spent on them: an image is untrusted input, and one hostile TOC must cost its reader a bounded
//! amount of memory and time, never the process.
//!
//! The defaults are generous for real images (the largest layers seen have a few hundred thousand
//! entries and TOCs of tens of MiB) and are listed, with their config keys under `[limits]`, in
//! docs/configuration.md. Errors that a limit causes name the limit's key, so an operator who
//! trusts an image bigger than the defaults knows what to raise.

use super::error::FormatError;

/// Hard ceiling of one non-zero chunk's uncompressed size (plus its `innerOffset`), whatever the
/// configuration says: [`super::decode_chunk`] holds a chunk in memory, and it is called without a
/// [`Limits`] by code that only sees chunks of TOCs decoded with one.
pub const MAX_CHUNK_CEILING: u64 = 256 << 20;

/// Hard ceiling of a TOC (compressed or JSON): the configuration may not raise the TOC limits past it.
pub const MAX_TOC_CEILING: u64 = 1 << 30;

/// Bounds applied while reading a layer's footer and TOC. `Limits::default()` holds the defaults
/// documented in docs/configuration.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest compressed TOC read from a blob (`limits.max_toc_compressed_bytes`).
    pub max_toc_compressed: u64,
    /// Largest TOC JSON; the decompressor stops here (`limits.max_toc_json_bytes`).
    pub max_toc_json: u64,
    /// Most JSON entries in one TOC, chunk entries included (`limits.max_toc_entries`).
    pub max_entries: u64,
    /// Longest entry name, symlink or hard link target, in bytes (`limits.max_name_bytes`).
    pub max_name_len: usize,
    /// Most components in an entry name (`limits.max_path_depth`).
    pub max_depth: usize,
    /// Largest uncompressed chunk (with its `innerOffset`) other than a zero run
    /// (`limits.max_chunk_bytes`, at most [`MAX_CHUNK_CEILING`]).
    pub max_chunk: u64,
    /// Most extended attributes on one entry (`limits.max_xattrs_per_entry`).
    pub max_xattrs: usize,
    /// Largest extended attribute value, in bytes (`limits.max_xattr_value_bytes`).
    pub max_xattr_value: usize,
}

/// Longest user or group name kept from a TOC (tar's own fields hold 32 bytes).
pub(crate) const MAX_OWNER_NAME: usize = 256;
/// Longest extended attribute name (the kernel's `XATTR_NAME_MAX`).
pub(crate) const MAX_XATTR_NAME: usize = 255;

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_toc_compressed: 64 << 20,
            max_toc_json: 128 << 20,
            max_entries: 1_000_000,
            max_name_len: 4096,
            max_depth: 1024,
            max_chunk: 64 << 20,
            max_xattrs: 128,
            max_xattr_value: 64 << 10,
        }
    }
}

impl Limits {
    /// Checks the limits themselves (a configuration that would lift a hard ceiling, or a zero).
    pub fn validate(&self) -> Result<(), String> {
        let nonzero = [
            (self.max_toc_compressed, "max_toc_compressed_bytes"),
            (self.max_toc_json, "max_toc_json_bytes"),
            (self.max_entries, "max_toc_entries"),
            (self.max_name_len as u64, "max_name_bytes"),
            (self.max_depth as u64, "max_path_depth"),
            (self.max_chunk, "max_chunk_bytes"),
            (self.max_xattr_value as u64, "max_xattr_value_bytes"),
        ];
        for (v, key) in nonzero {
            if v == 0 {
                return Err(format!("limits.{key} must be at least 1"));
            }
        }
        for (v, key) in [
            (self.max_toc_compressed, "max_toc_compressed_bytes"),
            (self.max_toc_json, "max_toc_json_bytes"),
        ] {
            if v > MAX_TOC_CEILING {
                return Err(format!(
                    "limits.{key} = {v} is above the ceiling of {MAX_TOC_CEILING} bytes"
                ));
            }
        }
        if self.max_chunk > MAX_CHUNK_CEILING {
            return Err(format!(
                "limits.max_chunk_bytes = {} is above the ceiling of {MAX_CHUNK_CEILING} bytes",
                self.max_chunk
            ));
        }
        Ok(())
    }

    /// The error for a stated `value` over the limit `max` of config key `key`.
    pub(crate) fn exceeded(what: &str, value: u64, max: u64, key: &str) -> String {
        format!("{what} ({value}) exceeds the limit of {max} (raise limits.{key} to accept it)")
    }

    /// Checks a name's (or link target's) length and depth.
    pub(crate) fn check_name(&self, what: &str, name: impl AsRef<[u8]>) -> Result<(), String> {
        let name = name.as_ref();
        if name.len() > self.max_name_len {
            return Err(Self::exceeded(
                &format!("{what} length"),
                name.len() as u64,
                self.max_name_len as u64,
                "max_name_bytes",
            ));
        }
        let depth = name
            .split(|&b| b == b'/')
            .filter(|c| !c.is_empty() && *c != b".")
            .count();
        if depth > self.max_depth {
            return Err(Self::exceeded(
                &format!("{what} depth"),
                depth as u64,
                self.max_depth as u64,
                "max_path_depth",
            ));
        }
        Ok(())
    }

    /// Checks the compressed and uncompressed TOC sizes a footer or annotation states.
    pub fn check_toc_size(&self, compressed: u64, json: u64) -> Result<(), FormatError> {
        if compressed > self.max_toc_compressed {
            return Err(FormatError::Toc(Self::exceeded(
                "compressed size",
                compressed,
                self.max_toc_compressed,
                "max_toc_compressed_bytes",
            )));
        }
        if json > self.max_toc_json {
            return Err(FormatError::Toc(Self::exceeded(
                "uncompressed size",
                json,
                self.max_toc_json,
                "max_toc_json_bytes",
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_ceilings_hold() {
        Limits::default().validate().unwrap();
        let mut l = Limits {
            max_chunk: MAX_CHUNK_CEILING + 1,
            ..Limits::default()
        };
        assert!(l.validate().unwrap_err().contains("max_chunk_bytes"));
        l.max_chunk = 1;
        l.max_toc_json = 0;
        assert!(l.validate().unwrap_err().contains("max_toc_json_bytes"));
    }

    #[test]
    fn names_are_bounded_in_length_and_depth() {
        let l = Limits {
            max_name_len: 10,
            max_depth: 3,
            ..Limits::default()
        };
        l.check_name("name", "a/b/c").unwrap();
        assert!(l
            .check_name("name", "a/b/c/d")
            .unwrap_err()
            .contains("limits.max_path_depth"));
        assert!(l
            .check_name("name", "abcdefghijk")
            .unwrap_err()
            .contains("limits.max_name_bytes"));
    }
}
