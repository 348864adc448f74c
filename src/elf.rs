//! Just enough of ELF to find what a dynamically linked program loads before `main`: its program
//! interpreter (`PT_INTERP`, the dynamic loader), the libraries it names (`DT_NEEDED`) and where it
//! says to look for them (`DT_RUNPATH`, `DT_RPATH`); and how the loader finds those files in an
//! image's tree ([`resolve`], [`library_paths`]).
//!
//! Used twice: `convert --startup-elf` puts an entrypoint's libraries first in its layers, and
//! lazysnap's fetchers prefetch the libraries of a program as soon as it starts (`fetch::loader`).
//!
//! The bytes come from an image, so they are hostile until proven otherwise: every offset, count
//! and size is checked against the file and against small fixed bounds before anything is read,
//! arithmetic never wraps, and a file that does not add up yields `None` (no start-up set), never
//! a panic. Reads go through a callback, so only the few ranges the headers point at are read.

/// What the loader needs for one ELF file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ElfInfo {
    /// The program interpreter (e.g. `/lib64/ld-linux-x86-64.so.2`), for executables.
    pub interp: Option<String>,
    /// `DT_NEEDED` names, in order.
    pub needed: Vec<String>,
    /// `DT_RUNPATH` (or, without one, `DT_RPATH`) directories, `$ORIGIN` not yet expanded.
    pub search: Vec<String>,
}

/// The most program headers read (real files have about a dozen).
const MAX_PHDRS: u64 = 128;
/// The most bytes of the dynamic section read (a few hundred entries at most in practice).
const MAX_DYNAMIC: u64 = 64 << 10;
/// The most `DT_NEEDED` entries kept.
const MAX_NEEDED: usize = 256;
/// The longest string (interpreter, library name, search path) read.
const MAX_STRING: usize = 4096;

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
const DT_STRSZ: u64 = 10;
const DT_RPATH: u64 = 15;
const DT_RUNPATH: u64 = 29;

/// The most symlinks followed resolving one path (Linux's own limit).
pub const MAX_HOPS: usize = 40;
/// Where the loader looks after `DT_RUNPATH` and `ld.so.conf`.
pub const DEFAULT_DIRS: [&str; 4] = ["/lib64", "/usr/lib64", "/lib", "/usr/lib"];

/// Reads `len` bytes at `offset` of the file; `None` if they are not all there.
pub type ReadAt<'a> = dyn Fn(u64, usize) -> Option<Vec<u8>> + 'a;

#[derive(Clone, Copy)]
struct Layout {
    wide: bool,
    little: bool,
}

impl Layout {
    fn u16(self, b: &[u8], at: usize) -> Option<u64> {
        let s: [u8; 2] = b.get(at..at + 2)?.try_into().ok()?;
        Some(u64::from(if self.little {
            u16::from_le_bytes(s)
        } else {
            u16::from_be_bytes(s)
        }))
    }

    fn u32(self, b: &[u8], at: usize) -> Option<u64> {
        let s: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
        Some(u64::from(if self.little {
            u32::from_le_bytes(s)
        } else {
            u32::from_be_bytes(s)
        }))
    }

    fn u64(self, b: &[u8], at: usize) -> Option<u64> {
        let s: [u8; 8] = b.get(at..at + 8)?.try_into().ok()?;
        Some(if self.little {
            u64::from_le_bytes(s)
        } else {
            u64::from_be_bytes(s)
        })
    }

    /// An address-sized field (8 bytes in ELF64, 4 in ELF32).
    fn word(self, b: &[u8], at: usize) -> Option<u64> {
        if self.wide {
            self.u64(b, at)
        } else {
            self.u32(b, at)
        }
    }
}

struct Segment {
    kind: u32,
    offset: u64,
    vaddr: u64,
    filesz: u64,
}

/// The ELF header's layout and the program headers of the file of `size` bytes `read` reads.
fn segments(read: &ReadAt<'_>, size: u64) -> Option<(Layout, Vec<Segment>)> {
    let ident = read(0, 64.min(size as usize))?;
    if ident.len() < 52 || ident.get(0..4)? != b"\x7fELF" {
        return None;
    }
    let l = Layout {
        wide: match ident[4] {
            1 => false,
            2 => true,
            _ => return None,
        },
        little: match ident[5] {
            1 => true,
            2 => false,
            _ => return None,
        },
    };
    let (phoff, phentsize, phnum) = if l.wide {
        (l.u64(&ident, 32)?, l.u16(&ident, 54)?, l.u16(&ident, 56)?)
    } else {
        (l.u32(&ident, 28)?, l.u16(&ident, 42)?, l.u16(&ident, 44)?)
    };
    let want_entsize = if l.wide { 56 } else { 32 };
    if phentsize != want_entsize || phnum == 0 || phnum > MAX_PHDRS {
        return None;
    }
    let table_len = phentsize * phnum;
    if phoff.checked_add(table_len)? > size {
        return None;
    }
    let table = read(phoff, table_len as usize)?;
    let mut segments = Vec::with_capacity(phnum as usize);
    for i in 0..phnum as usize {
        let at = i * phentsize as usize;
        let kind = l.u32(&table, at)? as u32;
        let (offset, vaddr, filesz) = if l.wide {
            (
                l.u64(&table, at + 8)?,
                l.u64(&table, at + 16)?,
                l.u64(&table, at + 32)?,
            )
        } else {
            (
                l.u32(&table, at + 4)?,
                l.u32(&table, at + 8)?,
                l.u32(&table, at + 16)?,
            )
        };
        segments.push(Segment {
            kind,
            offset,
            vaddr,
            filesz,
        });
    }
    Some((l, segments))
}

/// The NUL-terminated string at `offset`, at most `limit` (and [`MAX_STRING`]) bytes, inside the
/// file; `None` if empty, unterminated or not UTF-8.
fn string_at(read: &ReadAt<'_>, size: u64, offset: u64, limit: u64) -> Option<String> {
    let len = (MAX_STRING as u64)
        .min(limit)
        .min(size.checked_sub(offset)?);
    let bytes = read(offset, len as usize)?;
    let end = bytes.iter().position(|&b| b == 0)?;
    let s = std::str::from_utf8(&bytes[..end]).ok()?;
    (!s.is_empty()).then(|| s.to_owned())
}

fn in_file(size: u64, offset: u64, len: u64) -> bool {
    offset.checked_add(len).is_some_and(|end| end <= size)
}

fn interp_of(read: &ReadAt<'_>, size: u64, segments: &[Segment]) -> Option<String> {
    let interp = segments.iter().find(|s| s.kind == PT_INTERP)?;
    if !in_file(size, interp.offset, interp.filesz) {
        return None;
    }
    string_at(read, size, interp.offset, interp.filesz)
}

/// The program interpreter alone (`PT_INTERP`): it needs only the ELF and program headers, the
/// first bytes of a program, so the loader can be fetched before the dynamic section is in.
pub fn interpreter(read: &ReadAt<'_>, size: u64) -> Option<String> {
    let (_, segments) = segments(read, size)?;
    interp_of(read, size, &segments)
}

/// Parses the headers of the ELF file of `size` bytes that `read` reads. `None` for anything that
/// is not a well-formed ELF file within the bounds above.
pub fn parse(read: &ReadAt<'_>, size: u64) -> Option<ElfInfo> {
    let (l, segments) = segments(read, size)?;
    let in_file = |offset: u64, len: u64| in_file(size, offset, len);
    let string_at = |offset: u64, limit: u64| string_at(read, size, offset, limit);
    let mut info = ElfInfo {
        interp: interp_of(read, size, &segments),
        ..ElfInfo::default()
    };
    let Some(dynamic) = segments.iter().find(|s| s.kind == PT_DYNAMIC) else {
        return Some(info);
    };
    if !in_file(dynamic.offset, dynamic.filesz) {
        return None;
    }
    let dyn_len = dynamic.filesz.min(MAX_DYNAMIC);
    let table = read(dynamic.offset, dyn_len as usize)?;
    let entsize = if l.wide { 16 } else { 8 };
    let half = entsize / 2;
    let (mut strtab, mut strsz) = (None, u64::MAX);
    let (mut needed, mut runpath, mut rpath) = (Vec::new(), None, None);
    for entry in table.chunks_exact(entsize) {
        let tag = l.word(entry, 0)?;
        let val = l.word(entry, half)?;
        match tag {
            DT_NULL => break,
            DT_NEEDED if needed.len() < MAX_NEEDED => needed.push(val),
            DT_STRTAB => strtab = Some(val),
            DT_STRSZ => strsz = val,
            DT_RUNPATH => runpath = Some(val),
            DT_RPATH => rpath = Some(val),
            _ => {}
        }
    }
    // DT_STRTAB is an address: the PT_LOAD segment that holds it says where it is in the file.
    let strtab = strtab?;
    let load = segments.iter().find(|s| {
        s.kind == PT_LOAD
            && strtab >= s.vaddr
            && s.vaddr
                .checked_add(s.filesz)
                .is_some_and(|end| strtab < end)
    })?;
    let str_offset = load.offset.checked_add(strtab - load.vaddr)?;
    let string = |index: u64| -> Option<String> {
        if index >= strsz {
            return None;
        }
        string_at(str_offset.checked_add(index)?, strsz - index)
    };
    info.needed = needed.into_iter().filter_map(string).collect();
    if let Some(path) = runpath.or(rpath).and_then(string) {
        info.search = path
            .split(':')
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .collect();
    }
    Some(info)
}

/// One name of a tree, as path resolution sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// A regular file (or a hard link to one): where resolution ends.
    File,
    /// A symbolic link and its target.
    Symlink(String),
    /// A directory, or anything else.
    Other,
}

/// Resolves the absolute or root-relative `path` in a tree that `entry` describes (root-relative
/// names, no symlink followed, `None` for a name the tree lacks or hides), following symlinks
/// inside that tree, never on the host: a link's target is data. Returns where the regular file
/// it ends at lies (what `entry` said with it) and its name; `None` past [`MAX_HOPS`] links.
pub fn resolve<L>(path: &str, entry: impl Fn(&str) -> Option<(L, Node)>) -> Option<(L, String)> {
    let mut pending: std::collections::VecDeque<String> =
        path.split('/').map(str::to_owned).collect();
    let mut at: Vec<String> = Vec::new();
    let mut hops = 0;
    while let Some(part) = pending.pop_front() {
        match part.as_str() {
            "" | "." => continue,
            ".." => {
                at.pop();
                continue;
            }
            _ => {}
        }
        at.push(part);
        // A directory a layer's tar leaves out still exists under the files it holds: only the
        // last name must be there.
        if let Some((_, Node::Symlink(target))) = entry(&at.join("/")) {
            hops += 1;
            if hops > MAX_HOPS {
                return None;
            }
            at.pop();
            if target.starts_with('/') {
                at.clear();
            }
            for part in target.split('/').rev() {
                pending.push_front(part.to_owned());
            }
        }
    }
    let name = at.join("/");
    match entry(&name)? {
        (found, Node::File) => Some((found, name)),
        _ => None,
    }
}

/// Where the loader looks for the library `lib` that the object `origin_dir/…` (described by
/// `info`) needs, in order: `lib` itself when it has a slash, else `DT_RUNPATH`/`DT_RPATH` (with
/// `$ORIGIN` expanded), then `dirs` (`ld.so.conf`'s, or a fixed list), then [`DEFAULT_DIRS`].
pub fn library_paths(info: &ElfInfo, lib: &str, origin_dir: &str, dirs: &[String]) -> Vec<String> {
    if lib.contains('/') {
        return vec![lib.to_owned()];
    }
    info.search
        .iter()
        .map(|d| {
            d.replace("$ORIGIN", origin_dir)
                .replace("${ORIGIN}", origin_dir)
        })
        .chain(dirs.iter().cloned())
        .chain(DEFAULT_DIRS.iter().map(|d| (*d).to_owned()))
        .map(|d| format!("{}/{lib}", d.trim_end_matches('/')))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_bytes(b: &[u8]) -> Option<ElfInfo> {
        let read = |offset: u64, len: usize| -> Option<Vec<u8>> {
            let start = usize::try_from(offset).ok()?;
            b.get(start..start.checked_add(len)?).map(<[u8]>::to_vec)
        };
        parse(&read, b.len() as u64)
    }

    #[test]
    fn a_real_dynamic_executable_names_its_loader_and_libraries() {
        let bytes = std::fs::read("/bin/ls").unwrap();
        let info = parse_bytes(&bytes).unwrap();
        let interp = info.interp.unwrap();
        assert!(interp.contains("ld-linux"), "{interp}");
        assert!(
            info.needed.iter().any(|n| n.starts_with("libc.so")),
            "{:?}",
            info.needed
        );
    }

    #[test]
    fn hostile_headers_give_nothing_and_never_panic() {
        let real = std::fs::read("/bin/ls").unwrap();
        assert!(parse_bytes(b"").is_none());
        assert!(parse_bytes(b"\x7fELF").is_none());
        assert!(parse_bytes(&real[..40]).is_none());
        // Truncated anywhere: no panic (the result may be partial or none).
        for cut in [64, 100, 500, 1000, 4096, 20_000] {
            let _ = parse_bytes(&real[..cut.min(real.len())]);
        }
        // A huge program header count or a table past the end.
        let mut huge = real.clone();
        huge[56] = 0xff;
        huge[57] = 0xff;
        assert!(parse_bytes(&huge).is_none());
        let mut far = real.clone();
        far[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(parse_bytes(&far).is_none());
        // Random bytes with a valid magic.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..2000 {
            let mut junk: Vec<u8> = (0..512)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            junk[..4].copy_from_slice(b"\x7fELF");
            junk[4] = 2;
            junk[5] = 1;
            let _ = parse_bytes(&junk);
        }
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(data in proptest::collection::vec(proptest::num::u8::ANY, 0..2048)) {
            let mut data = data;
            if data.len() >= 6 {
                data[..4].copy_from_slice(b"\x7fELF");
            }
            let _ = parse_bytes(&data);
        }
    }
}
