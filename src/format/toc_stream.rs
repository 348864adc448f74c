//! The streaming half of TOC decoding: the JSON entries are deserialized one at a time and
//! normalised into [`TocEntry`]s as the parser yields them, so no array of raw JSON entries is
//! ever built, and each entry is checked against the [`Limits`] (count, names, depth, owners,
//! xattrs) before the next is read. `toc::decode_limited` then resolves chunks and hard links.

use std::collections::BTreeMap;

use base64::Engine as _;

use super::error::FormatError;
use super::limits::{Limits, MAX_OWNER_NAME, MAX_XATTR_NAME};
use super::names::{check_hardlink, check_symlink, normalise_name};
use super::toc::{parse_digest, parse_time, JsonEntry, RawChunk};
use super::{EntryKind, TocEntry};

/// The state of a streaming decode: entries normalised so far, and the first error (serde's own
/// error type cannot carry a [`FormatError`]).
pub(super) struct Decoder<'l> {
    limits: &'l Limits,
    /// JSON entries seen, chunk entries included.
    seen: u64,
    pub entries: Vec<TocEntry>,
    /// Chunks of all files, with the index of their entry.
    pub raw_chunks: Vec<(usize, RawChunk)>,
    /// Name and index of the last regular file (the file chunk entries continue).
    last_reg: Option<(String, usize)>,
    /// Names from the TOC's start-up field ([`super::toc::PREFETCH_FIELD`]), normalised.
    pub prefetch: Vec<String>,
    pub failure: Option<FormatError>,
}

impl<'l> Decoder<'l> {
    pub fn new(limits: &'l Limits) -> Self {
        Self {
            limits,
            seen: 0,
            entries: Vec::new(),
            raw_chunks: Vec::new(),
            last_reg: None,
            prefetch: Vec::new(),
            failure: None,
        }
    }

    /// Normalises one JSON entry and checks it against the limits.
    fn push(&mut self, j: JsonEntry) -> Result<(), FormatError> {
        let limits = self.limits;
        self.seen += 1;
        if self.seen > limits.max_entries {
            return Err(FormatError::Toc(Limits::exceeded(
                "entry count",
                self.seen,
                limits.max_entries,
                "max_toc_entries",
            )));
        }
        let b64 = base64::engine::general_purpose::STANDARD;
        let raw_name = j.name.clone().unwrap_or_default();
        let kind_s = j.kind.clone().unwrap_or_default();
        let shown = || -> String {
            // Names are bounded only after this check: never copy a huge one into an error.
            match raw_name.char_indices().nth(200) {
                Some((i, _)) => format!("{}…", &raw_name[..i]),
                None => raw_name.clone(),
            }
        };
        limits
            .check_name("name", &raw_name)
            .map_err(|r| FormatError::entry(shown(), r))?;
        let name = normalise_name(raw_name.trim_start_matches('/'))
            .map_err(|r| FormatError::entry(&raw_name, r))?;
        let err = |r: String| FormatError::entry(&raw_name, r);
        let chunk = || -> Result<RawChunk, FormatError> {
            Ok(RawChunk {
                file_offset: j.chunk_offset.unwrap_or(0),
                size: j.chunk_size.filter(|&s| s > 0),
                start: j.offset.unwrap_or(0),
                end: j.end_offset.filter(|&e| e > 0),
                inner: j.inner_offset.unwrap_or(0),
                digest: parse_digest(&raw_name, "chunkDigest", &j.chunk_digest)?,
                zeros: j.chunk_type.as_deref() == Some("zeros"),
            })
        };
        let kind = match kind_s.as_str() {
            "chunk" => {
                // Both formats write a file's chunk entries after it, before the next file.
                let idx = match &self.last_reg {
                    Some((last, idx)) if *last == name => *idx,
                    _ => {
                        return Err(err(
                            "chunk entry that does not follow its regular file".into()
                        ))
                    }
                };
                let c = chunk()?;
                self.raw_chunks.push((idx, c));
                return Ok(());
            }
            "dir" => EntryKind::Dir,
            "reg" => EntryKind::Reg,
            "symlink" => EntryKind::Symlink,
            "hardlink" => EntryKind::Hardlink,
            "char" => EntryKind::Char,
            "block" => EntryKind::Block,
            "fifo" => EntryKind::Fifo,
            other => {
                let other: String = other.chars().take(64).collect();
                return Err(err(format!("unknown entry type {other:?}")));
            }
        };
        let link_raw = j.link_name.clone().unwrap_or_default();
        let link_name = match kind {
            EntryKind::Hardlink => {
                limits
                    .check_name("hard link target", &link_raw)
                    .map_err(err)?;
                check_hardlink(link_raw.trim_start_matches('/')).map_err(err)?
            }
            EntryKind::Symlink => {
                // A symlink target is data: bounded in length only.
                if link_raw.len() > limits.max_name_len {
                    return Err(err(Limits::exceeded(
                        "symlink target length",
                        link_raw.len() as u64,
                        limits.max_name_len as u64,
                        "max_name_bytes",
                    )));
                }
                check_symlink(&link_raw).map_err(err)?;
                link_raw
            }
            _ => String::new(),
        };
        for (what, owner) in [("userName", &j.user_name), ("groupName", &j.group_name)] {
            let len = owner.as_ref().map_or(0, String::len);
            if len > MAX_OWNER_NAME {
                return Err(err(format!(
                    "{what} of {len} bytes is longer than {MAX_OWNER_NAME}"
                )));
            }
        }
        let u32f = |v: Option<u64>, what: &str| -> Result<u32, FormatError> {
            u32::try_from(v.unwrap_or(0)).map_err(|_| err(format!("{what} out of range")))
        };
        let (mtime, mtime_nsec) = match j.modtime.as_deref() {
            None | Some("") => (0, 0),
            Some(t) => parse_time(t).ok_or_else(|| {
                let t: String = t.chars().take(64).collect();
                err(format!("invalid modtime {t:?}"))
            })?,
        };
        let mut xattrs = BTreeMap::new();
        let json_xattrs = j.xattrs.as_ref();
        let count = json_xattrs.map_or(0, BTreeMap::len);
        if count > limits.max_xattrs {
            return Err(err(Limits::exceeded(
                "xattr count",
                count as u64,
                limits.max_xattrs as u64,
                "max_xattrs_per_entry",
            )));
        }
        for (k, v) in json_xattrs.into_iter().flatten() {
            let shown_key: String = k.chars().take(64).collect();
            if k.len() > MAX_XATTR_NAME || k.is_empty() {
                return Err(err(format!(
                    "xattr name {shown_key:?} of {} bytes is empty or longer than {MAX_XATTR_NAME}",
                    k.len()
                )));
            }
            // Base64 holds 3 bytes in 4 characters: check before decoding.
            let decoded_len = v.len() / 4 * 3;
            if decoded_len > limits.max_xattr_value + 3 {
                return Err(err(Limits::exceeded(
                    &format!("xattr {shown_key:?} value size"),
                    decoded_len as u64,
                    limits.max_xattr_value as u64,
                    "max_xattr_value_bytes",
                )));
            }
            let val = b64
                .decode(v.as_bytes())
                .map_err(|_| err(format!("xattr {shown_key:?}: invalid base64")))?;
            if val.len() > limits.max_xattr_value {
                return Err(err(Limits::exceeded(
                    &format!("xattr {shown_key:?} value size"),
                    val.len() as u64,
                    limits.max_xattr_value as u64,
                    "max_xattr_value_bytes",
                )));
            }
            xattrs.insert(k.clone(), val);
        }
        let size = if kind == EntryKind::Reg {
            j.size.unwrap_or(0)
        } else {
            0
        };
        let entry = TocEntry {
            name: name.clone(),
            kind,
            size,
            mode: (j.mode.unwrap_or(0) & 0o7777) as u32,
            uid: u32f(j.uid, "uid")?,
            gid: u32f(j.gid, "gid")?,
            uname: j.user_name.clone().unwrap_or_default(),
            gname: j.group_name.clone().unwrap_or_default(),
            mtime,
            mtime_nsec,
            link_name,
            dev_major: u32f(j.dev_major, "devMajor")?,
            dev_minor: u32f(j.dev_minor, "devMinor")?,
            xattrs,
            digest: if kind == EntryKind::Reg {
                parse_digest(&raw_name, "digest", &j.digest)?
            } else {
                None
            },
            chunks: Vec::new(),
        };
        if kind == EntryKind::Reg {
            if size > 0 {
                let c = chunk()?;
                self.raw_chunks.push((self.entries.len(), c));
            }
            self.last_reg = Some((name, self.entries.len()));
        }
        self.entries.push(entry);
        Ok(())
    }
}

/// Deserializes the TOC object, feeding `entries` to the [`Decoder`]; yields `version`.
pub(super) struct TocSeed<'a, 'l>(&'a mut Decoder<'l>);

impl<'a, 'l> TocSeed<'a, 'l> {
    pub fn new(decoder: &'a mut Decoder<'l>) -> Self {
        Self(decoder)
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for TocSeed<'_, '_> {
    type Value = Option<i64>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for TocSeed<'_, '_> {
    type Value = Option<i64>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a TOC object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut version = None;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match key.as_ref() {
                "version" => version = map.next_value::<Option<i64>>()?,
                "entries" => map.next_value_seed(EntriesSeed(&mut *self.0))?,
                super::toc::PREFETCH_FIELD => map.next_value_seed(PrefetchSeed(&mut *self.0))?,
                _ => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(version)
    }
}

/// Deserializes the `entries` array one element at a time into the [`Decoder`].
struct EntriesSeed<'a, 'l>(&'a mut Decoder<'l>);

impl<'de> serde::de::DeserializeSeed<'de> for EntriesSeed<'_, '_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de> serde::de::Visitor<'de> for EntriesSeed<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array of TOC entries")
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(j) = seq.next_element::<JsonEntry>()? {
            if let Err(e) = self.0.push(j) {
                let text = e.to_string();
                self.0.failure = Some(e);
                return Err(serde::de::Error::custom(text));
            }
        }
        Ok(())
    }
}

/// Deserializes the start-up field: an array of names, each checked against the name limits and
/// counted against the entry limit as it is read (a hostile list costs no more than its bytes).
struct PrefetchSeed<'a, 'l>(&'a mut Decoder<'l>);

impl<'de> serde::de::DeserializeSeed<'de> for PrefetchSeed<'_, '_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for PrefetchSeed<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array of entry names")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let limits = self.0.limits;
        let mut read = 0u64;
        while let Some(name) = seq.next_element::<std::borrow::Cow<'de, str>>()? {
            read += 1;
            if read > limits.max_entries {
                let e = FormatError::Toc(Limits::exceeded(
                    "start-up names",
                    read,
                    limits.max_entries,
                    "max_toc_entries",
                ));
                let text = e.to_string();
                self.0.failure = Some(e);
                return Err(serde::de::Error::custom(text));
            }
            // A name no entry could have is ignored: the list is only a hint.
            let checked = limits
                .check_name("start-up name", name.as_bytes())
                .and_then(|()| normalise_name(name.trim_start_matches('/')));
            if let Ok(n) = checked {
                self.0.prefetch.push(n);
            }
        }
        Ok(())
    }
}
