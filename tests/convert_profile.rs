//! Start-up sets at conversion: `lazysnap convert --profile` writes each layer's start-up files
//! first and records them in the TOC; the layer stays a plain layer that `tar`, `zstd` and `gzip`
//! read with the same content; a mount prefetches the set. Checked with independent tools and a
//! real registry and mount.

mod common;

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use common::image::{self, LayoutBuilder};
use common::mount_process::MountProcess;
use common::registry::TestRegistry;
use common::{scrape, tree, UnmountOnDrop};
use lazysnap::format::{self, EntryKind};
use lazysnap::oci::Digest;
use lazysnap::profile::{Access, LayerProfile, Profile};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_lazysnap");

fn lazysnap(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN).args(args).output().expect("run lazysnap");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn long_name() -> String {
    format!("srv/{}-long-name.txt", "ü".repeat(60))
}

/// Layer 1's start-up set as a profile lists it (a hard link, whose target must lead it; a file
/// the layer lacks; a directory), and what must lead the converted layer, in order.
fn profile_names() -> (Vec<String>, Vec<String>) {
    let asked = [
        "usr/bin/tool.hard",
        &long_name(),
        "no/such/file",
        "etc/hostname",
        "usr/bin",
        "usr/bin/tool",
    ]
    .map(str::to_owned)
    .to_vec();
    let leading = [
        "usr/bin/tool",
        "usr/bin/tool.hard",
        &long_name(),
        "etc/hostname",
    ]
    .map(str::to_owned)
    .to_vec();
    (asked, leading)
}

/// A two-layer source (the sample tree; whiteouts and an opaque dir) and a profile for it whose
/// first layer matches by diff_id and whose second matches only by position.
fn source_and_profile(dir: &Path) -> Result<(LayoutBuilder, Vec<Vec<u8>>, Profile)> {
    let trees = tempfile::tempdir()?;
    let (a, b) = (trees.path().join("a"), trees.path().join("b"));
    image::sample_tree(&a, 1)?;
    image::whiteout_tree(&b)?;
    let tars = vec![image::tar_dir(&a)?, image::tar_dir(&b)?];
    let layout = LayoutBuilder::new(&dir.join("src"))?;
    let desc = layout.image(&tars, "amd64")?;
    layout.tags(&[("src", desc)])?;
    let access = |name: &str, offset: u64, at_ms| Access {
        name: name.to_owned(),
        offset,
        chunk: Digest::of(format!("{name}@{offset}").as_bytes()),
        at_ms,
    };
    let (asked, _) = profile_names();
    let mut accesses = Vec::new();
    for (i, n) in asked.iter().enumerate() {
        accesses.push(access(n, 0, i as u64));
        if n == "usr/bin/tool.hard" {
            // Read whole (600 kB in 64 KiB chunks): it moves.
            accesses.extend((1..10).map(|c| access(n, c * 65536, i as u64)));
        }
    }
    // One 64 KiB chunk of a 300 kB file: too sparse to move (a mount would prefetch all of it).
    accesses.push(access("srv/data/zeros", 65536, 9));
    let profile = Profile {
        version: 1,
        image: Digest::of(b"another encoding of the image"),
        command: vec!["/bin/sh".into()],
        layers: vec![
            LayerProfile {
                digest: Digest::of(b"not this blob"),
                diff_id: Some(image::digest_of(&tars[0]).parse()?),
                accesses,
            },
            LayerProfile {
                digest: Digest::of(b"nor this one"),
                diff_id: None,
                accesses: vec![access("srv/data/new", 0, 9)],
            },
        ],
    };
    Ok((layout, tars, profile))
}

/// Unpacks a plain tar with GNU tar into `dir` (as root: owners, modes, devices, xattrs).
fn untar(tar: &[u8], dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    image::pipe(
        Command::new("tar")
            .args([
                "--numeric-owner",
                "--xattrs",
                "--xattrs-include=*",
                "-xpf",
                "-",
                "-C",
            ])
            .arg(dir),
        tar,
    )?;
    Ok(())
}

/// Kind (first letter of the mode) and name of one `tar -tv` line (names here hold no spaces).
fn entry_of(line: &str) -> (char, String) {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let name = fields.get(5).copied().unwrap_or("");
    (
        line.chars().next().unwrap_or('?'),
        name.trim_start_matches("./")
            .trim_end_matches('/')
            .to_owned(),
    )
}

/// The regular files (and hard links) of a tar, in stream order.
fn files_in_order(tar: &[u8]) -> Result<Vec<String>> {
    Ok(image::tar_listing(tar)?
        .iter()
        .map(|l| entry_of(l))
        .filter(|(k, n)| {
            matches!(k, '-' | 'h') && !n.rsplit('/').next().unwrap_or("").starts_with(".wh.")
        })
        .map(|(_, n)| n)
        .collect())
}

fn check_profiled_conversion(format_arg: &str, format: format::LayerFormat) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (src, tars, profile) = source_and_profile(tmp.path())?;
    let profile_file = tmp.path().join("profile.json");
    std::fs::write(&profile_file, profile.encode()?)?;
    let dst = tmp.path().join("dst");
    let (ok, stdout, stderr) = lazysnap(&[
        "convert",
        "--format",
        format_arg,
        "--chunk-size",
        "65536",
        "--profile",
        &profile_file.display().to_string(),
        &format!("oci:{}:src", src.dir.display()),
        &format!("oci:{}:lazy", dst.display()),
    ]);
    ensure!(ok, "convert failed: {stderr}");
    ensure!(
        stderr.contains("layer 1/2")
            && stderr.contains("start-up set of 4 files")
            && stderr.contains("1 sparsely read files left in place"),
        "the output says which layers got a start-up set: {stderr}"
    );
    ensure!(
        stderr.contains("layer 2/2") && stderr.contains("start-up set of 1 files"),
        "{stderr}"
    );
    let digest = stdout.lines().last().context("no output")?.to_owned();
    let blob = |d: &str| -> Result<Vec<u8>> {
        Ok(std::fs::read(
            dst.join("blobs/sha256")
                .join(d.trim_start_matches("sha256:")),
        )?)
    };
    let manifest: Value = serde_json::from_slice(&blob(&digest)?)?;
    let config: Value = serde_json::from_slice(&blob(
        manifest["config"]["digest"].as_str().context("config")?,
    )?)?;
    let (_, leading) = profile_names();
    let wanted: [Vec<String>; 2] = [leading, vec!["srv/data/new".to_owned()]];
    let noise = ["stargz.index.json", ".prefetch.landmark"];
    for (i, layer) in manifest["layers"]
        .as_array()
        .context("layers")?
        .iter()
        .enumerate()
    {
        let bytes = blob(layer["digest"].as_str().context("digest")?)?;
        // The system's zstd or gzip and tar read it as a plain layer, the start-up files first.
        let tar = image::decompress(&bytes)?;
        let files = files_in_order(&tar)?;
        ensure!(
            files[..wanted[i].len()] == wanted[i][..],
            "layer {i}: the start-up set leads, in access order: {files:?}"
        );
        if format == format::LayerFormat::Estargz {
            ensure!(
                files.get(wanted[i].len()).map(String::as_str) == Some(".prefetch.landmark"),
                "layer {i}: the landmark follows the set: {files:?}"
            );
        }
        // Every directory entry comes before the entries inside it.
        let listing = image::tar_listing(&tar)?;
        let entries: Vec<(char, String)> = listing.iter().map(|l| entry_of(l)).collect();
        let dirs: std::collections::HashSet<&str> = entries
            .iter()
            .filter(|(k, _)| *k == 'd')
            .map(|(_, n)| n.as_str())
            .collect();
        let mut seen = std::collections::HashSet::new();
        for (kind, name) in &entries {
            for (at, _) in name.match_indices('/') {
                let parent = &name[..at];
                ensure!(
                    !dirs.contains(parent) || seen.contains(parent),
                    "layer {i}: {name} comes before its directory {parent}"
                );
            }
            if *kind == 'd' {
                seen.insert(name.as_str());
            }
        }
        // tar pads its columns to what it printed before: compare the fields, not the spacing.
        let fields = |l: &String| l.split_whitespace().collect::<Vec<_>>().join(" ");
        let mut want: Vec<String> = image::tar_listing(&tars[i])?.iter().map(fields).collect();
        let mut got: Vec<String> = listing.iter().map(fields).collect();
        got.retain(|l| !noise.iter().any(|n| l.ends_with(n)));
        want.sort();
        got.sort();
        ensure!(
            got == want,
            "layer {i}: the same entries as the source: only in the source {:?}, only converted {:?}",
            want.iter().filter(|l| !got.contains(l)).collect::<Vec<_>>(),
            got.iter().filter(|l| !want.contains(l)).collect::<Vec<_>>()
        );
        // Unpacked, it is the same tree as the source unpacked.
        let (a, b) = (
            tmp.path().join(format!("want{i}")),
            tmp.path().join(format!("got{i}")),
        );
        untar(&tars[i], &a)?;
        untar(&tar, &b)?;
        for n in noise {
            let _ = std::fs::remove_file(b.join(n));
        }
        let differences = tree::differences(&tree::snapshot(&a)?, &tree::snapshot(&b)?);
        ensure!(
            differences.is_empty(),
            "layer {i}: {}",
            differences.join("\n")
        );
        // The config names the reordered tar.
        ensure!(
            config["rootfs"]["diff_ids"][i] == image::digest_of(&tar),
            "layer {i}: diff_id is the new tar's"
        );
        ensure!(
            image::digest_of(&tar) != image::digest_of(&tars[i]),
            "layer {i}: the order changed"
        );
        // The TOC records the set.
        let annotations: BTreeMap<String, String> =
            serde_json::from_value(layer["annotations"].clone())?;
        let media_type = layer["mediaType"].as_str().context("mediaType")?;
        let (_, toc) = format::read_toc(Cursor::new(&bytes), media_type, &annotations)?;
        let files_first: Vec<&str> = toc
            .prefetch
            .iter()
            .filter(|n| {
                toc.entries.iter().any(|e| {
                    &e.name == *n && matches!(e.kind, EntryKind::Reg | EntryKind::Hardlink)
                }) && !n.rsplit('/').next().unwrap_or("").starts_with(".wh.")
            })
            .map(String::as_str)
            .collect();
        ensure!(
            files_first == wanted[i],
            "layer {i}: the TOC's start-up set: {:?}",
            toc.prefetch
        );
    }
    // inspect counts the prefetch entries and verifies the TOCs.
    let (ok, json, stderr) =
        lazysnap(&["inspect", "--json", &format!("oci:{}:lazy", dst.display())]);
    ensure!(ok, "{stderr}");
    let info: Value = serde_json::from_str(&json)?;
    for layer in info["layers"].as_array().context("layers")? {
        ensure!(layer["toc_verified"] == true, "{layer}");
        ensure!(
            layer["prefetch_entries"].as_u64().unwrap_or(0) >= 1,
            "{layer}"
        );
    }
    Ok(())
}

#[test]
fn profiled_zstd_chunked_conversion_leads_with_the_start_up_set_and_stays_a_plain_layer(
) -> Result<()> {
    check_profiled_conversion("zstd-chunked", format::LayerFormat::ZstdChunked)
}

#[test]
fn profiled_estargz_conversion_leads_with_the_start_up_set_and_stays_a_plain_layer() -> Result<()> {
    check_profiled_conversion("estargz", format::LayerFormat::Estargz)
}

#[test]
fn a_bad_profile_file_is_a_clear_error() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (src, _, _) = source_and_profile(tmp.path())?;
    let bad = tmp.path().join("bad.json");
    std::fs::write(&bad, b"{\"version\":7}")?;
    let big = tmp.path().join("big.json");
    std::fs::write(
        &big,
        vec![b' '; (lazysnap::profile::MAX_BYTES + 10) as usize],
    )?;
    for (file, says) in [(&bad, "profile"), (&big, "bytes")] {
        let (ok, _, stderr) = lazysnap(&[
            "convert",
            "--profile",
            &file.display().to_string(),
            &format!("oci:{}:src", src.dir.display()),
            &format!("oci:{}:x", tmp.path().join("dst").display()),
        ]);
        ensure!(!ok && stderr.contains(says), "{stderr}");
    }
    Ok(())
}

/// Waits until `check` holds, or fails after `timeout`.
fn wait_until(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let start = Instant::now();
    loop {
        if check()? {
            return Ok(());
        }
        ensure!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_mount_of_a_profiled_conversion_prefetches_the_start_up_set_in_one_request_per_layer(
) -> Result<()> {
    let registry = TestRegistry::start()?;
    let tmp = tempfile::tempdir()?;
    let _cleanup = UnmountOnDrop(tmp.path().to_owned());
    let (src, _, profile) = source_and_profile(tmp.path())?;
    let profile_file = tmp.path().join("profile.json");
    std::fs::write(&profile_file, profile.encode()?)?;
    let oracle = tempfile::tempdir()?;
    image::sample_tree(oracle.path(), 1)?;
    for (format_arg, profiled) in [
        ("zstd-chunked", true),
        ("estargz", true),
        ("zstd-chunked", false),
    ] {
        let reference = format!("{}/profiled/{format_arg}:{profiled}", registry.addr);
        let mut args = vec!["convert", "--format", format_arg, "--chunk-size", "65536"];
        let profile_arg = profile_file.display().to_string();
        if profiled {
            args.extend(["--profile", &profile_arg]);
        }
        let source = format!("oci:{}:src", src.dir.display());
        args.extend([source.as_str(), reference.as_str()]);
        let (ok, _, stderr) = lazysnap(&args);
        ensure!(ok, "{stderr}");

        let addr = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
            probe.local_addr()?.to_string()
        };
        let target = tmp.path().join(format!("mnt-{format_arg}-{profiled}"));
        let process = MountProcess::start(
            &tmp.path().join(format!("root-{format_arg}-{profiled}")),
            &reference,
            &target,
            &["--metrics-addr", &addr, "--no-background-fetch"],
        )?;
        let prefetched = || scrape(&addr, "lazysnap_fetch_bytes_total{kind=\"prefetch\"}");
        let on_demand = || scrape(&addr, "lazysnap_fetch_bytes_total{kind=\"on_demand\"}");
        if profiled {
            // The set arrives before anything reads it ...
            // (Requests are counted when sent, bytes when they arrive: wait for both.)
            wait_until(Duration::from_secs(30), "the prefetch", || {
                Ok(
                    scrape(&addr, "lazysnap_fetch_requests_total{kind=\"prefetch\"}")? >= 2.0
                        && prefetched()? > 0.0,
                )
            })?;
            let requests = scrape(&addr, "lazysnap_fetch_requests_total{kind=\"prefetch\"}")?;
            std::thread::sleep(Duration::from_millis(300));
            ensure!(
                requests == 2.0,
                "{format_arg}: one range request per layer, not {requests}"
            );
            // ... so reading them costs no on-demand fetch.
            let before = on_demand()?;
            for name in ["usr/bin/tool", "etc/hostname", &long_name()] {
                ensure!(
                    std::fs::read(target.join(name))? == std::fs::read(oracle.path().join(name))?,
                    "{name}"
                );
            }
            ensure!(
                on_demand()? == before,
                "{format_arg}: the start-up files were already fetched"
            );
        } else {
            std::thread::sleep(Duration::from_millis(500));
            ensure!(prefetched()? == 0.0, "no profile, no prefetch");
            std::fs::read(target.join("usr/bin/tool"))?;
            ensure!(on_demand()? > 0.0, "read on demand");
        }
        process.stop()?;
    }
    Ok(())
}

/// Copies host file `from` to `root/to`, keeping a host symlink as a symlink to its target's
/// file name (which is copied too), as Debian's library links are.
fn copy_host(from: &Path, root: &Path, to: &str) -> Result<String> {
    let dest = root.join(to);
    std::fs::create_dir_all(dest.parent().context("parent")?)?;
    let meta = std::fs::symlink_metadata(from)?;
    if meta.file_type().is_symlink() {
        let real = std::fs::canonicalize(from)?;
        let real_name = real
            .file_name()
            .context("name")?
            .to_string_lossy()
            .into_owned();
        let dir = Path::new(to).parent().context("dir")?;
        std::os::unix::fs::symlink(&real_name, &dest)?;
        return copy_host(&real, root, &dir.join(&real_name).to_string_lossy());
    }
    std::fs::copy(from, &dest)?;
    Ok(to.to_owned())
}

/// The files (real names, not links) `ldd` says `program` loads, loader first.
fn host_libraries(program: &str) -> Result<Vec<std::path::PathBuf>> {
    let out = image::run(Command::new("ldd").arg(program))?;
    let mut libs = Vec::new();
    for line in String::from_utf8_lossy(&out).lines() {
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(std::path::PathBuf::from(p));
        }
    }
    Ok(libs)
}

/// An image whose `Cmd` (`/bin/sh`, through the `bin -> usr/bin` link) is a script that runs the
/// host's `/bin/ls`; layer 1 holds the loader and libraries the Debian way (`lib -> usr/lib`,
/// `lib64 -> usr/lib64`, libraries found through `ld.so.conf.d`), layer 2 the programs.
/// Returns the layout and, per layer, the file names the heuristic must put first.
fn elf_image(dir: &Path) -> Result<(LayoutBuilder, [Vec<String>; 2])> {
    let trees = tempfile::tempdir()?;
    let (base, top) = (trees.path().join("base"), trees.path().join("top"));
    for d in [
        "usr/lib/x86_64-linux-gnu",
        "usr/lib64",
        "etc/ld.so.conf.d",
        "usr/bin",
    ] {
        std::fs::create_dir_all(base.join(d))?;
    }
    std::os::unix::fs::symlink("usr/lib", base.join("lib"))?;
    std::os::unix::fs::symlink("usr/lib64", base.join("lib64"))?;
    std::os::unix::fs::symlink("usr/bin", base.join("bin"))?;
    std::fs::write(
        base.join("etc/ld.so.conf"),
        "include /etc/ld.so.conf.d/*.conf\n",
    )?;
    std::fs::write(
        base.join("etc/ld.so.conf.d/x86_64-linux-gnu.conf"),
        "# Multiarch support\n/lib/x86_64-linux-gnu\n",
    )?;
    std::fs::write(
        base.join("usr/lib/x86_64-linux-gnu/libunused.so.1"),
        b"not loaded",
    )?;
    let mut lower = Vec::new();
    for lib in host_libraries("/bin/ls")? {
        let name = lib
            .file_name()
            .context("name")?
            .to_string_lossy()
            .into_owned();
        let file = if name.starts_with("ld-linux") {
            // /lib64/ld-linux-x86-64.so.2 -> /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
            let real = std::fs::canonicalize(&lib)?;
            let to = format!("usr/lib/x86_64-linux-gnu/{name}");
            std::fs::copy(&real, base.join(&to))?;
            std::os::unix::fs::symlink(
                format!("/lib/x86_64-linux-gnu/{name}"),
                base.join("usr/lib64").join(&name),
            )?;
            to
        } else {
            copy_host(&lib, &base, &format!("usr/lib/x86_64-linux-gnu/{name}"))?
        };
        lower.push(file);
    }
    std::fs::create_dir_all(top.join("usr/bin"))?;
    std::fs::copy("/bin/ls", top.join("usr/bin/ls"))?;
    std::fs::write(top.join("usr/bin/sh"), "#!/usr/bin/ls -l\n")?;
    let tars = vec![image::tar_dir(&base)?, image::tar_dir(&top)?];
    let layout = LayoutBuilder::new(&dir.join("src"))?;
    let desc = layout.image(&tars, "amd64")?;
    layout.tags(&[("src", desc)])?;
    Ok((
        layout,
        [lower, vec!["usr/bin/sh".into(), "usr/bin/ls".into()]],
    ))
}

/// The leading regular files of each converted layer of `oci:DIR:TAG`, as many as `counts`.
fn leading_files(dir: &Path, digest: &str) -> Result<Vec<Vec<String>>> {
    let blob = |d: &str| {
        std::fs::read(
            dir.join("blobs/sha256")
                .join(d.trim_start_matches("sha256:")),
        )
    };
    let manifest: Value = serde_json::from_slice(&blob(digest)?)?;
    let mut out = Vec::new();
    for layer in manifest["layers"].as_array().context("layers")? {
        let tar = image::decompress(&blob(layer["digest"].as_str().context("digest")?)?)?;
        out.push(files_in_order(&tar)?);
    }
    Ok(out)
}

#[test]
fn startup_elf_puts_the_entrypoints_loader_and_libraries_first() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (src, want) = elf_image(tmp.path())?;
    let dst = tmp.path().join("dst");
    let (ok, stdout, stderr) = lazysnap(&[
        "convert",
        "--startup-elf",
        &format!("oci:{}:src", src.dir.display()),
        &format!("oci:{}:elf", dst.display()),
    ]);
    ensure!(ok, "{stderr}");
    ensure!(stderr.contains("entrypoint's ELF headers"), "{stderr}");
    let leading = leading_files(&dst, stdout.lines().last().context("digest")?)?;
    for (i, want) in want.iter().enumerate() {
        let got = &leading[i][..want.len().min(leading[i].len())];
        let mut sorted_got = got.to_vec();
        let mut sorted_want = want.clone();
        sorted_got.sort();
        sorted_want.sort();
        ensure!(
            sorted_got == sorted_want,
            "layer {i}: the start-up set is {want:?}, the layer starts with {:?}",
            leading[i]
        );
    }
    ensure!(
        leading[1][..2] == ["usr/bin/sh", "usr/bin/ls"],
        "the script, then its interpreter: {:?}",
        leading[1]
    );
    // Without the option, nothing moves (the layers keep the source's name order).
    let (ok, stdout, stderr) = lazysnap(&[
        "convert",
        &format!("oci:{}:src", src.dir.display()),
        &format!("oci:{}:plain", dst.display()),
    ]);
    ensure!(ok && !stderr.contains("start-up set"), "{stderr}");
    let plain = leading_files(&dst, stdout.lines().last().context("digest")?)?;
    ensure!(plain[1][0] == "usr/bin/ls", "{:?}", plain[1]);
    Ok(())
}

#[test]
fn hostile_entrypoints_give_no_start_up_set_and_no_failure() -> Result<()> {
    let real = std::fs::read("/bin/ls")?;
    let mut huge = real.clone();
    huge[56] = 0xff; // e_phnum
    huge[57] = 0xff;
    let mut far_dynamic = real.clone();
    far_dynamic[32..40].copy_from_slice(&(real.len() as u64 - 8).to_le_bytes()); // e_phoff
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", real[..200].to_vec()),
        ("huge program header count", huge),
        ("program headers past the end", far_dynamic),
        ("not ELF", b"MZ\x90\x00 not an executable".to_vec()),
    ];
    for (what, bytes) in cases {
        let tmp = tempfile::tempdir()?;
        let root = tmp.path().join("tree");
        std::fs::create_dir_all(root.join("bin"))?;
        std::fs::write(root.join("bin/sh"), &bytes)?;
        std::fs::write(root.join("bin/other"), b"x")?;
        let layout = LayoutBuilder::new(&tmp.path().join("src"))?;
        let desc = layout.image(&[image::tar_dir(&root)?], "amd64")?;
        layout.tags(&[("src", desc)])?;
        let (ok, _, stderr) = lazysnap(&[
            "convert",
            "--startup-elf",
            &format!("oci:{}:src", layout.dir.display()),
            &format!("oci:{}:t", tmp.path().join("dst").display()),
        ]);
        ensure!(ok, "{what}: {stderr}");
        // At most the entrypoint itself leads; no library or loader is invented.
        ensure!(
            !stderr.contains("start-up set of") || stderr.contains("start-up set of 1 files"),
            "{what}: {stderr}"
        );
    }
    // A symlink loop as the entrypoint ends; nothing is found.
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("tree");
    std::fs::create_dir_all(&root)?;
    std::os::unix::fs::symlink("bin", root.join("bin"))?;
    let layout = LayoutBuilder::new(&tmp.path().join("src"))?;
    let desc = layout.image(&[image::tar_dir(&root)?], "amd64")?;
    layout.tags(&[("src", desc)])?;
    let (ok, _, stderr) = lazysnap(&[
        "convert",
        "--startup-elf",
        &format!("oci:{}:src", layout.dir.display()),
        &format!("oci:{}:t", tmp.path().join("dst").display()),
    ]);
    ensure!(ok && !stderr.contains("start-up set of"), "{stderr}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profile_ref_is_looked_up_in_the_registry() -> Result<()> {
    let registry = TestRegistry::start()?;
    let tmp = tempfile::tempdir()?;
    let (src, _, mut profile) = source_and_profile(tmp.path())?;
    let image_ref = format!("{}/profiled/app:v1", registry.addr);
    let (ok, stdout, stderr) = lazysnap(&[
        "convert",
        &format!("oci:{}:src", src.dir.display()),
        &image_ref,
    ]);
    ensure!(ok, "{stderr}");
    let manifest: Digest = stdout.lines().last().context("digest")?.parse()?;
    let dst = tmp.path().join("dst");
    let convert_with_ref = || {
        lazysnap(&[
            "convert",
            "--profile",
            &image_ref,
            &image_ref,
            &format!("oci:{}:fast", dst.display()),
        ])
    };
    // No profile stored yet: a clear error that says what to do.
    let (ok, _, stderr) = convert_with_ref();
    ensure!(
        !ok && stderr.contains("no start-up profile") && stderr.contains("profile record"),
        "{stderr}"
    );
    // Stored as the referrers artifact of the image: found, and applied to the matching layers.
    profile.image = manifest;
    let client = lazysnap::registry::Client::new(lazysnap::registry::ClientConfig::default())?;
    lazysnap::profile::store::push(&client, &image_ref.parse()?, &profile).await?;
    let (ok, _, stderr) = convert_with_ref();
    ensure!(ok, "{stderr}");
    // With the default 4 MiB chunks every file is one chunk, so none is sparse: srv/data/zeros
    // moves too.
    ensure!(
        stderr.contains("layer 1/2") && stderr.contains("start-up set of 5 files"),
        "{stderr}"
    );
    Ok(())
}
