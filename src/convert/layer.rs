//! Converting one layer: detect the source compression, decompress, rewrite into the lazy format,
//! and check the uncompressed stream against the config's `diff_id` (and, through the source
//! reader, the stored bytes against the manifest digest) before the result may be used.

use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, Write};
use std::sync::mpsc::{self, Receiver, SyncSender};

use crate::format::reorder::{self, Plan, Symlinks, TarIndex};
use crate::format::{self, FormatError, LayerFormat, WriteOptions, WrittenLayer};
use crate::oci::{Digest, Hasher};

use super::{ConvertError, StartupSet};

/// Rewrites the layer read from `stored` (compressed as it was stored) into `out`.
///
/// `label` names the layer in errors. The conversion fails, and `out` must be discarded, if the
/// stored bytes do not match their digest or the uncompressed tar does not match `diff_id`.
pub fn convert_layer<W: Write>(
    stored: Box<dyn Read + Send>,
    diff_id: &Digest,
    out: W,
    options: &WriteOptions,
    label: &str,
    progress: &mut dyn FnMut(u64),
) -> Result<WrittenLayer, ConvertError> {
    let (_, decoded) = format::decoder(stored)
        .map_err(|e| ConvertError::io(format!("layer {label}: reading"), e))?;
    // Decompression and the diff_id hash run on their own thread, ahead of the writer, so that
    // they overlap with tar parsing and the compression workers instead of adding to them.
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::sync_channel(READ_AHEAD_BUFFERS);
        let reader = scope.spawn(move || read_ahead(decoded, tx));
        let mut tar = ChannelReader {
            rx,
            current: Vec::new(),
            pos: 0,
        };
        let written =
            format::write_layer(&mut tar, out, options, progress).map_err(|source| match source {
                FormatError::Io(e) => ConvertError::io(format!("layer {label}"), e),
                source => ConvertError::Format {
                    layer: label.to_owned(),
                    error: source,
                },
            });
        // The writer stops at the end-of-archive marker; read the rest so that the whole stream
        // is hashed and the source's own digest check at its end runs.
        let drained = written.and_then(|w| {
            io::copy(&mut tar, &mut io::sink())
                .map(|_| w)
                .map_err(|e| ConvertError::io(format!("layer {label}: reading to the end"), e))
        });
        drop(tar); // an early error stops the reader at its next send
        let got = reader.join().map_err(|_| {
            ConvertError::Source(format!("layer {label}: the decompression thread panicked"))
        })?;
        let written = drained?;
        let got =
            got.ok_or_else(|| ConvertError::Source(format!("layer {label}: stream ended early")))?;
        if got != *diff_id {
            return Err(ConvertError::DigestMismatch {
                what: format!("layer {label}: uncompressed tar (the config's diff_id)"),
                expected: *diff_id,
                got,
            });
        }
        Ok(written)
    })
}

fn format_error(label: &str, source: FormatError) -> ConvertError {
    match source {
        FormatError::Io(e) => ConvertError::io(format!("layer {label}"), e),
        source => ConvertError::Format {
            layer: label.to_owned(),
            error: source,
        },
    }
}

/// A source layer's uncompressed tar, verified against its `diff_id` and spooled to a file, with
/// the index of its items: what reordering (and the ELF heuristic) need random access to.
#[derive(Debug)]
pub struct Spooled {
    pub file: File,
    pub index: TarIndex,
    pub symlinks: Symlinks,
}

impl Spooled {
    /// Reads up to `len` bytes at `offset` of the spooled stream.
    pub fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; len];
        let mut got = 0;
        while got < len {
            match self.file.read_at(&mut buf[got..], offset + got as u64)? {
                0 => break,
                n => got += n,
            }
        }
        buf.truncate(got);
        Ok(buf)
    }
}

/// Decompresses `stored` into `spool` while indexing its tar items, and checks the stream against
/// `diff_id` (and, through the source reader, the stored bytes against their digest).
pub fn spool_layer(
    stored: Box<dyn Read + Send>,
    diff_id: &Digest,
    spool: File,
    label: &str,
) -> Result<Spooled, ConvertError> {
    let (_, decoded) = format::decoder(stored)
        .map_err(|e| ConvertError::io(format!("layer {label}: reading"), e))?;
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::sync_channel(READ_AHEAD_BUFFERS);
        let reader = scope.spawn(move || read_ahead(decoded, tx));
        let mut tee = Tee {
            inner: ChannelReader {
                rx,
                current: Vec::new(),
                pos: 0,
            },
            out: BufWriter::with_capacity(1 << 20, spool),
        };
        let indexed = reorder::index(io::BufReader::with_capacity(1 << 20, &mut tee))
            .map_err(|e| format_error(label, e))
            .and_then(|found| {
                io::copy(&mut tee, &mut io::sink()).map_err(|e| {
                    ConvertError::io(format!("layer {label}: reading to the end"), e)
                })?;
                Ok(found)
            });
        let Tee { inner, out } = tee;
        drop(inner); // an early error stops the reader at its next send
        let got = reader.join().map_err(|_| {
            ConvertError::Source(format!("layer {label}: the decompression thread panicked"))
        })?;
        let (index, symlinks) = indexed?;
        let got =
            got.ok_or_else(|| ConvertError::Source(format!("layer {label}: stream ended early")))?;
        if got != *diff_id {
            return Err(ConvertError::DigestMismatch {
                what: format!("layer {label}: uncompressed tar (the config's diff_id)"),
                expected: *diff_id,
                got,
            });
        }
        let mut file = out
            .into_inner()
            .map_err(|e| ConvertError::io(format!("layer {label}: spooling"), e.into_error()))?;
        file.rewind()
            .map_err(|e| ConvertError::io(format!("layer {label}: spooling"), e))?;
        Ok(Spooled {
            file,
            index,
            symlinks,
        })
    })
}

/// Writes a spooled layer with `wanted` (entry names, in access order; files start-up read only
/// sparsely are left in place) first; returns the layer, the plan that says what moved, and how
/// many files were left for being sparse. With nothing to move the layer is written as it was.
pub fn write_spooled<W: Write>(
    spooled: Spooled,
    wanted: &StartupSet,
    drop_estargz_toc: bool,
    out: W,
    options: &WriteOptions,
    label: &str,
    progress: &mut dyn FnMut(u64),
) -> Result<(WrittenLayer, (Plan, usize)), ConvertError> {
    let (names, sparse) = wanted.dense(&spooled.index, options.chunk_size);
    let plan = reorder::plan(&spooled.index, &names, options.format, drop_estargz_toc);
    let written = format::write_layer_with_prefetch(
        plan.reader(spooled.file),
        out,
        options,
        &plan.startup,
        progress,
    )
    .map_err(|e| format_error(label, e))?;
    Ok((written, (plan, sparse)))
}

/// Passes every byte read through to a file.
struct Tee<R, W> {
    inner: R,
    out: W,
}

impl<R: Read, W: Write> Read for Tee<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.out.write_all(&buf[..n])?;
        Ok(n)
    }
}

/// Whether a format's own TOC entry rides in the source tar (an eStargz source).
pub fn carries_estargz_toc(lazy: Option<&format::LazyLayer>) -> bool {
    lazy.is_some_and(|l| l.format == LayerFormat::Estargz)
}

/// Buffers of [`READ_AHEAD_SIZE`] the decompression thread may run ahead by.
const READ_AHEAD_BUFFERS: usize = 4;
const READ_AHEAD_SIZE: usize = 1 << 20;

/// Reads `source` to its end in large buffers, hashing them, and sends them to `tx`. Returns the
/// digest of the whole stream, or `None` if it stopped early (an error, or the receiver left).
fn read_ahead(mut source: impl Read, tx: SyncSender<io::Result<Vec<u8>>>) -> Option<Digest> {
    let mut hasher = Hasher::new();
    loop {
        let mut buf = vec![0u8; READ_AHEAD_SIZE];
        let mut filled = 0;
        while filled < buf.len() {
            match source.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return None;
                }
            }
        }
        if filled == 0 {
            return Some(hasher.finish());
        }
        buf.truncate(filled);
        hasher.update(&buf);
        if tx.send(Ok(buf)).is_err() {
            return None;
        }
    }
}

/// The consuming end of [`read_ahead`].
struct ChannelReader {
    rx: Receiver<io::Result<Vec<u8>>>,
    current: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.current.len() {
            match self.rx.recv() {
                Ok(next) => {
                    self.current = next?;
                    self.pos = 0;
                }
                Err(_) => return Ok(0), // the reader finished: end of stream
            }
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}
