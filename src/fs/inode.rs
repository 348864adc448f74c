//! The inode table of one layer, built once from its TOC.
//!
//! Inode `n` is `nodes[n - 1]`; the root is inode 1 (FUSE's root id). Directories hold their
//! children sorted by name, so a lookup is a binary search and a listing is a slice. OCI whiteouts
//! are translated here into what overlayfs understands: `dir/.wh.NAME` becomes a char device 0:0
//! named `NAME`, and `dir/.wh..wh..opq` marks `dir` opaque.

use std::collections::HashMap;

use crate::format::{EntryKind, Toc};

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
    pub fn build(toc: &Toc) -> Self {
        let mut table = Self {
            nodes: vec![dir_node(None, ROOT)],
        };
        // Path → inode while building; children are kept as maps until the end.
        let mut paths: HashMap<String, u64> = HashMap::from([(String::new(), ROOT)]);
        let mut children: Vec<HashMap<Box<str>, u64>> = vec![HashMap::new()];
        for (index, entry) in toc.entries.iter().enumerate() {
            let index = index as u32;
            if entry.name.is_empty() {
                table.nodes[0].entry = Some(index);
                continue;
            }
            let (parent_path, base) = match entry.name.rsplit_once('/') {
                Some((p, b)) => (p, b),
                None => ("", entry.name.as_str()),
            };
            let parent = table.ensure_dir(parent_path, &mut paths, &mut children);
            if base == OPAQUE_MARKER {
                table.nodes[(parent - 1) as usize].opaque = true;
                continue;
            }
            if let Some(hidden) = base.strip_prefix(WHITEOUT_PREFIX) {
                let ino = table.push(
                    Node {
                        kind: NodeKind::Whiteout,
                        entry: Some(index),
                        parent,
                        nlink: 1,
                        opaque: false,
                        children: Vec::new(),
                    },
                    &mut children,
                );
                children[(parent - 1) as usize].insert(hidden.into(), ino);
                continue;
            }
            if entry.kind == EntryKind::Hardlink {
                if let Some(&target) = paths.get(entry.link_name.as_str()) {
                    if table.nodes[(target - 1) as usize].kind != NodeKind::Dir {
                        table.nodes[(target - 1) as usize].nlink += 1;
                        children[(parent - 1) as usize].insert(base.into(), target);
                        paths.insert(entry.name.clone(), target);
                        continue;
                    }
                }
            }
            if entry.kind == EntryKind::Dir {
                if let Some(&existing) = paths.get(entry.name.as_str()) {
                    if table.nodes[(existing - 1) as usize].kind == NodeKind::Dir {
                        table.nodes[(existing - 1) as usize].entry = Some(index);
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
            let ino = table.push(node, &mut children);
            // A later entry of the same name replaces the earlier one, as when unpacking.
            children[(parent - 1) as usize].insert(base.into(), ino);
            paths.insert(entry.name.clone(), ino);
        }
        for (i, map) in children.into_iter().enumerate() {
            let mut list: Vec<(Box<str>, u64)> = map.into_iter().collect();
            list.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            let subdirs = list
                .iter()
                .filter(|(_, ino)| table.nodes[(*ino - 1) as usize].kind == NodeKind::Dir)
                .count() as u32;
            let node = &mut table.nodes[i];
            if node.kind == NodeKind::Dir {
                node.nlink = 2 + subdirs;
            }
            node.children = list;
        }
        table
    }

    fn push(&mut self, node: Node, children: &mut Vec<HashMap<Box<str>, u64>>) -> u64 {
        self.nodes.push(node);
        children.push(HashMap::new());
        self.nodes.len() as u64
    }

    /// The inode of directory `path`, creating it (and its parents) if the TOC has not listed it.
    fn ensure_dir(
        &mut self,
        path: &str,
        paths: &mut HashMap<String, u64>,
        children: &mut Vec<HashMap<Box<str>, u64>>,
    ) -> u64 {
        if let Some(&ino) = paths.get(path) {
            if self.nodes[(ino - 1) as usize].kind == NodeKind::Dir {
                return ino;
            }
        }
        let (parent_path, base) = match path.rsplit_once('/') {
            Some((p, b)) => (p, b),
            None => ("", path),
        };
        let parent = self.ensure_dir(parent_path, paths, children);
        let ino = self.push(dir_node(None, parent), children);
        children[(parent - 1) as usize].insert(base.into(), ino);
        paths.insert(path.to_owned(), ino);
        ino
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
            name: name.into(),
            kind,
            size: 0,
            mode: 0o644,
            uid: 0,
            gid: 0,
            uname: String::new(),
            gname: String::new(),
            mtime: 0,
            mtime_nsec: 0,
            link_name: link.into(),
            dev_major: 0,
            dev_minor: 0,
            xattrs: Default::default(),
            digest: None,
            chunks: Vec::new(),
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
        let t = InodeTable::build(&toc);
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
}
