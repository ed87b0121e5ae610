//! Create-behind in netmount: a new file whose name the mount knows to be absent is answered at
//! `create` and stored with one `PutFile` at its close; while open it looks as it will, anything
//! else that touches it stores it first; a failed store is close's error and takes the name away.

use homefs_tests::mount::{alice_twice, delta, fuse_available, Counts, LoggedMount, TestMount, PASSWORD};
use homefs_tests::TestServer;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn logged_alice(name: &str, quota: Option<&str>, options: &str) -> Option<(TestServer, LoggedMount)> {
    if !fuse_available(name) {
        return None;
    }
    let server = TestServer::start(name);
    server.add_user("alice", PASSWORD, quota);
    let m = LoggedMount::new(&server, "alice", PASSWORD, options);
    Some((server, m))
}

/// Requests of every kind between two counts, those that changed only.
fn changed(a: &Counts, b: &Counts) -> Vec<(String, u64)> {
    let mut v: Vec<_> = b.keys().map(|k| (k.clone(), delta(a, b, k))).filter(|(_, n)| *n > 0).collect();
    v.sort();
    v
}

/// Runs a python script in the mount's root; returns its stdout.
fn python(m: &LoggedMount, script: &str) -> String {
    let path = m.path.parent().expect("the mount's temp dir").join("script.py");
    fs::write(&path, script).expect("write the script");
    m.sh_ok(&format!("python3 {}", path.display()))
}

#[test]
fn mount_created_files_land_with_one_put_file_each() {
    let Some((server, m)) = logged_alice("mount_created_files_land_with_one_put_file_each", None, "") else {
        return;
    };
    m.sh_ok("mkdir new");
    let c0 = m.counts();
    python(
        &m,
        "import os\n\
         for i in range(50):\n\
         \x20   fd = os.open('new/p%d' % i, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)\n\
         \x20   os.write(fd, b'file %d\\n' % i)\n\
         \x20   os.write(fd, b'x' * i)\n\
         \x20   os.close(fd)\n",
    );
    m.sh_ok("cd new && for i in $(seq 1 50); do echo $i > s$i; done");
    let c1 = m.counts();
    let all = changed(&c0, &c1);
    assert_eq!(delta(&c0, &c1, "put_file"), 100, "{all:?}");
    for kind in ["open", "write", "write_attr", "close", "setattr"] {
        assert_eq!(delta(&c0, &c1, kind), 0, "{kind}: {all:?}");
    }
    let total: u64 = all.iter().map(|(_, n)| n).sum();
    assert!(total <= 100 + 2, "100 files cost {total} requests: {all:?}");
    assert!(m.hits().get("create_behind").copied().unwrap_or(0) >= 100, "{:?}", m.hits());
    let dir = server.home_path("alice").join("new");
    for i in 0..50 {
        let want = [format!("file {i}\n").into_bytes(), vec![b'x'; i]].concat();
        assert_eq!(fs::read(dir.join(format!("p{i}"))).expect("stored on the server"), want, "p{i}");
    }
    assert_eq!(fs::read_to_string(dir.join("s37")).expect("stored"), "37\n");
    // As the server shows it, and as a synchronous create would: mode as asked, no temp names left.
    assert_eq!(m.sh_ok("stat -c '%a %s' new/p9 && ls new | wc -l"), "640 16\n100\n");
    let server_mode = fs::metadata(dir.join("p9")).map(|md| std::os::unix::fs::PermissionsExt::mode(&md.permissions()));
    assert_eq!(server_mode.expect("stat on the server") & 0o7777, 0o640);
}

#[test]
fn mount_tar_x_through_create_behind_matches_the_source() {
    let Some((server, m)) = logged_alice("mount_tar_x_through_create_behind_matches_the_source", None, "") else {
        return;
    };
    let src = tempfile::tempdir().expect("temp dir");
    let tree = src.path().join("t");
    for d in 0..3 {
        let dir = tree.join(format!("d{d}"));
        fs::create_dir_all(&dir).expect("mkdir");
        for f in 0..40 {
            // Sizes from empty to past the per-file buffer (1 MiB): the big ones are written through.
            let size = match f {
                0 => 0,
                1 => 1_300_000,
                _ => f * 997,
            };
            let body: Vec<u8> = (0..size).map(|i| (i * 31 + f + d) as u8).collect();
            fs::write(dir.join(format!("f{f}")), body).expect("write");
        }
        let _ = Command::new("chmod").arg("751").arg(dir.join("f5")).status();
    }
    let tar = src.path().join("t.tar");
    let out = Command::new("tar").arg("cf").arg(&tar).arg("-C").arg(src.path()).arg("t").output().expect("run tar c");
    assert!(out.status.success(), "tar c: {}", String::from_utf8_lossy(&out.stderr));
    let c0 = m.counts();
    m.sh_ok(&format!("mkdir x && tar xf {} -C x", tar.display()));
    let c1 = m.counts();
    let all = changed(&c0, &c1);
    // Per small file one PutFile (tar's fchown/fchmod/futimens absorbed); the three 1.3 MB
    // files are stored when they pass the buffer and then written through.
    assert_eq!(delta(&c0, &c1, "put_file"), 120, "{all:?}");
    assert!(delta(&c0, &c1, "open") <= 3, "{all:?}");
    let total: u64 = all.iter().map(|(_, n)| n).sum();
    assert!(total <= 120 + 3 * 60 + 10, "tar x of 120 files cost {total} requests: {all:?}");
    let out = Command::new("diff").arg("-r").arg(&tree).arg(m.join("x/t")).output().expect("run diff");
    assert!(out.status.success(), "diff -r: {}", String::from_utf8_lossy(&out.stdout));
    let out = Command::new("diff")
        .arg("-r")
        .arg(&tree)
        .arg(server.home_path("alice").join("x/t"))
        .output()
        .expect("run diff");
    assert!(out.status.success(), "diff -r on the server: {}", String::from_utf8_lossy(&out.stdout));
    // Modes and mtimes as tar set them.
    let stat = |p: &Path| {
        let out = Command::new("stat").args(["-c", "%a %Y %s"]).arg(p).output().expect("stat");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for f in ["d0/f5", "d1/f7", "d2/f1", "d2/f0"] {
        assert_eq!(stat(&m.join(&format!("x/t/{f}"))), stat(&tree.join(f)), "{f} through the mount");
        assert_eq!(stat(&server.home_path("alice").join(format!("x/t/{f}"))), stat(&tree.join(f)), "{f} on the server");
    }
}

#[test]
fn mount_a_file_still_open_for_writing_looks_as_it_will_and_can_be_used_elsewhere() {
    let Some((server, m)) =
        logged_alice("mount_a_file_still_open_for_writing_looks_as_it_will_and_can_be_used_elsewhere", None, "")
    else {
        return;
    };
    m.sh_ok("mkdir w");
    let out = python(
        &m,
        "import os, subprocess, fcntl\n\
         def sh(c):\n\
         \x20   return subprocess.run(c, shell=True, check=True, capture_output=True, text=True).stdout\n\
         fd = os.open('w/a', os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)\n\
         os.write(fd, b'hello ')\n\
         os.pwrite(fd, b'!', 20)\n\
         assert os.fstat(fd).st_size == 21, os.fstat(fd)\n\
         assert os.pread(fd, 7, 0) == b'hello \\0', os.pread(fd, 7, 0)\n\
         os.fchmod(fd, 0o644)\n\
         os.utime(fd, ns=(1_000_000_000_000_000_000, 1_500_000_000_000_000_000))\n\
         print(sh('stat -c \"%s %a %Y\" w/a').strip())\n\
         print(sh('ls -l w | grep -c \" 21 \"').strip())\n\
         print(sh('ls w').split())\n\
         print(sh('cat w/a | od -c | head -1').split()[1:3])\n\
         assert os.fstat(fd).st_ino == os.stat('w/a').st_ino, 'in use: one inode number (sqlite checks)'\n\
         os.write(fd, b'world')\n\
         print(sh('cat w/a').replace('\\0', '.'))\n\
         sh('mv w/a w/b')\n\
         os.write(fd, b'+')\n\
         sh('ln w/b w/c')\n\
         fcntl.flock(fd, fcntl.LOCK_EX)\n\
         fcntl.flock(fd, fcntl.LOCK_UN)\n\
         os.close(fd)\n\
         print(open('w/c', 'rb').read().replace(b'\\0', b'.'))\n",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "21 644 1500000000", "stat while open: {out}");
    assert_eq!(lines[1], "1", "ls -l shows the written size: {out}");
    assert_eq!(lines[2], "['a']", "{out}");
    assert_eq!(lines[3], "['h', 'e']", "cat while open: {out}");
    assert_eq!(lines[4], "hello world.........!", "a write after another open: {out}");
    assert_eq!(lines[5], "b'hello world+........!'", "{out}");
    let c = fs::read(server.home_path("alice").join("w/c")).expect("on the server");
    assert_eq!(c, b"hello world+\0\0\0\0\0\0\0\0!");
    assert!(!server.home_path("alice").join("w/a").exists());
}

#[test]
fn mount_another_mount_sees_a_created_file_after_close() {
    let Some((_server, a, b)) = alice_twice("mount_another_mount_sees_a_created_file_after_close") else { return };
    a.sh_ok("mkdir d && ls d");
    b.sh_ok("ls d");
    a.sh_ok("printf one > d/f && printf two > d/g");
    // New names reach the other mount's cache by change notice, milliseconds after the close
    // (the server gathers them for 3 ms): bounded, not at once.
    homefs_tests::mount::wait_until(Duration::from_secs(10), "the new files on the other mount", || {
        b.sh("cat d/f d/g").stdout == b"onetwo"
    });
    // Close-to-open on a name the other mount knows: what was written before the close is what
    // the next open there reads, with no wait.
    a.sh_ok("printf three > d/f && printf ' and more' >> d/g");
    assert_eq!(b.sh_ok("cat d/f d/g"), "threetwo and more");
}

#[test]
fn mount_o_excl_on_a_name_made_meanwhile_fails_at_close_and_a_plain_create_writes_into_it() {
    let Some((server, m)) = logged_alice(
        "mount_o_excl_on_a_name_made_meanwhile_fails_at_close_and_a_plain_create_writes_into_it",
        None,
        "",
    ) else {
        return;
    };
    m.sh_ok("mkdir d && ls d");
    // Made on the server's disk directly: no notice; the mount's cache still says absent.
    let d = server.home_path("alice").join("d");
    fs::write(d.join("x"), "theirs\n").expect("write on the server");
    fs::write(d.join("y"), "their longer content\n").expect("write on the server");
    let out = python(
        &m,
        "import os\n\
         fd = os.open('d/x', os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)\n\
         os.write(fd, b'mine\\n')\n\
         try:\n\
         \x20   os.close(fd)\n\
         \x20   print('closed')\n\
         except FileExistsError:\n\
         \x20   print('EEXIST')\n\
         fd = os.open('d/y', os.O_CREAT | os.O_WRONLY, 0o644)\n\
         os.write(fd, b'MINE')\n\
         os.close(fd)\n",
    );
    assert_eq!(out.trim(), "EEXIST");
    assert_eq!(fs::read_to_string(d.join("x")).expect("x"), "theirs\n", "the server's file untouched");
    assert_eq!(m.sh_ok("cat d/x"), "theirs\n", "the mount asks the server again");
    // Without O_EXCL (and without O_TRUNC): written over at its offsets, as a synchronous create would.
    assert_eq!(fs::read_to_string(d.join("y")).expect("y"), "MINEr longer content\n");
    fs::write(d.join("z"), "their content\n").expect("write on the server");
    m.sh_ok("echo new > d/z");
    assert_eq!(fs::read_to_string(d.join("z")).expect("z"), "new\n", "`>` truncates and writes into it");
    assert!(m.log().contains("could not be stored"), "the failure is logged:\n{}", m.log());
}

#[test]
fn mount_a_store_over_quota_fails_at_close_and_the_name_goes() {
    let Some((server, m)) = logged_alice("mount_a_store_over_quota_fails_at_close_and_the_name_goes", Some("1M"), "")
    else {
        return;
    };
    m.sh_ok("mkdir q && head -c 600000 /dev/zero > q/keep && ls q");
    let out = python(
        &m,
        "import os\n\
         fd = os.open('q/big', os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)\n\
         os.write(fd, b'y' * 600000)\n\
         try:\n\
         \x20   os.close(fd)\n\
         \x20   print('closed')\n\
         except OSError as e:\n\
         \x20   print(e.errno == __import__('errno').EDQUOT)\n\
         print(os.path.exists('q/big'), sorted(os.listdir('q')))\n",
    );
    assert_eq!(out, "True\nFalse ['keep']\n");
    let q = server.home_path("alice").join("q");
    assert!(!q.join("big").exists(), "nothing stored");
    assert_eq!(fs::metadata(q.join("keep")).expect("keep").len(), 600_000, "other files intact");
    let leftovers: Vec<_> = fs::read_dir(&q).expect("ls q").flatten().map(|e| e.file_name()).collect();
    assert_eq!(leftovers.len(), 1, "no temporary file left: {leftovers:?}");
    // The name is free again, and a small file fits.
    m.sh_ok("echo small > q/big");
    assert_eq!(fs::read_to_string(q.join("big")).expect("big"), "small\n");
}

#[test]
fn mount_no_create_behind_keeps_synchronous_creates() {
    let Some((_server, m)) = logged_alice("mount_no_create_behind_keeps_synchronous_creates", None, "no_create_behind")
    else {
        return;
    };
    m.sh_ok("mkdir new");
    let c0 = m.counts();
    m.sh_ok("cd new && for i in $(seq 1 20); do echo $i > f$i; done");
    let c1 = m.counts();
    let all = changed(&c0, &c1);
    assert_eq!(delta(&c0, &c1, "open"), 20, "{all:?}");
    assert_eq!(delta(&c0, &c1, "write_attr"), 20, "{all:?}");
    assert_eq!(delta(&c0, &c1, "put_file"), 0, "{all:?}");
    assert_eq!(m.sh_ok("cat new/f13"), "13\n");
}

#[test]
fn mount_a_file_created_before_a_server_restart_is_stored_at_close_after_it() {
    if !fuse_available("mount_a_file_created_before_a_server_restart_is_stored_at_close_after_it") {
        return;
    }
    let mut server = TestServer::start("mount_a_file_created_before_a_server_restart_is_stored_at_close_after_it");
    server.add_user("alice", PASSWORD, None);
    let m = TestMount::new(&server, "alice", PASSWORD, "");
    m.sh_ok("mkdir r && ls r");
    let flags = tempfile::tempdir().expect("temp dir for the script's flags");
    let (ready, go) = (flags.path().join("ready"), flags.path().join("go"));
    let script = format!(
        "import os, time\n\
         fd = os.open('r/f', os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)\n\
         os.write(fd, b'before restart;')\n\
         open('{ready}', 'w').close()\n\
         deadline = time.time() + 60\n\
         while not os.path.exists('{go}'):\n\
         \x20   assert time.time() < deadline, 'no go within 60 s'\n\
         \x20   time.sleep(0.02)\n\
         os.write(fd, b' after')\n\
         os.close(fd)\n\
         print(open('r/f').read())\n",
        ready = ready.display(),
        go = go.display()
    );
    let child = Command::new("python3")
        .arg("-c")
        .arg(&script)
        .current_dir(&m.path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start python");
    homefs_tests::mount::wait_until(std::time::Duration::from_secs(60), "the script to create its file", || {
        ready.exists()
    });
    server.restart();
    fs::write(&go, "").expect("write the go flag");
    let out = homefs_tests::mount::child_output_within(child, std::time::Duration::from_secs(120), "the script");
    assert!(out.status.success(), "python: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "before restart; after\n");
    assert_eq!(fs::read_to_string(server.home_path("alice").join("r/f")).expect("stored"), "before restart; after");
}

/// Close, then rename or unlink at once (dbench, editors, git): every server handle opened for
/// such a file is closed again (the session's limit is 1024 open files).
#[test]
fn mount_close_then_rename_or_unlink_leaves_no_handle_open_on_the_server() {
    let Some((server, m)) =
        logged_alice("mount_close_then_rename_or_unlink_leaves_no_handle_open_on_the_server", None, "")
    else {
        return;
    };
    m.sh_ok("mkdir h");
    let out = python(
        &m,
        "import os\n\
         for i in range(1200):\n\
         \x20   fd = os.open('h/t%d' % i, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)\n\
         \x20   os.write(fd, b'x' * 100)\n\
         \x20   keep = os.dup(fd) if i % 3 == 0 else None\n\
         \x20   os.close(fd)\n\
         \x20   if i % 2:\n\
         \x20       os.rename('h/t%d' % i, 'h/r%d' % i)\n\
         \x20       os.unlink('h/r%d' % i)\n\
         \x20   else:\n\
         \x20       os.unlink('h/t%d' % i)\n\
         \x20   if keep is not None:\n\
         \x20       os.write(keep, b'after')\n\
         \x20       assert os.fstat(keep).st_size == 105, os.fstat(keep)\n\
         \x20       os.close(keep)\n\
         print(len(os.listdir('h')))\n",
    );
    assert_eq!(out, "0\n");
    assert_eq!(fs::read_dir(server.home_path("alice").join("h")).expect("ls h").count(), 0);
    // Still room for as many open files as before.
    m.sh_ok("for i in $(seq 1 50); do echo $i > h/n$i; done && cat h/n50");
}

/// More data pending than the mount keeps (8 MiB): the writers past it store their files and
/// write through; `fsync` and a lock store a pending file at once, while it stays open.
#[test]
fn mount_many_open_new_files_stay_within_the_budget_and_fsync_or_a_lock_stores_one_at_once() {
    let Some((server, m)) = logged_alice(
        "mount_many_open_new_files_stay_within_the_budget_and_fsync_or_a_lock_stores_one_at_once",
        None,
        "",
    ) else {
        return;
    };
    m.sh_ok("mkdir b");
    let home = server.home_path("alice");
    let flags = tempfile::tempdir().expect("temp dir for the script's flags");
    let ready = flags.path().join("ready");
    let go = flags.path().join("go");
    let script = format!(
        "import os, fcntl, time\n\
         fds = []\n\
         for i in range(20):\n\
         \x20   fd = os.open('b/f%d' % i, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)\n\
         \x20   for k in range(6):\n\
         \x20       os.write(fd, bytes([65 + i]) * 100000)\n\
         \x20   fds.append(fd)\n\
         s = os.open('b/synced', os.O_CREAT | os.O_WRONLY, 0o644)\n\
         os.write(s, b'synced')\n\
         os.fsync(s)\n\
         l = os.open('b/locked', os.O_CREAT | os.O_RDWR, 0o644)\n\
         os.write(l, b'locked')\n\
         fcntl.lockf(l, fcntl.LOCK_EX)\n\
         open('{ready}', 'w').close()\n\
         deadline = time.time() + 60\n\
         while not os.path.exists('{go}'):\n\
         \x20   assert time.time() < deadline, 'no go within 60 s'\n\
         \x20   time.sleep(0.02)\n\
         for fd in fds + [s, l]:\n\
         \x20   os.close(fd)\n",
        ready = ready.display(),
        go = go.display()
    );
    let child = Command::new("python3")
        .arg("-c")
        .arg(&script)
        .current_dir(&m.path)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start python");
    homefs_tests::mount::wait_until(std::time::Duration::from_secs(60), "the script to write its files", || {
        ready.exists()
    });
    // Still open: the fsync'd and the locked files are on the server, and so are the files that
    // passed the budget (20 x 600 kB = 12 MB > 8 MiB), whole or as written so far.
    assert_eq!(fs::read_to_string(home.join("b/synced")).expect("fsync stored it"), "synced");
    assert_eq!(fs::read_to_string(home.join("b/locked")).expect("the lock stored it"), "locked");
    let stored_early = (0..20).filter(|i| home.join(format!("b/f{i}")).exists()).count();
    assert!(stored_early >= 6, "only {stored_early} of 20 files stored before close: the budget holds 8 MiB");
    fs::write(&go, "").expect("write the go flag");
    let out = homefs_tests::mount::child_output_within(child, std::time::Duration::from_secs(120), "the script");
    assert!(out.status.success(), "python: {}", String::from_utf8_lossy(&out.stderr));
    for i in 0..20u8 {
        let body = fs::read(home.join(format!("b/f{i}"))).expect("stored");
        assert!(body.len() == 600_000 && body.iter().all(|b| *b == 65 + i), "b/f{i}: {} bytes", body.len());
    }
}

/// git keeps each file's inode number, ctime and mtime in its index: a file created behind keeps
/// the ones it showed (its provisional inode number, for the life of the mount), also when the
/// kernel forgets the inode, so `git status` after `drop_caches` reads none of the files again.
#[test]
fn mount_files_created_behind_keep_their_stat_for_git_after_the_kernel_forgets() {
    let Some((_server, m)) =
        logged_alice("mount_files_created_behind_keep_their_stat_for_git_after_the_kernel_forgets", None, "")
    else {
        return;
    };
    // Files older than git's index (so none is "racily clean" and read again for that reason),
    // their mtime set while still open (kept with the pending file, sent with its PutFile).
    python(
        &m,
        "import os\n\
         os.mkdir('r')\n\
         for d in range(1, 4):\n\
         \x20   os.mkdir('r/d%d' % d)\n\
         \x20   for f in range(1, 31):\n\
         \x20       fd = os.open('r/d%d/f%d' % (d, f), os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)\n\
         \x20       os.write(fd, b'%d%d\\n' % (d, f))\n\
         \x20       os.utime(fd, (1700000000, 1700000000))\n\
         \x20       os.close(fd)\n",
    );
    m.sh_ok(
        "cd r && git init -q && git add -A && git -c user.name=t -c user.email=t@t commit -qm one \
         && git status --porcelain",
    );
    let before = m.sh_ok("stat -c '%i %Z.%z %Y %s' r/d2/f5");
    if fs::write("/proc/sys/vm/drop_caches", "3").is_err() {
        eprintln!(
            "mount_files_created_behind_keep_their_stat_for_git_after_the_kernel_forgets: skipped: no drop_caches"
        );
        return;
    }
    assert_eq!(m.sh_ok("stat -c '%i %Z.%z %Y %s' r/d2/f5"), before, "stat after the kernel forgot");
    let c0 = m.counts();
    assert_eq!(m.sh_ok("cd r && git status --porcelain"), "");
    let c1 = m.counts();
    let all = changed(&c0, &c1);
    // git opens its own files (HEAD, config, index, refs: under 20 here), none of the 90 files.
    assert!(delta(&c0, &c1, "open") < 30, "git status read files again: {all:?}");
    assert_eq!(delta(&c0, &c1, "get_file"), 0, "{all:?}");
}
