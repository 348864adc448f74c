//! The workloads, HelloBench style: real images from Debian packages, each with a command that
//! prints a line when the workload is ready. Images are built once by the test fixtures (cached
//! under /var/cache/lazysnap), pushed plain (gzip, what nodes pull today) and converted by
//! `lazysnap convert` into zstd:chunked.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// One workload: which image, what to run, and the line that says it is ready.
#[derive(Debug, Clone)]
pub struct Workload {
    pub name: &'static str,
    pub image: Image,
    pub command: Vec<String>,
    /// Start-up ends when a line of the workload's stdout or stderr contains this.
    pub ready: &'static str,
}

/// The images the workloads run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Image {
    Python,
    Java,
    Gcc,
    BigSparse,
}

impl Image {
    fn repo(self) -> &'static str {
        match self {
            Self::Python => "python",
            Self::Java => "java",
            Self::Gcc => "gcc",
            Self::BigSparse => "big-sparse",
        }
    }

    /// `HOST/bench/REPO:plain` and `:lazy`.
    pub fn reference(self, addr: &str, kind: &str) -> String {
        format!("{addr}/bench/{}", self.repo_tag(kind))
    }

    /// `REPO:KIND`.
    pub fn repo_tag(self, kind: &str) -> String {
        format!("{}:{kind}", self.repo())
    }
}

impl Workload {
    /// `HOST/bench/profiled-REPO-N-RUN:lazy` (N: the workload's index): the converted image
    /// copied into a repository of this workload and benchmark run alone, where its start-up
    /// profile is pushed. The image's own repository never gets a profile, so the methods without
    /// one really have none; a new repository per run keeps profiles of earlier runs (the
    /// registry's storage is cached) out. Not the workload's name: `lazysnap run` prints the
    /// reference, and `python-hello` would match the ready line `hello` before the container ran.
    pub fn profiled_reference(&self, addr: &str, index: usize, run_id: &str) -> String {
        format!(
            "{addr}/bench/profiled-{}-{index}-{run_id}:lazy",
            self.image.repo()
        )
    }
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// Every workload, in the order they run; `quick` keeps `python-hello` only.
pub fn all(quick: bool) -> Vec<Workload> {
    let mut w = vec![Workload {
        name: "python-hello",
        image: Image::Python,
        command: args(&["python3", "-c", "print('hello')"]),
        ready: "hello",
    }];
    if quick {
        return w;
    }
    w.extend([
        Workload {
            name: "python-import",
            image: Image::Python,
            command: args(&[
                "python3",
                "-c",
                "import json, sqlite3, asyncio, email.parser, http.client, xml.etree.ElementTree, \
                 decimal, unittest, argparse, logging, multiprocessing, ssl, csv, zipfile, \
                 tarfile, urllib.request, html.parser, statistics; print('imported')",
            ]),
            ready: "imported",
        },
        Workload {
            name: "java-hello",
            image: Image::Java,
            command: args(&["java", "-version"]),
            ready: "version",
        },
        Workload {
            name: "gcc-hello",
            image: Image::Gcc,
            command: args(&[
                "sh",
                "-c",
                "printf '#include <stdio.h>\\nint main(void) { puts(\"compiled hello\"); return 0; }\\n' \
                 > /tmp/h.c && gcc -O0 -o /tmp/h /tmp/h.c && /tmp/h",
            ]),
            ready: "compiled hello",
        },
        Workload {
            name: "big-sparse",
            image: Image::BigSparse,
            command: args(&["sh", "-c", "echo hello from a big image"]),
            ready: "hello from a big image",
        },
    ]);
    w
}

/// Runs `cmd`; its trimmed stdout, or an error with its stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Builds (or finds cached) the image's OCI layout; returns `DIR:TAG`.
fn layout(image: Image, repo_root: &Path, cache: &Path, work: &Path) -> Result<String> {
    let fixtures = repo_root.join("tests/fixtures");
    let out = work.join(image.repo());
    let packages = match image {
        Image::Python => "python3",
        Image::Java => "openjdk-17-jre-headless",
        Image::Gcc => "gcc libc6-dev",
        Image::BigSparse => return big_sparse(&fixtures, cache, &out),
    };
    eprintln!("coldstart: image {} (Debian + {packages})", image.repo());
    run(Command::new(fixtures.join("debian-image.sh"))
        .args(["--packages", packages])
        .arg(&out)
        .arg("v1"))
}

/// busybox plus a 2 GiB layer of random (incompressible) data that the workload never reads.
fn big_sparse(fixtures: &Path, cache: &Path, out: &Path) -> Result<String> {
    let cached = cache.join("big-sparse-r1/layout");
    if !cached.join("index.json").exists() {
        eprintln!("coldstart: building big-sparse (busybox + 2 GiB of random data; once)");
        let base = run(Command::new(fixtures.join("busybox-image.sh"))
            .arg(out.join("base"))
            .arg("v1"))?;
        let base_dir = base.rsplit_once(':').map_or(base.as_str(), |(d, _)| d);
        let partial = cache.join("big-sparse-r1/partial");
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir_all(partial.join("tree/data"))?;
        run(Command::new("cp")
            .args(["-a", base_dir])
            .arg(partial.join("layout")))?;
        run(Command::new("sh").arg("-c").arg(format!(
            "head -c 2G /dev/urandom > '{}' && tar -C '{}' --owner=0 --group=0 -cf '{}' data",
            partial.join("tree/data/blob").display(),
            partial.join("tree").display(),
            partial.join("data.tar").display()
        )))?;
        run(Command::new("umoci")
            .args(["raw", "add-layer", "--image"])
            .arg(format!("{}:v1", partial.join("layout").display()))
            .arg(partial.join("data.tar")))?;
        std::fs::rename(partial.join("layout"), &cached)?;
        std::fs::remove_dir_all(&partial)?;
    }
    Ok(format!("{}:v1", cached.display()))
}

/// Pushes every image the workloads need, plain and converted (with `convert_args`), to the
/// registry at `addr` (skipped by the registry when already there: pushes and conversion are
/// reproducible).
pub fn publish(
    workloads: &[Workload],
    addr: &str,
    lazysnap: &Path,
    convert_args: &[String],
    repo_root: &Path,
    cache: &Path,
) -> Result<()> {
    let work = tempfile::tempdir()?;
    let mut done: Vec<Image> = Vec::new();
    for w in workloads {
        if done.contains(&w.image) {
            continue;
        }
        done.push(w.image);
        let layout = layout(w.image, repo_root, cache, work.path())?;
        let plain = w.image.reference(addr, "plain");
        run(
            Command::new(repo_root.join("tests/fixtures/push-layout.sh"))
                .arg(&layout)
                .arg(&plain),
        )?;
        run(Command::new(lazysnap)
            .arg("convert")
            .args(convert_args)
            .arg(&plain)
            .arg(w.image.reference(addr, "lazy")))?;
        eprintln!("coldstart: published {plain} and :lazy");
    }
    Ok(())
}

/// The bench cache directory (images, registry storage) under `LAZYSNAP_CACHE`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("LAZYSNAP_CACHE")
        .map_or_else(|| PathBuf::from("/var/cache/lazysnap"), PathBuf::from)
        .join("bench")
}

/// `curl` against the registry at `addr`: returns the status code and the content type, the
/// body goes to `body_out` (if any).
fn curl(args: &[&str], body_out: Option<&Path>) -> Result<(u16, String)> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--noproxy", "*", "-o"])
        .arg(body_out.map_or_else(|| PathBuf::from("/dev/null"), Path::to_owned))
        .args(["-w", "%{http_code} %{content_type}"])
        .args(args);
    let out = run(&mut cmd)?;
    let (code, ctype) = out.split_once(' ').unwrap_or((out.as_str(), ""));
    Ok((
        code.parse().context("curl's status code")?,
        ctype.to_owned(),
    ))
}

/// Copies the image `from` (`bench/REPO:TAG`, an image manifest) to the repository `to` under the
/// same tag, byte for byte (same manifest digest): blobs by cross-repository mount, then the
/// manifest as it was served.
pub fn copy_image(addr: &str, from: &str, to_repo: &str) -> Result<()> {
    let (from_repo, tag) = from.rsplit_once(':').context("copy_image: REPO:TAG")?;
    let work = tempfile::tempdir()?;
    let body = work.path().join("manifest");
    let accept = "Accept: application/vnd.oci.image.manifest.v1+json, \
                  application/vnd.docker.distribution.manifest.v2+json";
    let (code, ctype) = curl(
        &[
            "-H",
            accept,
            &format!("http://{addr}/v2/{from_repo}/manifests/{tag}"),
        ],
        Some(&body),
    )?;
    if code != 200 {
        bail!("GET manifest {from}: HTTP {code}");
    }
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(&body)?)?;
    let layers = manifest["layers"]
        .as_array()
        .with_context(|| format!("{from}: not an image manifest ({ctype})"))?;
    let digests = std::iter::once(&manifest["config"]).chain(layers).map(|d| {
        d["digest"]
            .as_str()
            .context("a descriptor without a digest")
    });
    for digest in digests {
        let digest = digest?;
        let (code, _) = curl(
            &[
                "-X",
                "POST",
                &format!(
                    "http://{addr}/v2/{to_repo}/blobs/uploads/?mount={digest}&from={from_repo}"
                ),
            ],
            None,
        )?;
        if code != 201 {
            bail!("mounting {digest} from {from_repo} into {to_repo}: HTTP {code}");
        }
    }
    let (code, _) = curl(
        &[
            "-X",
            "PUT",
            "-H",
            &format!("Content-Type: {ctype}"),
            "--data-binary",
            &format!("@{}", body.display()),
            &format!("http://{addr}/v2/{to_repo}/manifests/{tag}"),
        ],
        None,
    )?;
    if code != 201 {
        bail!("PUT manifest {to_repo}:{tag}: HTTP {code}");
    }
    Ok(())
}

/// The largest blob of the image `repo:tag` at `addr`: `/v2/REPO/blobs/DIGEST` and its size.
pub fn largest_blob(addr: &str, reference: &str) -> Result<(String, u64)> {
    let (repo, tag) = reference
        .rsplit_once(':')
        .context("largest_blob: REPO:TAG")?;
    let work = tempfile::tempdir()?;
    let body = work.path().join("manifest");
    let (code, _) = curl(
        &[
            "-H",
            "Accept: application/vnd.oci.image.manifest.v1+json, \
             application/vnd.docker.distribution.manifest.v2+json",
            &format!("http://{addr}/v2/{repo}/manifests/{tag}"),
        ],
        Some(&body),
    )?;
    if code != 200 {
        bail!("GET manifest {reference}: HTTP {code}");
    }
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(&body)?)?;
    manifest["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| Some((l["digest"].as_str()?.to_owned(), l["size"].as_u64()?)))
        .max_by_key(|(_, size)| *size)
        .map(|(digest, size)| (format!("/v2/{repo}/blobs/{digest}"), size))
        .with_context(|| format!("{reference}: no layers"))
}
