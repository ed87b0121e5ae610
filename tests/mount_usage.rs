//! What `df` shows through a mount, and what it costs: `statfs` answered from netmount's last
//! usage figures while nothing moved them (no round trip: `df` again, `find`'s `fstatfs`), and
//! the new figures right after a change made through this mount or through another.

use homefs_tests::mount::{delta, fuse_available, wait_until, Counts, LoggedMount, TestMount, PASSWORD};
use homefs_tests::TestServer;
use std::time::Duration;

/// The quota of these tests: 16 MiB, a whole number of 4 KiB blocks, so `df` shows bytes exactly.
const QUOTA: u64 = 16 << 20;

/// A server with alice (quota [`QUOTA`]) and a logged mount of her home; `None` (the test skips,
/// saying why) without FUSE.
fn logged_alice(name: &str) -> Option<(TestServer, LoggedMount)> {
    if !fuse_available(name) {
        return None;
    }
    let server = TestServer::start(name);
    server.add_user("alice", PASSWORD, Some("16M"));
    let m = LoggedMount::new(&server, "alice", PASSWORD, "");
    Some((server, m))
}

/// `(size, used, available)` in bytes from the output of `stat -f -c '%b %f %a %S'`.
fn figures(out: &str) -> (u64, u64, u64) {
    let v: Vec<u64> = out.split_whitespace().map(|n| n.parse().expect("a number from stat -f")).collect();
    assert_eq!(v.len(), 4, "stat -f printed {out:?}");
    let (blocks, free, avail, unit) = (v[0], v[1], v[2], v[3]);
    (blocks * unit, (blocks - free) * unit, avail * unit)
}

const DF: &str = "stat -f -c '%b %f %a %S' .";

/// The StatFs requests between two counts.
fn asked(before: &Counts, after: &Counts) -> u64 {
    delta(before, after, "statfs")
}

#[test]
fn mount_usage_statfs_again_and_find_cost_no_round_trip_while_nothing_changed() {
    let Some((_server, m)) = logged_alice("mount_usage_statfs_again_and_find_cost_no_round_trip_while_nothing_changed")
    else {
        return;
    };
    m.sh_ok("mkdir -p t/a t/b && echo x > t/a/f && echo y > t/b/g && find t > /dev/null");
    let c0 = m.counts();
    let first = figures(&m.sh_ok(DF));
    let c1 = m.counts();
    assert!(asked(&c0, &c1) <= 1, "the first statfs asks the server at most once: {c1:?}");
    // Nothing changed since: df, and find's fstatfs, answer from the figures asked.
    assert_eq!(figures(&m.sh_ok(DF)), first);
    assert_eq!(m.sh_ok("find t | wc -l").trim(), "5");
    assert_eq!(figures(&m.sh_ok(DF)), first);
    let c2 = m.counts();
    let total: u64 = c2.keys().map(|k| delta(&c1, &c2, k)).sum();
    assert_eq!(total, 0, "df, find and df again with nothing changed: {c2:?}");
}

#[test]
fn mount_usage_is_refreshed_behind_once_changes_settle() {
    let Some((server, m)) = logged_alice("mount_usage_is_refreshed_behind_once_changes_settle") else { return };
    let (_, used0, _) = figures(&m.sh_ok(DF));
    let c0 = m.counts();
    // One process, one burst of changes: a new file past create-behind's buffer (stored, then
    // written through).
    m.sh_ok("head -c 1056768 /dev/zero > one");
    // Someone asked before (the df above): the stale figures are asked again in the background,
    // once, after the changes settle.
    let mut c1 = Counts::new();
    wait_until(Duration::from_secs(10), "the usage figures refreshed behind after a write", || {
        c1 = m.counts();
        asked(&c0, &c1) >= 1
    });
    let (_, used1, _) = figures(&m.sh_ok(DF));
    let c2 = m.counts();
    assert_eq!(asked(&c0, &c2), 1, "one ask, behind, for the burst of changes; none for the df after it: {c2:?}");
    assert_eq!(used1, used0 + 1056768, "df shows the new figures");
    assert_eq!(std::fs::metadata(server.home_path("alice").join("one")).expect("on the server").len(), 1056768);
}

#[test]
fn mount_usage_df_right_after_a_change_here_shows_it_exactly() {
    let Some((server, m)) = logged_alice("mount_usage_df_right_after_a_change_here_shows_it_exactly") else { return };
    let (size, used0, avail0) = figures(&m.sh_ok(DF));
    assert_eq!(size, QUOTA, "df size is the quota");
    assert_eq!(avail0, QUOTA - used0, "available is what the quota has left");
    // Each step changes usage and asks at once, in the same shell: no stale figure shows.
    let steps: [(&str, u64); 7] = [
        ("head -c 2097152 /dev/zero > a", 2 << 20),
        ("head -c 4096 /dev/zero >> a", (2 << 20) + 4096),
        ("truncate -s 1048576 a", 1 << 20),
        ("head -c 3145728 /dev/zero > b && mv b a", 3 << 20),
        ("cp a c", 6 << 20),
        (": > c", 3 << 20),
        ("rm a", 0),
    ];
    for (step, used) in steps {
        let out = m.sh_ok(&format!("{DF} && {step} && {DF}"));
        let (before, after) = out.split_once('\n').expect("two lines of stat -f");
        let (_, _, _) = figures(before);
        let (_, now, avail) = figures(after);
        assert_eq!((now, avail), (used0 + used, QUOTA - used0 - used), "df right after `{step}`");
    }
    // And the server agrees.
    let home = server.home_path("alice");
    assert!(home.join("c").exists() && !home.join("a").exists());
}

#[test]
fn mount_usage_df_shows_a_write_made_through_another_mount() {
    let name = "mount_usage_df_shows_a_write_made_through_another_mount";
    let Some((server, a)) = logged_alice(name) else { return };
    let b = TestMount::new(&server, "alice", PASSWORD, "");
    let (_, used0, _) = figures(&a.sh_ok(DF));
    // Asked again (fresh) on A: no change yet.
    assert_eq!(figures(&a.sh_ok(DF)).1, used0);
    b.sh_ok("head -c 3145728 /dev/zero > big");
    // A learns of it by the server's change notice, which makes its figures stale.
    let mut seen = 0;
    wait_until(Duration::from_secs(10), "df on mount A to show 3 MiB written through mount B", || {
        seen = figures(&a.sh_ok(DF)).1;
        seen == used0 + (3 << 20)
    });
    b.sh_ok("rm big");
    wait_until(Duration::from_secs(10), "df on mount A to show the 3 MiB freed through mount B", || {
        seen = figures(&a.sh_ok(DF)).1;
        seen == used0
    });
}
