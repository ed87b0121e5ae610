//! Adversarial review of create-behind: what users do with a new file still pending (several
//! processes, mmap, renames, links, times, modes, sizes past the buffer, quota, fsync of the
//! directory), each checked through the mount and on the server's disk.

use homefs_tests::mount::{delta, fuse_available, mounted_alice, LoggedMount, TestMount, PASSWORD};
use homefs_tests::TestServer;
use std::fs;

/// Runs `body` after the tests' python prelude (`support::mount::PY_PRELUDE`) in alice's mount.
fn python(server: &TestServer, m: &TestMount, body: &str) -> String {
    homefs_tests::mount::python(server, m, "alice", body)
}

#[test]
fn mount_create_review_shared_descriptors_fork_dup_and_two_appenders() {
    let Some((server, m)) = mounted_alice("mount_create_review_shared_descriptors_fork_dup_and_two_appenders", None)
    else {
        return;
    };
    let out = python(
        &server,
        &m,
        "os.mkdir('a')\n\
         fd = os.open('a/f', W | os.O_EXCL, 0o644)\n\
         os.write(fd, b'one\\n')\n\
         pid = os.fork()\n\
         if pid == 0:\n\
         \x20   os.write(fd, b'two\\n'); os.close(fd); os._exit(0)\n\
         _, st = os.waitpid(pid, 0)\n\
         assert st == 0\n\
         assert rd('a/f') == b'one\\ntwo\\n', rd('a/f')\n\
         os.write(fd, b'three\\n'); os.close(fd)\n\
         assert rd('a/f') == b'one\\ntwo\\nthree\\n', rd('a/f')\n\
         assert here('a/f') == b'one\\ntwo\\nthree\\n'\n\
         f1 = os.open('a/g', W | os.O_APPEND, 0o644)\n\
         os.write(f1, b'1')\n\
         f2 = os.open('a/g', os.O_WRONLY | os.O_APPEND)\n\
         os.write(f2, b'2'); os.write(f1, b'3'); os.write(f2, b'4')\n\
         os.close(f1); os.close(f2)\n\
         assert here('a/g') == b'1234' and rd('a/g') == b'1234', (here('a/g'), rd('a/g'))\n\
         fd = os.open('a/h', W, 0o600); d = os.dup(fd)\n\
         os.write(fd, b'x'); os.close(fd); os.write(d, b'y'); os.close(d)\n\
         assert rd('a/h') == b'xy', rd('a/h')\n\
         fd = os.open('a/sh', W, 0o644)\n\
         sh('echo child >> a/sh')\n\
         os.write(fd, b'P'); os.close(fd)\n\
         assert rd('a/sh') == b'Phild\\n', rd('a/sh')\n\
         print('ok')\n",
    );
    assert_eq!(out, "ok\n");
}

#[test]
fn mount_create_review_mmap_and_sendfile_into_a_pending_file() {
    let Some((server, m)) = mounted_alice("mount_create_review_mmap_and_sendfile_into_a_pending_file", None) else {
        return;
    };
    let out = python(
        &server,
        &m,
        "fd = os.open('m', os.O_CREAT | os.O_RDWR, 0o644)\n\
         os.ftruncate(fd, 8192)\n\
         mm = mmap.mmap(fd, 8192)\n\
         mm[0:5] = b'hello'; mm[5000:5003] = b'abc'\n\
         mm.flush()\n\
         os.close(fd)\n\
         mm[100:103] = b'zzz'\n\
         mm.close()\n\
         want = bytearray(8192); want[0:5] = b'hello'; want[100:103] = b'zzz'; want[5000:5003] = b'abc'\n\
         until('the mmap writes on the server', lambda: rd('m') == bytes(want))\n\
         assert here('m') == bytes(want)\n\
         src = os.open('/etc/passwd', os.O_RDONLY); n = os.fstat(src).st_size\n\
         fd = os.open('sf', W, 0o644)\n\
         os.write(fd, b'head:')\n\
         sent = os.sendfile(fd, src, 0, n)\n\
         os.close(fd); os.close(src)\n\
         with open('/etc/passwd', 'rb') as f: pw = f.read()\n\
         assert rd('sf') == b'head:' + pw[:sent], (len(rd('sf')), sent)\n\
         print('ok')\n",
    );
    assert_eq!(out, "ok\n");
}

#[test]
fn mount_create_review_renames_unlink_recreate_link_and_o_trunc_while_pending() {
    let Some((server, m)) =
        mounted_alice("mount_create_review_renames_unlink_recreate_link_and_o_trunc_while_pending", None)
    else {
        return;
    };
    let out = python(
        &server,
        &m,
        "os.mkdir('r')\n\
         a = os.open('r/a', W, 0o644); os.write(a, b'AAA')\n\
         b = os.open('r/b', W, 0o644); os.write(b, b'BB')\n\
         os.rename('r/a', 'r/b')\n\
         os.write(a, b'a2'); os.write(b, b'b2')\n\
         os.close(a); os.close(b)\n\
         assert sorted(os.listdir('r')) == ['b'], os.listdir('r')\n\
         assert here('r/b') == b'AAAa2' and rd('r/b') == b'AAAa2', (here('r/b'), rd('r/b'))\n\
         assert sorted(os.listdir(srv('r'))) == ['b'], os.listdir(srv('r'))\n\
         os.mkdir('p'); fd = os.open('p/f', W, 0o644); os.write(fd, b'x')\n\
         os.rename('p', 'q'); os.write(fd, b'y'); os.close(fd)\n\
         assert rd('q/f') == b'xy' and here('q/f') == b'xy', rd('q/f')\n\
         fd = os.open('u', os.O_CREAT | os.O_RDWR, 0o644); os.write(fd, b'old'); os.unlink('u')\n\
         assert not os.path.exists('u')\n\
         f2 = os.open('u', W | os.O_EXCL, 0o644); os.write(f2, b'new'); os.write(fd, b'more')\n\
         assert os.pread(fd, 100, 0) == b'oldmore', os.pread(fd, 100, 0)\n\
         os.close(fd); os.close(f2)\n\
         assert rd('u') == b'new' and here('u') == b'new', (rd('u'), here('u'))\n\
         fd = os.open('l1', W, 0o644); os.write(fd, b'L')\n\
         os.link('l1', 'l2')\n\
         s1, s2, sf = os.stat('l1'), os.stat('l2'), os.fstat(fd)\n\
         assert (s1.st_nlink, s2.st_nlink, sf.st_nlink) == (2, 2, 2), (s1.st_nlink, s2.st_nlink, sf.st_nlink)\n\
         assert s1.st_ino == s2.st_ino == sf.st_ino, (s1.st_ino, s2.st_ino, sf.st_ino)\n\
         os.write(fd, b'M'); os.close(fd)\n\
         assert here('l2') == b'LM' and rd('l2') == b'LM' and os.stat(srv('l1')).st_nlink == 2\n\
         fd = os.open('t', os.O_CREAT | os.O_RDWR, 0o644); os.write(fd, b'0123456789')\n\
         f2 = os.open('t', os.O_WRONLY | os.O_TRUNC); os.write(f2, b'ab'); os.close(f2)\n\
         assert os.fstat(fd).st_size == 2, os.fstat(fd).st_size\n\
         os.close(fd)\n\
         assert rd('t') == b'ab' and here('t') == b'ab', rd('t')\n\
         print('ok')\n",
    );
    assert_eq!(out, "ok\n");
}

#[test]
fn mount_create_review_times_modes_and_sizes_past_the_buffer_while_pending() {
    let Some((server, m)) =
        mounted_alice("mount_create_review_times_modes_and_sizes_past_the_buffer_while_pending", None)
    else {
        return;
    };
    let out = python(
        &server,
        &m,
        "fd = os.open('s', W, 0o644); os.write(fd, b'x' * 10)\n\
         sh('touch -m -d @1000000000 s')\n\
         sh('touch -a -d @1200000000 s')\n\
         st = os.stat('s')\n\
         assert (st.st_mtime, st.st_atime) == (1000000000, 1200000000), (st.st_mtime, st.st_atime)\n\
         os.chmod('s', 0o4755)\n\
         pending_mode = stat.S_IMODE(os.stat('s').st_mode)\n\
         os.close(fd)\n\
         ss = os.stat(srv('s'))\n\
         assert (ss.st_mtime, ss.st_atime) == (1000000000, 1200000000), (ss.st_mtime, ss.st_atime)\n\
         assert stat.S_IMODE(ss.st_mode) == pending_mode == stat.S_IMODE(os.stat('s').st_mode), \
(oct(ss.st_mode), oct(pending_mode))\n\
         fd = os.open('big', W, 0o644); os.write(fd, b'abc'); os.ftruncate(fd, 3 << 20); os.write(fd, b'd')\n\
         assert os.fstat(fd).st_size == 3 << 20\n\
         os.close(fd)\n\
         b = rd('big'); assert len(b) == 3 << 20 and b[:4] == b'abcd' and b[4:] == bytes(len(b) - 4), len(b)\n\
         fd = os.open('sp', W, 0o644); os.pwrite(fd, b'end', 10 << 20); os.pwrite(fd, b'beg', 0); os.close(fd)\n\
         b = rd('sp'); assert len(b) == (10 << 20) + 3 and b[:3] == b'beg' and b[-3:] == b'end' \
and b[3:-3] == bytes(len(b) - 6), len(b)\n\
         fd = os.open('hole', W, 0o644); os.pwrite(fd, b'x', 500000); os.close(fd)\n\
         assert rd('hole') == bytes(500000) + b'x'\n\
         fd = os.open('o', W, 0o640); os.write(fd, b'k' * 12345)\n\
         assert sh('stat -c %s o') == '12345\\n'\n\
         assert 'o' in sh('ls -a').split() and '.' in sh('ls -a').split()\n\
         du = int(sh('du -k o').split()[0]); assert du >= 12, du\n\
         os.close(fd)\n\
         assert int(sh('du -k o').split()[0]) == du, sh('du -k o')\n\
         fd = os.open('z', W | os.O_EXCL, 0o644); os.close(fd)\n\
         assert os.path.exists(srv('z')) and os.stat(srv('z')).st_size == 0\n\
         print('ok')\n",
    );
    assert_eq!(out, "ok\n");
}

#[test]
fn mount_create_review_tar_x_into_a_full_quota_leaves_only_whole_files() {
    let Some((server, m)) =
        mounted_alice("mount_create_review_tar_x_into_a_full_quota_leaves_only_whole_files", Some("1M"))
    else {
        return;
    };
    let src = tempfile::tempdir().expect("temp dir");
    let tree = src.path().join("t");
    fs::create_dir_all(&tree).expect("mkdir");
    for i in 0..10 {
        fs::write(tree.join(format!("f{i}")), vec![b'a' + i as u8; 200_000]).expect("write");
    }
    let tar = src.path().join("t.tar");
    let out = std::process::Command::new("tar").arg("cf").arg(&tar).arg("-C").arg(src.path()).arg("t").output();
    assert!(out.expect("run tar").status.success());
    let run = m.sh(&format!("tar xf {}", tar.display()));
    assert!(!run.status.success(), "tar x of 2 MB into a 1 MB quota succeeded");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("quota"), "tar names the quota: {stderr}");
    let on_server = server.home_path("alice").join("t");
    let mut seen = Vec::new();
    for e in fs::read_dir(m.join("t")).expect("ls t") {
        let name = e.expect("entry").file_name().into_string().expect("utf-8");
        let i: u8 = name[1..].parse().expect("fN");
        let want = vec![b'a' + i; 200_000];
        assert_eq!(fs::read(m.join("t").join(&name)).expect("read via mount"), want, "{name} via the mount");
        assert_eq!(fs::read(on_server.join(&name)).expect("read on server"), want, "{name} on the server");
        seen.push(name);
    }
    let mut there: Vec<String> = fs::read_dir(&on_server)
        .expect("ls")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .collect();
    seen.sort();
    there.sort();
    assert_eq!(seen, there, "the mount and the server list the same files");
    assert!((3..=5).contains(&seen.len()), "about 1 MB of whole files: {seen:?}");
}

/// The names of 40 new files, each made by its own shell running `command` (`%d`: the number),
/// that were not on the server when that shell had returned.
fn names_missing_when_the_shell_returned(test: &str, command: &str) -> Option<String> {
    let (server, m) = mounted_alice(test, None)?;
    let script = format!(
        "os.mkdir('e')\n\
         missing = []\n\
         for i in range(40):\n\
         \x20   sh('{command}' % i)\n\
         \x20   missing += [n for n in ['%d' % i] if not os.path.exists(srv('e/' + n))]\n\
         print(missing)\n"
    );
    Some(python(&server, &m, &script))
}

#[test]
fn mount_create_review_a_touched_new_file_is_on_the_server_when_touch_returns() {
    let test = "mount_create_review_a_touched_new_file_is_on_the_server_when_touch_returns";
    let Some(out) = names_missing_when_the_shell_returned(test, "touch e/%d") else { return };
    assert_eq!(out, "[]\n", "names not on the server when touch had returned");
}

#[test]
fn mount_create_review_an_empty_new_file_is_on_the_server_when_the_shell_returns() {
    let test = "mount_create_review_an_empty_new_file_is_on_the_server_when_the_shell_returns";
    let Some(out) = names_missing_when_the_shell_returned(test, ": > e/%d") else { return };
    assert_eq!(out, "[]\n", "names not on the server when the shell that made them had returned");
}

#[test]
fn mount_create_review_a_descriptor_opened_and_closed_by_exec_is_on_the_server_when_the_shell_returns() {
    let test = "mount_create_review_a_descriptor_opened_and_closed_by_exec_is_on_the_server_when_the_shell_returns";
    let Some(out) = names_missing_when_the_shell_returned(test, "exec 3>e/%d; exec 3>&-") else { return };
    assert_eq!(out, "[]\n", "names not on the server when the shell that made them had returned");
}

#[test]
fn mount_create_review_a_redirected_command_still_stores_its_file_once_with_its_content() {
    let test = "mount_create_review_a_redirected_command_still_stores_its_file_once_with_its_content";
    if !fuse_available(test) {
        return;
    }
    let server = TestServer::start(test);
    server.add_user("alice", PASSWORD, None);
    let m = LoggedMount::new(&server, "alice", PASSWORD, "");
    m.sh_ok("mkdir r");
    let c0 = m.counts();
    // dup2 then close of the first descriptor, before the command writes: a builtin in this
    // shell, a builtin in a shell of its own, an external command in a child, a descriptor
    // kept open by exec across a write (the write's own close, by the restoring dup2, stores it:
    // a second write would open it on the server, as before).
    m.sh_ok(
        "cd r && echo one > a && sh -c 'echo two > b' && /bin/echo three > c && \
         exec 3>d && echo four >&3 && exec 3>&-",
    );
    let c1 = m.counts();
    let home = server.home_path("alice").join("r");
    for (name, want) in [("a", "one\n"), ("b", "two\n"), ("c", "three\n"), ("d", "four\n")] {
        assert_eq!(fs::read_to_string(home.join(name)).expect("on the server"), want, "r/{name} on the server");
    }
    assert_eq!(delta(&c0, &c1, "put_file"), 4, "one PutFile a file: {c1:?}");
    for kind in ["open", "write", "write_attr"] {
        assert_eq!(delta(&c0, &c1, kind), 0, "{kind}: {c1:?}");
    }
}

#[test]
fn mount_create_review_touch_over_a_full_quota_fails() {
    let Some((server, m)) = mounted_alice("mount_create_review_touch_over_a_full_quota_fails", Some("1M")) else {
        return;
    };
    // Over the quota (the second file's store fails at close), then an empty file.
    let _ = m.sh("head -c 900000 /dev/zero > fill; head -c 300000 /dev/zero > over");
    let synced = m.sh("touch empty; echo rc=$?");
    let out = String::from_utf8_lossy(&synced.stdout).into_owned();
    let exists_on_server = server.home_path("alice").join("empty").exists();
    // Either touch fails, or the file is there: never exit 0 with no file.
    assert!(out.contains("rc=0") == exists_on_server, "touch said {out:?}, on the server: {exists_on_server}");
}

#[test]
fn mount_create_review_fsync_of_the_parent_stores_its_pending_entries() {
    let Some((server, m)) = mounted_alice("mount_create_review_fsync_of_the_parent_stores_its_pending_entries", None)
    else {
        return;
    };
    let out = python(
        &server,
        &m,
        "os.mkdir('d')\n\
         fd = os.open('d/n', W | os.O_EXCL, 0o644); os.write(fd, b'data')\n\
         dfd = os.open('d', os.O_RDONLY | os.O_DIRECTORY); os.fsync(dfd); os.close(dfd)\n\
         print(os.path.exists(srv('d/n')))\n\
         os.close(fd)\n",
    );
    assert_eq!(out, "True\n", "after fsync(dir) the entry is on the server");
}

#[test]
fn mount_create_review_listings_before_during_and_after_pending_files() {
    let Some((server, m)) = mounted_alice("mount_create_review_listings_before_during_and_after_pending_files", None)
    else {
        return;
    };
    let out = python(
        &server,
        &m,
        "os.mkdir('L'); sh('echo > L/old')\n\
         assert sh('ls L') == 'old\\n'\n\
         def sizes():\n\
         \x20   return {l.split()[-1]: int(l.split()[4]) for l in sh('ls -la L').splitlines()[1:]}\n\
         fd = os.open('L/n', W, 0o644); os.write(fd, b'abc')\n\
         s = sizes(); assert s['n'] == 3 and '.' in s and '..' in s and s['old'] == 1, s\n\
         os.write(fd, b'defg')\n\
         assert sizes()['n'] == 7, sizes()\n\
         os.close(fd)\n\
         assert sizes()['n'] == 7 and sorted(os.listdir('L')) == ['n', 'old'], sizes()\n\
         fds = [os.open('L/' + 'x' * 100 + '%04d' % i, W | os.O_EXCL, 0o644) for i in range(600)]\n\
         for i, f in enumerate(fds):\n\
         \x20   os.write(f, b'%d' % i)\n\
         names = sh('ls -fa L').split()\n\
         assert len(names) == len(set(names)) == 604, (len(names), len(set(names)))\n\
         listed = sorted(os.listdir('L'))\n\
         for f in fds:\n\
         \x20   os.close(f)\n\
         assert sorted(os.listdir('L')) == listed == sorted(os.listdir(srv('L'))), len(os.listdir(srv('L')))\n\
         assert rd('L/' + 'x' * 100 + '0599') == b'599'\n\
         print('ok')\n",
    );
    assert_eq!(out, "ok\n");
}

#[test]
fn mount_create_review_touch_while_the_server_is_down_fails() {
    if !homefs_tests::mount::fuse_available("mount_create_review_touch_while_the_server_is_down_fails") {
        return;
    }
    let mut server = TestServer::start("mount_create_review_touch_while_the_server_is_down_fails");
    server.add_user("alice", homefs_tests::mount::PASSWORD, None);
    let m = TestMount::new(&server, "alice", homefs_tests::mount::PASSWORD, "reconnect_timeout=2");
    m.sh_ok("mkdir d && ls d");
    server.stop();
    let out = m.sh("touch d/x; echo touch=$?");
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    // Down longer than the reconnect timeout: two requests that need the server fail in turn
    // (each waits the 2 s), so the release of touch's file has given up too.
    for probe in ["stat -f .", "stat -f d"] {
        assert!(!m.sh(probe).status.success(), "{probe} with the server down");
    }
    server.start_again();
    // Wait (bounded) for the mount to answer again, then look.
    homefs_tests::mount::wait_until(std::time::Duration::from_secs(20), "the mount answering again", || {
        m.sh("ls d").status.success()
    });
    let there = server.home_path("alice").join("d/x").exists() && m.join("d/x").exists();
    assert!(said.contains("touch=0") == there, "touch said {said:?}; the file there afterwards: {there}");
}

#[test]
fn mount_create_review_o_append_on_a_name_made_meanwhile_elsewhere_appends() {
    let Some((server, a)) =
        mounted_alice("mount_create_review_o_append_on_a_name_made_meanwhile_elsewhere_appends", None)
    else {
        return;
    };
    let b = TestMount::new(&server, "alice", homefs_tests::mount::PASSWORD, "");
    let out = python(
        &server,
        &a,
        &format!(
            "os.mkdir('x'); assert os.listdir('x') == []\n\
             fd = os.open('x/log', os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)\n\
             os.write(fd, b'mine\\n')\n\
             with open('{other}/x/log', 'w') as f: f.write('OTHER\\n')\n\
             assert rd('x/log') == b'OTHER\\n', rd('x/log')\n\
             os.close(fd)\n\
             print(repr(rd('x/log')), repr(here('x/log')))\n",
            other = b.path.display()
        ),
    );
    assert_eq!(out, "b'OTHER\\nmine\\n' b'OTHER\\nmine\\n'\n", "O_APPEND appends to the file made meanwhile");
}

#[test]
fn mount_create_review_stores_and_failed_stores_while_others_list_and_stat() {
    let Some((server, m)) =
        mounted_alice("mount_create_review_stores_and_failed_stores_while_others_list_and_stat", Some("2M"))
    else {
        return;
    };
    // The listers may see `big` listed and gone when they stat it (created, then its store refused:
    // as a file removed between readdir and stat on any file system); nothing else may fail. The
    // shell lister ends with `exit 0`: a loop's own status is its last pass's, which is grep's 1
    // when that pass saw only big's error.
    let out = python(
        &server,
        &m,
        "import threading\n\
         os.mkdir('c')\n\
         stop = False; errs = []; rounds = [0]\n\
         def hammer():\n\
         \x20   while not stop:\n\
         \x20       try:\n\
         \x20           for n in os.listdir('c'):\n\
         \x20               try:\n\
         \x20                   os.stat('c/' + n)\n\
         \x20               except FileNotFoundError:\n\
         \x20                   if n != 'big': errs.append(n)\n\
         \x20           os.path.exists('c/big')\n\
         \x20           rounds[0] += 1\n\
         \x20       except OSError as e:\n\
         \x20           errs.append(repr(e))\n\
         t = threading.Thread(target=hammer, daemon=True); t.start()\n\
         p = subprocess.Popen(['sh', '-c', 'while [ ! -e c/stop ]; do e=$(ls -la c 2>&1 >/dev/null) || { echo \"$e\" | grep -v c/big && exit 1; }; done; exit 0'])\n\
         slow = []\n\
         def work():\n\
         \x20   for i in range(150):\n\
         \x20       with open('c/f%d' % i, 'wb') as f: f.write(b'%d' % i)\n\
         \x20   sh('head -c 1800000 /dev/zero > keep')\n\
         \x20   for i in range(3):\n\
         \x20       fd = os.open('c/big', W | os.O_EXCL, 0o644); os.write(fd, bytes(600000))\n\
         \x20       t0 = time.time()\n\
         \x20       try:\n\
         \x20           os.close(fd); errs.append('big stored over the quota')\n\
         \x20       except OSError as e:\n\
         \x20           assert e.errno == errno.EDQUOT, e\n\
         \x20       if time.time() - t0 > 3: slow.append(time.time() - t0)\n\
         \x20       assert not os.path.exists('c/big')\n\
         try:\n\
         \x20   work()\n\
         finally:\n\
         \x20   open('c/stop', 'w').close()\n\
         \x20   stop = True; t.join(20); assert p.wait(20) == 0\n\
         assert sorted(os.listdir('c')) == sorted(os.listdir(srv('c'))) and len(os.listdir('c')) == 151\n\
         print(errs, slow, rounds[0] > 0)\n",
    );
    assert_eq!(out, "[] [] True\n", "errors seen by the listers, slow failing closes");
}

#[test]
fn mount_create_review_a_read_only_mode_new_file_stays_writable_through_its_descriptor() {
    let name = "mount_create_review_a_read_only_mode_new_file_stays_writable_through_its_descriptor";
    if !homefs_tests::mount::fuse_available(name) {
        return;
    }
    // The server drops root (as in production), so the file's mode is enforced on its opens.
    let Some(server) = TestServer::start_as_nobody(name) else { return };
    server.add_user("alice", homefs_tests::mount::PASSWORD, None);
    let m = TestMount::new(&server, "alice", homefs_tests::mount::PASSWORD, "");
    // As git's objects and tar/cp of a read-only file: created 0444, then written through the fd,
    // past the buffer (stored, then written through) and after a second open (stored first).
    let out = python(
        &server,
        &m,
        "fd = os.open('ro-big', W | os.O_EXCL, 0o444)\n\
         n1 = os.write(fd, b'a' * 700000); n2 = os.write(fd, b'b' * 700000); os.close(fd)\n\
         got = rd('ro-big')\n\
         assert got == b'a' * 700000 + b'b' * 700000, (n1, n2, len(got), got.count(b'a'), len(here('ro-big')))\n\
         assert stat.S_IMODE(os.stat(srv('ro-big')).st_mode) == 0o444 == stat.S_IMODE(os.stat('ro-big').st_mode)\n\
         fd = os.open('ro-shared', W | os.O_EXCL, 0o444); os.write(fd, b'1')\n\
         r = os.open('ro-shared', os.O_RDONLY)\n\
         os.write(fd, b'2'); os.fsync(fd); os.close(fd); os.close(r)\n\
         assert rd('ro-shared') == b'12' and stat.S_IMODE(os.stat(srv('ro-shared')).st_mode) == 0o444\n\
         print('ok')\n",
    );
    assert_eq!(out, "ok\n");
}

#[test]
fn mount_create_review_a_file_made_just_before_is_in_the_listing() {
    let Some((server, m)) = mounted_alice("mount_create_review_a_file_made_just_before_is_in_the_listing", None) else {
        return;
    };
    // Python's Path.touch() / open(f, 'w').close(): never written, so stored at the release,
    // which the kernel sends after close returned: the next listing races with that store.
    let out = python(
        &server,
        &m,
        "import pathlib\n\
         os.mkdir('L'); missed = []\n\
         for i in range(200):\n\
         \x20   pathlib.Path('L/f%d' % i).touch()\n\
         \x20   if 'f%d' % i not in os.listdir('L'): missed.append(i)\n\
         print(missed)\n",
    );
    assert_eq!(out, "[]\n", "files missing from the listing taken right after they were made");
}
