//! The server-wide lock table: byte-range (`fcntl`) and whole-file (`flock`) locks, keyed by the
//! file's identity, so that locks taken through one connection hold against every other.

/// All locks held on this server. OWNED BY: the fsd-ops work.
#[derive(Default)]
pub struct LockTable {
    _private: (),
}
