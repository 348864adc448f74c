//! A fault-injecting HTTP/1.1 proxy on 127.0.0.1 in front of a [`TestRegistry`]: every request
//! passes through unchanged, except blob GETs (`/v2/<repo>/blobs/<digest>`, with or without a
//! `Range` header) while a [`Fault`] is set. Each request gets its own upstream connection and the
//! answer is sent with `Connection: close`, so one connection is one request and a fault never
//! leaks into the next request. Threads, not a runtime: a stalled connection is one sleeping
//! thread, and the proxy stops (and closes every connection) when dropped.
//!
//! ```ignore
//! let proxy = FaultProxy::start(&registry.addr)?;
//! let reference = format!("{}/sample/x:v1", proxy.addr);
//! proxy.set(Fault::Flip);
//! ```
//!
//! [`TestRegistry`]: super::registry::TestRegistry

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// What happens to blob GETs while set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Pass through.
    None,
    /// Flip one bit in the middle of the body.
    Flip,
    /// Send the headers (with the full `Content-Length`) and half the body, then close.
    Truncate,
    /// Read the request and never answer; the connection stays open until the client closes it.
    StallHeaders,
    /// Send the headers and half the body, then nothing more until the client closes.
    StallBody,
    /// Answer with this status and an empty body.
    Status(u16),
    /// Read the request, then reset the connection (RST, not FIN).
    Reset,
    /// For a range: a 206 whose body (and `Content-Length`) is the asked range plus 64 MiB.
    Oversize,
    /// For a range: a 206 with the `Content-Range` and body of the range one byte further on.
    WrongRange,
    /// For a range: a 206 with the asked `Content-Range` but the body of the range one byte on.
    ShiftedBody,
}

/// Bytes an [`Fault::Oversize`] answer adds beyond the asked range.
pub const OVERSIZE_EXTRA: usize = 64 << 20;

#[derive(Debug)]
struct State {
    fault: Mutex<Fault>,
    stop: AtomicBool,
    blob_gets: AtomicU64,
    range_gets: AtomicU64,
    faulted: AtomicU64,
    /// Connections held open by a stall right now.
    stalled_open: AtomicU64,
}

/// A running proxy; `addr` is `127.0.0.1:PORT`.
#[derive(Debug)]
pub struct FaultProxy {
    pub addr: String,
    state: Arc<State>,
    acceptor: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream` (`127.0.0.1:PORT`).
    pub fn start(upstream: &str) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?.to_string();
        let state = Arc::new(State {
            fault: Mutex::new(Fault::None),
            stop: AtomicBool::new(false),
            blob_gets: AtomicU64::new(0),
            range_gets: AtomicU64::new(0),
            faulted: AtomicU64::new(0),
            stalled_open: AtomicU64::new(0),
        });
        let upstream = upstream.to_owned();
        let acceptor_state = state.clone();
        let acceptor = std::thread::spawn(move || {
            let state = acceptor_state;
            while !state.stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let state = state.clone();
                        let upstream = upstream.clone();
                        std::thread::spawn(move || {
                            let _ = client.set_nonblocking(false);
                            if let Err(e) = serve(client, &upstream, &state) {
                                eprintln!("faultproxy: {e:#}");
                            }
                        });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => {
                        eprintln!("faultproxy: accept: {e}");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        });
        Ok(Self {
            addr,
            state,
            acceptor: Some(acceptor),
        })
    }

    /// Applies `fault` to every blob GET from now on (requests already answered are not touched).
    pub fn set(&self, fault: Fault) {
        *self.state.fault.lock().unwrap() = fault;
    }

    /// Blob GETs seen, with and without a `Range` header.
    pub fn blob_gets(&self) -> u64 {
        self.state.blob_gets.load(Ordering::Relaxed)
    }

    /// Blob GETs with a `Range` header.
    pub fn range_gets(&self) -> u64 {
        self.state.range_gets.load(Ordering::Relaxed)
    }

    /// Blob GETs a fault was applied to.
    pub fn faulted(&self) -> u64 {
        self.state.faulted.load(Ordering::Relaxed)
    }

    /// Stalled connections the client has not closed yet.
    pub fn stalled_open(&self) -> u64 {
        self.state.stalled_open.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
    }
}

/// An upstream answer: status line, headers, body.
type Answer = (String, Vec<(String, String)>, Vec<u8>);

/// A parsed request head.
struct Request {
    method: String,
    path: String,
    range: Option<(u64, u64)>,
    /// The head as received, to forward (with `Connection` replaced).
    head: Vec<String>,
    body: Vec<u8>,
}

fn serve(mut client: TcpStream, upstream: &str, state: &State) -> Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    let Some(request) = read_request(&mut client)? else {
        return Ok(());
    };
    let is_blob_get = request.method == "GET" && request.path.contains("/blobs/sha256:");
    let fault = if is_blob_get {
        state.blob_gets.fetch_add(1, Ordering::Relaxed);
        if request.range.is_some() {
            state.range_gets.fetch_add(1, Ordering::Relaxed);
        }
        *state.fault.lock().unwrap()
    } else {
        Fault::None
    };
    // Range-only faults leave whole-blob streams alone.
    let fault = match fault {
        Fault::Oversize | Fault::WrongRange | Fault::ShiftedBody if request.range.is_none() => {
            Fault::None
        }
        f => f,
    };
    if fault != Fault::None {
        state.faulted.fetch_add(1, Ordering::Relaxed);
    }
    match fault {
        Fault::StallHeaders => return hold(client, state),
        Fault::Reset => {
            // SO_LINGER 0: close() sends RST.
            socket2_linger_zero(&client);
            return Ok(());
        }
        Fault::Status(code) => {
            let answer = format!(
                "HTTP/1.1 {code} Injected\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            client.write_all(answer.as_bytes())?;
            return Ok(());
        }
        _ => {}
    }
    // Shifted faults ask upstream for the range one byte on.
    let shift = matches!(fault, Fault::WrongRange | Fault::ShiftedBody);
    let (status, mut headers, mut body) = forward(upstream, &request, shift)?;
    if header(&headers, "Transfer-Encoding").is_some() {
        // Not a blob body (docker-registry sends those with a length): pass it on as it came,
        // since the upstream answer ends where its connection does, and so will ours.
        let mut raw = format!("{status}\r\n");
        for (k, v) in &headers {
            raw.push_str(&format!("{k}: {v}\r\n"));
        }
        raw.push_str("\r\n");
        client.write_all(raw.as_bytes())?;
        client.write_all(&body)?;
        return Ok(());
    }
    match fault {
        Fault::Flip if !body.is_empty() => {
            let at = body.len() / 2;
            body[at] ^= 0x01;
        }
        Fault::Oversize => {
            body.resize(body.len() + OVERSIZE_EXTRA, 0x5a);
            set_header(&mut headers, "Content-Length", &body.len().to_string());
        }
        Fault::ShiftedBody => {
            if let Some((start, end)) = request.range {
                let total = header(&headers, "Content-Range")
                    .and_then(|v| v.rsplit('/').next().map(str::to_owned))
                    .unwrap_or_else(|| "*".into());
                set_header(
                    &mut headers,
                    "Content-Range",
                    &format!("bytes {start}-{end}/{total}"),
                );
            }
        }
        _ => {}
    }
    set_header(&mut headers, "Connection", "close");
    let mut head = format!("{status}\r\n");
    for (k, v) in &headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    client.write_all(head.as_bytes())?;
    match fault {
        Fault::Truncate => {
            client.write_all(&body[..body.len() / 2])?;
            client.flush()?;
            let _ = client.shutdown(Shutdown::Both);
        }
        Fault::StallBody => {
            client.write_all(&body[..body.len() / 2])?;
            client.flush()?;
            return hold(client, state);
        }
        _ => {
            // A client that gives up on a huge body closes: that is not the proxy's error.
            let _ = client.write_all(&body);
        }
    }
    Ok(())
}

/// Keeps a stalled connection open, sending nothing, until the client closes it or the proxy
/// stops.
fn hold(mut client: TcpStream, state: &State) -> Result<()> {
    state.stalled_open.fetch_add(1, Ordering::Relaxed);
    client.set_read_timeout(Some(Duration::from_millis(50)))?;
    let mut byte = [0u8; 1];
    while !state.stop.load(Ordering::Relaxed) {
        match client.read(&mut byte) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    state.stalled_open.fetch_sub(1, Ordering::Relaxed);
    Ok(())
}

fn socket2_linger_zero(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = nix::libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: the fd is open for the duration of the call and `linger` is a valid `struct
    // linger` of the size passed.
    unsafe {
        nix::libc::setsockopt(
            stream.as_raw_fd(),
            nix::libc::SOL_SOCKET,
            nix::libc::SO_LINGER,
            (&linger as *const nix::libc::linger).cast(),
            std::mem::size_of::<nix::libc::linger>() as nix::libc::socklen_t,
        );
    }
}

fn read_request(client: &mut TcpStream) -> Result<Option<Request>> {
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        match client.read(&mut byte)? {
            0 if raw.is_empty() => return Ok(None),
            0 => bail!("client closed mid-request"),
            _ => raw.push(byte[0]),
        }
        if raw.len() > 64 << 10 {
            bail!("request head over 64 KiB");
        }
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let mut lines = text.split("\r\n").filter(|l| !l.is_empty());
    let first = lines.next().context("empty request")?.to_owned();
    let mut parts = first.split(' ');
    let method = parts.next().unwrap_or_default().to_owned();
    let path = parts.next().unwrap_or_default().to_owned();
    let head: Vec<String> = std::iter::once(first.clone())
        .chain(lines.map(str::to_owned))
        .collect();
    let value = |name: &str| {
        head.iter().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    };
    let range = value("Range").and_then(|v| {
        let (a, b) = v.strip_prefix("bytes=")?.split_once('-')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    });
    let length: usize = value("Content-Length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    client.read_exact(&mut body)?;
    Ok(Some(Request {
        method,
        path,
        range,
        head,
        body,
    }))
}

/// Sends `request` upstream on a new connection (its range moved one byte on if `shift`) and
/// reads the whole answer: status line, headers, body.
fn forward(upstream: &str, request: &Request, shift: bool) -> Result<Answer> {
    let mut conn =
        TcpStream::connect(upstream).with_context(|| format!("connecting {upstream}"))?;
    let mut out = format!("{}\r\n", request.head[0]);
    for line in &request.head[1..] {
        let name = line.split(':').next().unwrap_or_default().trim();
        if name.eq_ignore_ascii_case("connection") {
            continue;
        }
        if shift && name.eq_ignore_ascii_case("range") {
            if let Some((a, b)) = request.range {
                out.push_str(&format!("Range: bytes={}-{}\r\n", a + 1, b + 1));
                continue;
            }
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    conn.write_all(out.as_bytes())?;
    conn.write_all(&request.body)?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("upstream answer without a header end")?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let body = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default().to_owned();
    let headers = lines
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_owned(), v.trim().to_owned()))
        })
        .collect::<Vec<_>>();
    Ok((status, headers, body))
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn set_header(headers: &mut Vec<(String, String)>, name: &str, value: &str) {
    headers.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
    headers.push((name.to_owned(), value.to_owned()));
}
