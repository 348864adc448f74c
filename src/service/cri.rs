//! The CRI image service proxy: kubelet's `--image-service-endpoint` points here, every call is
//! forwarded to containerd's CRI plugin unchanged, and the credentials of each `PullImage` (the
//! pod's image pull secret) are handed to the layer host for that repository first.
//!
//! Why: containerd's CRI plugin resolves a private image with the pull secret kubelet sends, but
//! never passes it to a proxy snapshotter, so lazysnapd's own range requests for that image's
//! layers would get a 401 and every layer would fall back to a full download. Credentials are
//! kept in memory only, per `(registry, repository)`, for `[cri] credentials_ttl_secs`, and are
//! never logged (see `registry::secrets`).
//!
//! A PullImage also starts the layer host finding the image's lazy layers (`[cri] find_ahead`):
//! containerd resolves the image (HEAD, manifest, config, one after another) before its first
//! Prepare reaches lazysnapd, and those round trips are the layer host's to read the TOCs and
//! the start-up profile in. What is found ahead is checked as at a Prepare (see
//! `snapshot::locate`).
//!
//! The runtime service stays containerd's own (kubelet's `--container-runtime-endpoint`): only
//! image calls pass through here.

use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use base64::Engine as _;
use containerd_snapshots::tonic::transport::{Channel, Endpoint, Uri};
use containerd_snapshots::tonic::{self, Request, Response, Status};
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use prometheus::{IntCounterVec, Opts};

use crate::oci::Reference;
use crate::registry::{Credentials, PullSecret, PullSecrets};
use crate::snapshot::LayerHost;

/// Longest `auth` field (base64 of `user:password`) decoded.
const MAX_AUTH_BYTES: usize = 64 * 1024;

/// PullImage calls through the proxy, by whether credentials were kept (`kept`, `none`);
/// registered on first use, so only a process serving the proxy shows it.
static PULLS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    let pulls = IntCounterVec::new(
        Opts::new(
            "cri_pulls_total",
            "CRI PullImage calls through the proxy, by whether their credentials were kept.",
        )
        .namespace("lazysnap"),
        &["credentials"],
    )
    .expect("valid metric");
    if let Err(e) = crate::metrics::METRICS
        .registry
        .register(Box::new(pulls.clone()))
    {
        tracing::warn!("cannot register the CRI proxy's metric: {e}");
    }
    pulls
});

/// Forwards CRI image calls to containerd, keeping each pull's credentials on the way.
#[derive(Debug)]
pub struct ImageProxy {
    upstream: ImageServiceClient<Channel>,
    host: Arc<dyn LayerHost>,
    ttl: Duration,
    /// The credentials of each repository's last pull that containerd completed: what the layer
    /// host gets back when a later pull with other credentials fails, so that a pull with a wrong
    /// secret (another tenant's, say) does not break the lazy layers of those that work.
    succeeded: PullSecrets,
    /// Whether a PullImage starts the layer host finding the image's layers.
    find_ahead: bool,
}

impl ImageProxy {
    /// A proxy to containerd's CRI on `containerd` (dialled at the first call, so lazysnapd may
    /// start before containerd, as it must: containerd's config names lazysnapd's socket).
    pub fn new(containerd: &Path, host: Arc<dyn LayerHost>, ttl: Duration) -> Self {
        let socket: PathBuf = containerd.to_owned();
        // The URI is a placeholder: the connector dials the unix socket.
        let channel = Endpoint::from_static("http://[::]:50051").connect_with_connector_lazy(
            tower::service_fn(move |_: Uri| tokio::net::UnixStream::connect(socket.clone())),
        );
        Self {
            upstream: ImageServiceClient::new(channel),
            host,
            ttl,
            succeeded: PullSecrets::default(),
            find_ahead: true,
        }
    }

    /// Whether each PullImage starts the layer host finding the image's lazy layers (on by
    /// default).
    pub fn find_ahead(self, on: bool) -> Self {
        Self {
            find_ahead: on,
            ..self
        }
    }

    /// The gRPC service to add to a server.
    pub fn service(self) -> cri::image_service_server::ImageServiceServer<Self> {
        cri::image_service_server::ImageServiceServer::new(self)
    }

    fn upstream(&self) -> ImageServiceClient<Channel> {
        self.upstream.clone()
    }

    /// Has the layer host start finding `image`'s lazy layers (returns at once).
    async fn warm(&self, image: String) {
        if self.find_ahead && !image.is_empty() {
            self.host.warm_image(image).await;
        }
    }
}

/// The same call for containerd: kubelet's metadata (its deadline, `grpc-timeout`, among it)
/// and message, without the server-side extensions of our own connection.
fn forward<T>(request: Request<T>) -> Request<T> {
    let (metadata, _, message) = request.into_parts();
    Request::from_parts(metadata, tonic::Extensions::default(), message)
}

/// The pull secret of a `PullImage`, if it carries a user name and password (directly or as
/// docker's base64 `auth`). Identity and registry tokens are not used: lazysnapd's token flow
/// is the basic-credentials one.
pub(crate) fn secret_of(request: &cri::PullImageRequest, ttl: Duration) -> Option<PullSecret> {
    let image = request.image.as_ref()?.image.as_str();
    let auth = request.auth.as_ref()?;
    let credentials = if !auth.username.is_empty() {
        Credentials {
            username: auth.username.clone(),
            password: auth.password.clone(),
        }
    } else if !auth.auth.is_empty() && auth.auth.len() <= MAX_AUTH_BYTES {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.auth.trim())
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (username, password) = text.split_once(':')?;
        Credentials {
            username: username.to_owned(),
            password: password.to_owned(),
        }
    } else {
        if !auth.identity_token.is_empty() || !auth.registry_token.is_empty() {
            tracing::info!(
                image,
                "CRI pull carries only a token: not used for lazy layers (they may fall back)"
            );
        }
        return None;
    };
    let reference: Reference = image.parse().ok()?;
    Some(PullSecret {
        registry: reference.registry,
        repository: reference.repository,
        credentials,
        ttl_secs: ttl.as_secs(),
    })
}

#[tonic::async_trait]
impl cri::image_service_server::ImageService for ImageProxy {
    async fn list_images(
        &self,
        request: Request<cri::ListImagesRequest>,
    ) -> Result<Response<cri::ListImagesResponse>, Status> {
        self.upstream().list_images(forward(request)).await
    }

    async fn image_status(
        &self,
        request: Request<cri::ImageStatusRequest>,
    ) -> Result<Response<cri::ImageStatusResponse>, Status> {
        self.upstream().image_status(forward(request)).await
    }

    async fn pull_image(
        &self,
        request: Request<cri::PullImageRequest>,
    ) -> Result<Response<cri::PullImageResponse>, Status> {
        let image = request
            .get_ref()
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .unwrap_or_default();
        let Some(secret) = secret_of(request.get_ref(), self.ttl) else {
            PULLS.with_label_values(&["none"]).inc();
            self.warm(image).await;
            return self.upstream().pull_image(forward(request)).await;
        };
        tracing::info!(
            registry = secret.registry,
            repository = secret.repository,
            "CRI pull: keeping its credentials for the image's lazy layers"
        );
        PULLS.with_label_values(&["kept"]).inc();
        // Before containerd's pull: its Prepare calls look the layers up with them.
        self.host.remember_secret(secret.clone()).await;
        self.warm(image).await;
        let pulled = self.upstream().pull_image(forward(request)).await;
        if pulled.is_ok() {
            self.succeeded.remember(secret);
        } else if let Some(previous) = self
            .succeeded
            .secret(&secret.registry, &secret.repository)
            .filter(|p| p.credentials != secret.credentials)
        {
            tracing::info!(
                registry = secret.registry,
                repository = secret.repository,
                "CRI pull failed: the layer host keeps the credentials of the last pull that worked"
            );
            self.host.remember_secret(previous).await;
        }
        pulled
    }

    async fn remove_image(
        &self,
        request: Request<cri::RemoveImageRequest>,
    ) -> Result<Response<cri::RemoveImageResponse>, Status> {
        self.upstream().remove_image(forward(request)).await
    }

    async fn image_fs_info(
        &self,
        request: Request<cri::ImageFsInfoRequest>,
    ) -> Result<Response<cri::ImageFsInfoResponse>, Status> {
        self.upstream().image_fs_info(forward(request)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pull(image: &str, auth: cri::AuthConfig) -> cri::PullImageRequest {
        cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            auth: Some(auth),
            ..Default::default()
        }
    }

    const TTL: Duration = Duration::from_secs(60);

    #[test]
    fn a_user_name_and_password_are_kept_for_the_normalised_repository() {
        let secret = secret_of(
            &pull(
                "busybox:1",
                cri::AuthConfig {
                    username: "u".into(),
                    password: "p:w".into(),
                    ..Default::default()
                },
            ),
            TTL,
        )
        .unwrap();
        assert_eq!(secret.registry, "docker.io");
        assert_eq!(secret.repository, "library/busybox");
        assert_eq!(secret.credentials.username, "u");
        assert_eq!(secret.credentials.password, "p:w");
        assert_eq!(secret.ttl_secs, 60);
    }

    #[test]
    fn docker_auth_is_decoded_and_a_bad_one_or_a_token_gives_nothing() {
        let auth = base64::engine::general_purpose::STANDARD.encode("u:p:w");
        let secret = secret_of(
            &pull(
                "127.0.0.1:5000/team/app@sha256:0000000000000000000000000000000000000000000000000000000000000000",
                cri::AuthConfig {
                    auth,
                    ..Default::default()
                },
            ),
            TTL,
        )
        .unwrap();
        assert_eq!(
            (secret.registry.as_str(), secret.repository.as_str()),
            ("127.0.0.1:5000", "team/app")
        );
        assert_eq!(
            (
                secret.credentials.username.as_str(),
                secret.credentials.password.as_str()
            ),
            ("u", "p:w")
        );
        for auth in [
            cri::AuthConfig {
                auth: "not base64!".into(),
                ..Default::default()
            },
            cri::AuthConfig {
                auth: base64::engine::general_purpose::STANDARD.encode("no colon"),
                ..Default::default()
            },
            cri::AuthConfig {
                registry_token: "t".into(),
                ..Default::default()
            },
            cri::AuthConfig::default(),
        ] {
            assert_eq!(secret_of(&pull("r.example/app", auth), TTL), None);
        }
        let no_auth = cri::PullImageRequest {
            auth: None,
            ..pull("r.example/app", cri::AuthConfig::default())
        };
        assert_eq!(secret_of(&no_auth, TTL), None);
    }
}
