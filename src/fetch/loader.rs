//! The dynamic loader's reads, fetched before it asks for them.
//!
//! Without a start-up profile, a program starts as a chain of misses, one round trip each: the
//! kernel reads the program's head, then the loader reads its dynamic section and each library it
//! links, one after another, and each library's own (python3: the interpreter, its second chunk,
//! libm, libz, libexpat, libc). When a read reaches the first chunk of a file that may be an ELF
//! object, this module parses its headers ([`crate::elf`]), finds the loader and the libraries it
//! names in the image's merged tree (every layer of the image, top first; symlinks followed as
//! data, inside the tree), and fetches at once what the loader reads of each: the chunks holding
//! its headers, dynamic section and strings; then does the same for those libraries. The chain's
//! round trips overlap instead of adding up.
//!
//! A hint, and bounded: at most [`MAX_OBJECTS`] objects per image, [`MAX_ROUNDS`] fetches of at
//! most [`MAX_CHUNKS_PER_ROUND`] chunks and [`MAX_HELD`] bytes per object, a few objects at a
//! time, each chunk verified as every chunk is. An
//! image's headers can only make its own layers' chunks be fetched. Whiteouts of a file are
//! honoured, opaque directories are not: a library an upper layer hides that way costs its
//! fetched bytes, nothing else. The fetches count as `prefetch` bytes; they are not reads, so a
//! recorded profile does not list them.
//!
//! Owns: finding an image's libraries from the ELF objects its reads reach. Does not own: ELF
//! parsing and path resolution ([`crate::elf`]), range requests (the fetcher).

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use bytes::Bytes;

use super::plan::plan_ranges;
use super::{lock, Inner, Kind, LayerFetcher, SharedRange};
use crate::elf::{self, Node};
use crate::format::{Chunk, EntryKind, Toc, TocEntry};
use crate::fs::ChunkError;
use crate::metrics::METRICS;
use crate::oci::Digest;

/// The most objects (programs, loaders, libraries) examined for one image.
pub const MAX_OBJECTS: usize = 256;
/// The most fetches one object's headers may take (header, program headers, dynamic section,
/// strings: four in the worst case).
pub const MAX_ROUNDS: usize = 6;
/// The most chunks one round may fetch (a header range spans one or two).
pub const MAX_CHUNKS_PER_ROUND: usize = 4;
/// The most uncompressed bytes of chunks one object's parse holds (four of the default 4 MiB):
/// an image of huge chunks costs its fetches, not the node's memory.
pub const MAX_HELD: u64 = 16 << 20;
/// Objects of one image examined at once.
const SLOTS: usize = 8;
/// What the dynamic loader reads before any library: fetched with the loader.
const LD_SO_CACHE: &str = "/etc/ld.so.cache";
/// The smallest file that can hold an ELF header.
const MIN_ELF: u64 = 52;
/// Where the loader finds libraries on the distributions images are built from: the multiarch
/// directories (Debian, Ubuntu: named by `ld.so.conf.d`, which this does not read) and
/// `/usr/local/lib`; [`elf::DEFAULT_DIRS`] follow.
const LIBRARY_DIRS: [&str; 5] = [
    "/usr/local/lib",
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib/aarch64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
];

/// One image's loader prefetch, shared by the fetchers of its layers (cheap to clone); each
/// fetcher gets it through [`super::FetchConfig::loader`], placed with [`Self::at`].
#[derive(Clone, Default)]
pub struct LoaderPrefetch {
    image: Arc<Image>,
    /// Where the layer of the fetcher made with this lies in the image (0: bottom).
    position: usize,
}

impl std::fmt::Debug for LoaderPrefetch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoaderPrefetch")
            .field("position", &self.position)
            .finish()
    }
}

struct Image {
    /// The image's layers that have a fetcher, with their positions; a layer's view lives as
    /// long as its fetcher, so an unmounted layer's TOC is not kept for the others.
    layers: Mutex<Vec<(usize, Weak<LayerView>)>>,
    /// Objects examined (or being examined), by layer blob and entry.
    examined: Mutex<HashSet<(Digest, usize)>>,
    /// At most [`SLOTS`] objects parsed at once (each holds up to [`MAX_HELD`] bytes).
    slots: tokio::sync::Semaphore,
}

impl Default for Image {
    fn default() -> Self {
        Self {
            layers: Mutex::default(),
            examined: Mutex::default(),
            slots: tokio::sync::Semaphore::new(SLOTS),
        }
    }
}

/// One layer as the loader prefetch sees it.
struct LayerView {
    blob: Digest,
    toc: Arc<Toc>,
    fetcher: Weak<Inner>,
    /// The first chunk of each file that may be an ELF object, to the file's entry.
    heads: HashMap<Digest, usize>,
    /// Entry indices sorted by name, made at the first lookup (not on the mount's path).
    by_name: OnceLock<Vec<u32>>,
}

/// A fetcher's part: its image, and its layer there.
pub(super) struct LoaderLayer {
    image: Arc<Image>,
    view: Arc<LayerView>,
}

impl LoaderPrefetch {
    /// A new image's.
    pub fn new() -> Self {
        Self::default()
    }

    /// The same image's, for the layer at `position` (0: bottom).
    pub fn at(&self, position: usize) -> Self {
        Self {
            image: self.image.clone(),
            position,
        }
    }

    /// Registers a fetcher's layer.
    pub(super) fn layer(&self, blob: Digest, toc: &Arc<Toc>, fetcher: Weak<Inner>) -> LoaderLayer {
        let heads = toc
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| may_be_elf(e))
            .filter_map(|(i, e)| Some((e.chunks.first()?.digest, i)))
            .collect();
        let view = Arc::new(LayerView {
            blob,
            toc: toc.clone(),
            fetcher,
            heads,
            by_name: OnceLock::new(),
        });
        let mut layers = lock(&self.image.layers);
        layers.retain(|(_, v)| v.strong_count() > 0);
        layers.push((self.position, Arc::downgrade(&view)));
        drop(layers);
        LoaderLayer {
            image: self.image.clone(),
            view,
        }
    }
}

/// A regular file whose first chunk is real content, big enough for an ELF header, executable or
/// named like a shared object.
pub(super) fn may_be_elf(e: &TocEntry) -> bool {
    matches!(e.kind, EntryKind::Reg | EntryKind::Hardlink)
        && e.size >= MIN_ELF
        && e.chunks
            .first()
            .is_some_and(|c| c.file_offset == 0 && !c.zeros)
        && (e.mode & 0o111 != 0 || e.name.contains(".so"))
}

impl LoaderLayer {
    /// A read asked for `chunk`: if it starts a file that may be an ELF object, examine it.
    pub(super) fn note(&self, chunk: &Chunk) {
        if let Some(&entry) = self.view.heads.get(&chunk.digest) {
            examine(&self.image, &self.view, entry);
        }
    }
}

/// Starts examining `entry` of `view` unless it was (or the image's bound is reached).
fn examine(image: &Arc<Image>, view: &Arc<LayerView>, entry: usize) {
    {
        let mut examined = lock(&image.examined);
        if examined.len() >= MAX_OBJECTS || !examined.insert((view.blob, entry)) {
            return;
        }
    }
    let (image, view) = (image.clone(), view.clone());
    tokio::spawn(async move {
        let Ok(_slot) = image.slots.acquire().await else {
            return;
        };
        let Some(mut object) = Object::new(&view, entry) else {
            return;
        };
        // The loader and its cache first: they need only the program's head, which the read
        // that got here brings, not the dynamic section that may lie in a later chunk.
        let interp = object.parse(elf::interpreter, 1).await;
        if let Some(interp) = &interp {
            fetch_first(
                &image,
                &[vec![interp.clone()], vec![LD_SO_CACHE.to_owned()]],
            );
        }
        let Some(info) = object.parse(elf::parse, MAX_ROUNDS).await else {
            return;
        };
        METRICS.loader_objects.with_label_values(&["parsed"]).inc();
        let name = &view.toc.entries[entry].name;
        let origin = format!("/{}", name.rsplit_once('/').map_or("", |(d, _)| d));
        let dirs: Vec<String> = LIBRARY_DIRS.iter().map(|d| (*d).to_owned()).collect();
        let mut wanted: Vec<Vec<String>> = info
            .interp
            .iter()
            .filter(|i| interp.as_ref() != Some(*i))
            .map(|i| vec![i.clone()])
            .collect();
        wanted.extend(
            info.needed
                .iter()
                .map(|lib| elf::library_paths(&info, lib, &origin, &dirs)),
        );
        fetch_first(&image, &wanted);
    });
}

/// For each list of candidate paths, examines (so fetches the head of) the first that resolves
/// in the image.
fn fetch_first(image: &Arc<Image>, wanted: &[Vec<String>]) {
    let tree = Tree::of(image);
    for paths in wanted {
        match paths.iter().find_map(|p| tree.resolve(p)) {
            Some(((layer, object), _)) => {
                METRICS.loader_objects.with_label_values(&["found"]).inc();
                examine(image, &tree.layers[layer], object);
            }
            None => METRICS.loader_objects.with_label_values(&["missing"]).inc(),
        }
    }
}

/// One object being examined: its entry, and the chunks its parses have fetched so far (shared
/// by the parse of the interpreter and the full one, so the head is fetched once).
struct Object<'a> {
    e: &'a TocEntry,
    fetcher: LayerFetcher,
    have: HashMap<u64, Bytes>,
    /// Fetches made, and the uncompressed bytes they hold.
    fetches: usize,
    held: u64,
}

impl<'a> Object<'a> {
    fn new(view: &'a LayerView, entry: usize) -> Option<Self> {
        Some(Self {
            e: view.toc.entries.get(entry)?,
            fetcher: LayerFetcher {
                inner: view.fetcher.upgrade()?,
            },
            have: HashMap::new(),
            fetches: 0,
            held: 0,
        })
    }

    /// `parse` over the chunks fetched so far, or the chunks it missed (none: not a well-formed
    /// ELF object).
    fn try_parse<T>(&self, parse: fn(&elf::ReadAt<'_>, u64) -> Option<T>) -> Result<T, Vec<Chunk>> {
        let missing = RefCell::new(Vec::new());
        let read = |offset: u64, len: usize| read_at(self.e, &self.have, &missing, offset, len);
        parse(&read, self.e.size).ok_or_else(|| missing.take())
    }

    /// Runs `parse` over the chunks fetched so far, fetching the ones it misses, until it
    /// succeeds, the object has had `fetches` fetches in all, or a bound is passed.
    async fn parse<T>(
        &mut self,
        parse: fn(&elf::ReadAt<'_>, u64) -> Option<T>,
        fetches: usize,
    ) -> Option<T> {
        loop {
            let mut missing = match self.try_parse(parse) {
                Ok(found) => return Some(found),
                Err(missing) => missing,
            };
            missing.sort_by_key(|c| c.file_offset);
            missing.dedup_by_key(|c| c.file_offset);
            self.held = missing
                .iter()
                .fold(self.held, |sum, c| sum.saturating_add(c.size));
            if missing.is_empty()
                || missing.len() > MAX_CHUNKS_PER_ROUND
                || self.held > MAX_HELD
                || self.fetches >= fetches
            {
                return None;
            }
            self.fetches += 1;
            let data = self.fetcher.fetch_unread(&missing).await.ok()?;
            self.have
                .extend(missing.iter().map(|c| c.file_offset).zip(data));
        }
    }
}

/// `len` bytes at `offset` of `e` from the chunks in `have`; the chunks it lacks are added to
/// `missing` (zero runs never are: headers are not in one).
fn read_at(
    e: &TocEntry,
    have: &HashMap<u64, Bytes>,
    missing: &RefCell<Vec<Chunk>>,
    offset: u64,
    len: usize,
) -> Option<Vec<u8>> {
    let end = offset
        .checked_add(len as u64)
        .filter(|&end| end <= e.size)?;
    let mut out = Vec::with_capacity(len);
    let mut complete = true;
    for c in &e.chunks {
        let c_end = c.file_offset.saturating_add(c.size);
        if c_end <= offset || c.file_offset >= end {
            continue;
        }
        match have.get(&c.file_offset) {
            Some(data) if complete && !c.zeros => {
                let from = offset.max(c.file_offset) - c.file_offset;
                let to = end.min(c_end) - c.file_offset;
                out.extend_from_slice(data.get(from as usize..to as usize)?);
            }
            _ if c.zeros => return None,
            Some(_) => {}
            None => {
                complete = false;
                missing.borrow_mut().push(c.clone());
            }
        }
    }
    (complete && out.len() == len).then_some(out)
}

/// The image's layers stacked, top first, as path resolution sees them.
struct Tree {
    layers: Vec<Arc<LayerView>>,
}

impl Tree {
    fn of(image: &Image) -> Self {
        let mut layers: Vec<(usize, Arc<LayerView>)> = lock(&image.layers)
            .iter()
            .filter_map(|(at, v)| Some((*at, v.upgrade()?)))
            .collect();
        layers.sort_by_key(|l| std::cmp::Reverse(l.0));
        Self {
            layers: layers.into_iter().map(|(_, v)| v).collect(),
        }
    }

    /// Resolves `path`: which layer (index in `self.layers`) and entry the file is.
    fn resolve(&self, path: &str) -> Option<((usize, usize), String)> {
        elf::resolve(path, |name| self.entry(name))
    }

    /// The topmost entry named `name`, unless a layer above it whites it out.
    fn entry(&self, name: &str) -> Option<((usize, usize), Node)> {
        let whiteout = match name.rsplit_once('/') {
            Some((dir, base)) => format!("{dir}/.wh.{base}"),
            None => format!(".wh.{name}"),
        };
        for (i, view) in self.layers.iter().enumerate() {
            if let Some(at) = view.find(name) {
                let e = &view.toc.entries[at];
                let node = match e.kind {
                    EntryKind::Reg | EntryKind::Hardlink => Node::File,
                    EntryKind::Symlink => Node::Symlink(e.link_name.clone()),
                    _ => Node::Other,
                };
                return Some(((i, at), node));
            }
            if view.find(&whiteout).is_some() {
                return None;
            }
        }
        None
    }
}

impl LayerView {
    fn find(&self, name: &str) -> Option<usize> {
        let entries = &self.toc.entries;
        let by_name = self.by_name.get_or_init(|| {
            let mut order: Vec<u32> = (0..entries.len() as u32).collect();
            order.sort_by(|&a, &b| entries[a as usize].name.cmp(&entries[b as usize].name));
            order
        });
        by_name
            .binary_search_by(|&i| entries[i as usize].name.as_str().cmp(name))
            .ok()
            .map(|at| by_name[at] as usize)
    }
}

impl LayerFetcher {
    /// The verified bytes of `chunks`, from the cache, requests in flight, or new range requests
    /// (counted as prefetch), without noting them as reads: no read asked for them.
    async fn fetch_unread(&self, chunks: &[Chunk]) -> Result<Vec<Bytes>, ChunkError> {
        let inner = &self.inner;
        let mut out: Vec<Option<Bytes>> = chunks
            .iter()
            .map(|c| inner.cache.get(&c.digest).ok().flatten())
            .collect();
        let mut waits: Vec<(usize, SharedRange)> = Vec::new();
        {
            let mut inflight = lock(&inner.inflight);
            let mut plan: Vec<Chunk> = Vec::new();
            for (i, c) in chunks.iter().enumerate().filter(|(i, _)| out[*i].is_none()) {
                match inflight.get(&c.digest) {
                    Some(f) => waits.push((i, f.range.clone())),
                    None if !plan.iter().any(|p| p.digest == c.digest) => plan.push(c.clone()),
                    None => {}
                }
            }
            plan.sort_by_key(|c| (c.compressed_start, c.inner_offset));
            for span in plan_ranges(&plan, inner.config.max_request, inner.config.max_gap) {
                let digests: Vec<Digest> = span.chunks.iter().map(|c| c.digest).collect();
                let range = self.start_range_locked(&mut inflight, span, Kind::Prefetch);
                for (i, c) in chunks.iter().enumerate() {
                    if out[i].is_none() && digests.contains(&c.digest) {
                        waits.push((i, range.clone()));
                    }
                }
            }
        }
        for (i, range) in waits {
            out[i] = range.await?.get(&chunks[i].digest).cloned();
        }
        out.into_iter()
            .zip(chunks)
            .map(|(data, c)| {
                data.ok_or_else(|| ChunkError(format!("chunk {} failed verification", c.digest)))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::LayerFormat;

    fn chunk(file_offset: u64, data: &[u8]) -> Chunk {
        Chunk {
            file_offset,
            size: data.len() as u64,
            compressed_start: file_offset,
            compressed_end: file_offset + 1,
            inner_offset: 0,
            digest: Digest::of(data),
            zeros: false,
        }
    }

    fn entry(name: &str, kind: EntryKind, link: &str) -> TocEntry {
        TocEntry {
            link_name: link.to_owned(),
            ..TocEntry::new(name, kind)
        }
    }

    fn view(blob: &[u8], entries: Vec<TocEntry>) -> Arc<LayerView> {
        Arc::new(LayerView {
            blob: Digest::of(blob),
            toc: Arc::new(Toc {
                format: LayerFormat::ZstdChunked,
                entries,
                prefetch: Vec::new(),
            }),
            fetcher: Weak::new(),
            heads: HashMap::new(),
            by_name: OnceLock::new(),
        })
    }

    #[test]
    fn reads_span_chunks_and_name_the_ones_missing() {
        let (a, b) = (vec![1u8; 10], vec![2u8; 10]);
        let e = TocEntry {
            size: 20,
            chunks: vec![chunk(0, &a), chunk(10, &b)],
            ..TocEntry::new("f", EntryKind::Reg)
        };
        let mut have = HashMap::from([(0, Bytes::from(a.clone()))]);
        let missing = RefCell::new(Vec::new());
        assert_eq!(read_at(&e, &have, &missing, 2, 4), Some(vec![1; 4]));
        assert_eq!(read_at(&e, &have, &missing, 8, 4), None);
        assert_eq!(missing.borrow().len(), 1);
        assert_eq!(missing.borrow()[0].file_offset, 10);
        have.insert(10, Bytes::from(b));
        assert_eq!(read_at(&e, &have, &missing, 8, 4), Some(vec![1, 1, 2, 2]));
        // Past the end, or wrapping: nothing, and nothing asked for.
        missing.borrow_mut().clear();
        assert_eq!(read_at(&e, &have, &missing, 18, 4), None);
        assert_eq!(read_at(&e, &have, &missing, u64::MAX, 4), None);
        assert!(missing.borrow().is_empty());
        // A chunk shorter than the TOC says is not read past its end.
        have.insert(10, Bytes::from(vec![2u8; 3]));
        assert_eq!(read_at(&e, &have, &missing, 8, 12), None);
    }

    #[test]
    fn paths_resolve_across_layers_through_symlinks_and_whiteouts_hide() {
        let bottom = view(
            b"bottom",
            vec![
                entry("lib", EntryKind::Symlink, "usr/lib"),
                entry("usr/lib", EntryKind::Dir, ""),
                entry("usr/lib/libc.so.6", EntryKind::Reg, ""),
                entry("usr/lib/libgone.so", EntryKind::Reg, ""),
                entry("loop", EntryKind::Symlink, "/loop"),
            ],
        );
        let top = view(
            b"top",
            vec![
                entry("lib64", EntryKind::Symlink, "/lib"),
                entry("usr/lib/.wh.libgone.so", EntryKind::Reg, ""),
                entry("usr/lib/libc.so.6", EntryKind::Reg, ""),
            ],
        );
        let image = Image::default();
        lock(&image.layers).push((0, Arc::downgrade(&bottom)));
        lock(&image.layers).push((1, Arc::downgrade(&top)));
        let tree = Tree::of(&image);
        // The top layer's copy wins; found through two symlinks of two layers.
        let ((layer, at), name) = tree.resolve("/lib64/libc.so.6").unwrap();
        assert_eq!((layer, name.as_str()), (0, "usr/lib/libc.so.6"));
        assert_eq!(tree.layers[layer].toc.entries[at].name, "usr/lib/libc.so.6");
        assert!(tree.resolve("/lib/libgone.so").is_none(), "whited out");
        assert!(tree.resolve("/loop/x").is_none(), "a symlink loop ends");
        assert!(tree.resolve("/lib").is_none(), "a directory is not a file");
        // A layer whose fetcher is gone drops out of the tree.
        drop((tree, top));
        let tree = Tree::of(&image);
        assert_eq!(tree.layers.len(), 1);
        assert!(tree.resolve("/lib/libgone.so").is_some());
    }
}
