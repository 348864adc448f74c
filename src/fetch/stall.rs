//! A background stream that stops sending fails instead of holding its share of the link.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, ReadBuf};

/// An `AsyncRead` that fails with `TimedOut` when a read waits longer than `limit` for a byte.
pub(super) struct StallGuard<R> {
    inner: R,
    limit: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<R> StallGuard<R> {
    pub(super) fn new(inner: R, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            timer: None,
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for StallGuard<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                this.timer = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let limit = this.limit;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        this.timer = None;
                        Poll::Ready(Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("no data from the registry for {limit:?}"),
                        )))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    #[tokio::test]
    async fn a_reader_that_stops_sending_times_out_and_one_that_sends_does_not() {
        let (mut tx, rx) = tokio::io::duplex(64);
        let mut guarded = StallGuard::new(rx, Duration::from_millis(200));
        let mut buf = [0u8; 8];
        // Slow but steady: each byte comes within the limit.
        let sender = tokio::spawn(async move {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                tokio::io::AsyncWriteExt::write_all(&mut tx, b"x")
                    .await
                    .unwrap();
            }
            tx
        });
        for _ in 0..3 {
            assert_eq!(guarded.read(&mut buf).await.unwrap(), 1);
        }
        let _tx = sender.await.unwrap();
        // Then nothing: the next read fails after the limit.
        let err = guarded.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    }
}
