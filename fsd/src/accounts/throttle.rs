//! Failed-login throttling per address and per user (after libunftp's `failed_logins.rs`): after
//! `after` failures, each further attempt waits `base * 2^(n - after)`, at most `max`, before it
//! is answered. A success resets the user's count (not the address's, so that one good account
//! cannot be used to clear an address that guesses at others).

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How many addresses and user names are tracked at most; past this, the entries that have been
/// quiet longest are dropped, so a flood of names cannot grow memory without bound.
const MAX_TRACKED: usize = 65536;

/// Failures are forgotten after this long without a new one.
const FORGET_AFTER: Duration = Duration::from_secs(3600);

#[derive(Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
}

/// Failure counts per address and per user.
pub struct Throttle {
    after: u32,
    base: Duration,
    max: Duration,
    /// Guards both maps; held only for map operations, never across an await.
    state: Mutex<Maps>,
}

#[derive(Default)]
struct Maps {
    by_addr: HashMap<IpAddr, Failures>,
    by_user: HashMap<String, Failures>,
}

impl Throttle {
    /// A throttle that starts delaying after `after` failures.
    pub fn new(after: u32, base: Duration, max: Duration) -> Throttle {
        Throttle { after, base, max, state: Mutex::new(Maps::default()) }
    }

    /// How long an attempt from `addr` for `user` waits before it is answered.
    pub fn delay(&self, addr: IpAddr, user: &str) -> Duration {
        let maps = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let count = |f: Option<&Failures>| f.filter(|f| f.last.elapsed() < FORGET_AFTER).map_or(0, |f| f.count);
        let n = count(maps.by_addr.get(&addr)).max(count(maps.by_user.get(user)));
        self.delay_for(n)
    }

    fn delay_for(&self, failures: u32) -> Duration {
        if failures < self.after {
            return Duration::ZERO;
        }
        let exp = (failures - self.after).min(31);
        self.base.saturating_mul(1u32 << exp).min(self.max)
    }

    /// Records a failed attempt.
    pub fn fail(&self, addr: IpAddr, user: &str) {
        let mut maps = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        bump(&mut maps.by_addr, addr, now);
        bump(&mut maps.by_user, user.to_string(), now);
    }

    /// Records a success: the user's failures are forgotten.
    pub fn succeed(&self, user: &str) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).by_user.remove(user);
    }
}

fn bump<K: Hash + Eq + Clone>(map: &mut HashMap<K, Failures>, key: K, now: Instant) {
    if map.len() >= MAX_TRACKED && !map.contains_key(&key) {
        map.retain(|_, f| now.duration_since(f.last) < FORGET_AFTER);
        if map.len() >= MAX_TRACKED {
            // Still full of recent failures: drop the older half.
            let mut lasts: Vec<Instant> = map.values().map(|f| f.last).collect();
            lasts.sort_unstable();
            let cut = lasts[lasts.len() / 2];
            map.retain(|_, f| f.last > cut);
        }
    }
    let f = map.entry(key).or_insert(Failures { count: 0, last: now });
    if now.duration_since(f.last) >= FORGET_AFTER {
        f.count = 0;
    }
    f.count = f.count.saturating_add(1);
    f.last = now;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_after_the_threshold_and_are_capped() {
        let t = Throttle::new(3, Duration::from_millis(500), Duration::from_secs(30));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(t.delay(a, "alice"), Duration::ZERO);
            t.fail(a, "alice");
        }
        assert_eq!(t.delay(a, "alice"), Duration::from_millis(500));
        // The user is throttled from another address too, and the address for another user.
        assert_eq!(t.delay(b, "alice"), Duration::from_millis(500));
        assert_eq!(t.delay(a, "bob"), Duration::from_millis(500));
        t.fail(a, "alice");
        assert_eq!(t.delay(a, "alice"), Duration::from_secs(1));
        for _ in 0..40 {
            t.fail(a, "alice");
        }
        assert_eq!(t.delay(a, "alice"), Duration::from_secs(30));
        t.succeed("alice");
        assert_eq!(t.delay(b, "alice"), Duration::ZERO);
        assert_eq!(t.delay(a, "alice"), Duration::from_secs(30), "the address keeps its count");
    }
}
