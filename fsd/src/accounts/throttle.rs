//! Failed-login throttling per address and per user (after libunftp's `failed_logins.rs`): after
//! `after` failures, each further attempt waits `base * 2^(n - after)`, at most `max`, before it
//! is answered. A success resets the user's count (not the address's, so that one good account
//! cannot be used to clear an address that guesses at others).
//!
//! Many connections at once must not multiply the guessing rate. So once an address or user has
//! a failure on record, attempts still being checked count as failures too (an attempt is
//! counted when it starts, [`Throttle::attempt`]; a success takes its count back), and
//! throttled attempts queue: each gets its own time slot after the previous one, so parallel
//! guesses are answered one growing delay apart, not all together after one delay. An attempt
//! whose slot is further away than `max` is refused after waiting `max`, without a check.
//! Without a failure on record nothing is delayed, however many logins run at once (fifty
//! clients of one address logging in together are not an attack); the first parallel burst of
//! guesses is therefore checked, and everything after its first failure is throttled.

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
    /// Failed attempts and attempts still being checked.
    count: u32,
    /// Whether a failure has been recorded (so that pending attempts count).
    failed: bool,
    last: Instant,
    /// When the next throttled attempt may be checked (a slot later attempts queue behind).
    next_slot: Instant,
}

/// What an attempt must do before it is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Wait this long (possibly zero), then check the password.
    CheckAfter(Duration),
    /// Too many attempts are queued already: wait this long, then deny without checking.
    DenyAfter(Duration),
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

    /// How long the next attempt from `addr` for `user` would wait (its own delay, ignoring
    /// attempts already queued).
    pub fn delay(&self, addr: IpAddr, user: &str) -> Duration {
        let maps = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.delay_for(failures(&maps, addr, user, Instant::now()))
    }

    fn delay_for(&self, failures: u32) -> Duration {
        if failures < self.after {
            return Duration::ZERO;
        }
        let exp = (failures - self.after).min(31);
        self.base.saturating_mul(1u32 << exp).min(self.max)
    }

    /// Starts an attempt from `addr` for `user`: counts it as a failure now (a success takes it
    /// back with [`Throttle::succeed`]) and says how long to wait before checking it.
    pub fn attempt(&self, addr: IpAddr, user: &str) -> Verdict {
        let mut maps = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let delay = self.delay_for(failures(&maps, addr, user, now));
        let queued = |f: Option<&Failures>| f.map_or(now, |f| f.next_slot.max(now));
        let start = queued(maps.by_addr.get(&addr)).max(queued(maps.by_user.get(user)));
        let slot = start + delay;
        let wait = slot - now;
        if wait > self.max {
            // Counted, but takes no slot: a flood of attempts waits `max` each and is refused.
            bump(&mut maps.by_addr, addr, now, None);
            bump(&mut maps.by_user, user.to_string(), now, None);
            return Verdict::DenyAfter(self.max);
        }
        let slot = (!delay.is_zero()).then_some(slot);
        bump(&mut maps.by_addr, addr, now, slot);
        bump(&mut maps.by_user, user.to_string(), now, slot);
        Verdict::CheckAfter(wait)
    }

    /// Records the failure of an attempt started with [`Throttle::attempt`] (already counted).
    pub fn fail(&self, addr: IpAddr, user: &str) {
        let mut maps = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let Maps { by_addr, by_user } = &mut *maps;
        for f in by_addr.get_mut(&addr).into_iter().chain(by_user.get_mut(user)) {
            f.failed = true;
            f.last = now;
        }
    }

    /// Records a success of an attempt started with [`Throttle::attempt`]: the user's failures
    /// are forgotten, and the address's count loses the one this attempt added.
    pub fn succeed(&self, addr: IpAddr, user: &str) {
        let mut maps = self.state.lock().unwrap_or_else(|p| p.into_inner());
        maps.by_user.remove(user);
        if let Some(f) = maps.by_addr.get_mut(&addr) {
            f.count = f.count.saturating_sub(1);
        }
    }
}

/// The failures that count for `addr` and `user` now: the larger of the two recent counts, each
/// counting its pending attempts only once it has a failure on record.
fn failures(maps: &Maps, addr: IpAddr, user: &str, now: Instant) -> u32 {
    let count = |f: Option<&Failures>| {
        f.filter(|f| f.failed && now.duration_since(f.last) < FORGET_AFTER).map_or(0, |f| f.count)
    };
    count(maps.by_addr.get(&addr)).max(count(maps.by_user.get(user)))
}

fn bump<K: Hash + Eq + Clone>(map: &mut HashMap<K, Failures>, key: K, now: Instant, slot: Option<Instant>) {
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
    let f = map.entry(key).or_insert(Failures { count: 0, failed: false, last: now, next_slot: now });
    if now.duration_since(f.last) >= FORGET_AFTER {
        f.count = 0;
        f.failed = false;
    }
    f.count = f.count.saturating_add(1);
    f.last = now;
    if let Some(slot) = slot {
        f.next_slot = f.next_slot.max(slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attempts that all fail, one after another (each waits out its verdict first).
    fn fail(t: &Throttle, addr: IpAddr, user: &str) {
        t.attempt(addr, user);
        t.fail(addr, user);
        let mut guard = t.state.lock().unwrap();
        let maps = &mut *guard;
        // Pretend the wait passed: later calls are not queued behind this one.
        for f in maps.by_addr.values_mut().chain(maps.by_user.values_mut()) {
            f.next_slot = Instant::now();
        }
    }

    #[test]
    fn delays_grow_after_the_threshold_and_are_capped() {
        let t = Throttle::new(3, Duration::from_millis(500), Duration::from_secs(30));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(t.delay(a, "alice"), Duration::ZERO);
            fail(&t, a, "alice");
        }
        assert_eq!(t.delay(a, "alice"), Duration::from_millis(500));
        // The user is throttled from another address too, and the address for another user.
        assert_eq!(t.delay(b, "alice"), Duration::from_millis(500));
        assert_eq!(t.delay(a, "bob"), Duration::from_millis(500));
        fail(&t, a, "alice");
        assert_eq!(t.delay(a, "alice"), Duration::from_secs(1));
        for _ in 0..40 {
            fail(&t, a, "alice");
        }
        assert_eq!(t.delay(a, "alice"), Duration::from_secs(30));
        t.attempt(b, "alice");
        t.succeed(b, "alice");
        assert_eq!(t.delay(b, "alice"), Duration::ZERO);
        assert_eq!(t.delay(a, "alice"), Duration::from_secs(30), "the address keeps its count");
    }

    #[test]
    fn successes_do_not_count_against_an_address() {
        let t = Throttle::new(2, Duration::from_millis(500), Duration::from_secs(30));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        for i in 0..10 {
            assert_eq!(t.attempt(a, &format!("user{i}")), Verdict::CheckAfter(Duration::ZERO));
            t.succeed(a, &format!("user{i}"));
        }
        assert_eq!(t.delay(a, "anyone"), Duration::ZERO);
    }

    /// Attempts started together (one per connection) do not all get the first delay: they are
    /// counted as they start and queue one delay after another, and past `max` are refused.
    #[test]
    fn parallel_attempts_queue_instead_of_multiplying_the_rate() {
        let base = Duration::from_millis(500);
        let max = Duration::from_secs(4);
        let t = Throttle::new(1, base, max);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        // Without a failure on record, parallel attempts are not delayed.
        let free: Vec<Verdict> = (0..8).map(|i| t.attempt(a, &format!("ok{i}"))).collect();
        assert!(free.iter().all(|v| *v == Verdict::CheckAfter(Duration::ZERO)), "{free:?}");
        for i in 0..8 {
            t.succeed(a, &format!("ok{i}"));
        }
        // One failure on record: the next parallel attempts count each other.
        assert_eq!(t.attempt(a, "u"), Verdict::CheckAfter(Duration::ZERO));
        t.fail(a, "u");
        let mut verdicts = vec![Verdict::CheckAfter(Duration::ZERO)];
        verdicts.extend((0..7).map(|i| t.attempt(a, &format!("u{i}"))));
        let waits: Vec<Duration> = verdicts[1..]
            .iter()
            .map_while(|v| match v {
                Verdict::CheckAfter(w) => Some(*w),
                Verdict::DenyAfter(_) => None,
            })
            .collect();
        // 500 ms, then 500 + 1000, then 1500 + 2000: each waits behind the one before.
        let near = |w: Duration, ms: u64| w.abs_diff(Duration::from_millis(ms)) < Duration::from_millis(50);
        assert!(waits.len() == 3 && near(waits[0], 500) && near(waits[1], 1500) && near(waits[2], 3500), "{waits:?}");
        for v in &verdicts[4..] {
            assert_eq!(*v, Verdict::DenyAfter(max), "an attempt queued past max is refused");
        }
    }
}
