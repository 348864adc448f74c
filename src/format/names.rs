//! Entry name rules shared by the tar parser and the TOC decoder: names are relative to the layer
//! root and never escape it, neither directly (`/abs`, `..`) nor through links.
//!
//! The rules work on bytes: a tar name is a byte string, and a plain layer holding a name that is
//! not UTF-8 is still a valid layer that must unpack byte for byte. Whether a name can also be
//! written into a JSON TOC is a separate question, asked by the writer (see
//! [`super::tar::EntryMeta::toc_name`]). The `&str` forms serve the TOC decoder, whose names are
//! text by construction.

/// A name for messages: as it is when it is UTF-8, else with every byte outside printable ASCII
/// escaped (`caf\xe9.txt`), so two different byte names never print alike.
pub(crate) fn shown(name: &[u8]) -> String {
    match std::str::from_utf8(name) {
        Ok(s) => s.to_owned(),
        Err(_) => name.escape_ascii().to_string(),
    }
}

/// Normalises an entry name: strips `./` and `/` separators, rejects absolute names and `..`.
pub(crate) fn normalise_name_bytes(raw: &[u8]) -> Result<Vec<u8>, String> {
    if raw.starts_with(b"/") {
        return Err("absolute name (entries must be relative to the layer root)".into());
    }
    let mut parts: Vec<&[u8]> = Vec::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                return Err("name contains a `..` component (would escape the layer root)".into())
            }
            c => parts.push(c),
        }
    }
    Ok(parts.join(&b'/'))
}

/// [`normalise_name_bytes`] for a name that is text (a TOC's).
pub(crate) fn normalise_name(raw: &str) -> Result<String, String> {
    // Splitting and joining at `/` keeps UTF-8 valid, so the lossy step never replaces a byte.
    normalise_name_bytes(raw.as_bytes()).map(|n| String::from_utf8_lossy(&n).into_owned())
}

/// Checks a hard link target (relative to the layer root) and returns it normalised.
pub(crate) fn check_hardlink_bytes(target: &[u8]) -> Result<Vec<u8>, String> {
    let show = || format!("{:?}", shown(target));
    if target.starts_with(b"/") {
        return Err(format!("hard link target {} is absolute", show()));
    }
    if target.contains(&0) {
        return Err(format!("hard link target {} holds a NUL byte", show()));
    }
    let mut parts: Vec<&[u8]> = Vec::new();
    for c in target.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                if parts.pop().is_none() {
                    return Err(format!(
                        "hard link target {} escapes the layer root",
                        show()
                    ));
                }
            }
            c => parts.push(c),
        }
    }
    if parts.is_empty() {
        return Err(format!("hard link target {} is the layer root", show()));
    }
    Ok(parts.join(&b'/'))
}

/// [`check_hardlink_bytes`] for a target that is text (a TOC's).
pub(crate) fn check_hardlink(target: &str) -> Result<String, String> {
    check_hardlink_bytes(target.as_bytes()).map(|n| String::from_utf8_lossy(&n).into_owned())
}

/// A symlink target is data: the kernel resolves it inside the container's root, where `..` at
/// the root stays at the root, and docker, containerd, umoci and podman store every target as it
/// is (`a/b/link -> ../../../../etc/x` included), in whatever bytes the tar holds. Nothing
/// resolves it here: the FUSE layer serves it as written and the plain-layer unpacker never
/// follows a symlink (it opens every parent with `O_NOFOLLOW`). The one target refused is one no
/// file system can hold: with a NUL byte.
pub(crate) fn check_symlink_bytes(target: &[u8]) -> Result<(), String> {
    if target.contains(&0) {
        return Err(format!(
            "symlink target {:?} holds a NUL byte",
            shown(target)
        ));
    }
    Ok(())
}

/// [`check_symlink_bytes`] for a target that is text (a TOC's).
pub(crate) fn check_symlink(target: &str) -> Result<(), String> {
    check_symlink_bytes(target.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_names_follow_the_same_rules_as_text() {
        assert_eq!(
            normalise_name_bytes(b"./d/caf\xe9.txt/").unwrap(),
            b"d/caf\xe9.txt"
        );
        assert!(normalise_name_bytes(b"d/\xff/../../x").is_err());
        assert!(normalise_name_bytes(b"/\xff").is_err());
        assert_eq!(check_hardlink_bytes(b"a/\xe9/../b").unwrap(), b"a/b");
        assert!(check_hardlink_bytes(b"\xe9/../..").is_err());
        assert!(check_hardlink_bytes(b"a\0b").is_err());
        check_symlink_bytes(b"../../\xe9").unwrap();
        assert!(check_symlink_bytes(b"a\0").is_err());
        assert_eq!(shown(b"caf\xe9.txt"), "caf\\xe9.txt");
        assert_eq!(shown("café".as_bytes()), "café");
    }
}
