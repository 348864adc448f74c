//! lazysnap: start containers before their image has been downloaded.
//!
//! The modules follow the data's path from the registry to the container (see `docs/architecture.md`):
//! `oci` (names and documents) → `registry` (the distribution API) → `format` (lazy layer layouts)
//! → `convert` (the build path that writes them).
pub mod convert;
pub mod format;
pub mod inspect;
pub mod oci;
pub mod registry;
