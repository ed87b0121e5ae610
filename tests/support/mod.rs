//! Helpers for the end-to-end tests: servers, mounts and netcp runs. The test files read as scenarios.

pub mod mount;
pub mod netcp;
pub mod server;

pub use server::{binary, is_root, password, ServerOptions, TestServer};

use homefs_shared::WirePath;

/// A wire path from the bytes a test spells out.
///
/// # Panics
/// When the path breaks the wire limits (use `WirePath::new` to test those).
pub fn wp(p: impl AsRef<[u8]>) -> WirePath {
    WirePath::new(p.as_ref().to_vec()).expect("a valid test path")
}

/// BLAKE3 of `data`, as tests compare content.
pub fn hash(data: &[u8]) -> [u8; 32] {
    *blake3::hash(data).as_bytes()
}
