//! The build path: turn an OCI image into a lazily loadable one and push it.
