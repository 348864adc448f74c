//! The inode table of one layer, built once from its TOC.
//!
//! Inode `n` is `nodes[n - 1]`; the root is inode 1 (FUSE's root id). Directories hold their
//! children sorted by name, so a lookup is a binary search and a listing is a slice. OCI whiteouts
//! are translated here into what overlayfs understands: `dir/.wh.NAME` becomes a char device 0:0
//! named `NAME`, and `dir/.wh..wh..opq` marks `dir` opaque.
//!
//! The TOC is untrusted: building walks every name one component at a time from the root (no
//! recursion, no map of full paths), so its cost is linear in the bytes of the names, whatever
//! their depth; and a layer whose names no unpacker could create (longer than `PATH_MAX`, a
//! component longer than `NAME_MAX`) is refused, as containerd's applier would fail on it.

use std::collections::HashMap;

use crate::format::{EntryKind, Toc};

/// Longest entry or hard link name accepted, in bytes: the kernel's `PATH_MAX`. An unpacker
/// cannot create a longer path, so no real layer has one.
pub const MAX_NAME_BYTES: usize = 4096;
/// Longest name component, in bytes: the kernel's `NAME_MAX`.
pub const MAX_COMPONENT_BYTES: usize = 255;

/// Why a TOC cannot become an inode table. Names the entry.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TableError {
    #[error("entry {name:?}: {reason}")]
    Entry { name: String, reason: String },
    #[error("{0} entries are more than an inode table can number")]
    TooMany(usize),
}

/// What a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    Dir,
    Reg,
    Symlink,
    Char,
    Block,
    Fifo,
    /// An overlayfs whiteout: a char device 0:0.
    Whiteout,
}

/// One inode.
#[derive(Debug, Clone)]
pub struct Node {
    pub kind: NodeKind,
    /// The TOC entry its attributes and content come from; `None` for a directory the TOC
    /// implies but does not list.
    pub entry: Option<u32>,
    pub parent: u64,
    pub nlink: u32,
    /// Carries `trusted.overlay.opaque = y`.
    pub opaque: bool,
    /// Sorted by name.
    pub children: Vec<(Box<str>, u64)>,
}

/// All inodes of a layer.
#[derive(Debug, Default)]
pub struct InodeTable {
    nodes: Vec<Node>,
}

pub const ROOT: u64 = 1;
const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";

impl InodeTable {
    /// The table of `toc`, or why the layer cannot be served.
    pub fn build(toc: &Toc) -> Result<Self, TableError> {
        if toc.entries.len() > u32::MAX as usize {
            return Err(TableError::TooMany(toc.entries.len()));
        }
        let mut table = Builder {
            nodes: vec![dir_node(None, ROOT)],
            children: vec![HashMap::new()],
        };
        for (index, entry) in toc.entries.iter().enumerate() {
            let index = index as u32;
            let refuse = |reason: String| TableError::Entry {
                name: entry.name.chars().take(200).collect(),
                reason,
            };
            check_name(&entry.name).map_err(refuse)?;
            if entry.name.is_empty() {
                table.nodes[0].entry = Some(index);
                continue;
            }
            let (parent_path, base) = match entry.name.rsplit_once('/') {
                Some((p, b)) => (p, b),
                None => ("", entry.name.as_str()),
            };
            let parent = table.make_dirs(parent_path);
            if base == OPAQUE_MARKER {
                table.node_mut(parent).opaque = true;
                continue;
            }
            if let Some(hidden) = base.strip_prefix(WHITEOUT_PREFIX) {
                let ino = table.push(Node {
                    kind: NodeKind::Whiteout,
                    entry: Some(index),
                    parent,
                    nlink: 1,
                    opaque: false,
                    children: Vec::new(),
                });
                table.children[(parent - 1) as usize].insert(hidden.into(), ino);
                continue;
            }
            if entry.kind == EntryKind::Hardlink {
                check_name(&entry.link_name)
                    .map_err(|r| refuse(format!("hard link target: {r}")))?;
                // A link to something that is neither a directory nor a whiteout shares its inode;
                // a link to nothing yet becomes a file of its own, as before.
                if let Some(target) = table.resolve(&entry.link_name) {
                    if !matches!(table.node(target).kind, NodeKind::Dir | NodeKind::Whiteout) {
                        table.node_mut(target).nlink += 1;
                        table.children[(parent - 1) as usize].insert(base.into(), target);
                        continue;
                    }
                }
            }
            if entry.kind == EntryKind::Dir {
                if let Some(&existing) = table.children[(parent - 1) as usize].get(base) {
                    if table.node(existing).kind == NodeKind::Dir {
                        table.node_mut(existing).entry = Some(index);
                        continue;
                    }
                }
            }
            let kind = match entry.kind {
                EntryKind::Dir => NodeKind::Dir,
                EntryKind::Reg | EntryKind::Hardlink => NodeKind::Reg,
                EntryKind::Symlink => NodeKind::Symlink,
                EntryKind::Char => NodeKind::Char,
                EntryKind::Block => NodeKind::Block,
                EntryKind::Fifo => NodeKind::Fifo,
            };
            let node = if kind == NodeKind::Dir {
                dir_node(Some(index), parent)
            } else {
                Node {
                    kind,
                    entry: Some(index),
                    parent,
                    nlink: 1,
                    opaque: false,
                    children: Vec::new(),
                }
            };
            let ino = table.push(node);
            // A later entry of the same name replaces the earlier one, as when unpacking.
            table.children[(parent - 1) as usize].insert(base.into(), ino);
        }
        let Builder {
            mut nodes,
            children,
        } = table;
        for (i, map) in children.into_iter().enumerate() {
            let mut list: Vec<(Box<str>, u64)> = map.into_iter().collect();
            list.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            let subdirs = list
                .iter()
                .filter(|(_, ino)| nodes[(*ino - 1) as usize].kind == NodeKind::Dir)
                .count() as u32;
            let node = &mut nodes[i];
            if node.kind == NodeKind::Dir {
                node.nlink = 2u32.saturating_add(subdirs);
            }
            node.children = list;
        }
        Ok(Self { nodes })
    }

    pub fn get(&self, ino: u64) -> Option<&Node> {
        ino.checked_sub(1).and_then(|i| self.nodes.get(i as usize))
    }

    pub fn lookup(&self, parent: u64, name: &str) -> Option<u64> {
        let node = self.get(parent)?;
        node.children
            .binary_search_by(|(n, _)| (**n).cmp(name))
            .ok()
            .map(|i| node.children[i].1)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

/// Rejects a name no unpacker could create. Names reach here normalised by the TOC decoder (no
/// empty, `.` or `..` components).
fn check_name(name: &str) -> Result<(), String> {
    if name.len() > MAX_NAME_BYTES {
        return Err(format!(
            "name of {} bytes is longer than PATH_MAX ({MAX_NAME_BYTES})",
            name.len()
        ));
    }
    if let Some(long) = name.split('/').find(|c| c.len() > MAX_COMPONENT_BYTES) {
        return Err(format!(
            "a name component of {} bytes is longer than NAME_MAX ({MAX_COMPONENT_BYTES})",
            long.len()
        ));
    }
    Ok(())
}

/// The table while it is built: children are maps until the end.
struct Builder {
    nodes: Vec<Node>,
    children: Vec<HashMap<Box<str>, u64>>,
}

impl Builder {
    fn node(&self, ino: u64) -> &Node {
        &self.nodes[(ino - 1) as usize]
    }

    fn node_mut(&mut self, ino: u64) -> &mut Node {
        &mut self.nodes[(ino - 1) as usize]
    }

    fn push(&mut self, node: Node) -> u64 {
        self.nodes.push(node);
        self.children.push(HashMap::new());
        self.nodes.len() as u64
    }

    /// The directory `path`, walked from the root one component at a time; a component that is
    /// missing, or is not a directory, becomes a new directory the TOC implies (replacing what
    /// was there, as an unpacker's `mkdir -p` over a file would).
    fn make_dirs(&mut self, path: &str) -> u64 {
        let mut at = ROOT;
        for component in path.split('/').filter(|c| !c.is_empty()) {
            at = match self.children[(at - 1) as usize].get(component) {
                Some(&ino) if self.node(ino).kind == NodeKind::Dir => ino,
                _ => {
                    let ino = self.push(dir_node(None, at));
                    self.children[(at - 1) as usize].insert(component.into(), ino);
                    ino
                }
            };
        }
        at
    }

    /// The node named `path` now, if any (nothing is created).
    fn resolve(&self, path: &str) -> Option<u64> {
        let mut at = ROOT;
        for component in path.split('/').filter(|c| !c.is_empty()) {
            if self.node(at).kind != NodeKind::Dir {
                return None;
            }
            at = *self.children[(at - 1) as usize].get(component)?;
        }
        Some(at)
    }
}

fn dir_node(entry: Option<u32>, parent: u64) -> Node {
    Node {
        kind: NodeKind::Dir,
        entry,
        parent,
        nlink: 2,
        opaque: false,
        children: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{LayerFormat, TocEntry};

    fn entry(name: &str, kind: EntryKind, link: &str) -> TocEntry {
        TocEntry {
            link_name: link.into(),
            ..TocEntry::new(name, kind)
        }
    }

    #[test]
    fn builds_parents_links_whiteouts_and_opaque_dirs() {
        let toc = Toc {
            format: LayerFormat::ZstdChunked,
            entries: vec![
                entry("a/b/file", EntryKind::Reg, ""),
                entry("a/b/link", EntryKind::Hardlink, "a/b/file"),
                entry("a/.wh.gone", EntryKind::Reg, ""),
                entry("c/.wh..wh..opq", EntryKind::Reg, ""),
                entry("c", EntryKind::Dir, ""),
            ],
            prefetch: vec![],
        };
        let t = InodeTable::build(&toc).unwrap();
        let a = t.lookup(ROOT, "a").unwrap();
        let b = t.lookup(a, "b").unwrap();
        let file = t.lookup(b, "file").unwrap();
        assert_eq!(t.lookup(b, "link"), Some(file), "hard links share an inode");
        assert_eq!(t.get(file).unwrap().nlink, 2);
        assert_eq!(
            t.get(t.lookup(a, "gone").unwrap()).unwrap().kind,
            NodeKind::Whiteout
        );
        assert_eq!(t.lookup(a, ".wh.gone"), None);
        let c = t.lookup(ROOT, "c").unwrap();
        assert!(t.get(c).unwrap().opaque);
        assert_eq!(
            t.get(c).unwrap().entry,
            Some(4),
            "the listed dir's attributes win"
        );
        assert_eq!(t.get(c).unwrap().children.len(), 0, "the marker is hidden");
        assert_eq!(t.get(ROOT).unwrap().nlink, 4);
    }

    fn toc(entries: Vec<TocEntry>) -> Toc {
        Toc {
            format: LayerFormat::ZstdChunked,
            entries,
            prefetch: vec![],
        }
    }

    #[test]
    fn the_deepest_name_an_unpacker_can_create_builds_without_recursion() {
        // 2047 directories, 4095 bytes: just under PATH_MAX.
        let deep = format!("{}f", "a/".repeat(2047));
        let t = InodeTable::build(&toc(vec![
            entry(&deep, EntryKind::Reg, ""),
            entry(&format!("{}g", "a/".repeat(2047)), EntryKind::Reg, ""),
        ]))
        .unwrap();
        assert_eq!(t.len(), 1 + 2047 + 2, "implied directories are made once");
        let mut at = ROOT;
        for _ in 0..2047 {
            at = t.lookup(at, "a").unwrap();
        }
        assert!(t.lookup(at, "f").is_some() && t.lookup(at, "g").is_some());
    }

    #[test]
    fn names_no_unpacker_could_create_refuse_the_layer() {
        // 200,000 directories deep: this overflowed the stack of the serving process.
        let deep = format!("{}f", "a/".repeat(200_000));
        let err = InodeTable::build(&toc(vec![entry(&deep, EntryKind::Reg, "")])).unwrap_err();
        assert!(err.to_string().contains("PATH_MAX"), "{err}");
        let long = "x".repeat(256);
        let err = InodeTable::build(&toc(vec![entry(&long, EntryKind::Reg, "")])).unwrap_err();
        assert!(err.to_string().contains("NAME_MAX"), "{err}");
        let err = InodeTable::build(&toc(vec![
            entry("f", EntryKind::Reg, ""),
            entry("l", EntryKind::Hardlink, &deep),
        ]))
        .unwrap_err();
        assert!(err.to_string().contains("hard link target"), "{err}");
    }

    #[test]
    fn a_hard_link_never_shares_a_whiteout_or_a_directory() {
        let t = InodeTable::build(&toc(vec![
            entry(".wh.gone", EntryKind::Reg, ""),
            entry("d", EntryKind::Dir, ""),
            entry("l1", EntryKind::Hardlink, "gone"),
            entry("l2", EntryKind::Hardlink, "d"),
        ]))
        .unwrap();
        for name in ["l1", "l2"] {
            let ino = t.lookup(ROOT, name).unwrap();
            assert_eq!(t.get(ino).unwrap().kind, NodeKind::Reg, "{name}");
        }
        assert_eq!(
            t.get(t.lookup(ROOT, "gone").unwrap()).unwrap().kind,
            NodeKind::Whiteout
        );
    }

    #[test]
    fn a_file_in_the_way_of_an_implied_directory_is_replaced() {
        let t = InodeTable::build(&toc(vec![
            entry("a", EntryKind::Reg, ""),
            entry("a/b", EntryKind::Reg, ""),
        ]))
        .unwrap();
        let a = t.lookup(ROOT, "a").unwrap();
        assert_eq!(t.get(a).unwrap().kind, NodeKind::Dir);
        assert!(t.lookup(a, "b").is_some());
    }
}
