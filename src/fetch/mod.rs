//! TODO fetch
