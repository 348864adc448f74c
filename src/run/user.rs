//! The container's user: `USER` from the image config or `-u`, resolved the way container runtimes
//! do it, against the image's own `/etc/passwd` and `/etc/group` (never the host's).
//!
//! Accepted forms: empty (root), `name`, `uid`, `name:group`, `uid:gid`, and the mixed forms. A
//! numeric uid needs no passwd entry; a name must have one. The primary group is the passwd
//! entry's unless one is given; supplementary groups are the groups that list the user by name.

use std::io::Read;
use std::os::fd::AsFd;
use std::path::Path;

use nix::fcntl::{OFlag, OpenHow, ResolveFlag};

/// A resolved user, ready for the runtime spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    /// The passwd entry's home directory, for `HOME` when the image does not set it.
    pub home: String,
}

/// Why a user could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("unknown user {user:?}: no such name in the image's /etc/passwd")]
    UnknownUser { user: String },
    #[error("unknown group {group:?}: no such name in the image's /etc/group")]
    UnknownGroup { group: String },
    #[error("reading the image's {path}: {error}")]
    Read { path: &'static str, error: String },
}

/// One line of `/etc/passwd`.
#[derive(Debug, Clone)]
struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

/// One line of `/etc/group`.
#[derive(Debug, Clone)]
struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 7 || line.starts_with('#') {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_owned(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].to_owned(),
            })
        })
        .collect()
}

fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 4 || line.starts_with('#') {
                return None;
            }
            Some(GroupEntry {
                name: f[0].to_owned(),
                gid: f[2].parse().ok()?,
                members: f[3]
                    .split(',')
                    .filter(|m| !m.is_empty())
                    .map(str::to_owned)
                    .collect(),
            })
        })
        .collect()
}

/// Resolves `spec` against the passwd and group texts of the image.
fn resolve_in(spec: &str, passwd: &str, group: &str) -> Result<ResolvedUser, UserError> {
    let (user, group_spec) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let users = parse_passwd(passwd);
    let groups = parse_group(group);
    let user = if user.is_empty() { "0" } else { user };
    let entry = match user.parse::<u32>() {
        Ok(uid) => users.iter().find(|e| e.uid == uid).cloned(),
        Err(_) => Some(
            users
                .iter()
                .find(|e| e.name == user)
                .cloned()
                .ok_or_else(|| UserError::UnknownUser {
                    user: user.to_owned(),
                })?,
        ),
    };
    let uid = entry
        .as_ref()
        .map_or_else(|| user.parse().unwrap_or(0), |e| e.uid);
    let gid = match group_spec {
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                groups
                    .iter()
                    .find(|e| e.name == g)
                    .ok_or_else(|| UserError::UnknownGroup {
                        group: g.to_owned(),
                    })?
                    .gid
            }
        },
        None => entry.as_ref().map_or(0, |e| e.gid),
    };
    // Supplementary groups come from membership by name; an explicit group replaces them, as
    // `docker run -u user:group` does.
    let mut additional_gids = Vec::new();
    if let (Some(e), None) = (&entry, group_spec) {
        for g in &groups {
            if g.members.iter().any(|m| m == &e.name) && g.gid != gid {
                additional_gids.push(g.gid);
            }
        }
    }
    Ok(ResolvedUser {
        uid,
        gid,
        additional_gids,
        home: entry.map_or_else(|| "/".to_owned(), |e| e.home),
    })
}

/// Resolves `spec` against `/etc/passwd` and `/etc/group` of the root file system at `rootfs`.
/// Paths are resolved with the rootfs as `/`, so a symlink in the image can never make us read
/// a host file. A missing file counts as empty.
pub fn resolve(rootfs: &Path, spec: &str) -> Result<ResolvedUser, UserError> {
    let passwd = read_in_root(rootfs, "etc/passwd")?;
    let group = read_in_root(rootfs, "etc/group")?;
    resolve_in(spec, &passwd, &group)
}

fn read_in_root(rootfs: &Path, path: &'static str) -> Result<String, UserError> {
    let error = |e: &dyn std::fmt::Display| UserError::Read {
        path,
        error: e.to_string(),
    };
    let root = std::fs::File::open(rootfs).map_err(|e| error(&e))?;
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let fd = match nix::fcntl::openat2(root.as_fd(), path, how) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT) => return Ok(String::new()),
        Err(e) => return Err(error(&e)),
    };
    let mut text = String::new();
    std::fs::File::from(fd)
        .take(16 << 20)
        .read_to_string(&mut text)
        .map_err(|e| error(&e))?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
        daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
        app:x:1000:1000:App:/home/app:/bin/sh\n\
        # a comment\nbroken line\n";
    const GROUP: &str =
        "root:x:0:\ndaemon:x:1:\nstaff:x:50:app,daemon\napp:x:1000:\nvideo:x:44:app\n";

    fn r(spec: &str) -> Result<ResolvedUser, UserError> {
        resolve_in(spec, PASSWD, GROUP)
    }

    #[test]
    fn empty_is_root() {
        let u = r("").unwrap();
        assert_eq!((u.uid, u.gid, u.home.as_str()), (0, 0, "/root"));
    }

    #[test]
    fn name_takes_its_group_and_memberships() {
        let u = r("app").unwrap();
        assert_eq!((u.uid, u.gid), (1000, 1000));
        assert_eq!(u.additional_gids, vec![50, 44]);
        assert_eq!(u.home, "/home/app");
    }

    #[test]
    fn numeric_forms_need_no_entry() {
        let u = r("4242:4343").unwrap();
        assert_eq!((u.uid, u.gid, u.additional_gids.len()), (4242, 4343, 0));
        let u = r("4242").unwrap();
        assert_eq!((u.uid, u.gid), (4242, 0));
        let u = r("1").unwrap();
        assert_eq!((u.uid, u.gid), (1, 1));
    }

    #[test]
    fn explicit_group_by_name_replaces_memberships() {
        let u = r("app:staff").unwrap();
        assert_eq!((u.uid, u.gid), (1000, 50));
        assert!(u.additional_gids.is_empty());
        let u = r("1000:video").unwrap();
        assert_eq!((u.uid, u.gid), (1000, 44));
    }

    #[test]
    fn unknown_names_are_errors() {
        assert!(matches!(r("nobody"), Err(UserError::UnknownUser { .. })));
        assert!(matches!(
            r("app:nogroup"),
            Err(UserError::UnknownGroup { .. })
        ));
        let e = r("ghost").unwrap_err().to_string();
        assert!(e.contains("ghost") && e.contains("/etc/passwd"), "{e}");
    }

    #[test]
    fn files_are_read_inside_the_root() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        // An absolute symlink must resolve inside the image, not to the host's /etc/passwd.
        std::fs::create_dir_all(root.path().join("real")).unwrap();
        std::fs::write(root.path().join("real/passwd"), "zed:x:77:88::/z:/bin/sh\n").unwrap();
        std::os::unix::fs::symlink("/real/passwd", root.path().join("etc/passwd")).unwrap();
        let u = resolve(root.path(), "zed").unwrap();
        assert_eq!((u.uid, u.gid), (77, 88));
        assert!(matches!(
            resolve(root.path(), "root"),
            Err(UserError::UnknownUser { .. })
        ));
    }
}
