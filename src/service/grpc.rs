//! containerd's snapshots gRPC API (`containerd.services.snapshots.v1.Snapshots`) over the
//! [`Snapshotter`], through the `containerd-snapshots` crate's server: only type conversions and
//! error codes live here.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use containerd_snapshots::api::types::Mount as GrpcMount;
use containerd_snapshots::tonic::Status;
use containerd_snapshots::{Info as GrpcInfo, Kind as GrpcKind, Usage as GrpcUsage};
use futures_util::stream;

use crate::snapshot::{Info, Kind, Mount, SnapshotError, Snapshotter};

/// The gRPC face of a [`Snapshotter`].
#[derive(Debug, Clone)]
pub struct Grpc {
    snapshotter: Arc<Snapshotter>,
}

impl Grpc {
    pub fn new(snapshotter: Arc<Snapshotter>) -> Self {
        Self { snapshotter }
    }
}

/// containerd turns these codes back into its `errdefs` errors: `ALREADY_EXISTS` from Prepare is
/// the remote handshake, `NOT_FOUND` and `FAILED_PRECONDITION` steer its GC.
impl From<SnapshotError> for Status {
    fn from(e: SnapshotError) -> Self {
        let message = e.to_string();
        match e {
            SnapshotError::NotFound(_) => Status::not_found(message),
            SnapshotError::AlreadyExists(_) => Status::already_exists(message),
            SnapshotError::FailedPrecondition(_) => Status::failed_precondition(message),
            SnapshotError::InvalidArgument(_) => Status::invalid_argument(message),
            SnapshotError::Db { .. } | SnapshotError::Io { .. } => {
                tracing::error!("{message}");
                Status::internal(message)
            }
        }
    }
}

/// Logs the outcome of a call inside its span, with the time it took since `start`
/// (`LAZYSNAP_LOG=lazysnap=debug` shows every call: where a pull's time goes, call by call).
fn traced<T>(start: Instant, result: Result<T, SnapshotError>) -> Result<T, SnapshotError> {
    let ms = start.elapsed().as_secs_f64() * 1e3;
    match &result {
        Ok(_) => tracing::debug!(ms, "ok"),
        Err(e) => tracing::debug!(ms, "{e}"),
    }
    result
}

fn to_grpc_info(info: Info) -> GrpcInfo {
    GrpcInfo {
        kind: match info.kind {
            Kind::View => GrpcKind::View,
            Kind::Active => GrpcKind::Active,
            Kind::Committed => GrpcKind::Committed,
        },
        name: info.name,
        parent: info.parent,
        labels: info.labels,
        created_at: info.created,
        updated_at: info.updated,
    }
}

fn from_grpc_info(info: GrpcInfo) -> Info {
    Info {
        kind: match info.kind {
            GrpcKind::View => Kind::View,
            GrpcKind::Committed => Kind::Committed,
            GrpcKind::Active | GrpcKind::Unknown => Kind::Active,
        },
        name: info.name,
        parent: info.parent,
        labels: info.labels,
        created: info.created_at,
        updated: info.updated_at,
    }
}

fn to_grpc_mounts(mounts: Vec<Mount>) -> Vec<GrpcMount> {
    mounts
        .into_iter()
        .map(|m| GrpcMount {
            r#type: m.kind,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

type InfoStream = stream::Iter<std::vec::IntoIter<Result<GrpcInfo, SnapshotError>>>;

#[containerd_snapshots::tonic::async_trait]
impl containerd_snapshots::Snapshotter for Grpc {
    type Error = SnapshotError;

    #[tracing::instrument(level = "debug", skip(self))]
    async fn stat(&self, key: String) -> Result<GrpcInfo, SnapshotError> {
        let start = Instant::now();
        traced(start, self.snapshotter.stat(&key)).map(to_grpc_info)
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn update(
        &self,
        info: GrpcInfo,
        fieldpaths: Option<Vec<String>>,
    ) -> Result<GrpcInfo, SnapshotError> {
        let start = Instant::now();
        traced(
            start,
            self.snapshotter
                .update(from_grpc_info(info), &fieldpaths.unwrap_or_default()),
        )
        .map(to_grpc_info)
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn usage(&self, key: String) -> Result<GrpcUsage, SnapshotError> {
        let snapshotter = self.snapshotter.clone();
        // Measuring walks the tree: off the async threads.
        let usage = tokio::task::spawn_blocking(move || snapshotter.usage(&key))
            .await
            .map_err(|e| SnapshotError::FailedPrecondition(format!("usage task failed: {e}")))??;
        Ok(GrpcUsage {
            inodes: usage.inodes,
            size: usage.size,
        })
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn mounts(&self, key: String) -> Result<Vec<GrpcMount>, SnapshotError> {
        let start = Instant::now();
        traced(start, self.snapshotter.mounts(&key).await).map(to_grpc_mounts)
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn prepare(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<GrpcMount>, SnapshotError> {
        let start = Instant::now();
        traced(start, self.snapshotter.prepare(&key, &parent, labels).await).map(to_grpc_mounts)
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn view(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<GrpcMount>, SnapshotError> {
        let start = Instant::now();
        traced(start, self.snapshotter.view(&key, &parent, labels).await).map(to_grpc_mounts)
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn commit(
        &self,
        name: String,
        key: String,
        labels: HashMap<String, String>,
    ) -> Result<(), SnapshotError> {
        let start = Instant::now();
        let snapshotter = self.snapshotter.clone();
        // Commit measures the tree: off the async threads.
        traced(
            start,
            tokio::task::spawn_blocking(move || snapshotter.commit(&name, &key, labels))
                .await
                .map_err(|e| SnapshotError::FailedPrecondition(format!("commit task failed: {e}")))
                .and_then(|r| r),
        )
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn remove(&self, key: String) -> Result<(), SnapshotError> {
        let start = Instant::now();
        traced(start, self.snapshotter.remove(&key).await)
    }

    async fn clear(&self) -> Result<(), SnapshotError> {
        self.snapshotter.cleanup()
    }

    type InfoStream = InfoStream;

    #[tracing::instrument(level = "debug", skip(self, _snapshotter))]
    async fn list(
        &self,
        _snapshotter: String,
        filters: Vec<String>,
    ) -> Result<InfoStream, SnapshotError> {
        let start = Instant::now();
        let infos = traced(start, self.snapshotter.walk(&filters))?;
        tracing::debug!(found = infos.len());
        Ok(stream::iter(
            infos
                .into_iter()
                .map(|i| Ok(to_grpc_info(i)))
                .collect::<Vec<_>>(),
        ))
    }
}
