//! A registry with the OCI 1.1 referrers API, made of a real [`TestRegistry`] (which has none:
//! distribution 2.8) and a small HTTP/1.1 proxy on 127.0.0.1 that adds what the API adds:
//!
//! - a manifest PUT whose body has a `subject` is forwarded; if the registry stored it, the proxy
//!   records its descriptor (media type, digest, size, `artifactType`, annotations) under the
//!   subject and answers with `OCI-Subject: <subject digest>`, as the spec says a registry that
//!   processed the subject does;
//! - `GET /v2/<name>/referrers/<digest>[?artifactType=T]` is answered by the proxy: an OCI image
//!   index of the recorded descriptors (filtered by `T`, with `OCI-Filters-Applied`);
//! - everything else passes through unchanged, one upstream connection per request.
//!
//! Threads, not a runtime; stopped when dropped.
//!
//! [`TestRegistry`]: super::registry::TestRegistry

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::image::digest_of;

#[derive(Debug, Default)]
struct State {
    stop: AtomicBool,
    /// `(repository, subject digest)` → referrer descriptors, in push order.
    referrers: Mutex<BTreeMap<(String, String), Vec<Value>>>,
    referrers_gets: AtomicU64,
}

/// A running proxy; `addr` is `127.0.0.1:PORT`.
#[derive(Debug)]
pub struct ReferrersProxy {
    pub addr: String,
    state: Arc<State>,
    acceptor: Option<JoinHandle<()>>,
}

impl ReferrersProxy {
    /// Listens on a free loopback port in front of `upstream` (`127.0.0.1:PORT`).
    pub fn start(upstream: &str) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?.to_string();
        let state = Arc::new(State::default());
        let (upstream, acceptor_state) = (upstream.to_owned(), state.clone());
        let acceptor = std::thread::spawn(move || {
            let state = acceptor_state;
            while !state.stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let (state, upstream) = (state.clone(), upstream.clone());
                        std::thread::spawn(move || {
                            let _ = client.set_nonblocking(false);
                            if let Err(e) = serve(client, &upstream, &state) {
                                eprintln!("referrers proxy: {e:#}");
                            }
                        });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        });
        Ok(Self {
            addr,
            state,
            acceptor: Some(acceptor),
        })
    }

    /// Referrers API requests answered so far.
    pub fn referrers_gets(&self) -> u64 {
        self.state.referrers_gets.load(Ordering::Relaxed)
    }

    /// The descriptors recorded for `subject` in `repository`.
    pub fn referrers(&self, repository: &str, subject: &str) -> Vec<Value> {
        self.state
            .referrers
            .lock()
            .unwrap()
            .get(&(repository.to_owned(), subject.to_owned()))
            .cloned()
            .unwrap_or_default()
    }

    /// Lists `descriptor` as a referrer of `subject`, as if a manifest naming it had been pushed.
    pub fn add_referrer(&self, repository: &str, subject: &str, descriptor: Value) {
        self.state
            .referrers
            .lock()
            .unwrap()
            .entry((repository.to_owned(), subject.to_owned()))
            .or_default()
            .push(descriptor);
    }
}

impl Drop for ReferrersProxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
    }
}

fn serve(mut client: TcpStream, upstream: &str, state: &State) -> Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    let Some((head, body)) = read_request(&mut client)? else {
        return Ok(());
    };
    let mut first = head[0].split(' ');
    let method = first.next().unwrap_or_default().to_owned();
    let target = first.next().unwrap_or_default().to_owned();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let rest = path.strip_prefix("/v2/").unwrap_or_default();

    if method == "GET" {
        if let Some((repository, subject)) = rest.rsplit_once("/referrers/") {
            state.referrers_gets.fetch_add(1, Ordering::Relaxed);
            let wanted = query
                .split('&')
                .find_map(|p| p.strip_prefix("artifactType="))
                .map(percent_decode);
            let listed = state
                .referrers
                .lock()
                .unwrap()
                .get(&(repository.to_owned(), subject.to_owned()))
                .cloned()
                .unwrap_or_default();
            let manifests: Vec<Value> = listed
                .into_iter()
                .filter(|d| wanted.as_deref().is_none_or(|w| d["artifactType"] == w))
                .collect();
            let index = serde_json::to_vec(&json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": manifests,
            }))?;
            let filtered = if wanted.is_some() {
                "OCI-Filters-Applied: artifactType\r\n"
            } else {
                ""
            };
            let answer = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.index.v1+json\r\n\
                 Content-Length: {}\r\n{filtered}Connection: close\r\n\r\n",
                index.len()
            );
            client.write_all(answer.as_bytes())?;
            client.write_all(&index)?;
            return Ok(());
        }
    }

    let mut answer = forward(upstream, &head, &body)?;
    if method == "PUT" && rest.contains("/manifests/") && answer.starts_with(b"HTTP/1.1 201") {
        let doc: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if let Some(subject) = doc["subject"]["digest"].as_str() {
            let repository = rest.split("/manifests/").next().unwrap_or_default();
            let mut descriptor = json!({
                "mediaType": doc["mediaType"],
                "digest": digest_of(&body),
                "size": body.len(),
            });
            if let Some(t) = doc["artifactType"].as_str() {
                descriptor["artifactType"] = json!(t);
            }
            if doc["annotations"].is_object() {
                descriptor["annotations"] = doc["annotations"].clone();
            }
            state
                .referrers
                .lock()
                .unwrap()
                .entry((repository.to_owned(), subject.to_owned()))
                .or_default()
                .push(descriptor);
            let line_end = answer
                .windows(2)
                .position(|w| w == b"\r\n")
                .context("status line")?;
            let header = format!("\r\nOCI-Subject: {subject}");
            answer.splice(line_end..line_end, header.into_bytes());
        }
    }
    client.write_all(&answer)?;
    Ok(())
}

/// `%2B` → `+`, `%2F` → `/` and the like (what a query-encoded media type holds).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&text[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One request: head lines and body (by `Content-Length`).
fn read_request(client: &mut TcpStream) -> Result<Option<(Vec<String>, Vec<u8>)>> {
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
    let head: Vec<String> = text
        .split("\r\n")
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    let length: usize = head
        .iter()
        .skip(1)
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    client.read_exact(&mut body)?;
    Ok(Some((head, body)))
}

/// Sends the request upstream on its own connection and returns the whole raw answer.
fn forward(upstream: &str, head: &[String], body: &[u8]) -> Result<Vec<u8>> {
    let mut conn =
        TcpStream::connect(upstream).with_context(|| format!("connecting {upstream}"))?;
    let mut out = format!("{}\r\n", head[0]);
    for line in &head[1..] {
        let name = line.split(':').next().unwrap_or_default().trim();
        if !name.eq_ignore_ascii_case("connection") {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    out.push_str("Connection: close\r\n\r\n");
    conn.write_all(out.as_bytes())?;
    conn.write_all(body)?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw)?;
    Ok(raw)
}
