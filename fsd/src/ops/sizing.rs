//! The size-changing section shared by Write, truncate (Open with `truncate`, SetAttr size) and
//! CopyRange: under the user's size lock, look at the file, charge the growth (or refuse with
//! `QuotaExceeded` before any byte is written), change the file, settle on its real new size.

use rustix::fs::{FileType, Stat};
use std::os::fd::BorrowedFd;
use std::sync::Arc;

use super::OpError;
use crate::home::{QuotaError, QuotaLedger, Reservation};

/// The apparent size in a `Stat` (never negative on Linux).
pub fn size_of(st: &Stat) -> u64 {
    u64::try_from(st.st_size).unwrap_or(0)
}

/// Changes the size of the open file `fd` within the quota. `target(old)` is the size the file
/// will have if `change(old)` succeeds; growth to it is charged first. Returns `change`'s result
/// and the file's attributes afterwards. Whatever `change` did, even when it failed half-way, the
/// ledger settles on the size the file really has.
///
/// An open file whose last link is gone no longer counts (a scan would not find it) but still
/// takes disk space: it may only grow to a size the quota still has free.
///
/// # Errors
/// [`OpError::Quota`] before anything is changed, or `change`'s error.
pub fn change_size<T>(
    quota: &Arc<dyn QuotaLedger>,
    fd: BorrowedFd<'_>,
    target: impl FnOnce(u64) -> u64,
    change: impl FnOnce(u64) -> Result<T, OpError>,
) -> Result<(T, Stat), OpError> {
    let _sizing = quota.size_lock();
    let before = rustix::fs::fstat(fd)?;
    let old = size_of(&before);
    let regular = FileType::from_raw_mode(before.st_mode) == FileType::RegularFile;
    let counted = regular && before.st_nlink > 0;
    let new_end = target(old);
    let reservation = if counted {
        Some(Reservation::new(quota, new_end.saturating_sub(old))?)
    } else {
        if regular && new_end > old {
            let free = quota.limit().saturating_sub(quota.used());
            if new_end > free {
                return Err(QuotaError::Exceeded { needed: new_end, free }.into());
            }
        }
        None
    };
    let result = change(old);
    let after = rustix::fs::fstat(fd)?;
    let new = size_of(&after);
    if let Some(reservation) = reservation {
        if new >= old {
            reservation.settle(new - old);
        } else {
            drop(reservation);
            quota.release(old - new);
        }
    }
    result.map(|t| (t, after))
}
