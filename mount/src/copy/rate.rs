//! `--bwlimit`: netcp's bandwidth limit, as rsync's `--bwlimit` and scp's `-l`. One limit for the
//! whole process (all files and jobs share it), paced before each request's bytes go out or are
//! asked for: a token bucket holding one second's worth, so no second carries much more than
//! the limit. Written here because it is a dozen lines over `tokio::time`; the rate-limiting
//! crates (governor, ...) count cells of a fixed size, not bytes.

use std::sync::{Mutex, OnceLock};
use std::time::Duration;
use tokio::time::Instant;

/// The process's limit, once set.
static LIMIT: OnceLock<Limiter> = OnceLock::new();

/// Bytes that may go at once after an idle spell: one second's worth.
const BURST: Duration = Duration::from_secs(1);

/// A token bucket over bytes.
struct Limiter {
    bytes_per_sec: u64,
    /// When the bytes asked for so far are paid for at the limit.
    paid_until: Mutex<Instant>,
}

impl Limiter {
    fn new(bytes_per_sec: u64) -> Limiter {
        Limiter { bytes_per_sec, paid_until: Mutex::new(Instant::now()) }
    }

    async fn pace(&self, bytes: usize) {
        let wait_until = {
            let mut paid = self.paid_until.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            // Time spent idle earns at most the burst.
            let start = (*paid).max(now.checked_sub(BURST).unwrap_or(now));
            *paid = start + Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec as f64);
            (*paid).checked_sub(BURST).unwrap_or(now)
        };
        tokio::time::sleep_until(wait_until).await;
    }
}

/// Sets the process's limit in bytes per second (0: none). Only the first call counts.
pub fn set_limit(bytes_per_sec: u64) {
    if bytes_per_sec > 0 {
        let _ = LIMIT.set(Limiter::new(bytes_per_sec));
    }
}

/// Waits until `bytes` more may go without passing the limit (at once when there is none).
pub async fn pace(bytes: usize) {
    if let Some(l) = LIMIT.get() {
        l.pace(bytes).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 16 MiB at 8 MiB/s: the first second's worth goes at once, the rest takes a second more.
    #[tokio::test]
    async fn paces_to_the_limit_after_the_burst() {
        let l = Limiter::new(8 << 20);
        let t0 = Instant::now();
        for _ in 0..32 {
            l.pace(256 << 10).await;
        }
        for _ in 0..32 {
            l.pace(256 << 10).await;
        }
        let took = t0.elapsed();
        assert!(took >= Duration::from_millis(990), "8 MiB more at 8 MiB/s took only {took:?}");
    }
}
