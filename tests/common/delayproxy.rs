//! A delaying TCP proxy on 127.0.0.1 in front of a [`TestRegistry`], that also writes down when
//! each HTTP request passed: round trips become visible (and countable) on loopback, as on a
//! real network, without netem (this kernel has none).
//!
//! Every byte is held for `one_way` in each direction (timestamped when read, written that much
//! later), so the delay adds latency without limiting throughput; a new connection costs one
//! round trip before its first request goes, like a TCP handshake. Threads, not a runtime: the
//! proxy stops and closes every connection when dropped.
//!
//! ```ignore
//! let proxy = DelayProxy::start(&registry.addr, Duration::from_millis(50))?; // 100 ms RTT
//! let reference = format!("{}/app:v1", proxy.addr);
//! for r in proxy.requests() { println!("{:?} {} {:?}", r.at, r.line, r.range); }
//! ```
//!
//! (`bench/cold/network.rs` has the same delay for the benchmark's shaped namespace; this one
//! needs no namespace and keeps the request log tests assert on.)
//!
//! [`TestRegistry`]: super::registry::TestRegistry

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Result;

/// One HTTP request as it passed the proxy on its way to the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// When it reached the proxy, from the proxy's start.
    pub at: Duration,
    /// The request line without the protocol: `GET /v2/app/blobs/sha256:...`.
    pub line: String,
    /// The `Range` header's value, if any.
    pub range: Option<String>,
}

impl Request {
    /// The blob digest a `/blobs/` request names.
    pub fn blob(&self) -> Option<&str> {
        let (_, rest) = self.line.split_once("/blobs/")?;
        Some(rest.split(['?', ' ']).next().unwrap_or(rest))
    }
}

#[derive(Debug)]
struct State {
    start: Instant,
    one_way: Mutex<Duration>,
    stop: AtomicBool,
    requests: Mutex<Vec<Request>>,
    /// Connections accepted so far.
    connections: std::sync::atomic::AtomicU64,
}

/// A running proxy; `addr` is `127.0.0.1:PORT`.
#[derive(Debug)]
pub struct DelayProxy {
    pub addr: String,
    state: Arc<State>,
    acceptor: Option<JoinHandle<()>>,
}

impl DelayProxy {
    /// Listens on a free loopback port and forwards to `upstream` (`127.0.0.1:PORT`), holding
    /// each direction's bytes for `one_way` (the round trip is twice that).
    pub fn start(upstream: &str, one_way: Duration) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?.to_string();
        let state = Arc::new(State {
            start: Instant::now(),
            one_way: Mutex::new(one_way),
            stop: AtomicBool::new(false),
            requests: Mutex::new(Vec::new()),
            connections: std::sync::atomic::AtomicU64::new(0),
        });
        let upstream = upstream.to_owned();
        let st = state.clone();
        let acceptor = std::thread::spawn(move || {
            while !st.stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        st.connections.fetch_add(1, Ordering::Relaxed);
                        let (st, upstream) = (st.clone(), upstream.clone());
                        std::thread::spawn(move || connection(client, &upstream, st));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(Self {
            addr,
            state,
            acceptor: Some(acceptor),
        })
    }

    /// The one-way delay for connections opened from now on.
    pub fn set_one_way(&self, one_way: Duration) {
        *self.state.one_way.lock().unwrap() = one_way;
    }

    /// Every request so far, in the order they reached the proxy.
    pub fn requests(&self) -> Vec<Request> {
        self.state.requests.lock().unwrap().clone()
    }

    /// How many connections clients opened so far.
    pub fn connections(&self) -> u64 {
        self.state.connections.load(Ordering::Relaxed)
    }

    /// Forgets the requests so far (e.g. the pushes that set a test up).
    pub fn clear(&self) {
        self.state.requests.lock().unwrap().clear();
    }

    /// The time since the proxy started, on the clock of [`Request::at`].
    pub fn now(&self) -> Duration {
        self.state.start.elapsed()
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
    }
}

fn connection(client: TcpStream, upstream: &str, state: Arc<State>) {
    let _ = client.set_nonblocking(false);
    let Ok(server) = TcpStream::connect(upstream) else {
        return;
    };
    let delay = *state.one_way.lock().unwrap();
    // A new TCP connection costs a round trip (SYN, SYN-ACK) before the request goes.
    std::thread::sleep(delay * 2);
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (Ok(client2), Ok(server2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let up_state = state.clone();
    let up = std::thread::spawn(move || pump(client, server, delay, Some(up_state)));
    pump(server2, client2, delay, None);
    let _ = up.join();
}

/// Copies `from` to `to`, each read held for `delay`; `log` set: the upstream direction, whose
/// request lines are written down.
fn pump(mut from: TcpStream, to: TcpStream, delay: Duration, log: Option<Arc<State>>) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let writer = std::thread::spawn(move || {
        let mut to = to;
        while let Ok((at, data)) = rx.recv() {
            let due = at + delay;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if to.write_all(&data).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
    let mut buf = vec![0u8; 64 << 10];
    loop {
        if log.as_ref().is_some_and(|s| s.stop.load(Ordering::Relaxed)) {
            break;
        }
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let now = Instant::now();
                if let Some(state) = &log {
                    record(state, now, &buf[..n]);
                }
                if tx.send((now, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.join();
}

/// Writes down the request heads in `data` (a client's requests are small: a head arrives in
/// one read).
fn record(state: &State, now: Instant, data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut current: Option<Request> = None;
    let mut found = Vec::new();
    for line in text.split("\r\n") {
        if let Some(head) = line.strip_suffix(" HTTP/1.1") {
            if let Some(r) = current.take() {
                found.push(r);
            }
            current = Some(Request {
                at: now - state.start,
                line: head.to_owned(),
                range: None,
            });
        } else if let (Some(r), Some((name, value))) = (current.as_mut(), line.split_once(':')) {
            if name.eq_ignore_ascii_case("range") {
                r.range = Some(value.trim().to_owned());
            }
        }
    }
    found.extend(current);
    state.requests.lock().unwrap().extend(found);
}
