//! fsd: the homefs server. `serve` runs the accept loop on a listener that is already bound, so
//! the binary passes the real one and tests pass one bound to port 0.
#![deny(unsafe_code)]

pub mod home;
pub mod ops;
