//! The Prometheus endpoint (`[metrics]`): each scrape gets a fresh snapshot in the text
//! exposition format.

use super::server::accept_loop;
use super::*;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::warn;

/// Serve `GET /metrics` (Prometheus text format) on `listener` until the task is dropped.
pub async fn serve_metrics(listener: std::net::TcpListener, live: Arc<Live>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => Arc::new(l),
        Err(e) => {
            warn!("metrics listener: {e}");
            return;
        }
    };
    let accept = || {
        let l = listener.clone();
        async move { l.accept().await.map(|(c, _)| c) }
    };
    let serve = move |mut conn: tokio::net::TcpStream| {
        let live = live.clone();
        Box::pin(async move {
            let mut head = Vec::with_capacity(1024);
            let mut chunk = [0u8; 1024];
            let got = tokio::time::timeout(REQUEST_TIMEOUT, async {
                while head.len() < 8192 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => head.extend_from_slice(&chunk[..n]),
                    }
                }
                true
            })
            .await;
            if !matches!(got, Ok(true)) {
                return;
            }
            let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
            let line = String::from_utf8_lossy(line);
            let mut parts = line.split_whitespace();
            let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let (status, ctype, body) = if method != "GET" {
                (
                    "405 Method Not Allowed",
                    "text/plain",
                    "GET only\n".to_string(),
                )
            } else if target == "/metrics" || target.starts_with("/metrics?") {
                (
                    "200 OK",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    live.status().to_prometheus(),
                )
            } else {
                ("404 Not Found", "text/plain", "try /metrics\n".to_string())
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, async {
                let _ = conn.write_all(resp.as_bytes()).await;
                let _ = conn.shutdown().await;
            })
            .await;
        }) as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
    };
    accept_loop("metrics listener", accept, serve).await;
}
