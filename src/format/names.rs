//! Entry name rules shared by the tar parser and the TOC decoder: names are relative to the layer
//! root and never escape it, neither directly (`/abs`, `..`) nor through links.

/// Normalises an entry name: strips `./` and `/` separators, rejects absolute names and `..`.
pub(crate) fn normalise_name(raw: &str) -> Result<String, String> {
    if raw.starts_with('/') {
        return Err("absolute name (entries must be relative to the layer root)".into());
    }
    let mut parts = Vec::new();
    for c in raw.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                return Err("name contains a `..` component (would escape the layer root)".into())
            }
            c => parts.push(c),
        }
    }
    Ok(parts.join("/"))
}

/// Checks a hard link target (relative to the layer root) and returns it normalised.
pub(crate) fn check_hardlink(target: &str) -> Result<String, String> {
    if target.starts_with('/') {
        return Err(format!("hard link target {target:?} is absolute"));
    }
    let mut parts: Vec<&str> = Vec::new();
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(format!(
                        "hard link target {target:?} escapes the layer root"
                    ));
                }
            }
            c => parts.push(c),
        }
    }
    if parts.is_empty() {
        return Err(format!("hard link target {target:?} is the layer root"));
    }
    Ok(parts.join("/"))
}

/// A symlink target is data: the kernel resolves it inside the container's root, where `..` at
/// the root stays at the root, and docker, containerd, umoci and podman store every target as it
/// is (`a/b/link -> ../../../../etc/x` included). Nothing resolves it here: the FUSE layer serves
/// it as written and the plain-layer unpacker never follows a symlink (it opens every parent with
/// `O_NOFOLLOW`). The one target refused is one no file system can hold: with a NUL byte.
pub(crate) fn check_symlink(target: &str) -> Result<(), String> {
    if target.contains('\0') {
        return Err(format!("symlink target {target:?} holds a NUL byte"));
    }
    Ok(())
}
