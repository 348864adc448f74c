//! Start-up sets: which files of each layer a container reads first, so the conversion can put
//! them first and record them in the TOC. From a recorded profile ([`from_profile`]) or, with no
//! recording, from the image's entrypoint and the libraries it links ([`crate::elf`]).

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use crate::elf::{library_paths, Node};
use crate::format::reorder::TarIndex;
use crate::format::EntryKind;
use crate::profile::Profile;

use super::layer::Spooled;
use super::SourceLayer;

/// Where a layer's start-up set came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StartupSource {
    /// A recorded start-up profile (`--profile`).
    Profile,
    /// The entrypoint's executable, its loader and libraries (`--startup-elf`).
    Elf,
}

/// What was put first in one converted layer.
#[derive(Debug, Clone, Serialize)]
pub struct StartupReport {
    pub source: StartupSource,
    /// Files now leading the layer, in access order (what the TOC records).
    pub files: usize,
    /// Their uncompressed bytes.
    pub bytes: u64,
    /// Names asked for that the layer does not hold as a movable file.
    pub skipped: usize,
    /// Files left in place because start-up read less than half of them.
    pub sparse: usize,
    /// Why nothing moved, when nothing did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

/// One layer's start-up set: entry names in first-access order and, from a profile, how many
/// distinct chunks of each start-up read.
#[derive(Debug, Clone, Default)]
pub struct StartupSet {
    pub names: Vec<String>,
    /// Distinct chunk offsets read, by name; a name missing here counts as wholly read (the ELF
    /// heuristic's files, which the loader maps whole).
    pub touched: HashMap<String, usize>,
}

impl StartupSet {
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The names worth moving: a file larger than one chunk of which start-up read less than half
    /// (e.g. a few scattered pages of java's 57 MB `lib/modules`) stays where it is, since moving
    /// it would make every mount prefetch all of it; the profile prefetch at mount fetches just its
    /// read chunks instead. Returns the names kept and how many were left for being sparse.
    pub fn dense(&self, index: &TarIndex, chunk_size: u64) -> (Vec<String>, usize) {
        // Reads through every name of one content (hard links) count together.
        let mut read: HashMap<&str, usize> = HashMap::new();
        for (name, n) in &self.touched {
            if let Some((content, _)) = index.file(name) {
                *read.entry(content).or_default() += n;
            }
        }
        let mut sparse = 0;
        let kept = self
            .names
            .iter()
            .filter(|name| {
                if !self.touched.contains_key(*name) {
                    return true;
                }
                let Some((content, size)) = index.file(name) else {
                    return true; // not a file: the plan skips it
                };
                let chunks = read.get(content).copied().unwrap_or(0) as u64;
                let keep = size <= chunk_size || chunks.saturating_mul(chunk_size) * 2 >= size;
                sparse += usize::from(!keep);
                keep
            })
            .cloned()
            .collect();
        (kept, sparse)
    }
}

/// Each source layer's start-up set from `profile`, in first-access order (empty where the
/// profile has nothing for the layer).
///
/// A profile layer matches a source layer with the same blob digest (the profiled image itself),
/// else the same `diff_id` (the same tar in another encoding); when the profile names exactly as
/// many layers as the source has, the layers left unmatched pair up by position. Each profile
/// layer is used once.
pub fn from_profile(profile: &Profile, layers: &[SourceLayer]) -> Vec<StartupSet> {
    let mut used = vec![false; profile.layers.len()];
    let mut chosen: Vec<Option<usize>> = vec![None; layers.len()];
    let mut claim = |matches: &dyn Fn(usize, usize) -> bool, chosen: &mut Vec<Option<usize>>| {
        for (i, slot) in chosen.iter_mut().enumerate() {
            if slot.is_some() {
                continue;
            }
            if let Some(p) = (0..profile.layers.len()).find(|&p| !used[p] && matches(i, p)) {
                used[p] = true;
                *slot = Some(p);
            }
        }
    };
    claim(
        &|i, p| layers[i].digest == Some(profile.layers[p].digest),
        &mut chosen,
    );
    claim(
        &|i, p| profile.layers[p].diff_id == Some(layers[i].diff_id),
        &mut chosen,
    );
    if profile.layers.len() == layers.len() {
        claim(&|i, p| i == p, &mut chosen);
    }
    chosen
        .into_iter()
        .map(|p| {
            let mut set = StartupSet::default();
            let Some(p) = p else { return set };
            let mut chunks: HashSet<(&str, u64)> = HashSet::new();
            for a in &profile.layers[p].accesses {
                if !set.touched.contains_key(&a.name) {
                    set.names.push(a.name.clone());
                }
                if chunks.insert((a.name.as_str(), a.offset)) {
                    *set.touched.entry(a.name.clone()).or_default() += 1;
                }
            }
            set
        })
        .collect()
}

/// The most files (the program, its interpreter, libraries) an ELF start-up set holds.
const MAX_OBJECTS: usize = 256;
/// The most `#!` interpreters followed from a script entrypoint.
const MAX_SHEBANGS: usize = 4;
/// The most bytes of `/etc/ld.so.conf` (and each included file) read.
const MAX_CONF: usize = 64 << 10;
/// The most library directories taken from `ld.so.conf`.
const MAX_CONF_DIRS: usize = 64;
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// One layer's entries as the merged tree needs them.
struct LayerView<'a> {
    spooled: &'a Spooled,
    /// Kind and hard link target by name (the last entry of a name wins).
    entries: HashMap<&'a str, (EntryKind, &'a str)>,
    /// Directories this layer makes opaque.
    opaque: HashSet<String>,
}

/// The image's file system as the layers stack up, for resolving paths as data: symlink targets
/// are followed inside this tree, never on the host.
struct Tree<'a> {
    /// Bottom first.
    layers: Vec<LayerView<'a>>,
}

impl<'a> Tree<'a> {
    fn new(layers: &'a [&'a Spooled]) -> Self {
        let layers = layers
            .iter()
            .map(|s| {
                let mut entries = HashMap::new();
                let mut opaque = HashSet::new();
                for (name, kind, link, _) in s.index.iter() {
                    entries.insert(name, (kind, link));
                    if let Some(dir) = name.strip_suffix(".wh..wh..opq") {
                        opaque.insert(dir.trim_end_matches('/').to_owned());
                    }
                }
                LayerView {
                    spooled: s,
                    entries,
                    opaque,
                }
            })
            .collect();
        Self { layers }
    }

    /// The entry at `name` (no symlink followed): its layer, kind and hard link target.
    fn entry(&self, name: &str) -> Option<(usize, EntryKind, &'a str)> {
        let ancestors: Vec<&str> = std::iter::once("")
            .chain(name.match_indices('/').map(|(at, _)| &name[..at]))
            .collect();
        // Whiteout names for the entry and each directory above it.
        let whiteouts: Vec<String> = ancestors
            .iter()
            .skip(1)
            .copied()
            .chain(std::iter::once(name))
            .map(|p| match p.rsplit_once('/') {
                Some((dir, base)) => format!("{dir}/.wh.{base}"),
                None => format!(".wh.{p}"),
            })
            .collect();
        for (i, layer) in self.layers.iter().enumerate().rev() {
            if let Some(&(kind, link)) = layer.entries.get(name) {
                return Some((i, kind, link));
            }
            if whiteouts
                .iter()
                .any(|w| layer.entries.contains_key(w.as_str()))
                || ancestors.iter().any(|a| layer.opaque.contains(*a))
            {
                return None;
            }
        }
        None
    }

    /// Resolves an absolute or root-relative path, following symlinks inside the tree; returns the
    /// layer and name of the regular file (or hard link) it ends at.
    fn resolve(&self, path: &str) -> Option<(usize, String)> {
        crate::elf::resolve(path, |name| {
            let (layer, kind, _) = self.entry(name)?;
            let node = match kind {
                EntryKind::Reg | EntryKind::Hardlink => Node::File,
                EntryKind::Symlink => {
                    Node::Symlink(self.layers[layer].spooled.symlinks.get(name)?.clone())
                }
                _ => Node::Other,
            };
            Some((layer, node))
        })
    }

    /// Up to `len` bytes at `offset` of the file `name` of `layer` (a hard link reads its target).
    fn read(&self, layer: usize, name: &str, offset: u64, len: usize) -> Option<Vec<u8>> {
        let view = &self.layers[layer];
        let content = match view.entries.get(name)? {
            (EntryKind::Hardlink, target) => *target,
            _ => name,
        };
        let (start, size) = view.spooled.index.payload(content)?;
        if offset.checked_add(len as u64)? > size {
            return None;
        }
        view.spooled.read_at(start + offset, len).ok()
    }

    fn size(&self, layer: usize, name: &str) -> Option<u64> {
        let view = &self.layers[layer];
        let content = match view.entries.get(name)? {
            (EntryKind::Hardlink, target) => *target,
            _ => name,
        };
        Some(view.spooled.index.payload(content)?.1)
    }

    /// Names of the files directly in `dir` whose name ends with `suffix`, over all layers.
    fn list(&self, dir: &str, suffix: &str) -> Vec<String> {
        let prefix = format!("{}/", dir.trim_matches('/'));
        let mut names: Vec<String> = self
            .layers
            .iter()
            .flat_map(|l| l.entries.keys())
            .filter(|n| {
                n.strip_prefix(&prefix)
                    .is_some_and(|rest| !rest.contains('/') && rest.ends_with(suffix))
            })
            .map(|n| format!("/{n}"))
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// The directories `/etc/ld.so.conf` names (with its `include`s, one level deep).
    fn ld_so_conf(&self) -> Vec<String> {
        let mut dirs = Vec::new();
        let mut files = vec!["/etc/ld.so.conf".to_owned()];
        let (mut read_files, mut includes) = (0, 0);
        while let Some(file) = files.pop() {
            read_files += 1;
            if read_files > MAX_CONF_DIRS {
                break;
            }
            let Some((layer, name)) = self.resolve(&file) else {
                continue;
            };
            let Some(size) = self.size(layer, &name) else {
                continue;
            };
            let len = size.min(MAX_CONF as u64) as usize;
            let Some(text) = self.read(layer, &name, 0, len) else {
                continue;
            };
            for line in String::from_utf8_lossy(&text).lines() {
                let line = line.split('#').next().unwrap_or("").trim();
                if let Some(pattern) = line.strip_prefix("include") {
                    let pattern = pattern.trim();
                    includes += 1;
                    if file == "/etc/ld.so.conf" && includes <= MAX_CONF_DIRS {
                        if let Some((dir, suffix)) = pattern.rsplit_once("/*") {
                            files.extend(self.list(dir, suffix).into_iter().rev());
                        } else if pattern.starts_with('/') {
                            files.push(pattern.to_owned());
                        }
                    }
                } else if line.starts_with('/') && dirs.len() < MAX_CONF_DIRS {
                    dirs.push(line.to_owned());
                }
            }
        }
        dirs
    }
}

/// What the ELF heuristic found: per source layer the start-up names, and the program it
/// started from (for the report).
#[derive(Debug, Default)]
pub struct ElfStartup {
    pub sets: Vec<StartupSet>,
    pub program: Option<String>,
    pub files: usize,
}

/// Start-up sets from the image's entrypoint: the program `Entrypoint`/`Cmd` runs (found on the
/// config's `PATH`, following `#!` to its interpreter), its dynamic loader and the libraries it
/// and they need, found the way the loader finds them (`DT_RUNPATH`/`DT_RPATH`, `ld.so.conf`,
/// the default directories), all resolved inside the image's merged tree.
pub fn from_elf(config: &[u8], layers: &[&Spooled]) -> ElfStartup {
    let mut out = ElfStartup {
        sets: vec![StartupSet::default(); layers.len()],
        ..ElfStartup::default()
    };
    let Some((argv0, path_var)) = entrypoint(config) else {
        return out;
    };
    let tree = Tree::new(layers);
    let candidates: Vec<String> = if argv0.contains('/') {
        vec![argv0.clone()]
    } else {
        path_var
            .split(':')
            .filter(|d| d.starts_with('/'))
            .map(|d| format!("{}/{argv0}", d.trim_end_matches('/')))
            .collect()
    };
    let Some(mut program) = candidates.iter().find_map(|c| tree.resolve(c)) else {
        return out;
    };
    let mut seen: HashSet<(usize, String)> = HashSet::new();
    let mut queue: std::collections::VecDeque<(usize, String)> = Default::default();
    // A script's interpreter is what runs: the script first, then its `#!` program.
    for _ in 0..MAX_SHEBANGS {
        if seen.insert(program.clone()) {
            queue.push_back(program.clone());
        }
        let Some(head) = tree
            .size(program.0, &program.1)
            .and_then(|size| tree.read(program.0, &program.1, 0, size.min(256) as usize))
        else {
            break;
        };
        let Some(line) = head.strip_prefix(b"#!") else {
            break;
        };
        let line = line.split(|&b| b == b'\n').next().unwrap_or(&[]);
        let line = String::from_utf8_lossy(line);
        let Some(interp) = line.split_whitespace().next() else {
            break;
        };
        match tree.resolve(interp) {
            Some(next) => program = next,
            None => break,
        }
    }
    out.program = Some(format!("/{}", queue.front().map_or("", |p| p.1.as_str())));
    let conf_dirs = tree.ld_so_conf();
    let mut order: Vec<(usize, String)> = Vec::new();
    while let Some(object) = queue.pop_front() {
        order.push(object.clone());
        if order.len() >= MAX_OBJECTS {
            break;
        }
        let (layer, name) = &object;
        let Some(size) = tree.size(*layer, name) else {
            continue;
        };
        let read = |offset: u64, len: usize| tree.read(*layer, name, offset, len);
        let Some(info) = crate::elf::parse(&read, size) else {
            continue;
        };
        let origin = format!("/{}", name.rsplit_once('/').map_or("", |(d, _)| d));
        let mut found = Vec::new();
        if let Some(interp) = &info.interp {
            found.extend(tree.resolve(interp));
        }
        for lib in &info.needed {
            found.extend(
                library_paths(&info, lib, &origin, &conf_dirs)
                    .iter()
                    .find_map(|p| tree.resolve(p)),
            );
        }
        for f in found {
            if seen.insert(f.clone()) {
                queue.push_back(f);
            }
        }
    }
    out.files = order.len();
    for (layer, name) in order {
        out.sets[layer].names.push(name);
    }
    out
}

/// The program the image runs (first of `Entrypoint` + `Cmd`) and the `PATH` it is looked up on.
fn entrypoint(config: &[u8]) -> Option<(String, String)> {
    let config: serde_json::Value = serde_json::from_slice(config).ok()?;
    let c = config.get("config")?;
    let argv0 = ["Entrypoint", "Cmd"]
        .iter()
        .filter_map(|k| c.get(*k)?.as_array()?.first()?.as_str())
        .next()?
        .to_owned();
    let path = c
        .get("Env")
        .and_then(|e| e.as_array())
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str()?.strip_prefix("PATH="))
        .next()
        .unwrap_or(DEFAULT_PATH)
        .to_owned();
    (!argv0.is_empty()).then_some((argv0, path))
}
