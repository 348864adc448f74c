//! Helpers shared by the integration tests: real parts started on loopback with their own temp
//! dirs, torn down in `Drop`.
#![allow(dead_code)]

pub mod image;
pub mod registry;
pub mod tree;
