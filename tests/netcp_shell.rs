//! The netcp shell against a real fsd: its commands through a pipe (stopping at the first failure)
//! and through a pseudo-terminal (prompt, tab completion of remote names), and the login outcome.

use homefs_tests::netcp::{hash_file, server_with_user, write_random, Netcp};
use homefs_tests::server::TestServer;

const PASSWORD: &str = "correct horse";

fn server_with_alice(name: &str) -> (TestServer, Netcp) {
    server_with_user(name, "alice", PASSWORD, None)
}

#[test]
fn netcp_shell_commands_through_a_pipe() {
    let (server, netcp) = server_with_alice("netcp_shell_commands_through_a_pipe");
    let work = tempfile::tempdir().expect("tempdir");
    write_random(&work.path().join("local.bin"), 3 << 20, 21);
    std::fs::create_dir(work.path().join("sub")).expect("mkdir");
    let script = "\
help
mkdir d
cd d
mkdir e
cd e
pwd
put local.bin
ls
cd ../..
pwd
ls d
lcd sub
lpwd
get d/e/local.bin
lcd ..
lls sub
rm d/e/local.bin
rmdir d/e
rmdir d
ls
exit
";
    let run = netcp.shell(script, work.path());
    assert_eq!(run.code, Some(0), "{run:?}");
    let out = &run.stdout;
    assert!(out.starts_with("201 logged in as alice\n"), "{out}");
    assert!(out.contains("\n/d/e\n") && out.contains("\n/\n"), "pwd: {out}");
    assert!(out.contains("local.bin") && out.contains("drwx"), "ls: {out}");
    assert!(out.contains("/sub\n"), "lpwd: {out}");
    assert!(out.contains("verified"), "transfer summary: {out}");
    assert_eq!(hash_file(&work.path().join("sub/local.bin")), hash_file(&work.path().join("local.bin")));
    assert!(!server.home_path("alice").join("d").exists(), "rmdir d");
}

#[test]
fn netcp_shell_pipe_stops_at_first_failure() {
    let (server, netcp) = server_with_alice("netcp_shell_pipe_stops_at_first_failure");
    let work = tempfile::tempdir().expect("tempdir");
    let run = netcp.shell("mkdir ok\ncd nosuch\nmkdir never\n", work.path());
    assert_eq!(run.code, Some(1), "{run:?}");
    assert_eq!(run.stderr.trim(), "netcp: cd nosuch: No such file or directory");
    let home = server.home_path("alice");
    assert!(home.join("ok").is_dir());
    assert!(!home.join("never").exists(), "the shell went on after a failure");
}

#[test]
fn netcp_shell_wrong_password_prints_401() {
    let (_server, mut netcp) = server_with_alice("netcp_shell_wrong_password_prints_401");
    netcp.password = "wrong".into();
    let work = tempfile::tempdir().expect("tempdir");
    let run = netcp.shell("ls\n", work.path());
    assert_eq!(run.code, Some(3), "{run:?}");
    assert!(run.stdout.contains("401 login incorrect"), "{run:?}");
}

#[test]
fn netcp_shell_on_a_terminal() {
    let (server, netcp) = server_with_alice("netcp_shell_on_a_terminal");
    let home = server.home_path("alice");
    std::fs::create_dir_all(home.join("subdir/inner")).expect("mkdir");
    let work = tempfile::tempdir().expect("tempdir");
    write_random(&work.path().join("f.bin"), 6 << 20, 22);
    // Tab completes "sub" to "subdir/" from the server's listing.
    let lines = ["cd sub\t", "pwd", "put f.bin", "ls", "cd ../..", "pwd", "exit"];
    let run = netcp.on_pty_typed(&["shell", &netcp.server], &lines, work.path());
    assert_eq!(run.code, Some(0), "{run:?}");
    let out = &run.stdout;
    assert!(out.contains("201 logged in as alice"), "{out}");
    assert!(out.contains("netcp:/subdir> "), "prompt after cd with completion: {out}");
    assert!(out.contains("\r\n/subdir\r\n") && out.contains("\r\n/\r\n"), "pwd: {out}");
    assert!(out.contains("f.bin"), "ls: {out}");
    assert!(out.contains("ETA") || out.contains("verified"), "transfer shown: {out}");
    assert_eq!(hash_file(&home.join("subdir/f.bin")), hash_file(&work.path().join("f.bin")));
    let history = std::fs::read_to_string(work.path().join("homefs/netcp_history")).expect("history kept");
    assert!(history.contains("cd subdir/") && history.contains("put f.bin"), "{history}");
}
