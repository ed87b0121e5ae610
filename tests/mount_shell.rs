//! netmount with ordinary shell tools: every operation issue 4 lists, on a real mount of a real
//! fsd, content checked by BLAKE3.

use homefs_tests::hash;
use homefs_tests::mount::mounted_alice;
use std::fs;

/// 1 MiB + 7 bytes of varied content: more than one FUSE request, not page-aligned.
fn sample(seed: u8) -> Vec<u8> {
    (0..(1 << 20) + 7).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ seed).collect()
}

#[test]
fn mount_ls_cd_mkdir_rm_and_metadata() {
    let Some((server, m)) = mounted_alice("mount_ls_cd_mkdir_rm_and_metadata", None) else { return };
    let home = server.home_path("alice");

    m.sh_ok("mkdir -p a/b/c && echo hello > a/b/c/f.txt && mkdir empty");
    assert_eq!(fs::read(home.join("a/b/c/f.txt")).unwrap(), b"hello\n", "the file is on the server");
    let ls = m.sh_ok("ls");
    assert_eq!(ls.split_whitespace().collect::<Vec<_>>(), ["a", "empty"]);
    let long = m.sh_ok("ls -l a/b/c");
    assert!(long.contains("f.txt") && long.contains(" 6 "), "ls -l shows the size: {long}");
    assert_eq!(m.sh_ok("cd a/b && pwd").trim(), m.join("a/b").to_str().unwrap());
    // Files belong to the user who mounted.
    let me = m.sh_ok("id -u").trim().to_string();
    assert_eq!(m.sh_ok("stat -c %u a/b/c/f.txt").trim(), me);

    // Append, cat, truncate, touch with a time, chmod.
    m.sh_ok("echo more >> a/b/c/f.txt");
    assert_eq!(m.sh_ok("cat a/b/c/f.txt"), "hello\nmore\n");
    m.sh_ok("truncate -s 3 a/b/c/f.txt");
    assert_eq!(m.sh_ok("cat a/b/c/f.txt"), "hel");
    m.sh_ok("touch -d '2020-01-02 03:04:05 UTC' a/b/c/f.txt && chmod 640 a/b/c/f.txt");
    assert_eq!(m.sh_ok("stat -c '%Y %a %s' a/b/c/f.txt").trim(), "1577934245 640 3");
    assert_eq!(fs::metadata(home.join("a/b/c/f.txt")).unwrap().len(), 3);

    // Links: symbolic and hard.
    m.sh_ok("ln -s b/c/f.txt a/sym && ln a/b/c/f.txt a/hard");
    assert_eq!(m.sh_ok("readlink a/sym").trim(), "b/c/f.txt");
    assert_eq!(m.sh_ok("cat a/sym"), "hel");
    assert_eq!(m.sh_ok("stat -c %h a/b/c/f.txt").trim(), "2");
    assert_eq!(m.sh_ok("stat -c %i a/hard"), m.sh_ok("stat -c %i a/b/c/f.txt"), "one inode for both names");

    // find and du see the tree.
    let found = m.sh_ok("find . | sort");
    assert_eq!(
        found.lines().collect::<Vec<_>>(),
        [".", "./a", "./a/b", "./a/b/c", "./a/b/c/f.txt", "./a/hard", "./a/sym", "./empty"]
    );
    assert!(m.sh("du -s .").status.success());

    // rmdir: refused on a non-empty directory with the usual message, fine on an empty one.
    let out = m.sh("rmdir a");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Directory not empty"), "{out:?}");
    m.sh_ok("rmdir empty && rm -r a");
    assert_eq!(m.sh_ok("ls -A"), "");
    let out = m.sh("cat nothing-here");
    assert!(String::from_utf8_lossy(&out.stderr).contains("No such file or directory"), "{out:?}");
    assert!(fs::read_dir(&home).unwrap().next().is_none(), "the server's home is empty too");
}

#[test]
fn mount_cp_mv_and_editor_save() {
    let Some((server, m)) = mounted_alice("mount_cp_mv_and_editor_save", None) else { return };
    let home = server.home_path("alice");
    let local = tempfile::tempdir().unwrap();
    let (one, two) = (sample(1), sample(2));
    fs::create_dir_all(local.path().join("tree/sub")).unwrap();
    fs::write(local.path().join("one.bin"), &one).unwrap();
    fs::write(local.path().join("tree/sub/two.bin"), &two).unwrap();
    let l = local.path().display();

    // cp and cp -r in.
    m.sh_ok(&format!("cp {l}/one.bin . && cp -r {l}/tree ."));
    assert_eq!(hash(&fs::read(home.join("one.bin")).unwrap()), hash(&one));
    assert_eq!(hash(&fs::read(home.join("tree/sub/two.bin")).unwrap()), hash(&two));
    // cp within the mount: copy_file_range, done by the server, so the data never passes
    // through the daemon (its I/O grows by a few requests, not by the file's size).
    let io_before = m.daemon_io_bytes();
    m.sh_ok("cp one.bin copy.bin");
    let moved = m.daemon_io_bytes() - io_before;
    assert!(moved < one.len() as u64 / 4, "cp within the mount moved {moved} bytes through netmount");
    assert_eq!(hash(&fs::read(m.join("copy.bin")).unwrap()), hash(&one));
    // cp and cp -r out.
    m.sh_ok(&format!("cp copy.bin {l}/back.bin && cp -r tree {l}/tree-back"));
    assert_eq!(hash(&fs::read(local.path().join("back.bin")).unwrap()), hash(&one));
    assert_eq!(hash(&fs::read(local.path().join("tree-back/sub/two.bin")).unwrap()), hash(&two));

    // mv within, and replacing an existing file.
    m.sh_ok("mv tree moved && mv moved/sub/two.bin one.bin");
    assert_eq!(hash(&fs::read(m.join("one.bin")).unwrap()), hash(&two));
    assert!(!home.join("tree").exists() && home.join("moved/sub").is_dir());

    // An editor's save: write a temporary file, rename it over the original.
    m.sh_ok("printf 'v1\\n' > doc.txt && cat doc.txt > /dev/null");
    m.sh_ok("printf 'v2 longer\\n' > .doc.txt.swp && mv .doc.txt.swp doc.txt");
    assert_eq!(m.sh_ok("cat doc.txt"), "v2 longer\n");
    assert_eq!(fs::read(home.join("doc.txt")).unwrap(), b"v2 longer\n");
}

#[test]
fn mount_tar_git_sqlite() {
    let Some((_server, m)) = mounted_alice("mount_tar_git_sqlite", None) else { return };
    let local = tempfile::tempdir().unwrap();
    let l = local.path().display();
    fs::create_dir_all(local.path().join("src/deep")).unwrap();
    fs::write(local.path().join("src/deep/data.bin"), sample(3)).unwrap();
    fs::write(local.path().join("src/readme"), b"read me\n").unwrap();

    // tar into the mount, and out of it.
    m.sh_ok(&format!("mkdir x && tar cf - -C {l} src | tar xf - -C x"));
    assert_eq!(hash(&fs::read(m.join("x/src/deep/data.bin")).unwrap()), hash(&sample(3)));
    m.sh_ok(&format!("tar cf {l}/out.tar -C x src && mkdir {l}/out && tar xf {l}/out.tar -C {l}/out"));
    assert_eq!(hash(&fs::read(local.path().join("out/src/deep/data.bin")).unwrap()), hash(&sample(3)));

    // git init, add, commit, clone.
    m.sh_ok(
        "git init -q repo && cd repo && git config user.email t@example.org && git config user.name t \
         && cp ../x/src/readme . && git add readme && git commit -qm first && git log --oneline | grep -q first",
    );
    m.sh_ok("git clone -q repo clone && cmp repo/readme clone/readme && cd clone && git fsck --no-progress");

    // sqlite3 on a database in the mount.
    m.sh_ok("sqlite3 db.sqlite 'create table t(x); insert into t values (1),(2),(3);'");
    assert_eq!(m.sh_ok("sqlite3 db.sqlite 'select sum(x) from t; pragma integrity_check;'"), "6\nok\n");
}

#[test]
fn mount_quota_df_and_exceeded() {
    let Some((server, m)) = mounted_alice("mount_quota_df_and_exceeded", Some("4M")) else { return };
    let df = m.sh_ok("df -B1 --output=size,used,avail . | tail -1");
    let nums: Vec<u64> = df.split_whitespace().map(|n| n.parse().unwrap()).collect();
    assert_eq!(nums[0], 4 << 20, "df size is the quota: {df}");
    assert_eq!(nums[0], nums[1] + nums[2], "used + available = quota: {df}");

    let local = tempfile::tempdir().unwrap();
    fs::write(local.path().join("small"), sample(4)).unwrap();
    let big: Vec<u8> = sample(5).repeat(5);
    fs::write(local.path().join("big"), &big).unwrap();
    let l = local.path().display();
    m.sh_ok(&format!("cp {l}/small ."));
    let out = m.sh(&format!("cp {l}/big ."));
    assert!(!out.status.success(), "cp past the quota fails");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Disk quota exceeded"), "cp says why: {err}");
    assert_eq!(hash(&fs::read(server.home_path("alice").join("small")).unwrap()), hash(&sample(4)));
    assert_eq!(hash(&fs::read(m.join("small")).unwrap()), hash(&sample(4)), "earlier files stay intact");
}
