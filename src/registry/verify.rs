//! A reader that hashes a blob as it streams past and fails at EOF unless it matched its digest.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

use super::RegistryError;
use crate::oci::{Digest, Hasher};

/// Wraps a blob stream; the read that would report EOF instead fails with
/// `io::ErrorKind::InvalidData` (holding a [`RegistryError::DigestMismatch`]) if the bytes did not
/// hash to `expected`.
#[derive(Debug)]
pub(crate) struct VerifyingReader<R> {
    inner: R,
    hasher: Option<Hasher>,
    expected: Digest,
    reference: String,
    /// The failure, repeated on every read after it.
    failed: Option<(Digest, u64)>,
    /// The descriptor's size: a stream that runs past it fails at once, not at its end.
    size: Option<u64>,
    /// Set once the stream ran past `size`; every later read fails too.
    overran: bool,
}

impl<R> VerifyingReader<R> {
    pub fn new(inner: R, expected: Digest, reference: String) -> Self {
        Self {
            inner,
            hasher: Some(Hasher::new()),
            expected,
            reference,
            failed: None,
            size: None,
            overran: false,
        }
    }

    /// Fails the stream as soon as it delivers more than `size` bytes.
    pub fn with_size(mut self, size: Option<u64>) -> Self {
        self.size = size;
        self
    }

    fn overrun(&self, size: u64) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            RegistryError::Protocol {
                reference: self.reference.clone(),
                detail: format!(
                    "blob {} runs past its descriptor's size of {size} bytes; the read was stopped",
                    self.expected
                ),
            },
        )
    }

    fn mismatch(&self, got: Digest, len: u64) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            RegistryError::DigestMismatch {
                reference: self.reference.clone(),
                what: format!("blob {} ({len} bytes read)", self.expected),
                expected: self.expected,
                got,
            },
        )
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for VerifyingReader<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some((got, len)) = self.failed {
            return Poll::Ready(Err(self.mismatch(got, len)));
        }
        if let (true, Some(size)) = (self.overran, self.size) {
            return Poll::Ready(Err(self.overrun(size)));
        }
        if buf.remaining() == 0 {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {}
            other => return other,
        }
        let new = &buf.filled()[before..];
        if !new.is_empty() {
            if let Some(hasher) = this.hasher.as_mut() {
                hasher.update(new);
                if let Some(size) = this.size.filter(|&s| hasher.len() > s) {
                    // An error read returns no bytes: take back what this read filled.
                    buf.set_filled(before);
                    this.overran = true;
                    return Poll::Ready(Err(this.overrun(size)));
                }
            }
            return Poll::Ready(Ok(()));
        }
        // EOF: check once.
        if let Some(hasher) = this.hasher.take() {
            let len = hasher.len();
            let got = hasher.finish();
            if got != this.expected {
                this.failed = Some((got, len));
                return Poll::Ready(Err(this.mismatch(got, len)));
            }
            tracing::debug!(digest = %this.expected, len, "blob stream verified");
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    #[tokio::test]
    async fn passes_matching_bytes_and_fails_others_at_eof() {
        let data = vec![5u8; 100_000];
        let mut ok = VerifyingReader::new(&data[..], Digest::of(&data), "r".into());
        let mut out = Vec::new();
        ok.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, data);

        let mut bad = VerifyingReader::new(&data[..99_999], Digest::of(&data), "r".into());
        let err = bad.read_to_end(&mut Vec::new()).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("digest mismatch"), "{err}");
        let inner = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<RegistryError>());
        assert!(matches!(inner, Some(RegistryError::DigestMismatch { .. })));
        // And it keeps failing.
        assert!(bad.read(&mut [0u8; 8]).await.is_err());
    }

    /// A reader that yields `block`-sized reads forever, counting what it handed out.
    struct Endless {
        given: u64,
    }

    impl AsyncRead for Endless {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let n = buf.remaining().min(8192);
            buf.put_slice(&vec![7u8; n]);
            self.given += n as u64;
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_stream_longer_than_its_descriptor_stops_at_the_size() {
        let mut r = VerifyingReader::new(Endless { given: 0 }, Digest::of(b"x"), "r".into())
            .with_size(Some(100_000));
        let err = r.read_to_end(&mut Vec::new()).await.unwrap_err();
        assert!(err.to_string().contains("runs past"), "{err}");
        assert!(r.inner.given <= 100_000 + 8192, "read {}", r.inner.given);
        assert!(r.read(&mut [0u8; 8]).await.is_err(), "keeps failing");
    }
}
