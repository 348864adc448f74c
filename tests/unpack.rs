//! Unpacking plain layers: the same tree as GNU tar extracts, overlay whiteouts, and nothing
//! ever written outside the target directory whatever the tar says.

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::Command;

use anyhow::Result;
use common::{image, tree};
use lazysnap::fs::unpack::unpack_layer;

fn empty(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|mut d| d.next().is_none())
        .unwrap_or(true)
}

#[test]
fn a_symlink_in_the_layer_is_never_followed_out_of_the_directory() -> Result<()> {
    let outside = tempfile::tempdir()?;
    let cases = [
        format!("add('a', kind=tarfile.SYMTYPE, link='{}')\nadd('a/pwned', b'x')", outside.path().display()),
        format!("add('d', kind=tarfile.DIRTYPE)\nadd('d/a', kind=tarfile.SYMTYPE, link='{}')\nadd('d/a/x/pwned', b'x')", outside.path().display()),
        "add('a', kind=tarfile.SYMTYPE, link='/')\nadd('a/tmp/pwned', b'x')".to_owned(),
    ];
    for (i, body) in cases.iter().enumerate() {
        let dir = tempfile::tempdir()?;
        let err = unpack_layer(&image::python_tar(body)?[..], dir.path())
            .expect_err("must refuse to write through a symlink");
        let message = err.to_string();
        assert!(
            message.contains("pwned") && message.contains("symlink"),
            "case {i}: {message}"
        );
        assert!(
            empty(outside.path()),
            "case {i}: something was written outside"
        );
        assert!(!Path::new("/tmp/pwned").exists(), "case {i}");
    }
    Ok(())
}

#[test]
fn links_and_names_out_of_the_layer_are_refused() -> Result<()> {
    for (body, entry) in [
        ("add('hl', kind=tarfile.LNKTYPE, link='/etc/passwd')", "hl"),
        ("add('../escape', b'x')", "../escape"),
        ("add('/abs', b'x')", "/abs"),
    ] {
        let dir = tempfile::tempdir()?;
        let err = unpack_layer(&image::python_tar(body)?[..], dir.path()).expect_err(body);
        assert!(err.to_string().contains(entry), "{err}");
        assert!(empty(dir.path()), "nothing unpacked for {body}");
    }
    Ok(())
}

#[test]
fn an_unpacked_layer_equals_gnu_tar_extraction() -> Result<()> {
    let work = tempfile::tempdir()?;
    let source = work.path().join("source");
    image::sample_tree(&source, 7)?;
    let tar = image::tar_dir(&source)?;
    let ours = work.path().join("ours");
    let theirs = work.path().join("theirs");
    std::fs::create_dir_all(&ours)?;
    std::fs::create_dir_all(&theirs)?;
    let unpacked = unpack_layer(&tar[..], &ours)?;
    assert!(
        unpacked.entries > 10 && unpacked.bytes > 600_000,
        "{unpacked:?}"
    );
    image::pipe(
        Command::new("tar")
            .args([
                "--xattrs",
                "--xattrs-include=*",
                "--same-owner",
                "-p",
                "--numeric-owner",
                "-xf",
                "-",
                "-C",
            ])
            .arg(&theirs),
        &tar,
    )?;
    let differences = tree::differences(&tree::snapshot(&theirs)?, &tree::snapshot(&ours)?);
    assert!(differences.is_empty(), "{}", differences.join("\n"));
    Ok(())
}

#[test]
fn whiteouts_become_overlay_whiteouts_and_opaque_directories() -> Result<()> {
    let work = tempfile::tempdir()?;
    let source = work.path().join("source");
    image::whiteout_tree(&source)?;
    let dir = work.path().join("layer");
    std::fs::create_dir_all(&dir)?;
    unpack_layer(&image::tar_dir(&source)?[..], &dir)?;
    let whiteout = std::fs::symlink_metadata(dir.join("etc/hostname.hard"))?;
    assert!(
        whiteout.file_type().is_char_device() && whiteout.rdev() == 0,
        "char 0:0"
    );
    assert!(!dir.join("etc/.wh.hostname.hard").exists());
    assert!(!dir.join("srv/data/.wh..wh..opq").exists());
    let out = image::run(
        Command::new("getfattr")
            .args(["-n", "trusted.overlay.opaque", "--only-values"])
            .arg(dir.join("srv/data")),
    )?;
    assert_eq!(out, b"y");
    Ok(())
}

#[test]
fn names_and_symlink_targets_that_are_not_utf8_unpack_byte_for_byte() -> Result<()> {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let work = tempfile::tempdir()?;
    let source = work.path().join("source");
    image::latin1_tree(&source)?;
    let tar = image::tar_dir(&source)?;
    let ours = work.path().join("ours");
    let theirs = work.path().join("theirs");
    std::fs::create_dir_all(&ours)?;
    std::fs::create_dir_all(&theirs)?;
    unpack_layer(&tar[..], &ours)?;
    image::pipe(
        Command::new("tar")
            .args(["--same-owner", "-p", "--numeric-owner", "-xf", "-", "-C"])
            .arg(&theirs),
        &tar,
    )?;
    let want = tree::snapshot(&theirs)?;
    assert!(
        want.contains_key(r"caf\xe9.txt") && want.contains_key(r"d\xff/inner\xe9"),
        "GNU tar kept the byte names: {:?}",
        want.keys().collect::<Vec<_>>()
    );
    let differences = tree::differences(&want, &tree::snapshot(&ours)?);
    assert!(differences.is_empty(), "{}", differences.join("\n"));
    // The symlink target is stored as its bytes, never resolved.
    let target = std::fs::read_link(ours.join(OsStr::from_bytes(b"d\xff/up")))?;
    assert_eq!(target.as_os_str().as_bytes(), b"../../\xfe/\xe9");
    let hard = std::fs::metadata(ours.join(OsStr::from_bytes(b"hard\xe9")))?;
    assert_eq!(hard.nlink(), 2, "the hard link names the same file");
    Ok(())
}

#[test]
fn a_non_utf8_name_still_cannot_leave_the_directory() -> Result<()> {
    let outside = tempfile::tempdir()?;
    // `d\xe9` is a symlink out of the directory; a later entry below it must not be written.
    let body = format!(
        "add('d\\udce9', kind=tarfile.SYMTYPE, link='{}')\nadd('d\\udce9/pwned', b'x')",
        outside.path().display()
    );
    let dir = tempfile::tempdir()?;
    let err = unpack_layer(&image::python_tar_bytes(&body)?[..], dir.path())
        .expect_err("must refuse to write through a symlink");
    assert!(err.to_string().contains("symlink"), "{err}");
    assert!(empty(outside.path()), "something was written outside");
    for (body, entry) in [
        ("add('\\udce9/../../escape', b'x')", "escape"),
        (
            "add('hl', kind=tarfile.LNKTYPE, link='\\udce9/../../etc/passwd')",
            "hl",
        ),
    ] {
        let dir = tempfile::tempdir()?;
        let err = unpack_layer(&image::python_tar_bytes(body)?[..], dir.path()).expect_err(body);
        assert!(err.to_string().contains(entry), "{err}");
        assert!(empty(dir.path()), "nothing unpacked for {body}");
    }
    Ok(())
}
