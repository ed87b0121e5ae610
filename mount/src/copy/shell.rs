//! The FTP-style shell (`netcp shell`): `ls pwd cd mkdir rmdir rm get put exit help lcd lpwd lls`,
//! with line editing, history (kept in [`history_path`]) and tab completion of remote names on a
//! terminal, or one command per
//! line from a pipe, stopping at the first failure.
//!
//! The remote working directory is kept here, client-side, and normalised lexically
//! ([`RemoteCwd`]); the server only ever sees paths below the home. `get` and `put` use the same
//! transfer code as `netcp` (bars, verification, resume).
//!
//! The shell runs on a plain thread (the caller's), not on a runtime thread: each command, and each
//! completion, is driven with `Handle::block_on`, bounded by [`COMPLETION_TIMEOUT`] for completion.

use std::borrow::Cow;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use homefs_shared::{Attr, DirEntry, ErrorCode, FileKind, WirePath};
use rustyline::completion::{Completer, FilenameCompleter, Pair};
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::history::DefaultHistory;
use rustyline::validate::Validator;
use rustyline::{Context, Editor, Helper};
use tokio::runtime::Handle;

use super::batch::{self, Batches};
use super::progress::{Output, Progress};
use super::remote::{local_name, RemoteCwd};
use super::transfer::{self, TransferOptions};
use super::CopyError;
use crate::client::Client;

/// The longest a tab completion waits for the server's listing.
pub const COMPLETION_TIMEOUT: Duration = Duration::from_secs(5);

/// The commands, with their help lines.
const COMMANDS: &[(&str, &str)] = &[
    ("ls", "ls [PATH]          list a remote directory"),
    ("pwd", "pwd                print the remote directory"),
    ("cd", "cd [PATH]          change the remote directory (no PATH: the home)"),
    ("mkdir", "mkdir PATH...      make remote directories"),
    ("rmdir", "rmdir PATH...      remove empty remote directories"),
    ("rm", "rm PATH...         remove remote files"),
    ("get", "get REMOTE [LOCAL] copy a remote file here (verified, resumable)"),
    ("put", "put LOCAL [REMOTE] copy a local file there (verified, resumable)"),
    ("lcd", "lcd [DIR]          change the local directory"),
    ("lpwd", "lpwd               print the local directory"),
    ("lls", "lls [DIR]          list a local directory"),
    ("help", "help               this list"),
    ("exit", "exit               leave (also quit, bye, Ctrl-D)"),
];

/// How a shell session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShellEnd {
    /// `exit`, end of input, or (interactively) after any errors.
    Done,
    /// Reading from a pipe, a command failed: the session stopped there.
    Failed,
}

enum Flow {
    Continue,
    Exit,
}

/// One failed command: `OP PATH: reason`.
#[derive(Debug)]
struct Failure {
    op: String,
    path: String,
    error: CopyError,
}

impl Failure {
    fn new(op: &str, path: impl Into<String>, error: impl Into<CopyError>) -> Failure {
        Failure { op: op.to_string(), path: path.into(), error: error.into() }
    }
}

/// The shell's state.
pub struct Shell {
    client: Client,
    handle: Handle,
    /// The remote working directory; shared with the completer.
    cwd: Arc<Mutex<RemoteCwd>>,
    opts: TransferOptions,
    quiet: bool,
    /// Whether the server takes `Sync` (an older one does not: then `SyncFs`).
    batches: Batches,
}

impl Shell {
    /// A shell on a logged-in client, in the home.
    pub fn new(client: Client, handle: Handle, opts: TransferOptions, quiet: bool) -> Shell {
        let batches = Batches::new(true);
        Shell { client, handle, cwd: Arc::new(Mutex::new(RemoteCwd::default())), opts, quiet, batches }
    }

    fn cwd(&self) -> RemoteCwd {
        self.cwd.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Runs until `exit` or end of input: interactive on a terminal, else one command per line.
    pub fn run(self) -> ShellEnd {
        if std::io::stdin().is_terminal() {
            self.run_interactive()
        } else {
            self.run_script(std::io::stdin().lock())
        }
    }

    /// Runs commands read from `input`, one per line, stopping at the first failure.
    pub fn run_script(self, input: impl BufRead) -> ShellEnd {
        for line in input.lines() {
            let Ok(line) = line else {
                eprintln!("netcp: shell: cannot read the commands");
                return ShellEnd::Failed;
            };
            match self.execute(&line) {
                Ok(Flow::Continue) => {}
                Ok(Flow::Exit) => return ShellEnd::Done,
                Err(f) => {
                    eprintln!("netcp: {} {}: {}", f.op, f.path, f.error);
                    return ShellEnd::Failed;
                }
            }
        }
        ShellEnd::Done
    }

    fn run_interactive(self) -> ShellEnd {
        let helper = ShellHelper {
            client: self.client.clone(),
            handle: self.handle.clone(),
            cwd: self.cwd.clone(),
            files: FilenameCompleter::new(),
        };
        let mut editor = match Editor::<ShellHelper, DefaultHistory>::new() {
            Ok(e) => e,
            Err(e) => {
                eprintln!("netcp: shell: cannot use the terminal ({e}); reading lines instead");
                return self.run_script(std::io::stdin().lock());
            }
        };
        editor.set_helper(Some(helper));
        let history = history_path();
        if let Some(file) = &history {
            // A missing or unreadable history only means an empty one.
            let _ = editor.load_history(file);
        }
        let end = loop {
            let prompt = format!("netcp:{}> ", self.cwd().display());
            match editor.readline(&prompt) {
                Ok(line) => {
                    if !line.trim().is_empty() {
                        let _ = editor.add_history_entry(line.as_str());
                    }
                    match self.execute(&line) {
                        Ok(Flow::Continue) => {}
                        Ok(Flow::Exit) => break ShellEnd::Done,
                        Err(f) => eprintln!("netcp: {} {}: {}", f.op, f.path, f.error),
                    }
                }
                Err(ReadlineError::Interrupted) => continue,
                Err(ReadlineError::Eof) => break ShellEnd::Done,
                Err(e) => {
                    eprintln!("netcp: shell: {e}");
                    break ShellEnd::Failed;
                }
            }
        };
        if let Some(file) = &history {
            let saved = file
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| editor.save_history(file).map_err(|e| std::io::Error::other(e.to_string())));
            if let Err(e) = saved {
                eprintln!("netcp: shell: cannot save the history to {}: {e}", file.display());
            }
        }
        end
    }

    fn remote(&self, arg: &str) -> Result<WirePath, Failure> {
        self.cwd().resolve(arg.as_bytes()).wire().map_err(|e| Failure::new("path", arg, e))
    }

    fn execute(&self, line: &str) -> Result<Flow, Failure> {
        let words = split_words(line);
        let Some((cmd, args)) = words.split_first() else { return Ok(Flow::Continue) };
        if cmd.starts_with('#') {
            return Ok(Flow::Continue);
        }
        let handle = &self.handle;
        match cmd.as_str() {
            "help" | "?" => {
                for (_, line) in COMMANDS {
                    println!("{line}");
                }
            }
            "exit" | "quit" | "bye" => return Ok(Flow::Exit),
            "pwd" => println!("{}", self.cwd().display()),
            "cd" => {
                let arg = args.first().map_or("/", String::as_str);
                let target = self.cwd().resolve(arg.as_bytes());
                let path = target.wire().map_err(|e| Failure::new("cd", arg, e))?;
                let attr = block_on_stat(&self.handle, &self.client, &path).map_err(|e| Failure::new("cd", arg, e))?;
                if attr.kind != FileKind::Dir {
                    return Err(Failure::new("cd", arg, homefs_shared::WireError::from(ErrorCode::NotDir)));
                }
                if let Ok(mut cwd) = self.cwd.lock() {
                    *cwd = target;
                }
            }
            "ls" | "dir" => {
                let arg = args.first().map_or(".", String::as_str);
                let path = self.remote(arg)?;
                let attr = block_on_stat(&self.handle, &self.client, &path).map_err(|e| Failure::new("ls", arg, e))?;
                if attr.kind == FileKind::Dir {
                    let entries =
                        handle.block_on(self.client.read_dir(&path)).map_err(|e| Failure::new("ls", arg, e))?;
                    for e in entries {
                        println!("{}", ls_line(&e.attr, &e.name));
                    }
                } else {
                    println!("{}", ls_line(&attr, arg.as_bytes()));
                }
            }
            "mkdir" | "rmdir" | "rm" | "delete" => {
                if args.is_empty() {
                    return Err(Failure::new(cmd, "", CopyError::Unsupported("a path is needed".into())));
                }
                for arg in args {
                    let path = self.remote(arg)?;
                    let r = match cmd.as_str() {
                        "mkdir" => handle.block_on(async { self.client.mkdir(&path, 0o755).await.map(|_| ()) }),
                        "rmdir" => handle.block_on(self.client.rmdir(&path)),
                        _ => handle.block_on(self.client.unlink(&path)),
                    };
                    r.map_err(|e| Failure::new(cmd, arg.as_str(), e))?;
                }
            }
            "get" => {
                let Some(src) = args.first() else {
                    return Err(Failure::new("get", "", CopyError::Unsupported("usage: get REMOTE [LOCAL]".into())));
                };
                let path = self.remote(src)?;
                let name = self.cwd().resolve(src.as_bytes()).name().map(<[u8]>::to_vec);
                let name =
                    name.ok_or_else(|| Failure::new("get", src.as_str(), CopyError::Remote(ErrorCode::IsDir.into())))?;
                let local = match args.get(1) {
                    Some(l) if Path::new(l).is_dir() => Path::new(l).join(local_name(&name)),
                    Some(l) => PathBuf::from(l),
                    None => PathBuf::from(local_name(&name)),
                };
                let attr = block_on_stat(&self.handle, &self.client, &path)
                    .map_err(|e| Failure::new("get", src.as_str(), e))?;
                let progress = Progress::new(Output::detect(self.quiet));
                let bar = progress.start(src, attr.size);
                let got =
                    handle.block_on(transfer::get_sized(&self.client, &path, &local, self.opts, &bar, Some(attr.size)));
                // Durable before the command reports success (one syncfs, not a per-file fsync).
                let got =
                    got.and_then(|o| transfer::sync_local([local.as_path()]).map(|()| o).map_err(CopyError::from));
                match got {
                    Ok(outcome) => bar.finish(&outcome),
                    Err(e) => {
                        bar.fail();
                        return Err(Failure::new("get", src.as_str(), e));
                    }
                }
            }
            "put" => {
                let Some(src) = args.first() else {
                    return Err(Failure::new("put", "", CopyError::Unsupported("usage: put LOCAL [REMOTE]".into())));
                };
                let local = PathBuf::from(src);
                let name = local
                    .file_name()
                    .map(|n| std::os::unix::ffi::OsStrExt::as_bytes(n).to_vec())
                    .ok_or_else(|| Failure::new("put", src.as_str(), CopyError::Remote(ErrorCode::IsDir.into())))?;
                let mut target = self.remote(args.get(1).map_or(".", String::as_str))?;
                let is_dir =
                    matches!(block_on_stat(&self.handle, &self.client, &target), Ok(a) if a.kind == FileKind::Dir);
                if is_dir {
                    target = target.join(&name).map_err(|e| Failure::new("put", src.as_str(), e))?;
                }
                let size = std::fs::metadata(&local).map_err(|e| Failure::new("put", src.as_str(), e))?.len();
                let progress = Progress::new(Output::detect(self.quiet));
                let bar = progress.start(src, size);
                let put = handle.block_on(async {
                    let outcome = transfer::put(&self.client, &local, &target, self.opts, &bar).await?;
                    // Durable on the server before the command reports success: that file only.
                    batch::sync(&self.client, vec![target.clone()], &self.batches, 1).await.map(|()| outcome)
                });
                match put {
                    Ok(outcome) => bar.finish(&outcome),
                    Err(e) => {
                        bar.fail();
                        return Err(Failure::new("put", src.as_str(), e));
                    }
                }
            }
            "lcd" => {
                let dir = match args.first() {
                    Some(d) => PathBuf::from(d),
                    None => std::env::var_os("HOME").map_or_else(|| PathBuf::from("/"), PathBuf::from),
                };
                std::env::set_current_dir(&dir).map_err(|e| Failure::new("lcd", dir.display().to_string(), e))?;
            }
            "lpwd" => {
                let dir = std::env::current_dir().map_err(|e| Failure::new("lpwd", ".", e))?;
                println!("{}", dir.display());
            }
            "lls" => {
                let dir = args.first().map_or(".", String::as_str);
                let mut names: Vec<_> = std::fs::read_dir(dir)
                    .map_err(|e| Failure::new("lls", dir, e))?
                    .filter_map(Result::ok)
                    .map(|e| {
                        let slash = if e.file_type().is_ok_and(|t| t.is_dir()) { "/" } else { "" };
                        format!("{}{slash}", e.file_name().to_string_lossy())
                    })
                    .collect();
                names.sort();
                for n in names {
                    println!("{n}");
                }
            }
            other => {
                return Err(Failure::new(other, "", CopyError::Unsupported("unknown command (try help)".into())));
            }
        }
        let _ = std::io::stdout().flush();
        Ok(Flow::Continue)
    }
}

/// Where the shell keeps its history: `$XDG_STATE_HOME/homefs/netcp_history`, else
/// `~/.local/state/homefs/netcp_history`; none without either variable.
pub fn history_path() -> Option<PathBuf> {
    let state = match std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").filter(|v| !v.is_empty())?).join(".local/state"),
    };
    Some(state.join("homefs").join("netcp_history"))
}

fn block_on_stat(handle: &Handle, client: &Client, path: &WirePath) -> Result<Attr, homefs_shared::WireError> {
    handle.block_on(client.stat(path))
}

/// One `ls` line: type and permissions, size, name (`/` after a directory, `@` after a symlink).
fn ls_line(attr: &Attr, name: &[u8]) -> String {
    let kind = match attr.kind {
        FileKind::Dir => 'd',
        FileKind::Symlink => 'l',
        FileKind::File => '-',
        FileKind::Fifo => 'p',
        FileKind::Socket => 's',
        FileKind::CharDevice => 'c',
        FileKind::BlockDevice => 'b',
    };
    let mut perm = String::with_capacity(9);
    for shift in [6, 3, 0] {
        let bits = (attr.perm >> shift) & 7;
        perm.push(if bits & 4 != 0 { 'r' } else { '-' });
        perm.push(if bits & 2 != 0 { 'w' } else { '-' });
        perm.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    let suffix = match attr.kind {
        FileKind::Dir => "/",
        FileKind::Symlink => "@",
        _ => "",
    };
    format!("{kind}{perm} {:>12} {}{suffix}", attr.size, String::from_utf8_lossy(name))
}

/// Splits a command line into words: whitespace separates, `'...'` and `"..."` quote, `\` escapes.
fn split_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (q, '\\') if q != Some('\'') => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            (_, c) => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    words
}

/// Completes command names, remote names (for remote arguments) and local names (for `lcd`,
/// `lls` and `put`'s first argument).
struct ShellHelper {
    client: Client,
    handle: Handle,
    cwd: Arc<Mutex<RemoteCwd>>,
    files: FilenameCompleter,
}

impl ShellHelper {
    fn remote_entries(&self, dir: &[u8]) -> Vec<DirEntry> {
        let cwd = self.cwd.lock().map(|c| c.clone()).unwrap_or_default();
        let Ok(path) = cwd.resolve(dir).wire() else { return Vec::new() };
        let listing =
            self.handle.block_on(async { tokio::time::timeout(COMPLETION_TIMEOUT, self.client.read_dir(&path)).await });
        match listing {
            Ok(Ok(entries)) => entries,
            _ => Vec::new(),
        }
    }
}

impl Completer for ShellHelper {
    type Candidate = Pair;

    fn complete(&self, line: &str, pos: usize, _ctx: &Context<'_>) -> rustyline::Result<(usize, Vec<Pair>)> {
        let before = &line[..pos];
        let start = before.rfind(char::is_whitespace).map_or(0, |i| i + 1);
        let word = &before[start..];
        let earlier: Vec<&str> = before[..start].split_whitespace().collect();
        let Some(cmd) = earlier.first() else {
            let names = COMMANDS
                .iter()
                .filter(|(c, _)| c.starts_with(word))
                .map(|(c, _)| Pair { display: (*c).to_string(), replacement: format!("{c} ") })
                .collect();
            return Ok((start, names));
        };
        let local = matches!(*cmd, "lcd" | "lls") || (*cmd == "put" && earlier.len() == 1);
        if local {
            return self.files.complete_path(line, pos);
        }
        let (dir, prefix) = match word.rfind('/') {
            Some(i) => (&word[..=i], &word[i + 1..]),
            None => ("", word),
        };
        let candidates = self
            .remote_entries(dir.as_bytes())
            .into_iter()
            .filter(|e| e.name.starts_with(prefix.as_bytes()))
            .map(|e| {
                let name = String::from_utf8_lossy(&e.name).into_owned();
                let slash = if e.attr.kind == FileKind::Dir { "/" } else { "" };
                Pair { display: format!("{name}{slash}"), replacement: format!("{dir}{name}{slash}") }
            })
            .collect();
        Ok((start, candidates))
    }
}

impl Hinter for ShellHelper {
    type Hint = String;
}

impl Highlighter for ShellHelper {
    fn highlight_prompt<'b, 's: 'b, 'p: 'b>(&'s self, prompt: &'p str, _default: bool) -> Cow<'b, str> {
        Cow::Borrowed(prompt)
    }
}

impl Validator for ShellHelper {}

impl Helper for ShellHelper {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words() {
        assert_eq!(split_words("  put  a b "), vec!["put", "a", "b"]);
        assert_eq!(split_words(r#"get "my file" 'x y'"#), vec!["get", "my file", "x y"]);
        assert_eq!(split_words(r"rm a\ b"), vec!["rm", "a b"]);
        assert_eq!(split_words(r#"mkdir """#), vec!["mkdir", ""]);
        assert!(split_words("   ").is_empty());
    }

    #[test]
    fn ls_lines() {
        let t = homefs_shared::Timestamp::default();
        let a = Attr {
            ino: 1,
            kind: FileKind::Dir,
            perm: 0o755,
            nlink: 2,
            size: 4096,
            blocks: 8,
            atime: t,
            mtime: t,
            ctime: t,
        };
        assert_eq!(ls_line(&a, b"docs"), "drwxr-xr-x         4096 docs/");
    }
}
