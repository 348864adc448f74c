//! The Kubernetes path, `lazysnap-cri` and `lazysnap-cri-profile`: kubelet's calls made by hand.
//! containerd runs its CRI plugin with the `lazysnap` snapshotter and the layer labels, and
//! lazysnapd serves its CRI image proxy in front of it, as an operator sets them up for kubelet
//! (`--image-service-endpoint` on the proxy, the runtime service straight to containerd).
//!
//! kubelet makes a pod's sandbox before it pulls the pod's images, so the sandbox is made first
//! and not timed (its image, a `sleep` on busybox, comes from `localhost:PORT`, another host
//! name than the workload's `127.0.0.1:PORT`, so no connection opened for it serves the timed
//! part). The timed part is what kubelet does next: `PullImage` through lazysnapd's proxy, then
//! `CreateContainer` and `StartContainer`, until the workload's ready line is in the container's
//! CRI log.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use containerd_snapshots::tonic::transport::{Channel, Endpoint, Uri};
use k8s_cri::v1 as cri;

use crate::methods::Sample;
use crate::workloads::{run, Workload};

/// Builds the sandbox image (busybox running `sleep`, the tests' fixture) and pushes it, plain,
/// to the registry at `addr` (`127.0.0.1:PORT`). Returns its reference under `localhost:PORT`.
pub fn publish_pause(repo_root: &Path, addr: &str, scratch: &Path) -> Result<String> {
    let fixtures = repo_root.join("tests/fixtures");
    let layout = run(Command::new(fixtures.join("busybox-image.sh"))
        .arg(scratch.join("pause-layout"))
        .arg("pause"))?;
    run(Command::new("umoci").args([
        "config",
        "--image",
        &layout,
        "--config.cmd",
        "/bin/sleep",
        "--config.cmd",
        "100000",
    ]))?;
    run(Command::new(fixtures.join("push-layout.sh"))
        .arg(&layout)
        .arg(format!("{addr}/bench/pause:plain")))?;
    let port = addr
        .rsplit_once(':')
        .map(|(_, p)| p)
        .context("registry address without a port")?;
    Ok(format!("localhost:{port}/bench/pause:plain"))
}

async fn channel(socket: &Path) -> Result<Channel> {
    let socket: PathBuf = socket.to_owned();
    // The URI is a placeholder: the connector dials the unix socket.
    Endpoint::try_from("http://[::]:50051")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            tokio::net::UnixStream::connect(socket.clone())
        }))
        .await
        .context("connecting to a CRI socket")
}

/// One cold start through CRI: the sandbox on `containerd` (not timed; `settle` runs after it,
/// to drop what it cost from the counts and the page cache), then `PullImage` of `reference`
/// through `proxy`, the container, its ready line. `logs` holds the pod's CRI logs.
pub fn cold_start(
    containerd: &Path,
    proxy: &Path,
    reference: &str,
    w: &Workload,
    logs: &Path,
    settle: impl FnOnce() -> Result<()>,
) -> Result<Sample> {
    tokio::runtime::Handle::current().block_on(async {
        let mut runtime =
            cri::runtime_service_client::RuntimeServiceClient::new(channel(containerd).await?);
        let mut images = cri::image_service_client::ImageServiceClient::new(channel(proxy).await?);
        std::fs::create_dir_all(logs)?;
        let sandbox = sandbox_config(logs);
        let pod = runtime
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(sandbox.clone()),
                runtime_handler: String::new(),
            })
            .await
            .context("RunPodSandbox")?
            .into_inner()
            .pod_sandbox_id;
        let timed = async {
            settle()?;
            let start = Instant::now();
            let image = images
                .pull_image(cri::PullImageRequest {
                    image: Some(cri::ImageSpec {
                        image: reference.to_owned(),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await
                .context("PullImage through lazysnapd's proxy")?
                .into_inner()
                .image_ref;
            let container = runtime
                .create_container(cri::CreateContainerRequest {
                    pod_sandbox_id: pod.clone(),
                    config: Some(cri::ContainerConfig {
                        metadata: Some(cri::ContainerMetadata {
                            name: "workload".into(),
                            attempt: 0,
                        }),
                        image: Some(cri::ImageSpec {
                            image,
                            ..Default::default()
                        }),
                        command: w.command.clone(),
                        log_path: "workload.log".into(),
                        ..Default::default()
                    }),
                    sandbox_config: Some(sandbox.clone()),
                })
                .await
                .context("CreateContainer")?
                .into_inner()
                .container_id;
            runtime
                .start_container(cri::StartContainerRequest {
                    container_id: container.clone(),
                })
                .await
                .context("StartContainer")?;
            let log = logs.join("workload.log");
            let seconds = until_ready(&mut runtime, &container, &log, w.ready, start).await?;
            anyhow::Ok(Sample {
                seconds,
                needed_bytes: None,
            })
        }
        .await;
        // Stopping the sandbox stops the container too; containerd's own clean-up (its root is
        // removed with the run's directory) takes what is left.
        let _ = runtime
            .stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            })
            .await;
        let _ = runtime
            .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: pod,
            })
            .await;
        timed
    })
}

/// A pod on the node's network (no CNI here), logging under `logs`.
fn sandbox_config(logs: &Path) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: "coldstart".into(),
            uid: format!("coldstart-{}", std::process::id()),
            namespace: "bench".into(),
            attempt: 0,
        }),
        log_directory: logs.to_string_lossy().into_owned(),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    network: cri::NamespaceMode::Node as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Polls the CRI log `log` (lines `TIMESTAMP STREAM TAG content`) until a line's content holds
/// `ready`; the seconds from `start` to when it was seen (polled every 2 ms). A container that
/// has exited without it (asked every 100 ms) fails the run.
async fn until_ready(
    runtime: &mut cri::runtime_service_client::RuntimeServiceClient<Channel>,
    container: &str,
    log: &Path,
    ready: &str,
    start: Instant,
) -> Result<f64> {
    let limit = Duration::from_secs(600);
    let has_ready = |text: &str| {
        text.lines()
            .filter_map(|l| l.splitn(4, ' ').nth(3))
            .any(|l| l.contains(ready))
    };
    let mut polls = 0u64;
    // Set once its status says it exited: the next read of the log (its last lines may come
    // with its exit) is the last chance for the line.
    let mut exited = false;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if has_ready(&text) {
            return Ok(start.elapsed().as_secs_f64());
        }
        if exited {
            bail!("the container exited without {ready:?}:\n{text}");
        }
        if start.elapsed() > limit {
            bail!("no {ready:?} in {} after {limit:?}:\n{text}", log.display());
        }
        polls += 1;
        if polls % 50 == 0 {
            exited = runtime
                .container_status(cri::ContainerStatusRequest {
                    container_id: container.to_owned(),
                    verbose: false,
                })
                .await
                .context("ContainerStatus")?
                .into_inner()
                .status
                .is_some_and(|s| s.state == cri::ContainerState::ContainerExited as i32);
        }
        if !exited {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}
