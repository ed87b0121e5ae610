//! Quota: how much a user may store and how much they use. [`QuotaLedger`] is the seam a cluster of
//! fsd nodes replaces (with the shared file system's own quotas); [`LocalLedger`] is the in-process
//! ledger of one server; [`Reservation`] holds bytes charged ahead of a write and refunds on drop
//! what the write did not use.
//!
//! Usage is the sum of the apparent sizes of the user's regular files and symlinks, each inode once
//! (hard links count once). Directories are not counted: their size is the file system's own
//! bookkeeping, it changes with every entry in ways no operation can predict, and counting it would
//! make the ledger drift from a fresh scan.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};

/// Why bytes cannot be charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QuotaError {
    /// The charge would take usage past the limit; nothing was charged.
    #[error("needs {}, {} free", HumanBytes(*needed), HumanBytes(*free))]
    Exceeded { needed: u64, free: u64 },
}

/// Usage against a limit for one user, shared by all of the user's sessions.
///
/// Callers change a file's size inside [`QuotaLedger::size_lock`] in this order: look at the
/// file's size, charge the growth (which may fail), change the file, settle on the real new size.
/// Holding the lock across those steps is what keeps concurrent writers of one user on several
/// connections from overshooting together, and keeps the ledger exact.
pub trait QuotaLedger: Send + Sync {
    /// The limit in bytes.
    fn limit(&self) -> u64;
    /// Bytes in use, including outstanding reservations.
    fn used(&self) -> u64;
    /// Changes the limit (a reloaded users file). Usage over a lowered limit stays; only growth fails.
    fn set_limit(&self, limit: u64);
    /// Charges `bytes` if they fit under the limit; all or nothing.
    ///
    /// # Errors
    /// [`QuotaError::Exceeded`] when they do not fit; nothing is charged.
    fn try_charge(&self, bytes: u64) -> Result<(), QuotaError>;
    /// Records growth that already happened (it cannot be refused any more).
    fn charge(&self, bytes: u64);
    /// Records bytes freed (saturating at zero).
    fn release(&self, bytes: u64);
    /// Serialises the size-changing part of operations of this user. Hold it only on a blocking
    /// thread, never across an `.await`.
    fn size_lock(&self) -> MutexGuard<'_, ()>;
    /// [`QuotaLedger::size_lock`] if nobody holds it now; `None` otherwise (without waiting).
    fn try_size_lock(&self) -> Option<MutexGuard<'_, ()>>;
}

/// Limit and usage of one user, kept in this process.
#[derive(Debug, Default)]
pub struct LocalLedger {
    /// Guards `limit` and `used`; held for a few instructions at a time.
    usage: Mutex<Usage>,
    /// Held across fstat, charge, the write or truncate, and settle (see [`QuotaLedger`]).
    sizing: Mutex<()>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    limit: u64,
    used: u64,
}

impl LocalLedger {
    /// A ledger with `limit` and the `used` bytes a scan found.
    pub fn new(limit: u64, used: u64) -> LocalLedger {
        LocalLedger { usage: Mutex::new(Usage { limit, used }), sizing: Mutex::new(()) }
    }

    fn usage(&self) -> MutexGuard<'_, Usage> {
        // A panic while holding this lock cannot leave `Usage` half-updated (each section is one
        // assignment), so a poisoned lock is still consistent.
        self.usage.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl QuotaLedger for LocalLedger {
    fn limit(&self) -> u64 {
        self.usage().limit
    }

    fn used(&self) -> u64 {
        self.usage().used
    }

    fn set_limit(&self, limit: u64) {
        self.usage().limit = limit;
    }

    fn try_charge(&self, bytes: u64) -> Result<(), QuotaError> {
        let mut u = self.usage();
        let free = u.limit.saturating_sub(u.used);
        if bytes > free {
            return Err(QuotaError::Exceeded { needed: bytes, free });
        }
        u.used += bytes;
        Ok(())
    }

    fn charge(&self, bytes: u64) {
        let mut u = self.usage();
        u.used = u.used.saturating_add(bytes);
    }

    fn release(&self, bytes: u64) {
        let mut u = self.usage();
        u.used = u.used.saturating_sub(bytes);
    }

    fn size_lock(&self) -> MutexGuard<'_, ()> {
        // The guarded value is `()`: a panic under the lock leaves nothing inconsistent in it.
        self.sizing.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn try_size_lock(&self) -> Option<MutexGuard<'_, ()>> {
        match self.sizing.try_lock() {
            Ok(guard) => Some(guard),
            Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }
}

/// Bytes charged ahead of a write. Dropping it refunds whatever was not settled.
#[must_use = "dropping a reservation refunds it at once"]
pub struct Reservation {
    ledger: Arc<dyn QuotaLedger>,
    /// Charged and not yet used.
    left: u64,
}

impl Reservation {
    /// Charges `bytes` to `ledger`.
    ///
    /// # Errors
    /// [`QuotaError::Exceeded`] when they do not fit.
    pub fn new(ledger: &Arc<dyn QuotaLedger>, bytes: u64) -> Result<Reservation, QuotaError> {
        ledger.try_charge(bytes)?;
        Ok(Reservation { ledger: Arc::clone(ledger), left: bytes })
    }

    /// Bytes charged and not yet used.
    pub fn left(&self) -> u64 {
        self.left
    }

    /// Records that `grown` bytes were really used; growth past the reservation (which the size
    /// lock should prevent) is charged anyway so the ledger matches the disk. The rest is refunded.
    pub fn settle(mut self, grown: u64) {
        if grown > self.left {
            self.ledger.charge(grown - self.left);
            self.left = 0;
        } else {
            self.left -= grown;
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.left > 0 {
            self.ledger.release(self.left);
        }
    }
}

/// Bytes for people: "3.0 MiB", "512 B".
pub struct HumanBytes(pub u64);

impl fmt::Display for HumanBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
        if self.0 < 1024 {
            return write!(f, "{} B", self.0);
        }
        let mut value = self.0 as f64 / 1024.0;
        let mut unit = 0;
        while value >= 1024.0 && unit + 1 < UNITS.len() {
            value /= 1024.0;
            unit += 1;
        }
        write!(f, "{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger(limit: u64, used: u64) -> Arc<dyn QuotaLedger> {
        Arc::new(LocalLedger::new(limit, used))
    }

    #[test]
    fn charges_up_to_the_limit_exactly() {
        let l = ledger(100, 90);
        assert_eq!(l.try_charge(11), Err(QuotaError::Exceeded { needed: 11, free: 10 }));
        assert_eq!(l.used(), 90);
        l.try_charge(10).expect("exactly at the limit fits");
        assert_eq!(l.used(), 100);
        assert!(l.try_charge(1).is_err());
        l.release(200);
        assert_eq!(l.used(), 0, "release saturates");
    }

    #[test]
    fn reservation_refunds_what_was_not_used() {
        let l = ledger(100, 0);
        let r = Reservation::new(&l, 60).expect("fits");
        assert_eq!(l.used(), 60);
        assert!(Reservation::new(&l, 41).is_err(), "reserved bytes are in use");
        r.settle(25);
        assert_eq!(l.used(), 25);
        drop(Reservation::new(&l, 75).expect("fits"));
        assert_eq!(l.used(), 25, "an unsettled reservation is refunded on drop");
        Reservation::new(&l, 5).expect("fits").settle(9);
        assert_eq!(l.used(), 34, "growth past the reservation is still recorded");
    }

    #[test]
    fn set_limit_applies_live() {
        let l = ledger(10, 8);
        l.set_limit(5);
        assert_eq!(l.try_charge(1), Err(QuotaError::Exceeded { needed: 1, free: 0 }));
        l.set_limit(20);
        l.try_charge(12).expect("fits under the raised limit");
    }

    #[test]
    fn message_names_needed_and_free() {
        let e = QuotaError::Exceeded { needed: 10 << 20, free: 3 << 20 };
        assert_eq!(e.to_string(), "needs 10.0 MiB, 3.0 MiB free");
        assert_eq!(HumanBytes(512).to_string(), "512 B");
    }
}
