//! The daemon's side of the control socket: accepting with a bound on clients and a backoff,
//! the kernel-checked credentials of each caller (root only), one request line (and for a
//! reload its document and descriptors) read with a timeout, one answer written.

use super::*;
use std::io;
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tracing::{debug, warn};

/// Accept connections on `listener` one permit at a time, backing off when descriptors run
/// out, and hand each to `serve`.
pub(super) async fn accept_loop<L, C, F, Fut>(what: &'static str, mut accept: L, serve: F)
where
    L: FnMut() -> C,
    C: std::future::Future<Output = io::Result<Fut>>,
    F: Fn(Fut) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
{
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    let mut warned: Option<Instant> = None;
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        match accept().await {
            Ok(conn) => {
                let fut = serve(conn);
                tokio::spawn(async move {
                    fut.await;
                    drop(permit);
                });
            }
            Err(e) => {
                let starved = matches!(
                    e.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                );
                if !warned.is_some_and(|t| t.elapsed() <= Duration::from_secs(60)) {
                    warn!("{what}: accept failed: {e}; backing off");
                    warned = Some(Instant::now());
                }
                tokio::time::sleep(if starved {
                    ACCEPT_BACKOFF
                } else {
                    ACCEPT_BACKOFF / 10
                })
                .await;
            }
        }
    }
}

/// Whether a caller with these credentials may make `request`: root only, for every request
/// (keys and status alike; docs/security.md).
pub fn authorized(uid: u32, request: &str) -> Result<(), Refused> {
    if uid == 0 {
        Ok(())
    } else {
        Err(Refused::NotRoot {
            uid,
            request: request.escape_debug().to_string(),
        })
    }
}

/// Serve the control socket until the task is dropped.
pub async fn serve_control(listener: UnixListener, live: Arc<Live>) {
    let listener = match tokio::net::UnixListener::from_std(listener) {
        Ok(l) => Arc::new(l),
        Err(e) => {
            warn!("control socket: {e}; `espip show` will not answer");
            return;
        }
    };
    let accept = || {
        let l = listener.clone();
        async move { l.accept().await.map(|(c, _)| c) }
    };
    let serve = move |mut conn: tokio::net::UnixStream| {
        let live = live.clone();
        Box::pin(async move {
            // SO_PEERCRED: the kernel's record of who connected.
            let uid = match conn.peer_cred() {
                Ok(c) => c.uid(),
                Err(_) => return,
            };
            let read = tokio::time::timeout(REQUEST_TIMEOUT, read_request(&conn, uid == 0)).await;
            let Ok(Ok((req, doc, fds))) = read else {
                debug!("control client sent no complete request in time");
                return;
            };
            let request = String::from_utf8_lossy(&req).trim().to_string();
            let body = match authorized(uid, &request) {
                Ok(()) if request == "reload" => live.reload(&doc, fds).await,
                Ok(()) if request.starts_with("rekey ") => live.rekey(&request).await,
                Ok(()) => live.answer(&request),
                Err(why) => {
                    debug!(uid, "control request refused");
                    zeroize::Zeroizing::new(
                        serde_json::to_vec(&serde_json::json!({ "error": why.to_string() }))
                            .unwrap_or_default(),
                    )
                }
            };
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, async {
                let _ = conn.write_all(&body).await;
                let _ = conn.shutdown().await;
            })
            .await;
        }) as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
    };
    accept_loop("control socket", accept, serve).await;
}

/// Read a request: its line, and for `reload` (only from root: `may_reload`) the document
/// after it up to the end of the stream, with the descriptors passed along (`SCM_RIGHTS`).
async fn read_request(
    conn: &tokio::net::UnixStream,
    may_reload: bool,
) -> io::Result<(
    Vec<u8>,
    zeroize::Zeroizing<Vec<u8>>,
    Vec<std::os::fd::OwnedFd>,
)> {
    use std::os::fd::AsRawFd;
    let mut line = Vec::with_capacity(MAX_REQUEST);
    let mut doc = zeroize::Zeroizing::new(Vec::new());
    let mut fds = Vec::new();
    let mut chunk = zeroize::Zeroizing::new(vec![0u8; 4096]);
    loop {
        conn.readable().await?;
        let n = match conn.try_io(tokio::io::Interest::READABLE, || {
            crate::sys::fdpass::recv_with_fds(conn.as_raw_fd(), &mut chunk, &mut fds)
        }) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if fds.len() > MAX_FDS {
            return Err(io::Error::other("too many descriptors"));
        }
        let mut got = &chunk[..n];
        if doc.capacity() == 0 {
            // Still in the request line.
            match got.iter().position(|b| *b == b'\n') {
                Some(i) => {
                    line.extend_from_slice(&got[..i]);
                    got = &got[i + 1..];
                    if line != b"reload" || !may_reload {
                        return Ok((line, doc, fds));
                    }
                    // Allocated once, never grown: no copy of a key in a freed reallocation.
                    doc = zeroize::Zeroizing::new(Vec::with_capacity(MAX_RELOAD));
                }
                None => {
                    line.extend_from_slice(got);
                    if n == 0 || line.len() > MAX_REQUEST {
                        return Ok((line, doc, fds));
                    }
                    continue;
                }
            }
        }
        if got.len() > MAX_RELOAD - doc.len() {
            return Err(io::Error::other("reload document too large"));
        }
        doc.extend_from_slice(got);
        if n == 0 {
            return Ok((line, doc, fds));
        }
    }
}
