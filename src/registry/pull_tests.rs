//! The registry client against a hostile server on loopback: bodies longer than asked for, wrong
//! `Content-Range`s, endless manifests and blobs. Each test counts what the server managed to send
//! before the client hung up, so a client that buffers everything fails it.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;
use crate::registry::range::parse_content_range;
use crate::registry::ClientConfig;
use std::ops::Range;

/// A one-connection HTTP server on loopback that answers any request with `head` and then up
/// to `body_len` bytes of body; yields how many body bytes it managed to write before the
/// client hung up.
async fn serve(head: String, body_len: u64) -> (String, tokio::task::JoinHandle<u64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let task = tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut req = Vec::new();
        let mut buf = [0u8; 4096];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            match sock.read(&mut buf).await {
                Ok(0) | Err(_) => return 0,
                Ok(n) => req.extend_from_slice(&buf[..n]),
            }
        }
        if sock.write_all(head.as_bytes()).await.is_err() {
            return 0;
        }
        let block = vec![0x5au8; 64 << 10];
        let mut written = 0u64;
        while written < body_len {
            let n = block.len().min((body_len - written) as usize);
            let step = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                sock.write_all(&block[..n]),
            );
            match step.await {
                Ok(Ok(())) => written += n as u64,
                _ => break,
            }
        }
        written
    });
    (addr, task)
}

async fn range_read(head: &str, body_len: u64, range: Range<u64>) -> (String, u64) {
    let (addr, server) = serve(head.to_owned(), body_len).await;
    let client = Client::new(ClientConfig {
        max_retries: 0,
        ..ClientConfig::default()
    })
    .unwrap();
    let reference: Reference = format!("{addr}/hostile/app:v1").parse().unwrap();
    let err = client
        .get_blob_range(&reference, &Digest::of(b"blob"), range)
        .await
        .unwrap_err()
        .to_string();
    drop(client);
    (err, server.await.unwrap())
}

const HUGE: u64 = 512 << 20;

#[tokio::test]
async fn an_oversized_range_body_is_cut_off_at_the_length_asked_for() {
    // 206 with the right Content-Range but a close-delimited body of 512 MiB for 112 KB.
    let head = "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-114687/999999999\r\n\
                Connection: close\r\n\r\n";
    let (err, written) = range_read(head, HUGE, 0..114_688).await;
    assert!(err.contains("more than the 114688 bytes"), "{err}");
    // What the kernel's socket buffers absorbed, not the body: far below the 512 MiB sent.
    assert!(
        written < 64 << 20,
        "the client let the server write {written} bytes"
    );
}

#[tokio::test]
async fn a_chunked_oversized_range_body_is_cut_off_too() {
    // Transfer-Encoding: chunked, one endless chunk.
    let head = format!(
        "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-999/999999999\r\n\
         Transfer-Encoding: chunked\r\n\r\n{HUGE:x}\r\n"
    );
    let (err, written) = range_read(&head, HUGE, 0..1000).await;
    assert!(err.contains("more than the 1000 bytes"), "{err}");
    assert!(
        written < 64 << 20,
        "the client let the server write {written} bytes"
    );
}

#[tokio::test]
async fn an_announced_oversized_range_body_is_refused_unread() {
    let head = format!(
        "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-999/999999999\r\n\
         Content-Length: {HUGE}\r\n\r\n"
    );
    let (err, written) = range_read(&head, HUGE, 0..1000).await;
    assert!(err.contains("announces a body of"), "{err}");
    assert!(
        written < 64 << 20,
        "the client let the server write {written} bytes"
    );
}

#[tokio::test]
async fn a_content_range_other_than_the_request_is_refused() {
    for (content_range, want) in [
        (Some("bytes 10-1009/5000"), "not the range asked for"),
        (Some("bytes 0-99/5000"), "bytes 0-99 only"),
        (Some("bytes 0-999/500"), "not the range asked for"),
        (Some("garbage"), "not the range asked for"),
        (None, "without a Content-Range"),
    ] {
        let header = content_range.map_or(String::new(), |v| format!("Content-Range: {v}\r\n"));
        let head = format!("HTTP/1.1 206 Partial Content\r\n{header}Content-Length: 1000\r\n\r\n");
        let (err, _) = range_read(&head, 1000, 0..1000).await;
        assert!(err.contains(want), "{content_range:?}: {err}");
    }
}

#[tokio::test]
async fn a_whole_blob_read_is_bounded() {
    let (addr, server) = serve(
        "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".to_owned(),
        HUGE,
    )
    .await;
    let client = Client::new(ClientConfig::default()).unwrap();
    let reference: Reference = format!("{addr}/hostile/app:v1").parse().unwrap();
    let err = client
        .get_blob(&reference, &Digest::of(b"config"))
        .await
        .unwrap_err()
        .to_string();
    drop(client);
    assert!(err.contains("larger than"), "{err}");
    let written = server.await.unwrap();
    assert!(written < WHOLE_BLOB_LIMIT + (64 << 20), "wrote {written}");
}

#[tokio::test]
async fn a_blob_stream_stops_at_the_descriptor_size() {
    let (addr, server) = serve(
        "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".to_owned(),
        HUGE,
    )
    .await;
    let client = Client::new(ClientConfig::default()).unwrap();
    let reference: Reference = format!("{addr}/hostile/app:v1").parse().unwrap();
    let mut reader = client
        .blob_reader_sized(&reference, &Digest::of(b"layer"), 1 << 20)
        .await
        .unwrap();
    let err = tokio::io::copy(&mut reader, &mut tokio::io::sink())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("runs past"), "{err}");
    drop(reader);
    drop(client);
    let written = server.await.unwrap();
    assert!(written < 64 << 20, "wrote {written}");
}

#[tokio::test]
async fn a_manifest_over_4_mib_is_refused_as_it_arrives() {
    let (addr, server) = serve(
        "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\n\
         Connection: close\r\n\r\n"
            .to_owned(),
        HUGE,
    )
    .await;
    let client = Client::new(ClientConfig::default()).unwrap();
    let reference: Reference = format!("{addr}/hostile/app:v1").parse().unwrap();
    let err = client
        .get_manifest(&reference)
        .await
        .unwrap_err()
        .to_string();
    drop(client);
    assert!(err.contains("manifest larger than 4194304 bytes"), "{err}");
    let written = server.await.unwrap();
    assert!(written < 64 << 20, "wrote {written}");
}

#[test]
fn content_ranges_parse_strictly() {
    assert_eq!(parse_content_range("bytes 0-9/10"), Some((0, 9)));
    assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, 9)));
    assert_eq!(parse_content_range("bytes 5-9/9"), None);
    assert_eq!(parse_content_range("bytes 9-5/100"), None);
    assert_eq!(parse_content_range("bytes -5/100"), None);
    assert_eq!(parse_content_range("items 0-9/10"), None);
}
