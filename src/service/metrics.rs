//! The metrics endpoint of lazysnapd: the snapshotter's own metrics and, with a separate layer
//! host, the data path's from that process (fetches, cache, FUSE), in one Prometheus text page.

use std::sync::Arc;

use prometheus::{Encoder, TextEncoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::layer_host::LayerHostClient;

/// Serves `GET /metrics` on `listener` until the task is dropped; anything else gets 404.
pub async fn serve(listener: tokio::net::TcpListener, host: Option<Arc<LayerHostClient>>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let host = host.clone();
        tokio::spawn(async move {
            let mut request = [0u8; 2048];
            let n = stream.read(&mut request).await.unwrap_or(0);
            let head = String::from_utf8_lossy(&request[..n]);
            let (status, body) =
                if head.starts_with("GET /metrics ") || head.starts_with("GET /metrics?") {
                    ("200 OK", render(host.as_deref()).await)
                } else {
                    ("404 Not Found", "try GET /metrics\n".to_owned())
                };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}

/// In-process: everything. With a layer host: this process's snapshot metrics (the data path's
/// families here are idle and would duplicate the host's) and the CRI proxy's, then the host's
/// page.
async fn render(host: Option<&LayerHostClient>) -> String {
    let Some(host) = host else {
        return crate::metrics::render();
    };
    let families: Vec<_> = crate::metrics::METRICS
        .registry
        .gather()
        .into_iter()
        .filter(|f| {
            f.name().starts_with("lazysnap_snapshot_") || f.name().starts_with("lazysnap_cri_")
        })
        .collect();
    let mut out = Vec::new();
    let _ = TextEncoder::new().encode(&families, &mut out);
    let mut text = String::from_utf8_lossy(&out).into_owned();
    text.push_str(
        &host
            .metrics()
            .await
            .lines()
            .filter(|l| !l.contains("lazysnap_snapshot_"))
            .map(|l| format!("{l}\n"))
            .collect::<String>(),
    );
    text
}
