//! Converting one layer: detect the source compression, decompress, rewrite into the lazy format,
//! and check the uncompressed stream against the config's `diff_id` (and, through the source
//! reader, the stored bytes against the manifest digest) before the result may be used.

use std::io::{self, Read, Write};
use std::sync::mpsc::{self, Receiver, SyncSender};

use crate::format::{self, FormatError, WriteOptions, WrittenLayer};
use crate::oci::{Digest, Hasher};

use super::ConvertError;

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
