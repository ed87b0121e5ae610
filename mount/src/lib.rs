//! The homefs clients' library, in three wings: `client` (the connection both binaries share),
//! `fuse` (netmount) and `copy` (netcp).
#![forbid(unsafe_code)]

pub mod client;
pub mod copy;
pub mod fuse;
