//! Remove: many unlinks and rmdirs in one request (`Request::Remove`), run in order, each exactly
//! as its own request runs ([`link::unlink`], [`dir::rmdir`]: the quota frees what disappears,
//! under the user's size lock, item by item).
//!
//! Where it runs follows `inline.rs`: the items go on the runtime thread while a [`Slot`] is free,
//! at most [`INLINE_CHUNK`] per slot taken (then the thread is given back to the runtime for a
//! moment), so one batch holds a runtime thread no longer than a few dozen single requests would.
//! An unlink that would free a large file ([`Place::declines`]), or that finds the user's size lock
//! held (`OpError::Busy`: inline work never waits for it), sends that item and the rest of its
//! chunk to the blocking pool, in order; so does a chunk that finds no slot free.
//!
//! One item's failure is its own: the items after it still run. The client sends the unlinks it
//! answered behind, which are independent of each other (stopping at one would fail the others
//! for no reason), and an rmdir after them: when one of the directory's unlinks failed, the rmdir
//! fails on its own (`NotEmpty`), which is the answer the caller must get.

use homefs_shared::{ErrorCode, RemoveItem, RemoveKind, MAX_BATCH_FILES};
use std::sync::Arc;

use super::inline::{run_inline, Place, Slot};
use super::whole::BatchResults;
use super::{dir, link, OpError};
use crate::home::{Jail, QuotaLedger};

/// The most items run inline per slot taken: ~25-40 us each here (an unlink on ext4 with its
/// path resolution), so a runtime thread is held for about 2 ms at most before it yields.
pub const INLINE_CHUNK: usize = 64;

/// One item where `place` says; `None` when it declined (nothing done: do it on the pool).
fn remove_one(
    jail: &Jail,
    quota: &Arc<dyn QuotaLedger>,
    item: &RemoveItem,
    place: Place,
) -> Option<Result<(), OpError>> {
    match item.kind {
        RemoveKind::File => match link::unlink(jail, quota, &item.path, place) {
            Ok(Some(())) => Some(Ok(())),
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        },
        RemoveKind::Dir => Some(dir::rmdir(jail, &item.path)),
    }
}

/// Removes each of `items` in order (see the module doc); returns one result per item.
///
/// # Errors
/// For the whole batch: `TooBig` for more than [`MAX_BATCH_FILES`] items, `Io` when the pool's
/// thread panicked.
pub async fn remove(
    jail: &Jail,
    quota: &Arc<dyn QuotaLedger>,
    items: Vec<RemoveItem>,
) -> Result<BatchResults<()>, OpError> {
    if items.len() > MAX_BATCH_FILES {
        return Err(ErrorCode::TooBig.into());
    }
    let items = Arc::new(items);
    let mut results: BatchResults<()> = Vec::with_capacity(items.len());
    while results.len() < items.len() {
        let end = (results.len() + INLINE_CHUNK).min(items.len());
        if let Some(_slot) = Slot::try_take() {
            while results.len() < end {
                match run_inline(|| remove_one(jail, quota, &items[results.len()], Place::Inline)) {
                    // The user's size lock is held (by a write on the pool): not waited for here.
                    None | Some(Err(OpError::Busy)) => break,
                    Some(r) => results.push(r),
                }
            }
        }
        if results.len() < end {
            let (from, q, all) = (results.len(), Arc::clone(quota), Arc::clone(&items));
            let rest = jail
                .run(move |j| {
                    let done = all[from..end]
                        .iter()
                        .map(|item| remove_one(j, &q, item, Place::Pool).unwrap_or_else(|| Err(ErrorCode::Io.into())));
                    Ok::<_, OpError>(done.collect::<BatchResults<()>>())
                })
                .await?;
            results.extend(rest);
        }
        if results.len() < items.len() {
            // Let the runtime thread serve others between chunks.
            tokio::task::yield_now().await;
        }
    }
    Ok(results)
}
