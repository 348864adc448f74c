//! lazysnap: start containers before their image has been downloaded.
//!
//! The modules follow the data's path from the registry to the container (see `docs/architecture.md`):
//! `oci` (names and documents) → `registry` (the distribution API) → `format` (lazy layer layouts)
//! → `convert` (the build path that writes them); `cache`, `fetch`, `fs` and `mount` serve an image
//! lazily; `snapshot` and `service` make the node service `lazysnapd`, a containerd remote
//! snapshotter; `run` starts a container on a lazily mounted image.
pub mod cache;
pub mod convert;
pub mod elf;
pub mod fetch;
pub mod format;
pub mod fs;
pub mod inspect;
pub mod metrics;
pub mod mount;
pub mod oci;
pub mod profile;
pub mod registry;
pub mod run;
pub mod service;
pub mod snapshot;
