//! A panic anywhere in serving one request fails that request only: a real FUSE session (root
//! only) whose chunk source panics for one file keeps serving the others.

use std::io::Read;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt};

use super::{mount_layer, ChunkError, ChunkSource, LayerSession, MountOptions};
use crate::format::{Chunk, EntryKind, LayerFormat, Toc, TocEntry};
use crate::oci::Digest;

/// Panics for the chunk of `boom` and the local file of `boom-open`; serves `fine`.
struct Panicky {
    fine: Bytes,
}

impl ChunkSource for Panicky {
    fn read_chunk(&self, chunk: &Chunk) -> BoxFuture<'static, Result<Bytes, ChunkError>> {
        let fine = self.fine.clone();
        let digest = chunk.digest;
        async move {
            if digest == Digest::of(&fine) {
                Ok(fine)
            } else {
                panic!("a bug reached by a chunk read")
            }
        }
        .boxed()
    }

    fn local_file(&self, entry: &TocEntry) -> Option<std::fs::File> {
        if entry.name == "boom-open" {
            panic!("a bug reached by an open");
        }
        None
    }
}

fn file(name: &str, data: &[u8]) -> TocEntry {
    let digest = Digest::of(data);
    TocEntry {
        size: data.len() as u64,
        digest: Some(digest),
        chunks: vec![Chunk {
            file_offset: 0,
            size: data.len() as u64,
            compressed_start: 0,
            compressed_end: 1,
            inner_offset: 0,
            digest,
            zeros: false,
        }],
        ..TocEntry::new(name, EntryKind::Reg)
    }
}

#[test]
fn a_panic_while_serving_answers_eio_and_the_session_keeps_serving() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: mounting FUSE needs root");
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let fine = b"still served\n";
    let toc = Toc {
        format: LayerFormat::ZstdChunked,
        entries: vec![
            file("boom", b"never served"),
            file("boom-open", b"never opened"),
            file("fine", fine),
        ],
        prefetch: vec![],
    };
    let session = LayerSession::mount(&dir.path().join("session"), &MountOptions::default())
        .expect("session");
    let target = dir.path().join("layer");
    std::fs::create_dir_all(&target).unwrap();
    let layer = mount_layer(
        &session,
        Arc::new(toc),
        Arc::new(Panicky {
            fine: Bytes::from_static(fine),
        }),
        runtime.handle().clone(),
        &target,
    )
    .expect("layer");
    // More panics than the session has event-loop threads: none of them may end a loop. Without
    // the guard the loops die and reads hang, so the reads run in a thread with a deadline.
    let (done, result) = std::sync::mpsc::channel();
    let t = target.clone();
    std::thread::spawn(move || {
        let outcome = (|| -> Result<(), String> {
            for round in 0..6 {
                match std::fs::read(t.join("boom")) {
                    Err(e) if e.raw_os_error() == Some(nix::libc::EIO) => {}
                    other => return Err(format!("round {round}: boom gave {other:?}")),
                }
                // Opens reach the source only when the kernel offers passthrough.
                if let Err(e) = std::fs::File::open(t.join("boom-open")) {
                    if e.raw_os_error() != Some(nix::libc::EIO) {
                        return Err(format!("round {round}: boom-open gave {e}"));
                    }
                }
                let mut got = Vec::new();
                std::fs::File::open(t.join("fine"))
                    .and_then(|mut f| f.read_to_end(&mut got))
                    .map_err(|e| format!("round {round}: the session stopped serving: {e}"))?;
                if got != fine {
                    return Err(format!("round {round}: fine gave {got:?}"));
                }
            }
            Ok(())
        })();
        let _ = done.send(outcome);
    });
    let outcome = result
        .recv_timeout(std::time::Duration::from_secs(20))
        .unwrap_or_else(|_| Err("reads hung: the event loops died".into()));
    if let Err(why) = outcome {
        for p in [&target, &dir.path().join("session")] {
            let _ = nix::mount::umount2(p.as_path(), nix::mount::MntFlags::MNT_DETACH);
        }
        std::mem::forget((layer, session));
        panic!("{why}");
    }
    drop(layer);
    drop(session);
}
