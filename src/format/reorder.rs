//! Reordering a layer so that its start-up set comes first: the files a container reads while it
//! starts, in the order it first reads them, ahead of everything else. A lazy mount then fetches
//! them as one contiguous range instead of many scattered ones.
//!
//! Works on the uncompressed tar, spooled to a file: [`index`] records where each item lies,
//! [`plan`] decides the new order, and [`Plan::reader`] streams the items in that order as a new,
//! valid tar, which the ordinary writer then turns into the lazy layer. The result stays a plain
//! layer every unpacker reads:
//! - a moved file's parent directory entries move with it, parents first, so a directory is
//!   created (with its own mode) before anything in it;
//! - each moved directory takes its whiteout entries (opaque marker included) right behind it, so
//!   whiteouts still come before their sibling entries, as the OCI layer spec asks;
//! - a moved hard link takes its target first (hard links always follow their targets);
//! - names the layer holds more than once are not moved (a later entry replaces an earlier one,
//!   so their order is meaning), and PAX global headers must all precede the first entry;
//! - old prefetch landmarks are dropped: the order they described no longer exists.
//!
//! The tar bytes of each entry are passed through unchanged; only their order, and hence the
//! layer's `diff_id`, changes.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};

use super::error::FormatError;
use super::tar::{padding, ustar_file_header, TarItem, TarParser, BLOCK};
use super::toc::{NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK};
use super::{EntryKind, LayerFormat, ESTARGZ_TOC_NAME};

/// Where one tar item (headers, payload, padding) lies in the spooled stream.
#[derive(Debug, Clone)]
struct Item {
    start: u64,
    end: u64,
    name: String,
    /// `None` for a PAX global header.
    kind: Option<EntryKind>,
    /// Hard link target (normalised), else empty.
    link: String,
    size: u64,
}

/// The items of a spooled tar, in stream order.
#[derive(Debug, Default)]
pub struct TarIndex {
    items: Vec<Item>,
    /// The last entry of each name (the one an unpacked layer keeps).
    last: HashMap<String, usize>,
    seen_entry: bool,
    /// A PAX global header after the first entry: it applies to what follows it, so the entries
    /// cannot be moved across it.
    global_after_entry: bool,
}

impl TarIndex {
    /// Number of tar entries (global headers not counted).
    pub fn entries(&self) -> usize {
        self.items.iter().filter(|i| i.kind.is_some()).count()
    }

    /// Name, kind, hard link target (normalised; symlink targets are not kept) and size of each
    /// entry, in stream order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, EntryKind, &str, u64)> {
        self.items
            .iter()
            .filter_map(|i| Some((i.name.as_str(), i.kind?, i.link.as_str(), i.size)))
    }

    /// The stream range `[start, end)` of a regular file's payload, for reading a few of its
    /// bytes (the ELF heuristic); the last entry of that name wins, as in an unpacked layer.
    pub fn payload(&self, name: &str) -> Option<(u64, u64)> {
        let item = &self.items[*self.last.get(name)?];
        if item.kind != Some(EntryKind::Reg) {
            return None;
        }
        let payload_start = item.end - padding(item.size) as u64 - item.size;
        Some((payload_start, item.size))
    }

    /// The regular file `name` names, through hard links (the last entry of a name wins): its
    /// name and content size.
    pub fn file<'a>(&'a self, name: &'a str) -> Option<(&'a str, u64)> {
        let mut name = name;
        for _ in 0..16 {
            let item = &self.items[*self.last.get(name)?];
            match item.kind {
                Some(EntryKind::Reg) => return Some((&item.name, item.size)),
                Some(EntryKind::Hardlink) => name = &item.link,
                _ => return None,
            }
        }
        None
    }

    fn push(&mut self, item: Item) {
        if item.kind.is_none() && self.seen_entry {
            self.global_after_entry = true;
        }
        if item.kind.is_some() {
            self.seen_entry = true;
            self.last.insert(item.name.clone(), self.items.len());
        }
        self.items.push(item);
    }
}

/// Symlink targets by name, kept beside the index for path resolution (data, never resolved on
/// the host).
pub type Symlinks = HashMap<String, String>;

/// Reads a whole tar stream and records where each item lies. `r` is read to its end (trailing
/// zero blocks included), so a tee or hash over it sees every byte.
pub fn index<R: Read>(r: R) -> Result<(TarIndex, Symlinks), FormatError> {
    let mut tar = TarParser::new(r);
    let mut index = TarIndex::default();
    let mut symlinks = Symlinks::new();
    loop {
        let start = tar.offset();
        let Some(item) = tar.next_item()? else { break };
        match item {
            TarItem::Global(_) => index.push(Item {
                start,
                end: tar.offset(),
                name: String::new(),
                kind: None,
                link: String::new(),
                size: 0,
            }),
            TarItem::Entry(e) => {
                // The index feeds a lazy writer: a name its TOC cannot hold stops it here.
                e.meta.check_toc()?;
                let name = e.meta.toc_name()?.to_owned();
                let target = e.meta.toc_link_name()?.to_owned();
                tar.skip_payload(e.size + padding(e.size) as u64)?;
                let link = match e.meta.kind {
                    EntryKind::Hardlink => target,
                    EntryKind::Symlink => {
                        symlinks.insert(name.clone(), target);
                        String::new()
                    }
                    _ => String::new(),
                };
                index.push(Item {
                    start,
                    end: tar.offset(),
                    name,
                    kind: Some(e.meta.kind),
                    link,
                    size: e.size,
                });
            }
        }
    }
    Ok((index, symlinks))
}

/// One piece of the reordered stream.
#[derive(Debug, Clone)]
enum Segment {
    /// Bytes `[start, end)` of the spooled stream.
    Spool(u64, u64),
    /// Bytes made here (the eStargz landmark, the end-of-archive marker).
    Bytes(Vec<u8>),
}

/// The new order of a layer's entries.
#[derive(Debug, Clone)]
pub struct Plan {
    segments: Vec<Segment>,
    /// Regular files (and hard links to them) that now lead the layer, in access order: what the
    /// TOC records as the start-up set.
    pub startup: Vec<String>,
    /// Uncompressed bytes of their content.
    pub startup_bytes: u64,
    /// Names asked for that the layer does not hold as a movable file.
    pub skipped: usize,
    /// Why nothing was moved, when nothing was.
    pub refused: Option<String>,
}

/// The eStargz landmark entry: one byte (0x0f, as stargz-snapshotter writes it), padded.
fn landmark() -> Vec<u8> {
    let mut b = ustar_file_header(PREFETCH_LANDMARK, 1, 0o644).to_vec();
    b.push(0x0f);
    b.resize(2 * BLOCK, 0);
    b
}

/// Decides the order that puts `wanted` (entry names in access order) first. Unknown names,
/// names of non-files and names the layer repeats are skipped and counted. With nothing to move
/// the plan keeps the stream as it is (and writes no landmark). `drop_estargz_toc`: the source
/// was eStargz, whose old TOC entry (`stargz.index.json`) is dropped with the old landmarks when
/// anything moves (the writer adds a new one for an eStargz result).
pub fn plan(
    index: &TarIndex,
    wanted: &[String],
    format: LayerFormat,
    drop_estargz_toc: bool,
) -> Plan {
    let items = &index.items;
    let mut plan = Plan {
        segments: Vec::new(),
        startup: Vec::new(),
        startup_bytes: 0,
        skipped: 0,
        refused: None,
    };
    let mut count: HashMap<&str, usize> = HashMap::new();
    let mut by_name: HashMap<&str, usize> = HashMap::new();
    for (i, item) in items.iter().enumerate() {
        if item.kind.is_some() {
            *count.entry(item.name.as_str()).or_default() += 1;
            by_name.insert(item.name.as_str(), i);
        }
    }
    let unique = |name: &str| -> Option<usize> {
        (count.get(name) == Some(&1))
            .then(|| by_name.get(name).copied())
            .flatten()
    };
    // Whiteouts by directory, moved with it.
    let mut whiteouts: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, item) in items.iter().enumerate() {
        let (dir, base) = item.name.rsplit_once('/').unwrap_or(("", &item.name));
        if item.kind.is_some() && base.starts_with(".wh.") {
            whiteouts.entry(dir).or_default().push(i);
        }
    }

    let mut placed = vec![false; items.len()];
    let mut order: Vec<usize> = Vec::new();
    if index.global_after_entry {
        plan.refused = Some("a PAX global header follows the first entry".into());
    } else {
        let mut seen: HashSet<&str> = HashSet::new();
        for name in wanted {
            if !seen.insert(name.as_str()) {
                continue;
            }
            // A hard link brings its target; the chain is followed to a regular file, and it
            // ends: each target comes earlier in the stream than its link.
            let mut chain = Vec::new();
            let mut at = unique(name);
            while let Some(i) = at {
                chain.push(i);
                match items[i].kind {
                    Some(EntryKind::Hardlink) => {
                        let next = unique(&items[i].link).filter(|&t| t < i);
                        if next.is_none() {
                            chain.clear();
                        }
                        at = next;
                    }
                    Some(EntryKind::Reg) => at = None,
                    _ => {
                        chain.clear();
                        at = None;
                    }
                }
            }
            if chain.is_empty() {
                plan.skipped += 1;
                continue;
            }
            for &i in chain.iter().rev() {
                if placed[i] {
                    continue;
                }
                place_parents(
                    items,
                    &items[i].name,
                    &unique,
                    &whiteouts,
                    &mut placed,
                    &mut order,
                );
                placed[i] = true;
                order.push(i);
            }
        }
    }
    // The set as it now leads the stream: the files asked for and the hard link targets they
    // brought, in stream order (whiteouts, which moved with their directories, hold nothing).
    for &i in &order {
        let item = &items[i];
        let whiteout = item
            .name
            .rsplit('/')
            .next()
            .unwrap_or("")
            .starts_with(".wh.");
        if matches!(item.kind, Some(EntryKind::Reg | EntryKind::Hardlink)) && !whiteout {
            plan.startup.push(item.name.clone());
            plan.startup_bytes += item.size;
        }
    }
    let landmarks = [
        PREFETCH_LANDMARK,
        NO_PREFETCH_LANDMARK,
        if drop_estargz_toc {
            ESTARGZ_TOC_NAME
        } else {
            PREFETCH_LANDMARK
        },
    ];
    let moved = !plan.startup.is_empty();
    // Global headers lead (they all precede the first entry when anything moved).
    for (i, item) in items.iter().enumerate() {
        if moved && item.kind.is_none() {
            plan.segments.push(Segment::Spool(item.start, item.end));
            placed[i] = true;
        }
    }
    for &i in &order {
        plan.segments
            .push(Segment::Spool(items[i].start, items[i].end));
    }
    if moved && format == LayerFormat::Estargz {
        plan.segments.push(Segment::Bytes(landmark()));
    }
    for (i, item) in items.iter().enumerate() {
        if placed[i] || (moved && landmarks.contains(&item.name.as_str()) && item.kind.is_some()) {
            continue;
        }
        // Runs of adjacent items read as one segment.
        match plan.segments.last_mut() {
            Some(Segment::Spool(_, end)) if *end == item.start => *end = item.end,
            _ => plan.segments.push(Segment::Spool(item.start, item.end)),
        }
    }
    plan.segments.push(Segment::Bytes(vec![0; 2 * BLOCK]));
    plan
}

/// Places the directory entries above `name` (top first), each followed by its whiteouts.
fn place_parents(
    items: &[Item],
    name: &str,
    unique: &dyn Fn(&str) -> Option<usize>,
    whiteouts: &HashMap<&str, Vec<usize>>,
    placed: &mut [bool],
    order: &mut Vec<usize>,
) {
    let mut dirs = vec![""];
    dirs.extend(
        name.match_indices('/')
            .map(|(at, _)| &name[..at])
            .filter(|d| !d.is_empty()),
    );
    for dir in dirs {
        if let Some(d) = unique(dir).filter(|&d| items[d].kind == Some(EntryKind::Dir)) {
            if !placed[d] {
                placed[d] = true;
                order.push(d);
            }
        }
        for &w in whiteouts.get(dir).into_iter().flatten() {
            if !placed[w] {
                placed[w] = true;
                order.push(w);
            }
        }
    }
}

impl Plan {
    /// The reordered tar, read from the spooled stream `spool`.
    pub fn reader(&self, spool: File) -> PlanReader {
        PlanReader {
            spool,
            segments: self.segments.clone(),
            at: 0,
            pos: 0,
        }
    }
}

/// Streams a [`Plan`]'s segments in order.
#[derive(Debug)]
pub struct PlanReader {
    spool: File,
    segments: Vec<Segment>,
    /// Current segment, and bytes of it already read.
    at: usize,
    pos: u64,
}

impl Read for PlanReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let Some(segment) = self.segments.get(self.at) else {
                return Ok(0);
            };
            let n = match segment {
                Segment::Bytes(b) => {
                    let rest = &b[(self.pos as usize).min(b.len())..];
                    let n = rest.len().min(buf.len());
                    buf[..n].copy_from_slice(&rest[..n]);
                    n
                }
                Segment::Spool(start, end) => {
                    let left = end - start - self.pos;
                    if left == 0 {
                        0
                    } else {
                        if self.pos == 0 {
                            self.spool.seek(SeekFrom::Start(*start))?;
                        }
                        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                        let n = self.spool.read(&mut buf[..want])?;
                        if n == 0 {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "the spooled layer ended early",
                            ));
                        }
                        n
                    }
                }
            };
            if n == 0 {
                self.at += 1;
                self.pos = 0;
                if buf.is_empty() {
                    return Ok(0);
                }
                continue;
            }
            self.pos += n as u64;
            return Ok(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::testtar::{TestEntry, TestTar};

    /// A tar of `(name, typeflag, link, data)` entries.
    struct Builder(TestTar);

    impl Builder {
        fn new() -> Self {
            Self(TestTar::default())
        }
        fn add(&mut self, name: &str, typeflag: u8, link: &str, data: &[u8]) -> &mut Self {
            self.0.add(&TestEntry {
                name: name.into(),
                typeflag,
                mode: 0o755,
                link: link.into(),
                data: data.to_vec(),
                xattrs: Vec::new(),
            });
            self
        }
        fn dir(&mut self, name: &str) -> &mut Self {
            self.add(&format!("{name}/"), b'5', "", b"")
        }
        fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
            self.add(name, b'0', "", data)
        }
        fn hardlink(&mut self, name: &str, target: &str) -> &mut Self {
            self.add(name, b'1', target, b"")
        }
        fn global(&mut self, key: &str, value: &str) -> &mut Self {
            self.0.global(key, value.as_bytes());
            self
        }
        fn finish(&mut self) -> Vec<u8> {
            std::mem::take(&mut self.0).finish()
        }
    }

    fn names_of(tar: &[u8]) -> Vec<String> {
        let (index, _) = index(tar).unwrap();
        index.iter().map(|(n, ..)| n.to_owned()).collect()
    }

    fn reorder(tar: &[u8], wanted: &[&str], format: LayerFormat) -> (Vec<u8>, Plan) {
        let mut spool = tempfile::tempfile().unwrap();
        io::Write::write_all(&mut spool, tar).unwrap();
        let (index, _) = index(tar).unwrap();
        let wanted: Vec<String> = wanted.iter().map(|s| (*s).to_owned()).collect();
        let plan = plan(&index, &wanted, format, false);
        let mut out = Vec::new();
        plan.reader(spool).read_to_end(&mut out).unwrap();
        (out, plan)
    }

    fn sample() -> Vec<u8> {
        Builder::new()
            .dir("usr")
            .dir("usr/lib")
            .file("usr/lib/a.so", b"aaaa")
            .dir("etc")
            .file("etc/.wh.gone", b"")
            .file("etc/.wh..wh..opq", b"")
            .file("etc/conf", b"c")
            .file("usr/lib/b.so", b"bbbbbb")
            .hardlink("usr/lib/b2.so", "usr/lib/b.so")
            .dir("bin")
            .file("bin/app", b"app")
            .file(".prefetch.landmark", b"\x0f")
            .finish()
    }

    #[test]
    fn start_up_files_lead_in_access_order_with_parents_whiteouts_and_link_targets() {
        let tar = sample();
        let (out, plan) = reorder(
            &tar,
            &["bin/app", "etc/conf", "usr/lib/b2.so", "missing", "usr/lib"],
            LayerFormat::ZstdChunked,
        );
        assert_eq!(
            plan.startup,
            ["bin/app", "etc/conf", "usr/lib/b.so", "usr/lib/b2.so"]
        );
        assert_eq!(plan.startup_bytes, 3 + 1 + 6);
        assert_eq!(plan.skipped, 2);
        assert_eq!(
            names_of(&out),
            [
                "bin",
                "bin/app",
                "etc",
                "etc/.wh.gone",
                "etc/.wh..wh..opq",
                "etc/conf",
                "usr",
                "usr/lib",
                "usr/lib/b.so",
                "usr/lib/b2.so",
                "usr/lib/a.so",
            ]
        );
        // The same entries with the same bytes: only the order changed (and the old landmark
        // went).
        let entries = |t: &[u8]| {
            let mut v: Vec<Vec<u8>> = Vec::new();
            let (index, _) = index(t).unwrap();
            for i in &index.items {
                if i.name != ".prefetch.landmark" {
                    v.push(t[i.start as usize..i.end as usize].to_vec());
                }
            }
            v.sort();
            v
        };
        assert_eq!(entries(&out), entries(&tar));
        assert!(out.ends_with(&[0u8; 1024]));
    }

    #[test]
    fn estargz_gets_a_landmark_behind_the_start_up_set_and_nothing_moves_without_one() {
        let tar = sample();
        let (out, _) = reorder(&tar, &["usr/lib/a.so"], LayerFormat::Estargz);
        assert_eq!(
            names_of(&out)[..4],
            ["usr", "usr/lib", "usr/lib/a.so", ".prefetch.landmark"]
        );
        let (same, plan) = reorder(&tar, &["nothing"], LayerFormat::Estargz);
        assert!(plan.startup.is_empty());
        assert_eq!(same, tar, "nothing moved: the stream is unchanged");
    }

    #[test]
    fn an_estargz_sources_old_toc_entry_goes_when_anything_moves() {
        let tar = Builder::new()
            .file("a", b"1")
            .file("b", b"2")
            .file("stargz.index.json", b"{}")
            .finish();
        let mut spool = tempfile::tempfile().unwrap();
        io::Write::write_all(&mut spool, &tar).unwrap();
        let (index, _) = index(&tar[..]).unwrap();
        let plan = plan(&index, &["b".to_owned()], LayerFormat::Estargz, true);
        let mut out = Vec::new();
        plan.reader(spool).read_to_end(&mut out).unwrap();
        assert_eq!(names_of(&out), ["b", ".prefetch.landmark", "a"]);
    }

    #[test]
    fn repeated_names_and_late_global_headers_are_not_moved() {
        let tar = Builder::new()
            .file("a", b"1")
            .file("b", b"2")
            .file("a", b"3")
            .finish();
        let (_, plan) = reorder(&tar, &["a", "b"], LayerFormat::ZstdChunked);
        assert_eq!(plan.startup, ["b"]);
        let tar = Builder::new()
            .global("comment", "x")
            .file("a", b"1")
            .file("b", b"2")
            .finish();
        let (out, plan) = reorder(&tar, &["b"], LayerFormat::ZstdChunked);
        assert_eq!(plan.startup, ["b"]);
        assert_eq!(
            &out[..512],
            &tar[..512],
            "a leading global header stays first"
        );
        let tar = Builder::new()
            .file("a", b"1")
            .global("comment", "x")
            .file("b", b"2")
            .finish();
        let (out, plan) = reorder(&tar, &["b"], LayerFormat::ZstdChunked);
        assert!(plan.startup.is_empty());
        assert!(plan.refused.is_some());
        assert_eq!(out, tar);
    }
}
