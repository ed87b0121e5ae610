//! A directory stream opened before a change through the same mount: reading it afterwards must
//! not bring back what the change took away (a name removed, renamed away or never stored, an
//! old size), neither in the kernel's dentries nor in netmount's caches. What the stream itself
//! lists of such a name is unspecified (POSIX), what a later `stat` says is not.

use homefs_tests::mount::{mounted_alice, TestMount};
use homefs_tests::TestServer;

/// Runs `body` after the tests' python prelude (`support::mount::PY_PRELUDE`) in alice's mount.
fn python(server: &TestServer, m: &TestMount, body: &str) -> String {
    homefs_tests::mount::python(server, m, "alice", body)
}

#[test]
fn mount_listing_a_stream_opened_before_a_refused_store_does_not_bring_the_name_back() {
    let name = "mount_listing_a_stream_opened_before_a_refused_store_does_not_bring_the_name_back";
    let Some((server, m)) = mounted_alice(name, Some("2M")) else { return };
    let out = python(
        &server,
        &m,
        "os.mkdir('c'); sh('head -c 1800000 /dev/zero > keep')\n\
         fd = os.open('c/big', W | os.O_EXCL, 0o644); os.write(fd, bytes(600000))\n\
         it = os.scandir('c')\n\
         try:\n\
         \x20   os.close(fd); raise AssertionError('stored over the quota')\n\
         except OSError as e:\n\
         \x20   assert e.errno == errno.EDQUOT, e\n\
         listed = [e.name for e in it]\n\
         assert not os.path.exists('c/big'), listed\n\
         assert os.listdir('c') == [] and not os.path.exists(srv('c/big'))\n\
         print('ok')\n",
    );
    assert_eq!(out, "ok\n");
}

#[test]
fn mount_listing_a_stream_opened_before_an_unlink_or_a_rename_shows_what_is_there_after() {
    let name = "mount_listing_a_stream_opened_before_an_unlink_or_a_rename_shows_what_is_there_after";
    let Some((server, m)) = mounted_alice(name, None) else { return };
    let out = python(
        &server,
        &m,
        "os.mkdir('d')\n\
         for n in ('gone', 'from', 'over', 'grows', 'stays'):\n\
         \x20   with open('d/' + n, 'w') as f: f.write(n)\n\
         with open('d/new', 'w') as f: f.write('the new one')\n\
         before = {n: os.stat('d/' + n) for n in os.listdir('d')}\n\
         it = os.scandir('d')\n\
         os.unlink('d/gone')\n\
         os.rename('d/from', 'd/to')\n\
         keep = os.open('d/to', os.O_RDONLY)\n\
         os.rename('d/new', 'd/over')\n\
         with open('d/grows', 'a') as f: f.write(' and grows')\n\
         listed = sorted(e.name for e in it)\n\
         assert not os.path.exists('d/gone') and not os.path.exists('d/from'), listed\n\
         assert here('d/to') == b'from' and os.read(keep, 100) == b'from', listed\n\
         assert os.fstat(keep).st_ino == os.stat('d/to').st_ino == before['from'].st_ino\n\
         assert here('d/over') == b'the new one' and os.stat('d/over').st_size == 11, listed\n\
         assert os.stat('d/over').st_ino == before['new'].st_ino\n\
         assert os.stat('d/grows').st_size == 15 and here('d/grows') == b'grows and grows'\n\
         assert sorted(os.listdir('d')) == ['grows', 'over', 'stays', 'to'], os.listdir('d')\n\
         print('ok')\n",
    );
    assert_eq!(out, "ok\n");
}

#[test]
fn mount_listing_a_directory_removed_while_open_still_answers_fstat() {
    let name = "mount_listing_a_directory_removed_while_open_still_answers_fstat";
    let Some((server, m)) = mounted_alice(name, None) else { return };
    let out = python(
        &server,
        &m,
        "os.makedirs('p/d'); os.makedirs('p/e')\n\
         fd = os.open('p/d', os.O_RDONLY | os.O_DIRECTORY)\n\
         ino = os.fstat(fd).st_ino\n\
         os.rmdir('p/d')\n\
         st = os.fstat(fd)\n\
         assert st.st_ino == ino and stat.S_ISDIR(st.st_mode), st\n\
         assert os.listdir('p') == ['e'] and not os.path.exists(srv('p/d'))\n\
         os.close(fd)\n\
         print('ok')\n",
    );
    assert_eq!(out, "ok\n");
}
