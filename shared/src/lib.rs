//! The homefs wire protocol, shared by the server (`fsd`) and the clients (`netmount`, `netcp`).
//!
//! - [`frame`]: length-prefixed frames, checked against a maximum before anything is allocated.
//! - [`message`]: the request and response headers (postcard), with file data after them as raw bytes.
//! - [`path`]: [`WirePath`], a path relative to the user's home, as bytes.
//! - [`error`]: [`ErrorCode`], the one table that maps wire codes, errno and `io::Error`.
//! - [`size`]: [`size::ByteSize`], sizes written with binary units (`500M`, `20G`).
//! - [`tls`]: rustls configurations and certificate fingerprints for pinning on first use.
//!
//! `PROTOCOL.md` beside this crate's `src/` documents the format for writers of other clients.
#![forbid(unsafe_code)]

pub mod error;
pub mod frame;
pub mod message;
pub mod path;
pub mod size;
pub mod sync_cost;
pub mod tls;

pub use error::{ErrorCode, WireError};
pub use frame::{Frame, FrameError};
pub use message::*;
pub use path::{PathError, WirePath};

/// The version of the protocol this build speaks. Both ends send it in `Hello`; a mismatch is
/// refused with an error naming both versions. Bump it on any incompatible change of a message.
pub const PROTOCOL_VERSION: u32 = 1;

/// The largest amount of file data one `Read` or `Write` carries (4 MiB). The mount uses 1 MiB
/// requests (the kernel's `max_write`), netcp uses larger ones.
pub const MAX_DATA_BYTES: u32 = 4 << 20;

/// Room for a header beside the largest data: a readdir page is also kept under this.
pub const MAX_HEADER_BYTES: u32 = 256 << 10;

/// The default and hard upper bound of a frame: the largest data plus the largest header.
/// A peer that announces a longer frame is disconnected before anything is allocated.
pub const MAX_FRAME_BYTES: u32 = MAX_DATA_BYTES + MAX_HEADER_BYTES;

/// The default TCP port of fsd.
pub const DEFAULT_PORT: u16 = 7373;
