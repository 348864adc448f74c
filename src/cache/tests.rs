use super::*;
use std::io::{Seek, SeekFrom};

fn cache(dir: &Path, disk_budget: u64, memory_budget: u64) -> ChunkCache {
    ChunkCache::open(CacheConfig {
        dir: dir.to_owned(),
        disk_budget,
        memory_budget,
    })
    .unwrap()
}

fn chunk(i: u32, len: usize) -> (Digest, Bytes) {
    let data: Vec<u8> = (0..len)
        .map(|j| (j as u32).wrapping_mul(31).wrapping_add(i) as u8)
        .collect();
    (Digest::of(&data), Bytes::from(data))
}

#[test]
fn put_then_get_from_memory_and_after_a_restart_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let (d, data) = chunk(1, 1000);
    {
        let c = cache(dir.path(), 0, 1 << 20);
        assert_eq!(c.get(&d).unwrap(), None);
        c.put(&d, data.clone()).unwrap();
        assert_eq!(c.get(&d).unwrap(), Some(data.clone()));
        assert_eq!(c.usage().memory_bytes, 1000);
    }
    let c = cache(dir.path(), 0, 1 << 20);
    assert_eq!(
        c.usage(),
        CacheUsage {
            disk_bytes: 1000,
            disk_chunks: 1,
            memory_bytes: 0
        }
    );
    assert_eq!(c.get(&d).unwrap(), Some(data));
}

#[test]
fn the_same_chunk_is_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let c = cache(dir.path(), 0, 0);
    let (d, data) = chunk(2, 500);
    c.put(&d, data.clone()).unwrap();
    c.put(&d, data).unwrap();
    assert_eq!((c.usage().disk_bytes, c.usage().disk_chunks), (500, 1));
    let files = walk(&dir.path().join("chunks"));
    assert_eq!(files, 1);
}

fn walk(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| if p.is_dir() { walk(&p) } else { 1 })
        .sum()
}

#[test]
fn a_damaged_or_truncated_file_is_a_miss_and_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let (d1, data1) = chunk(3, 800);
    let (d2, data2) = chunk(4, 800);
    {
        let c = cache(dir.path(), 0, 0);
        c.put(&d1, data1).unwrap();
        c.put(&d2, data2).unwrap();
    }
    let p1 = chunk_path(&dir.path().join("chunks"), &d1);
    let mut bytes = std::fs::read(&p1).unwrap();
    bytes[10] ^= 1;
    std::fs::write(&p1, &bytes).unwrap();
    let p2 = chunk_path(&dir.path().join("chunks"), &d2);
    std::fs::write(&p2, &std::fs::read(&p2).unwrap()[..100]).unwrap();
    let c = cache(dir.path(), 0, 0);
    assert_eq!(c.get(&d1).unwrap(), None, "never the damaged bytes");
    assert!(!p1.exists());
    assert_eq!(c.get(&d2).unwrap(), None);
    assert_eq!(c.usage().disk_chunks, 0);
}

#[test]
fn eviction_removes_least_recently_used_unpinned_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let c = cache(dir.path(), 3000, 0);
    let chunks: Vec<_> = (0..3).map(|i| chunk(10 + i, 1000)).collect();
    for (d, data) in &chunks {
        c.put(d, data.clone()).unwrap();
    }
    // Make chunk 0 the oldest by hand (times have one-second resolution).
    lock(&c.inner.state)
        .chunks
        .get_mut(&chunks[0].0)
        .unwrap()
        .last_use = 1;
    lock(&c.inner.state)
        .chunks
        .get_mut(&chunks[1].0)
        .unwrap()
        .last_use = 2;
    c.pin("layer-a", &[chunks[0].0]).unwrap();
    let (d, data) = chunk(99, 1000);
    c.put(&d, data).unwrap();
    assert!(c.contains(&chunks[0].0), "pinned: kept although oldest");
    assert!(!c.contains(&chunks[1].0), "oldest unpinned: evicted");
    assert!(c.contains(&chunks[2].0) && c.contains(&d));
    assert_eq!(c.usage().disk_bytes, 3000);
    c.unpin("layer-a").unwrap();
    lock(&c.inner.state)
        .chunks
        .get_mut(&chunks[0].0)
        .unwrap()
        .last_use = 1;
    let (d2, data2) = chunk(100, 1000);
    c.put(&d2, data2).unwrap();
    assert!(!c.contains(&chunks[0].0), "unpinned: evictable");
}

#[test]
fn pins_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (d, data) = chunk(5, 2000);
    {
        let c = cache(dir.path(), 0, 0);
        c.put(&d, data).unwrap();
        c.pin("mount-1/layer", &[d]).unwrap();
    }
    let c = cache(dir.path(), 1000, 0);
    assert!(
        c.contains(&d),
        "a pinned chunk outlives a budget it exceeds"
    );
    assert_eq!(c.pin_owners().unwrap(), vec!["mount-1/layer".to_owned()]);
}

#[test]
fn memory_stays_within_its_budget() {
    let dir = tempfile::tempdir().unwrap();
    let c = cache(dir.path(), 0, 2500);
    for i in 0..10 {
        let (d, data) = chunk(20 + i, 1000);
        c.put(&d, data).unwrap();
        assert!(c.usage().memory_bytes <= 2500);
    }
}

#[test]
fn records_round_trip_by_namespace() {
    let dir = tempfile::tempdir().unwrap();
    {
        let c = cache(dir.path(), 0, 0);
        c.put_record("mounts", "a", b"1").unwrap();
        c.put_record("mounts", "b", b"2").unwrap();
        c.put_record("layers", "a", b"x").unwrap();
        c.delete_record("mounts", "b").unwrap();
    }
    let c = cache(dir.path(), 0, 0);
    assert_eq!(
        c.records("mounts").unwrap(),
        vec![("a".to_owned(), b"1".to_vec())]
    );
    assert_eq!(c.get_record("layers", "a").unwrap(), Some(b"x".to_vec()));
}

#[test]
fn concurrent_puts_and_gets_agree() {
    let dir = tempfile::tempdir().unwrap();
    let c = cache(dir.path(), 0, 1 << 16);
    let chunks: Vec<_> = (0..32).map(|i| chunk(200 + i, 4096)).collect();
    std::thread::scope(|s| {
        for t in 0..8 {
            let c = c.clone();
            let chunks = &chunks;
            s.spawn(move || {
                for (i, (d, data)) in chunks.iter().enumerate() {
                    if (i + t) % 2 == 0 {
                        c.put(d, data.clone()).unwrap();
                    }
                    if let Some(got) = c.get(d).unwrap() {
                        assert_eq!(&got, data);
                    }
                }
            });
        }
    });
    assert_eq!(c.usage().disk_chunks, 32);
    assert_eq!(c.usage().disk_bytes, 32 * 4096);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(16))]
    #[test]
    fn usage_is_the_sum_of_the_files_held(ops in proptest::collection::vec((0u32..12, 0u8..3), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let c = cache(dir.path(), 5000, 3000);
        for (i, op) in ops {
            let (d, data) = chunk(i, 700 + i as usize * 50);
            match op {
                0 => c.put(&d, data).unwrap(),
                1 => { let _ = c.get(&d).unwrap(); }
                _ => { c.evict().unwrap(); }
            }
            let files: u64 = std::fs::read_dir(dir.path().join("chunks")).unwrap()
                .flat_map(|s| std::fs::read_dir(s.unwrap().path()).unwrap())
                .map(|f| f.unwrap().metadata().unwrap().len()).sum();
            proptest::prop_assert_eq!(c.usage().disk_bytes, files);
            proptest::prop_assert!(c.usage().disk_bytes <= 5000);
        }
    }
}

#[test]
fn a_file_is_assembled_from_verified_chunks_counted_and_evictable() {
    let dir = tempfile::tempdir().unwrap();
    let c = cache(dir.path(), 0, 0);
    let (d1, a) = chunk(10, 3000);
    let (d2, b) = chunk(11, 2000);
    c.put(&d1, a.clone()).unwrap();
    c.put(&d2, b.clone()).unwrap();
    let mut whole = a.to_vec();
    whole.extend_from_slice(&[0u8; 500]);
    whole.extend_from_slice(&b);
    let file = Digest::of(&whole);
    let parts = [
        FilePart::Chunk {
            digest: d1,
            size: 3000,
        },
        FilePart::Zeros(500),
        FilePart::Chunk {
            digest: d2,
            size: 2000,
        },
    ];
    assert!(c.open_checked(&file).is_none(), "nothing before assembly");
    assert!(c.assemble(&file, &parts).unwrap());
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut c.open_checked(&file).unwrap(), &mut got).unwrap();
    assert_eq!(got, whole);
    assert_eq!(
        c.usage().disk_bytes,
        5000 + 5500,
        "counted in the disk budget"
    );

    // Bytes that do not hash to the digest asked for are never stored or offered.
    let wrong = Digest::of(b"another file");
    assert!(!c.assemble(&wrong, &parts).unwrap());
    assert!(c.open_checked(&wrong).is_none());
    assert_eq!(c.usage().disk_bytes, 10_500);

    // A later process re-hashes before offering; a file damaged on disk is dropped.
    drop(c);
    let c = cache(dir.path(), 0, 0);
    assert!(
        c.open_checked(&file).is_none(),
        "not offered before a check"
    );
    let path = chunk_path(&dir.path().join("chunks"), &file);
    let mut damaged = whole.clone();
    damaged[10] ^= 1;
    std::fs::write(&path, &damaged).unwrap();
    assert!(!c.check_file(&file).unwrap());
    assert!(c.open_checked(&file).is_none());
    assert!(!path.exists());
    assert!(c.assemble(&file, &parts).unwrap(), "reassembled");

    // Evicted like a chunk under a budget.
    drop(c);
    let c = cache(dir.path(), 4000, 0);
    assert!(c.usage().disk_bytes <= 4000);
}

#[test]
fn a_missing_chunk_means_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let c = cache(dir.path(), 0, 0);
    let (d, data) = chunk(12, 100);
    let parts = [FilePart::Chunk {
        digest: d,
        size: 100,
    }];
    assert!(!c.assemble(&d, &parts).unwrap());
    c.put(&d, data).unwrap();
    assert!(
        c.assemble(&d, &parts).unwrap(),
        "a one-chunk file is its chunk"
    );
    assert_eq!(c.usage().disk_chunks, 1);
}

#[test]
fn zero_runs_of_an_assembled_file_are_holes_and_the_budget_counts_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let c = cache(dir.path(), 0, 0);
    let (d1, a) = chunk(20, 4096);
    c.put(&d1, a.clone()).unwrap();
    let run = 64u64 << 20;
    let mut hasher = crate::oci::Hasher::new();
    hasher.update(&a);
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..64 {
        hasher.update(&zeros);
    }
    hasher.update(&a);
    let file = hasher.finish();
    let parts = [
        FilePart::Chunk {
            digest: d1,
            size: 4096,
        },
        FilePart::Zeros(run),
        FilePart::Chunk {
            digest: d1,
            size: 4096,
        },
    ];
    assert!(c.assemble(&file, &parts).unwrap());
    let path = chunk_path(&dir.path().join("chunks"), &file);
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), run + 8192, "the file has its full length");
    let counted = c.usage().disk_bytes - 4096;
    assert!(
        counted < 1 << 20,
        "a 64 MiB hole is not counted: {counted} bytes"
    );
    let mut f = c.open_checked(&file).unwrap();
    let mut tail = vec![0u8; 4096];
    f.seek(SeekFrom::Start(run + 4096)).unwrap();
    std::io::Read::read_exact(&mut f, &mut tail).unwrap();
    assert_eq!(tail, a.to_vec());

    // A restart counts the blocks again, and keeps the file.
    drop((f, c));
    let c = cache(dir.path(), 0, 0);
    assert!(c.usage().disk_bytes < (1 << 20) + 4096);
    assert!(c.check_file(&file).unwrap());
}
