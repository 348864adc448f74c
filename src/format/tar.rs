//! A small streaming tar parser that keeps every header byte it reads, so the writer can pass the
//! archive through verbatim while knowing where each payload starts.
//!
//! Understands ustar, GNU and PAX: checksums, base-256 numbers, PAX `x` records (path, linkpath,
//! size, uid, gid, uname, gname, mtime with fraction, `SCHILY.xattr.*`, `LIBARCHIVE.xattr.*`),
//! PAX `g` records (passed through, not applied), GNU `L`/`K` long names. GNU sparse files are
//! rejected. Names are checked here: absolute names, `..` components, escaping hard links and
//! escaping relative symlinks are errors that name the entry.
//!
//! Names and link targets are bytes, as tar stores them: the plain-layer unpacker creates them
//! byte for byte. What only a TOC cannot hold (a name that is not UTF-8, a time outside years
//! 0000-9999) is not an error here; writers ask [`EntryMeta::toc_name`] and
//! [`EntryMeta::check_toc`], which answer [`FormatError::Unrepresentable`].

use std::collections::BTreeMap;
use std::io::{self, Read};

use base64::Engine as _;

use super::error::FormatError;
use super::limits::{Limits, MAX_XATTR_NAME};
pub(crate) use super::names::shown;
use super::names::{check_hardlink_bytes, check_symlink_bytes, normalise_name_bytes};
use super::EntryKind;

pub(crate) const BLOCK: usize = 512;
/// 0000-01-01T00:00:00Z and 9999-12-31T23:59:59Z: the times RFC 3339 (and Go) can write.
pub(crate) const MIN_TIME: i64 = -62_167_219_200;
pub(crate) const MAX_TIME: i64 = 253_402_300_799;
/// Largest PAX or GNU long-name record we buffer.
const MAX_EXT_SIZE: u64 = 16 << 20;

/// What one entry of the archive says about itself, after extension records are applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EntryMeta {
    /// Normalised name (no leading `./` or `/`, no trailing `/`; the root is empty), as bytes.
    pub name: Vec<u8>,
    pub kind: EntryKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub uname: String,
    pub gname: String,
    pub mtime: i64,
    pub mtime_nsec: u32,
    /// Symlink target (verbatim) or hard link target (normalised), as bytes.
    pub link_name: Vec<u8>,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

impl EntryMeta {
    /// The name for messages (see [`shown`]).
    pub fn shown_name(&self) -> String {
        shown(&self.name)
    }

    /// The name as a TOC records it: text, or [`FormatError::Unrepresentable`].
    pub fn toc_name(&self) -> Result<&str, FormatError> {
        std::str::from_utf8(&self.name)
            .map_err(|_| self.unrepresentable("name is not valid UTF-8".into()))
    }

    /// The link target as a TOC records it: text, or [`FormatError::Unrepresentable`].
    pub fn toc_link_name(&self) -> Result<&str, FormatError> {
        std::str::from_utf8(&self.link_name).map_err(|_| {
            self.unrepresentable(format!(
                "link target {:?} is not valid UTF-8",
                shown(&self.link_name)
            ))
        })
    }

    /// Checks everything about the entry that a TOC (JSON with RFC 3339 times) must be able to
    /// hold: the name, the link target and the modification time.
    pub fn check_toc(&self) -> Result<(), FormatError> {
        self.toc_name()?;
        self.toc_link_name()?;
        if !(MIN_TIME..=MAX_TIME).contains(&self.mtime) {
            return Err(
                self.unrepresentable(format!("mtime {} is outside years 0000-9999", self.mtime))
            );
        }
        Ok(())
    }

    fn unrepresentable(&self, reason: String) -> FormatError {
        FormatError::Unrepresentable {
            name: self.shown_name(),
            reason,
        }
    }
}

/// One parsed entry: its raw header blocks (extension records included) and payload length.
#[derive(Debug)]
pub(crate) struct TarEntry {
    pub raw: Vec<u8>,
    pub meta: EntryMeta,
    /// Payload bytes that follow the header (padding not included).
    pub size: u64,
}

#[derive(Debug)]
pub(crate) enum TarItem {
    /// A PAX global header (with its data and padding), passed through verbatim.
    Global(Vec<u8>),
    Entry(TarEntry),
}

/// Reads a tar stream entry by entry. After [`TarParser::next_item`] returns an entry, the caller
/// must consume exactly `size` payload bytes and then `padding(size)` bytes before the next call.
#[derive(Debug)]
pub(crate) struct TarParser<R> {
    r: R,
    /// Bytes consumed so far.
    offset: u64,
    /// Name of the last entry, for error messages.
    last: String,
    done: bool,
}

/// Zero bytes after a payload of `size` bytes, up to the next block.
pub(crate) fn padding(size: u64) -> usize {
    ((BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64) as usize
}

impl<R: Read> TarParser<R> {
    pub fn new(r: R) -> Self {
        Self {
            r,
            offset: 0,
            last: String::new(),
            done: false,
        }
    }

    /// Bytes of input consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Reads exactly `buf.len()` bytes of the current entry's payload (or padding).
    pub fn read_payload(&mut self, buf: &mut [u8]) -> Result<(), FormatError> {
        let name = self.last.clone();
        self.fill(buf, &name, "inside the payload")
    }

    /// Skips `n` payload bytes.
    pub fn skip_payload(&mut self, mut n: u64) -> Result<(), FormatError> {
        let mut buf = [0u8; 8192];
        while n > 0 {
            let k = n.min(buf.len() as u64) as usize;
            self.read_payload(&mut buf[..k])?;
            n -= k as u64;
        }
        Ok(())
    }

    fn fill(&mut self, buf: &mut [u8], name: &str, what: &str) -> Result<(), FormatError> {
        let mut got = 0;
        while got < buf.len() {
            match self.r.read(&mut buf[got..]) {
                Ok(0) => {
                    return Err(FormatError::Truncated {
                        name: name.to_owned(),
                        detail: format!(
                            "end of stream {what} at byte offset {} ({} of {} bytes read)",
                            self.offset + got as u64,
                            got,
                            buf.len()
                        ),
                    })
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.offset += got as u64;
        Ok(())
    }

    /// Reads one block; `None` at a clean end of stream.
    fn read_block(&mut self) -> Result<Option<[u8; BLOCK]>, FormatError> {
        let mut block = [0u8; BLOCK];
        let mut got = 0;
        while got < BLOCK {
            match self.r.read(&mut block[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => {
                    return Err(FormatError::Truncated {
                        name: self.last.clone(),
                        detail: format!(
                        "end of stream inside a header block at byte offset {} (after this entry)",
                        self.offset + got as u64
                    ),
                    })
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.offset += BLOCK as u64;
        Ok(Some(block))
    }

    /// The next entry, or `None` after the end-of-archive marker (or a clean end of stream).
    pub fn next_item(&mut self) -> Result<Option<TarItem>, FormatError> {
        if self.done {
            return Ok(None);
        }
        let mut raw: Vec<u8> = Vec::new();
        let mut pax: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        loop {
            let header_offset = self.offset;
            let Some(block) = self.read_block()? else {
                if raw.is_empty() {
                    self.done = true;
                    return Ok(None);
                }
                return Err(FormatError::Truncated {
                    name: self.last.clone(),
                    detail: "end of stream after an extended header, before its entry".into(),
                });
            };
            if block.iter().all(|&b| b == 0) {
                if !raw.is_empty() {
                    return Err(FormatError::entry(
                        self.last.clone(),
                        "extended header followed by the end-of-archive marker",
                    ));
                }
                self.done = true;
                // Trailing zero blocks and record padding are not part of the layer.
                self.offset += io::copy(&mut self.r, &mut io::sink())?;
                return Ok(None);
            }
            let field_name = String::from_utf8_lossy(cstr(&block[0..100])).into_owned();
            verify_checksum(&block, header_offset, &field_name)?;
            let typeflag = block[156];
            let size = parse_numeric(&block[124..136])
                .and_then(|v| u64::try_from(v).ok())
                .ok_or_else(|| FormatError::entry(&field_name, "invalid size field"))?;
            match typeflag {
                b'x' | b'g' | b'L' | b'K' => {
                    if size > MAX_EXT_SIZE || raw.len() as u64 + size > 4 * MAX_EXT_SIZE {
                        return Err(FormatError::entry(
                            &field_name,
                            format!("extended header of {size} bytes is too large"),
                        ));
                    }
                    let was_empty = raw.is_empty();
                    raw.extend_from_slice(&block);
                    let start = raw.len();
                    raw.resize(start + size as usize + padding(size), 0);
                    let mut data = std::mem::take(&mut raw);
                    self.fill(&mut data[start..], &field_name, "inside an extended header")?;
                    raw = data;
                    let body = &raw[start..start + size as usize];
                    match typeflag {
                        b'x' => parse_pax(body, &mut pax)
                            .map_err(|r| FormatError::entry(&field_name, r))?,
                        b'L' => long_name = Some(cstr(body).to_vec()),
                        b'K' => long_link = Some(cstr(body).to_vec()),
                        _ => {
                            if was_empty {
                                return Ok(Some(TarItem::Global(raw)));
                            }
                        }
                    }
                    continue;
                }
                _ => {}
            }
            raw.extend_from_slice(&block);
            let entry = self.build(&block, typeflag, size, &pax, long_name, long_link, raw)?;
            self.last = entry.meta.shown_name();
            return Ok(Some(TarItem::Entry(entry)));
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        &mut self,
        block: &[u8; BLOCK],
        typeflag: u8,
        mut size: u64,
        pax: &BTreeMap<String, Vec<u8>>,
        long_name: Option<Vec<u8>>,
        long_link: Option<Vec<u8>>,
        raw: Vec<u8>,
    ) -> Result<TarEntry, FormatError> {
        let ustar = &block[257..263] == b"ustar\0";
        let gnu = &block[257..265] == b"ustar  \0";
        let name_bytes: Vec<u8> = if let Some(p) = pax.get("path") {
            p.clone()
        } else if let Some(l) = long_name {
            l
        } else {
            let prefix = cstr(&block[345..500]);
            let n = cstr(&block[0..100]);
            if ustar && !prefix.is_empty() {
                let mut v = prefix.to_vec();
                v.push(b'/');
                v.extend_from_slice(n);
                v
            } else {
                n.to_vec()
            }
        };
        let display = shown(&name_bytes);
        let err = |reason: String| FormatError::entry(display.clone(), reason);
        if name_bytes.contains(&0) {
            return Err(err("name contains a NUL byte".into()));
        }
        // The same bounds the TOC reader applies: a layer converted here must load lazily.
        let limits = Limits::default();
        limits.check_name("name", &name_bytes).map_err(|r| {
            let shown: String = display.chars().take(200).collect();
            FormatError::entry(shown, r)
        })?;
        if pax.keys().any(|k| k.starts_with("GNU.sparse.")) || typeflag == b'S' {
            return Err(err(
                "GNU sparse files are not supported; re-create the tar without --sparse".into(),
            ));
        }
        let link_bytes: Vec<u8> = if let Some(p) = pax.get("linkpath") {
            p.clone()
        } else if let Some(l) = long_link {
            l
        } else {
            cstr(&block[157..257]).to_vec()
        };
        let link_raw = link_bytes;
        if link_raw.len() > limits.max_name_len {
            return Err(err(Limits::exceeded(
                "link target length",
                link_raw.len() as u64,
                limits.max_name_len as u64,
                "max_name_bytes",
            )));
        }

        let kind = match typeflag {
            b'0' | b'7' => EntryKind::Reg,
            0 if name_bytes.ends_with(b"/") => EntryKind::Dir,
            0 => EntryKind::Reg,
            b'1' => EntryKind::Hardlink,
            b'2' => EntryKind::Symlink,
            b'3' => EntryKind::Char,
            b'4' => EntryKind::Block,
            b'5' => EntryKind::Dir,
            b'6' => EntryKind::Fifo,
            other => {
                return Err(err(format!(
                    "unsupported tar entry type {:?} (0x{other:02x})",
                    other as char
                )))
            }
        };
        let name = normalise_name_bytes(&name_bytes).map_err(err)?;
        let link_name = match kind {
            EntryKind::Hardlink => check_hardlink_bytes(&link_raw).map_err(err)?,
            EntryKind::Symlink => {
                check_symlink_bytes(&link_raw).map_err(err)?;
                link_raw
            }
            _ => Vec::new(),
        };

        let num = |range: std::ops::Range<usize>, what: &str| -> Result<i64, FormatError> {
            parse_numeric(&block[range]).ok_or_else(|| err(format!("invalid {what} field")))
        };
        let to_u32 = |v: i64, what: &str| -> Result<u32, FormatError> {
            u32::try_from(v).map_err(|_| err(format!("{what} {v} out of range")))
        };
        let mode = (num(100..108, "mode")? & 0o7777) as u32;
        let mut uid = to_u32(num(108..116, "uid")?, "uid")?;
        let mut gid = to_u32(num(116..124, "gid")?, "gid")?;
        let mut mtime = num(136..148, "mtime")?;
        let mut mtime_nsec = 0;
        let (mut uname, mut gname, mut dev_major, mut dev_minor) =
            (String::new(), String::new(), 0, 0);
        if ustar || gnu {
            uname = String::from_utf8_lossy(cstr(&block[265..297])).into_owned();
            gname = String::from_utf8_lossy(cstr(&block[297..329])).into_owned();
            if matches!(kind, EntryKind::Char | EntryKind::Block) {
                dev_major = to_u32(num(329..337, "devmajor")?, "devmajor")?;
                dev_minor = to_u32(num(337..345, "devminor")?, "devminor")?;
            }
        }
        let mut xattrs = BTreeMap::new();
        let mut pax_mtime = None;
        for (k, v) in pax {
            let text = || String::from_utf8_lossy(v).into_owned();
            let dec = |what: &str| -> Result<u64, FormatError> {
                text()
                    .trim()
                    .parse::<u64>()
                    .map_err(|_| err(format!("invalid PAX {what} {:?}", text())))
            };
            match k.as_str() {
                "size" => size = dec("size")?,
                "uid" => {
                    uid = u32::try_from(dec("uid")?)
                        .map_err(|_| err("PAX uid out of range".into()))?
                }
                "gid" => {
                    gid = u32::try_from(dec("gid")?)
                        .map_err(|_| err("PAX gid out of range".into()))?
                }
                "uname" => uname = text(),
                "gname" => gname = text(),
                "mtime" => {
                    pax_mtime = Some(
                        parse_pax_time(&text())
                            .ok_or_else(|| err(format!("invalid PAX mtime {:?}", text())))?,
                    )
                }
                "SCHILY.devmajor" => {
                    dev_major = u32::try_from(dec("devmajor")?).unwrap_or(u32::MAX)
                }
                "SCHILY.devminor" => {
                    dev_minor = u32::try_from(dec("devminor")?).unwrap_or(u32::MAX)
                }
                _ => {
                    if let Some(x) = k.strip_prefix("SCHILY.xattr.") {
                        xattrs.insert(x.to_owned(), v.clone());
                    }
                }
            }
        }
        if let Some((secs, nsec)) = pax_mtime {
            (mtime, mtime_nsec) = (secs, nsec);
        }
        for (k, v) in pax {
            if let Some(enc) = k.strip_prefix("LIBARCHIVE.xattr.") {
                let key = percent_decode(enc);
                if let std::collections::btree_map::Entry::Vacant(slot) = xattrs.entry(key) {
                    let text: Vec<u8> = v.iter().copied().filter(|&b| b != b'=').collect();
                    let val = base64::engine::general_purpose::STANDARD_NO_PAD
                        .decode(text)
                        .map_err(|_| err(format!("invalid base64 in PAX record {k}")))?;
                    slot.insert(val);
                }
            }
        }
        if xattrs.len() > limits.max_xattrs {
            return Err(err(Limits::exceeded(
                "xattr count",
                xattrs.len() as u64,
                limits.max_xattrs as u64,
                "max_xattrs_per_entry",
            )));
        }
        if let Some((k, v)) = xattrs
            .iter()
            .find(|(k, v)| v.len() > limits.max_xattr_value || k.len() > MAX_XATTR_NAME)
        {
            return Err(err(format!(
                "xattr {:?}: name of {} bytes (at most {MAX_XATTR_NAME}) or value of {} bytes \
                 (at most {}, limits.max_xattr_value_bytes)",
                k.chars().take(64).collect::<String>(),
                k.len(),
                v.len(),
                limits.max_xattr_value
            )));
        }
        Ok(TarEntry {
            raw,
            meta: EntryMeta {
                name,
                kind,
                mode,
                uid,
                gid,
                uname,
                gname,
                mtime,
                mtime_nsec,
                link_name,
                dev_major,
                dev_minor,
                xattrs,
            },
            size,
        })
    }
}

/// The bytes of a NUL-terminated field.
fn cstr(field: &[u8]) -> &[u8] {
    match field.iter().position(|&b| b == 0) {
        Some(i) => &field[..i],
        None => field,
    }
}

fn verify_checksum(block: &[u8; BLOCK], offset: u64, name: &str) -> Result<(), FormatError> {
    let mut unsigned: u64 = 0;
    let mut signed: i64 = 0;
    for (i, &b) in block.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += u64::from(b);
        signed += i64::from(b as i8);
    }
    let stored = parse_numeric(&block[148..156]);
    if stored == Some(unsigned as i64) || stored == Some(signed) {
        return Ok(());
    }
    Err(FormatError::Checksum {
        name: name.to_owned(),
        offset,
        stored: String::from_utf8_lossy(cstr(&block[148..156]))
            .trim()
            .to_owned(),
        computed: unsigned,
    })
}

/// Parses a numeric header field: octal ASCII (space/NUL padded) or GNU base-256.
pub(crate) fn parse_numeric(field: &[u8]) -> Option<i64> {
    let first = *field.first()?;
    if first & 0x80 != 0 {
        // GNU base-256: big-endian; 0x80 marks a positive value, 0xff a two's complement negative.
        if field.len() > 15 {
            return None;
        }
        let mut u: i128 = 0;
        for (i, &b) in field.iter().enumerate() {
            let b = if i == 0 && first != 0xff { b & 0x7f } else { b };
            u = (u << 8) | i128::from(b);
        }
        if first == 0xff {
            u -= 1i128 << (field.len() * 8);
        }
        return i64::try_from(u).ok();
    }
    let text = field
        .iter()
        .position(|&b| b == 0)
        .map_or(field, |i| &field[..i]);
    let text = std::str::from_utf8(text).ok()?.trim_matches(' ');
    if text.is_empty() {
        return Some(0);
    }
    i64::from_str_radix(text, 8).ok().filter(|v| *v >= 0)
}

/// Parses PAX records (`"%d %s=%s\n"`) into `map`.
fn parse_pax(data: &[u8], map: &mut BTreeMap<String, Vec<u8>>) -> Result<(), String> {
    let mut rest = data;
    while !rest.is_empty() {
        if rest.iter().all(|&b| b == 0) {
            break;
        }
        let sp = rest
            .iter()
            .take(20)
            .position(|&b| b == b' ')
            .ok_or("malformed PAX record (no length)")?;
        let len: usize = std::str::from_utf8(&rest[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("malformed PAX record length")?;
        if len <= sp + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err("malformed PAX record".into());
        }
        let rec = &rest[sp + 1..len - 1];
        let eq = rec
            .iter()
            .position(|&b| b == b'=')
            .ok_or("PAX record without '='")?;
        let key = std::str::from_utf8(&rec[..eq]).map_err(|_| "PAX key is not UTF-8")?;
        map.insert(key.to_owned(), rec[eq + 1..].to_vec());
        rest = &rest[len..];
    }
    Ok(())
}

/// Parses a PAX time `[-]seconds[.fraction]` into seconds and nanoseconds (floor semantics).
fn parse_pax_time(s: &str) -> Option<(i64, u32)> {
    let s = s.trim();
    let (neg, body) = match s.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, s),
    };
    let (secs, frac) = match body.split_once('.') {
        Some((a, b)) => (a, b),
        None => (body, ""),
    };
    if secs.is_empty()
        || !secs.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let secs: i64 = secs.parse().ok()?;
    let mut nsec: u32 = 0;
    for (i, d) in frac.bytes().take(9).enumerate() {
        nsec += u32::from(d - b'0') * 10u32.pow(8 - i as u32);
    }
    if !neg {
        return Some((secs, nsec));
    }
    if nsec == 0 {
        Some((secs.checked_neg()?, 0))
    } else {
        Some((secs.checked_neg()?.checked_sub(1)?, 1_000_000_000 - nsec))
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A ustar header block for a plain regular file (the eStargz TOC entry).
pub(crate) fn ustar_file_header(name: &str, size: u64, mode: u32) -> [u8; BLOCK] {
    let mut h = [0u8; BLOCK];
    let n = name.as_bytes();
    let n = &n[..n.len().min(100)];
    h[..n.len()].copy_from_slice(n);
    put_octal(&mut h[100..108], u64::from(mode));
    put_octal(&mut h[108..116], 0);
    put_octal(&mut h[116..124], 0);
    put_octal(&mut h[124..136], size);
    put_octal(&mut h[136..148], 0);
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    put_octal(&mut h[329..337], 0);
    put_octal(&mut h[337..345], 0);
    h[148..156].fill(b' ');
    let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    h
}

/// Writes `v` as zero-padded octal with a NUL terminator (field width − 1 digits).
pub(crate) fn put_octal(field: &mut [u8], v: u64) {
    let w = field.len() - 1;
    let s = format!("{v:0w$o}");
    let s = s.as_bytes();
    let s = &s[s.len().saturating_sub(w)..];
    field[..s.len()].copy_from_slice(s);
    field[w] = 0;
}

#[cfg(test)]
#[path = "tar_tests.rs"]
mod tests;
