//! Building test images on disk with independent tools: GNU `tar` and `gzip` make the layers,
//! and the layout, archive and index JSON are written by hand here, not by the code under test.

#![allow(dead_code)]

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(bytes))
}

/// The oracle tree: `umoci unpack` of `layout_dir:tag` into `bundle`; returns its rootfs.
pub fn umoci_unpack(layout_dir: &Path, tag: &str, bundle: &Path) -> Result<PathBuf> {
    run(Command::new("umoci")
        .args([
            "unpack",
            "--image",
            &format!("{}:{tag}", layout_dir.display()),
        ])
        .arg(bundle))?;
    Ok(bundle.join("rootfs"))
}

/// Runs a command, failing with its stderr if it fails; returns stdout.
pub fn run(cmd: &mut Command) -> Result<Vec<u8>> {
    let out = cmd
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

/// Runs `tests/fixtures/SCRIPT ARGS`; returns its stdout, trimmed (the fixtures print one result).
pub fn fixture(script: &str, args: &[&str]) -> Result<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(script);
    let out = run(Command::new(path).args(args))?;
    Ok(String::from_utf8(out)?.trim().to_owned())
}

/// Runs a command with `input` on stdin; returns stdout.
pub fn pipe(cmd: &mut Command, input: &[u8]) -> Result<Vec<u8>> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output()?;
    let _ = writer.join();
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

/// The tar of a directory, as GNU tar writes it (PAX, sorted, numeric owners, xattrs).
pub fn tar_dir(dir: &Path) -> Result<Vec<u8>> {
    run(Command::new("tar")
        .args([
            "--format=pax",
            "--sort=name",
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "-C",
        ])
        .arg(dir)
        .args(["-cf", "-", "."]))
}

pub fn gzip(bytes: &[u8]) -> Result<Vec<u8>> {
    pipe(Command::new("gzip").args(["-n", "-c"]), bytes)
}

/// `tar -tv` of an uncompressed tar, the independent listing tests compare.
pub fn tar_listing(tar: &[u8]) -> Result<Vec<String>> {
    let out = pipe(
        Command::new("tar").args([
            "--numeric-owner",
            "--full-time",
            "--xattrs",
            "--xattrs-include=*",
            "-tvf",
            "-",
        ]),
        tar,
    )?;
    Ok(String::from_utf8_lossy(&out)
        .lines()
        .map(str::to_owned)
        .collect())
}

/// Decompresses a layer blob with the system tool its magic bytes call for.
pub fn decompress(blob: &[u8]) -> Result<Vec<u8>> {
    match blob {
        [0x1f, 0x8b, ..] => pipe(Command::new("gzip").args(["-dc"]), blob),
        [0x28, 0xb5, 0x2f, 0xfd, ..] => pipe(Command::new("zstd").args(["-dc", "-q"]), blob),
        _ => Ok(blob.to_vec()),
    }
}

/// A config for `diff_ids`, with fields a conversion must keep.
pub fn config_for(diff_ids: &[String], arch: &str) -> Value {
    json!({
        "architecture": arch,
        "os": "linux",
        "created": "2024-01-02T03:04:05Z",
        "config": {"Env": ["PATH=/usr/bin:/bin", "LAZYSNAP_TEST=1"], "Cmd": ["/bin/sh"], "WorkingDir": "/srv", "Labels": {"k": "v"}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": diff_ids.iter().enumerate().map(|(i, _)| json!({"created_by": format!("step {i}")})).collect::<Vec<_>>(),
    })
}

/// An OCI layout being written by hand.
pub struct LayoutBuilder {
    pub dir: PathBuf,
}

impl LayoutBuilder {
    pub fn new(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir.join("blobs/sha256"))?;
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    pub fn blob(&self, bytes: &[u8]) -> Result<Value> {
        let hex = sha256_hex(bytes);
        fs::write(self.dir.join("blobs/sha256").join(&hex), bytes)?;
        Ok(json!({"digest": format!("sha256:{hex}"), "size": bytes.len()}))
    }

    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.dir
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    }

    /// Writes an image of gzip layers made from `tars`; returns the manifest descriptor.
    pub fn image(&self, tars: &[Vec<u8>], arch: &str) -> Result<Value> {
        let mut layers = Vec::new();
        let mut diff_ids = Vec::new();
        for tar in tars {
            diff_ids.push(digest_of(tar));
            let mut d = self.blob(&gzip(tar)?)?;
            d["mediaType"] = json!("application/vnd.oci.image.layer.v1.tar+gzip");
            layers.push(d);
        }
        let config = serde_json::to_vec(&config_for(&diff_ids, arch))?;
        let mut config_desc = self.blob(&config)?;
        config_desc["mediaType"] = json!("application/vnd.oci.image.config.v1+json");
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config_desc,
            "layers": layers,
            "annotations": {"org.opencontainers.image.title": "lazysnap test"},
        });
        let mut desc = self.blob(&serde_json::to_vec(&manifest)?)?;
        desc["mediaType"] = json!("application/vnd.oci.image.manifest.v1+json");
        desc["platform"] = json!({"os": "linux", "architecture": arch});
        Ok(desc)
    }

    /// Writes an index over `manifests`; returns its descriptor.
    pub fn index(&self, manifests: &[Value]) -> Result<Value> {
        let index = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests});
        let mut desc = self.blob(&serde_json::to_vec(&index)?)?;
        desc["mediaType"] = json!("application/vnd.oci.image.index.v1+json");
        Ok(desc)
    }

    /// Writes `index.json` naming each descriptor by its tag.
    pub fn tags(&self, tagged: &[(&str, Value)]) -> Result<()> {
        let manifests: Vec<Value> = tagged
            .iter()
            .map(|(tag, d)| {
                let mut d = d.clone();
                d["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
                d
            })
            .collect();
        let index = json!({"schemaVersion": 2, "manifests": manifests});
        fs::write(self.dir.join("index.json"), serde_json::to_vec(&index)?)?;
        Ok(())
    }
}

/// Writes a `docker save`-style archive (older layout: `<id>/layer.tar`, plain tars).
/// `diff_ids` overrides what the config names (default: the tars' real digests).
pub fn docker_archive(path: &Path, tars: &[Vec<u8>], diff_ids: Option<Vec<String>>) -> Result<()> {
    let staging = tempfile::tempdir()?;
    let diff_ids: Vec<String> =
        diff_ids.unwrap_or_else(|| tars.iter().map(|t| digest_of(t)).collect());
    let config = serde_json::to_vec(&config_for(&diff_ids, "amd64"))?;
    let config_name = format!("{}.json", sha256_hex(&config));
    fs::write(staging.path().join(&config_name), &config)?;
    let mut layer_names = Vec::new();
    for (i, tar) in tars.iter().enumerate() {
        let id = format!("{:064x}", i + 1);
        fs::create_dir_all(staging.path().join(&id))?;
        fs::write(staging.path().join(&id).join("layer.tar"), tar)?;
        layer_names.push(format!("{id}/layer.tar"));
    }
    let manifest =
        json!([{"Config": config_name, "RepoTags": ["test:latest"], "Layers": layer_names}]);
    fs::write(
        staging.path().join("manifest.json"),
        serde_json::to_vec(&manifest)?,
    )?;
    run(Command::new("tar")
        .arg("-C")
        .arg(staging.path())
        .arg("-cf")
        .arg(path)
        .arg("."))?;
    Ok(())
}

/// A small tree with the entries conversions most often get wrong.
pub fn sample_tree(root: &Path, seed: u8) -> Result<()> {
    fs::create_dir_all(root.join("etc"))?;
    fs::create_dir_all(root.join("usr/bin"))?;
    fs::create_dir_all(root.join("srv/data"))?;
    fs::write(root.join("etc/hostname"), format!("host{seed}\n"))?;
    let big: Vec<u8> = (0..600_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8 ^ seed)
        .collect();
    fs::write(root.join("usr/bin/tool"), &big)?;
    fs::write(root.join("srv/data/zeros"), vec![0u8; 300_000])?;
    fs::write(root.join("srv/data/empty"), b"")?;
    std::os::unix::fs::symlink("/usr/bin/tool", root.join("usr/bin/abs-link"))?;
    std::os::unix::fs::symlink("tool", root.join("usr/bin/rel-link"))?;
    // A target that climbs above the root: data, as docker and umoci store it (in the container
    // `..` at the root stays there, so it names /etc/hostname).
    std::os::unix::fs::symlink("../../../../etc/hostname", root.join("usr/bin/up-link"))?;
    fs::hard_link(root.join("etc/hostname"), root.join("etc/hostname.hard"))?;
    fs::hard_link(root.join("usr/bin/tool"), root.join("usr/bin/tool.hard"))?;
    // Entry kinds a layer file system must reproduce: devices, a fifo, setuid, user xattrs.
    run(Command::new("mknod")
        .arg(root.join("etc/tty0"))
        .args(["c", "4", "0"]))?;
    run(Command::new("mknod")
        .arg(root.join("etc/loop9"))
        .args(["b", "7", "9"]))?;
    run(Command::new("mkfifo").arg(root.join("srv/pipe")))?;
    fs::write(root.join("usr/bin/suid"), b"setuid\n")?;
    run(Command::new("chmod")
        .arg("4755")
        .arg(root.join("usr/bin/suid")))?;
    run(Command::new("setfattr")
        .args(["-n", "user.lazysnap", "-v", "tested"])
        .arg(root.join("etc/hostname")))?;
    // An attribute with an empty value: `SCHILY.xattr.user.empty=` in the PAX header.
    run(Command::new("setfattr")
        .args(["-n", "user.empty"])
        .arg(root.join("etc/hostname")))?;
    run(Command::new("chown")
        .arg("1234:5678")
        .arg(root.join("srv/data/empty")))?;
    run(Command::new("touch")
        .args(["-h", "-d", "2021-05-06 07:08:09.123456789"])
        .arg(root.join("usr/bin/tool")))?;
    let name = "ü".repeat(60) + "-long-name.txt";
    fs::write(
        root.join("srv").join(name),
        b"unicode and a name over 100 bytes\n",
    )?;
    Ok(())
}

/// A tree whose names are not UTF-8 (Latin-1 bytes), which no lazy TOC can hold: a file, a
/// directory and a file in it, a name over 100 bytes (a PAX `path` record of raw bytes), a hard
/// link, and symlinks whose targets are not UTF-8 either (one dangling, one climbing).
pub fn latin1_tree(root: &Path) -> Result<()> {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let at = |name: &[u8]| root.join(OsStr::from_bytes(name));
    fs::create_dir_all(at(b"d\xff"))?;
    fs::write(at(b"caf\xe9.txt"), b"latin-1 name\n")?;
    fs::write(at(b"d\xff/inner\xe9"), b"inside a latin-1 directory\n")?;
    let mut long = b"x".repeat(150);
    long.extend_from_slice(b"\xe9.bin");
    fs::write(at(&long), b"a long latin-1 name\n")?;
    fs::hard_link(at(b"caf\xe9.txt"), at(b"hard\xe9"))?;
    std::os::unix::fs::symlink(OsStr::from_bytes(b"caf\xe9.txt"), at(b"link\xe9"))?;
    std::os::unix::fs::symlink(OsStr::from_bytes(b"../../\xfe/\xe9"), at(b"d\xff/up"))?;
    run(Command::new("touch")
        .args(["-h", "-d", "2022-02-03 04:05:06"])
        .arg(at(b"link\xe9")))?;
    Ok(())
}

/// A layer over [`sample_tree`] with a whiteout and an opaque directory.
pub fn whiteout_tree(root: &Path) -> Result<()> {
    fs::create_dir_all(root.join("etc"))?;
    fs::create_dir_all(root.join("srv/data"))?;
    fs::write(root.join("etc/.wh.hostname.hard"), b"")?;
    fs::write(root.join("srv/data/.wh..wh..opq"), b"")?;
    fs::write(root.join("srv/data/new"), b"after the opaque dir\n")?;
    Ok(())
}

/// A layer tar written by Python's `tarfile`, an independent writer that writes what it is told,
/// hostile entries included. `body` calls `add(name, data=b'', kind=tarfile.REGTYPE, link='')`.
pub fn python_tar(body: &str) -> Result<Vec<u8>> {
    let script = format!(
        "import io, sys, tarfile\nbuf = io.BytesIO()\nt = tarfile.open(fileobj=buf, mode='w', format=tarfile.PAX_FORMAT)\n\
         def add(name, data=b'', kind=tarfile.REGTYPE, link=''):\n    i = tarfile.TarInfo(name); i.type = kind; i.linkname = link; i.size = len(data)\n    t.addfile(i, io.BytesIO(data))\n\
         {body}\nt.close()\nsys.stdout.buffer.write(buf.getvalue())\n"
    );
    run(Command::new("python3").args(["-c", &script]))
}

/// [`python_tar`] with names and link targets written as raw bytes: a lone surrogate
/// `\udcXX` in `body` is the byte `0xXX` (Python's `surrogateescape`), so `'caf\udce9'` is
/// `caf\xe9`, a name that is not UTF-8.
pub fn python_tar_bytes(body: &str) -> Result<Vec<u8>> {
    let script = format!(
        "import io, sys, tarfile\nbuf = io.BytesIO()\nt = tarfile.open(fileobj=buf, mode='w', format=tarfile.GNU_FORMAT, encoding='utf-8', errors='surrogateescape')\n\
         def add(name, data=b'', kind=tarfile.REGTYPE, link=''):\n    i = tarfile.TarInfo(name); i.type = kind; i.linkname = link; i.size = len(data)\n    t.addfile(i, io.BytesIO(data))\n\
         {body}\nt.close()\nsys.stdout.buffer.write(buf.getvalue())\n"
    );
    run(Command::new("python3").args(["-c", &script]))
}

/// Bytes no compressor shrinks, from a seed (so two files never share a chunk).
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}
