//! The jail: the only code that turns a `WirePath` into a file descriptor. OWNED BY: fsd-ops.

/// A user's home as a directory capability.
pub struct Jail {
    _private: (),
}
