//! Lazy layer formats: one TOC model, and readers and writers for zstd:chunked and eStargz.
//!
//! Owns: the byte layout of a lazily loadable layer (frames or gzip members a file's chunks start,
//! the TOC, the footer, the manifest annotations that pin the TOC), and tar entry semantics
//! (names, whiteouts, hard links, xattrs, devices) as the TOC records them.
//! Does not own: where the bytes come from (`registry`, `fetch`) or where they go (`convert`, `fs`).
//!
//! The writer turns an uncompressed tar stream into a layer blob; the reader turns the blob's tail
//! and TOC bytes into a [`Toc`], and one chunk's compressed bytes into verified file content.
//!
//! Files: `tar` (streaming parser that keeps raw header bytes), `names` (name and link rules),
//! `toc` (the shared TOC JSON and the normalised model), `toc_stream` (entries decoded one at a time
//! against the limits), `footer` (the footer layouts), `reorder` (start-up set first), `writer`
//! (the parallel, reproducible pipeline), `reader` (TOC and chunk verification), `limits` (the
//! bounds on every size a footer or TOC states), `error`.
//!
//! Layout written:
//! - zstd:chunked: frames `[headers…][chunk][headers/padding…][chunk]…[padding + end-of-archive]`,
//!   then skippable frames holding the zstd TOC and the 64-byte `GNUlInUx` footer. No tar-split
//!   is written: its footer fields are zero, the TOC has no `tarSplitDigest` and no
//!   `tarsplit-position` annotation is emitted. Whole-zero chunks carry `chunkType: "zeros"`
//!   (their frames are still in the stream, so `zstd -d` gives the full tar).
//! - eStargz: the same cut in gzip members; the TOC member holds the `stargz.index.json` header,
//!   the JSON and the end-of-archive blocks; then the 51-byte footer. Chunk entries also carry
//!   `endOffset` (ignored by other readers; ours uses it to fetch only the chunk's member).
//! - Names are normalised (`./a/b/` → `a/b`, the root directory is `""`); tar bytes are passed
//!   through unchanged. Trailing zero blocks and record padding after the end-of-archive marker
//!   are dropped: the blob decodes to the entries plus exactly two zero blocks.
//! - PAX global headers are passed through but not applied; GNU sparse files are rejected.

pub mod compression;
mod error;
mod footer;
mod limits;
mod names;
mod reader;
pub mod reorder;
pub(crate) mod tar;
#[cfg(test)]
mod testtar;
mod toc;
mod toc_stream;
mod writer;

use std::collections::BTreeMap;
use std::io::{Read, Write};

pub use compression::{decoder, Compression};
pub use error::FormatError;
pub use limits::{Limits, MAX_CHUNK_CEILING, MAX_TOC_CEILING};
pub use reader::{read_file, read_toc, read_toc_limited};
pub use toc::{NO_PREFETCH_LANDMARK, PREFETCH_FIELD, PREFETCH_LANDMARK};

use crate::oci::Digest;

/// zstd:chunked annotation: sha256 of the compressed TOC.
pub const ANNOTATION_ZSTD_CHECKSUM: &str = "io.github.containers.zstd-chunked.manifest-checksum";
/// zstd:chunked annotation: `offset:length:uncompressed_length:type` of the TOC.
pub const ANNOTATION_ZSTD_POSITION: &str = "io.github.containers.zstd-chunked.manifest-position";
/// zstd:chunked annotation: `offset:length:uncompressed_length` of the tar-split (not written).
pub const ANNOTATION_ZSTD_TARSPLIT_POSITION: &str =
    "io.github.containers.zstd-chunked.tarsplit-position";
/// The older key of the TOC checksum (podman 4.3 / skopeo 1.9).
pub const ANNOTATION_ZSTD_CHECKSUM_OLD: &str = "io.containers.zstd-chunked.manifest-checksum";
/// The older key of the TOC position (podman 4.3 / skopeo 1.9).
pub const ANNOTATION_ZSTD_POSITION_OLD: &str = "io.containers.zstd-chunked.manifest-position";
/// lazysnap's copy of [`ANNOTATION_ZSTD_CHECKSUM`] on the layers it writes. containerd hands a
/// layer descriptor's `containerd.io/snapshot/` annotations to the snapshotter as Prepare labels
/// (as it does eStargz's TOC digest), so lazysnapd can start reading the TOC before it has the
/// manifest; the manifest must then pin the same TOC (see `snapshot::locate`).
pub const ANNOTATION_LABEL_ZSTD_CHECKSUM: &str =
    "containerd.io/snapshot/lazysnap/zstd-chunked.manifest-checksum";
/// lazysnap's copy of [`ANNOTATION_ZSTD_POSITION`], for the same reason.
pub const ANNOTATION_LABEL_ZSTD_POSITION: &str =
    "containerd.io/snapshot/lazysnap/zstd-chunked.manifest-position";
/// eStargz annotation: sha256 of the uncompressed TOC JSON.
pub const ANNOTATION_ESTARGZ_TOC_DIGEST: &str = "containerd.io/snapshot/stargz/toc.digest";
/// eStargz annotation: the layer's uncompressed size.
pub const ANNOTATION_ESTARGZ_UNCOMPRESSED_SIZE: &str = "io.containers.estargz.uncompressed-size";
/// Name of the eStargz TOC entry (the last tar entry of the layer).
pub const ESTARGZ_TOC_NAME: &str = "stargz.index.json";
/// Docker's gzip layer media type (eStargz layers may carry it too).
pub const MEDIA_TYPE_DOCKER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// Media type of a zstd:chunked layer (a plain OCI zstd layer to readers that cannot load lazily).
pub const MEDIA_TYPE_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// Media type of an eStargz layer (a plain OCI gzip layer to readers that cannot load lazily).
pub const MEDIA_TYPE_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// The lazy layouts this project reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayerFormat {
    /// containers/storage zstd:chunked: per-chunk zstd frames, TOC in a skippable frame.
    ZstdChunked,
    /// stargz-snapshotter eStargz: per-chunk gzip members, TOC as the last tar entry.
    Estargz,
}

/// How the writer lays a layer out.
#[derive(Debug, Clone)]
pub struct WriteOptions {
    pub format: LayerFormat,
    /// Largest uncompressed chunk of a file; each chunk is its own frame or gzip member.
    pub chunk_size: u64,
    /// Compression level (zstd level, or gzip level for eStargz).
    pub level: i32,
    /// Compression threads; the output is byte-identical whatever the count.
    pub threads: usize,
}

impl Default for WriteOptions {
    /// zstd:chunked, 4 MiB chunks, zstd level 3, one thread per core.
    fn default() -> Self {
        Self {
            format: LayerFormat::ZstdChunked,
            chunk_size: 4 << 20,
            level: 3,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// The result of writing one layer: what the manifest and config need to name it.
#[derive(Debug, Clone)]
pub struct WrittenLayer {
    pub media_type: &'static str,
    /// sha256 and size of the compressed blob (the manifest descriptor).
    pub digest: Digest,
    pub size: u64,
    /// sha256 and size of the uncompressed tar the blob decodes to (the config's `diff_ids`).
    pub diff_id: Digest,
    pub uncompressed_size: u64,
    /// The digest that pins the TOC (what the format's annotation carries).
    pub toc_digest: Digest,
    /// Manifest layer annotations the format defines (TOC digest, TOC position, sizes).
    pub annotations: BTreeMap<String, String>,
    /// Tar entries in the source layer.
    pub entries: u64,
}

/// Converts one uncompressed tar stream into a lazy layer written to `out`.
/// `progress` is called with the count of uncompressed input bytes consumed so far.
pub fn write_layer<R: Read, W: Write>(
    input: R,
    out: W,
    opts: &WriteOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<WrittenLayer, FormatError> {
    writer::write_layer(input, out, opts, &[], progress)
}

/// Like [`write_layer`], for a tar whose start-up set already leads it (see [`reorder`]):
/// `prefetch` names that set in access order, and the zstd:chunked TOC records it in
/// [`PREFETCH_FIELD`] (an eStargz stream carries its landmark entry instead).
pub fn write_layer_with_prefetch<R: Read, W: Write>(
    input: R,
    out: W,
    opts: &WriteOptions,
    prefetch: &[String],
    progress: &mut dyn FnMut(u64),
) -> Result<WrittenLayer, FormatError> {
    writer::write_layer(input, out, opts, prefetch, progress)
}

/// The kind of a TOC entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    Reg,
    Symlink,
    Hardlink,
    Char,
    Block,
    Fifo,
}

/// One piece of a regular file: where its compressed bytes lie and what they must hash to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Offset of this chunk within the file's content.
    pub file_offset: u64,
    /// Uncompressed length.
    pub size: u64,
    /// Blob range of the frame (zstd) or gzip member (eStargz) holding the chunk: `[start, end)`.
    pub compressed_start: u64,
    pub compressed_end: u64,
    /// Offset of the chunk inside the decompressed frame or member (eStargz `innerOffset`).
    pub inner_offset: u64,
    /// sha256 of the chunk's uncompressed bytes.
    pub digest: Digest,
    /// A run of zeros stored without compressed bytes (zstd:chunked `chunkType: "zeros"`).
    pub zeros: bool,
}

/// One file system entry of a layer, normalised from either format's TOC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TocEntry {
    /// Path relative to the layer root, no leading `./` or `/`, no trailing `/`.
    pub name: String,
    pub kind: EntryKind,
    pub size: u64,
    /// Permission bits plus setuid/setgid/sticky (no file-type bits).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub uname: String,
    pub gname: String,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Nanoseconds of the modification time (PAX `mtime` fraction, RFC 3339 fraction in the TOC).
    pub mtime_nsec: u32,
    /// Symlink target, or for a hard link the name of the entry it links to.
    pub link_name: String,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// sha256 of the whole file content, when the TOC records it.
    pub digest: Option<Digest>,
    /// Content chunks in file order, covering `[0, size)` without gaps. A hard link to a regular
    /// file carries its target's size, digest and chunks.
    pub chunks: Vec<Chunk>,
}

impl TocEntry {
    /// An entry of `kind` named `name` with nothing else set (root's, mode 0644, no content):
    /// what writers and tests fill in.
    pub fn new(name: &str, kind: EntryKind) -> Self {
        Self {
            name: name.to_owned(),
            kind,
            size: 0,
            mode: 0o644,
            uid: 0,
            gid: 0,
            uname: String::new(),
            gname: String::new(),
            mtime: 0,
            mtime_nsec: 0,
            link_name: String::new(),
            dev_major: 0,
            dev_minor: 0,
            xattrs: BTreeMap::new(),
            digest: None,
            chunks: Vec::new(),
        }
    }
}

/// A layer's table of contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Toc {
    pub format: LayerFormat,
    pub entries: Vec<TocEntry>,
    /// Names of the entries to fetch first, in access order: the entries before eStargz's
    /// prefetch landmark, or zstd:chunked's [`PREFETCH_FIELD`] (files the TOC holds, each once).
    pub prefetch: Vec<String>,
}

/// How a manifest descriptor says its layer can be loaded lazily.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LazyLayer {
    pub format: LayerFormat,
    /// The pinned TOC digest from the annotation (zstd: of the compressed TOC; eStargz: of the JSON).
    pub toc_digest: Digest,
    /// TOC position from the annotation, when the format carries it (zstd:chunked).
    pub toc_position: Option<TocPosition>,
}

/// Where the TOC lies in the blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TocPosition {
    pub offset: u64,
    pub compressed_len: u64,
    pub uncompressed_len: u64,
}

/// Decides from a layer descriptor whether the layer is lazy, and in which format.
/// `None` for a plain layer (or one whose annotations are incomplete).
pub fn detect(media_type: &str, annotations: &BTreeMap<String, String>) -> Option<LazyLayer> {
    let mt = media_type.split(';').next().unwrap_or("").trim();
    if mt == MEDIA_TYPE_ZSTD || mt.ends_with("+zstd") {
        for (ck, pk) in [
            (ANNOTATION_ZSTD_CHECKSUM, ANNOTATION_ZSTD_POSITION),
            (ANNOTATION_ZSTD_CHECKSUM_OLD, ANNOTATION_ZSTD_POSITION_OLD),
        ] {
            if let Some(d) = annotations.get(ck) {
                let toc_digest = d.parse().ok()?;
                let toc_position = annotations.get(pk).and_then(|p| parse_position(p));
                return Some(LazyLayer {
                    format: LayerFormat::ZstdChunked,
                    toc_digest,
                    toc_position,
                });
            }
        }
        return None;
    }
    if mt == MEDIA_TYPE_GZIP || mt == MEDIA_TYPE_DOCKER_GZIP || mt.ends_with("+gzip") {
        let toc_digest = annotations
            .get(ANNOTATION_ESTARGZ_TOC_DIGEST)?
            .parse()
            .ok()?;
        return Some(LazyLayer {
            format: LayerFormat::Estargz,
            toc_digest,
            toc_position: None,
        });
    }
    None
}

/// Parses `offset:length:uncompressed_length[:type]` (type must be 1 when present).
fn parse_position(s: &str) -> Option<TocPosition> {
    let mut it = s.trim().split(':');
    let mut num = || it.next()?.parse::<u64>().ok();
    let (offset, compressed_len, uncompressed_len) = (num()?, num()?, num()?);
    match it.next() {
        None | Some("1") => {}
        Some(_) => return None,
    }
    if it.next().is_some() {
        return None;
    }
    Some(TocPosition {
        offset,
        compressed_len,
        uncompressed_len,
    })
}

/// How many bytes at the end of the blob hold the footer (one range GET).
pub fn tail_len(format: LayerFormat) -> u64 {
    match format {
        LayerFormat::ZstdChunked => footer::ZSTD_FOOTER_LEN as u64,
        LayerFormat::Estargz => footer::ESTARGZ_FOOTER_LEN as u64,
    }
}

/// Reads the TOC position from the blob's last `tail_len` bytes.
pub fn parse_tail(
    format: LayerFormat,
    tail: &[u8],
    blob_size: u64,
) -> Result<TocPosition, FormatError> {
    reader::parse_tail(format, tail, blob_size)
}

/// Parses the TOC from the blob bytes at `position`, after checking them against the pinned digest,
/// with the default [`Limits`].
pub fn parse_toc(layer: &LazyLayer, position: TocPosition, raw: &[u8]) -> Result<Toc, FormatError> {
    reader::parse_toc(layer, position, raw, &Limits::default())
}

/// Parses the TOC from the blob bytes at `position`, after checking them against the pinned digest;
/// every size, count and name in it is checked against `limits` before memory is spent on it.
pub fn parse_toc_limited(
    layer: &LazyLayer,
    position: TocPosition,
    raw: &[u8],
    limits: &Limits,
) -> Result<Toc, FormatError> {
    reader::parse_toc(layer, position, raw, limits)
}

/// Decompresses one chunk from the bytes `[compressed_start, compressed_end)` of the blob and
/// checks it against its digest. Unverified bytes never leave this function.
///
/// Never decompresses (or, for a zero run, allocates) more than [`MAX_CHUNK_CEILING`] bytes; TOCs
/// decoded with [`Limits`] hold no larger non-zero chunk. A zero run larger than that is refused
/// here: serve it as zeros without materialising it.
pub fn decode_chunk(
    format: LayerFormat,
    chunk: &Chunk,
    compressed: &[u8],
) -> Result<Vec<u8>, FormatError> {
    reader::decode_chunk(format, chunk, compressed)
}

#[cfg(test)]
mod hostile_tests;
#[cfg(test)]
mod prop_tests;
#[cfg(test)]
mod testalloc;
#[cfg(test)]
mod testlayer;
#[cfg(test)]
mod tests;
