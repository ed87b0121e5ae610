//! Quota: the seam a cluster replaces. OWNED BY: fsd-ops.

/// Usage against a limit for one user.
pub trait QuotaLedger: Send + Sync {}

/// Reserved bytes; refunds what is not used on drop.
pub struct Reservation {
    _private: (),
}
