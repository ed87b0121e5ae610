//! Many files and trees: where each source lands (scp rules), walking a tree (`-r`) into a plan of
//! directories, symlinks (copied as symlinks, never followed) and files, and running the files
//! `-j N` at once over the one connection.

use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use futures::stream::{self, StreamExt};
use homefs_shared::{Attr, ErrorCode, FileKind, SetAttr, SetTime, Timestamp, WirePath};

use super::batch;
use super::progress::{FileProgress, Outcome, Progress};
use super::remote::{last_name, local_name};
use super::resume::{self, SourceId};
use super::transfer::{self, timestamp, TransferOptions};
use super::writeback;
use super::CopyError;
use crate::client::Client;

/// Directories (or symlinks) made, or directories listed, at once: the entries of one level of a
/// tree need no order among themselves; the client's in-flight cap bounds them too.
const ENTRIES_AT_ONCE: usize = 32;

/// What the command line asked for.
#[derive(Debug, Clone, Copy)]
pub struct CopyOptions {
    /// `-r`
    pub recursive: bool,
    /// `-p`
    pub preserve: bool,
    /// Not `--no-resume`.
    pub resume: bool,
    /// `-j N`: files at once (at least 1).
    pub jobs: usize,
}

/// Which way the copy goes.
#[derive(Debug, Clone)]
pub enum Direction {
    /// Local sources to a remote destination.
    Put { sources: Vec<PathBuf>, dest: WirePath },
    /// Remote sources to a local destination.
    Get { sources: Vec<WirePath>, dest: PathBuf },
}

/// How the run went, for the exit status.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// Files and other entries copied.
    pub copied: usize,
    /// Entries that failed.
    pub failed: usize,
    /// Files that arrived but did not verify.
    pub unverified: usize,
    /// Whether a failure was the connection going away.
    pub disconnected: bool,
}

impl Report {
    fn record(&mut self, progress: &Progress, op: &str, path: &str, result: Result<(), CopyError>) {
        match result {
            Ok(()) => self.copied += 1,
            Err(e) => {
                progress.error(&format!("{op} {path}: {e}"));
                self.failed += 1;
                self.unverified += usize::from(e.is_verify());
                self.disconnected |= e.is_connection();
            }
        }
    }
}

/// One step of a plan.
#[derive(Debug, Clone)]
enum Step<L, R> {
    Dir {
        to: R,
        mode: u32,
        mtime: Timestamp,
    },
    Symlink {
        target: Vec<u8>,
        to: R,
    },
    /// `mtime` with `size` names the source's version (see [`SourceId`]).
    File {
        from: L,
        to: R,
        size: u64,
        mtime: Timestamp,
    },
}

type PutStep = Step<PathBuf, WirePath>;
type GetStep = Step<WirePath, PathBuf>;

/// Runs the whole copy, printing one line per failure; never stops at the first failed file.
pub async fn run(client: &Client, direction: Direction, opts: CopyOptions, progress: &mut Progress) -> Report {
    match direction {
        Direction::Put { sources, dest } => run_put(client, sources, dest, opts, progress).await,
        Direction::Get { sources, dest } => run_get(client, sources, dest, opts, progress).await,
    }
}

fn show(p: &Path) -> String {
    p.display().to_string()
}

/// The last name of a local source (`.` and `..` resolved through the real path).
fn local_source_name(p: &Path) -> io::Result<OsString> {
    match p.file_name() {
        Some(n) => Ok(n.to_os_string()),
        None => std::fs::canonicalize(p)?
            .file_name()
            .map(|n| n.to_os_string())
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput)),
    }
}

async fn run_put(
    client: &Client,
    sources: Vec<PathBuf>,
    dest: WirePath,
    opts: CopyOptions,
    progress: &mut Progress,
) -> Report {
    let mut report = Report::default();
    let dest_is_dir = matches!(client.stat(&dest).await, Ok(a) if a.kind == FileKind::Dir);
    if sources.len() > 1 && !dest_is_dir {
        report.record(progress, "put", &dest.to_string(), Err(CopyError::Remote(ErrorCode::NotDir.into())));
        return report;
    }
    let mut plan: Vec<PutStep> = Vec::new();
    for src in &sources {
        let planned = plan_put(src, &dest, dest_is_dir, opts.recursive).await;
        match planned {
            Ok(steps) => plan.extend(steps),
            Err(e) => report.record(progress, "put", &show(src), Err(e)),
        }
    }
    execute_put(client, plan, opts, progress, &mut report).await;
    report
}

async fn plan_put(src: &Path, dest: &WirePath, dest_is_dir: bool, recursive: bool) -> Result<Vec<PutStep>, CopyError> {
    let meta = tokio::fs::metadata(src).await?;
    let to = if dest_is_dir { dest.join(local_source_name(src)?.as_bytes())? } else { dest.clone() };
    if !meta.is_dir() {
        return Ok(vec![Step::File {
            from: src.to_path_buf(),
            to,
            size: meta.len(),
            mtime: timestamp(meta.modified()?),
        }]);
    }
    if !recursive {
        return Err(CopyError::Unsupported(format!("{} (use -r)", ErrorCode::IsDir)));
    }
    let src = src.to_path_buf();
    tokio::task::spawn_blocking(move || walk_local(&src, to))
        .await
        .map_err(|e| CopyError::Local(io::Error::other(e)))?
}

/// Walks a local tree (not following symlinks) into steps, parents before children.
fn walk_local(root: &Path, to: WirePath) -> Result<Vec<PutStep>, CopyError> {
    let mut steps = Vec::new();
    let mut stack = vec![(root.to_path_buf(), to)];
    while let Some((dir, to)) = stack.pop() {
        let meta = std::fs::symlink_metadata(&dir)?;
        steps.push(Step::Dir {
            to: to.clone(),
            mode: meta.permissions().mode() & 0o7777,
            mtime: timestamp(meta.modified()?),
        });
        let mut entries: Vec<_> = std::fs::read_dir(&dir)?.collect::<io::Result<_>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let path = e.path();
            let child = to.join(e.file_name().as_bytes())?;
            let meta = std::fs::symlink_metadata(&path)?;
            let ft = meta.file_type();
            if ft.is_dir() {
                stack.push((path, child));
            } else if ft.is_symlink() {
                let target = std::fs::read_link(&path)?;
                steps.push(Step::Symlink { target: target.as_os_str().as_bytes().to_vec(), to: child });
            } else if ft.is_file() {
                steps.push(Step::File { from: path, to: child, size: meta.len(), mtime: timestamp(meta.modified()?) });
            } else {
                tracing::warn!(path = ?path, "skipping a special file");
            }
        }
    }
    Ok(steps)
}

fn set_total<L, R>(plan: &[Step<L, R>], progress: &mut Progress) {
    let (files, bytes) = plan.iter().fold((0u64, 0u64), |(n, b), s| match s {
        Step::File { size, .. } => (n + 1, b + size),
        _ => (n, b),
    });
    let has_dirs = plan.iter().any(|s| matches!(s, Step::Dir { .. }));
    if files > 1 || has_dirs {
        progress.set_total(files, bytes);
    }
}

/// A file to copy, with the bar that shows it.
type Job<S, D> = (S, D, SourceId, FileProgress);

/// Copies `units` (groups of files from [`batch::group`]) with `copy`, `jobs` units at a time,
/// each file with its own bar; returns each file's label, target and outcome (in completion
/// order). The first unit of several files goes alone, before the others: against a server that
/// does not know batches, only that one is refused (or loses the connection). Both directions of a
/// tree copy share it.
async fn copy_units<S, D, Fut>(
    units: Vec<Vec<(S, D, SourceId)>>,
    jobs: usize,
    progress: &Progress,
    label: impl Fn(&S) -> String,
    copy: impl Fn(Vec<Job<S, D>>) -> Fut,
) -> Vec<(String, D, Result<(), CopyError>)>
where
    Fut: std::future::Future<Output = (Vec<Job<S, D>>, Vec<Result<Outcome, CopyError>>)>,
{
    let (label, copy) = (&label, &copy);
    let run = |unit: Vec<(S, D, SourceId)>| async move {
        let jobs: Vec<Job<S, D>> = unit
            .into_iter()
            .map(|(from, to, id)| {
                let bar = progress.start(&label(&from), id.size);
                (from, to, id, bar)
            })
            .collect();
        let (jobs, results) = copy(jobs).await;
        jobs.into_iter()
            .zip(results)
            .map(|((from, to, _, bar), r)| {
                match &r {
                    Ok(outcome) => bar.finish(outcome),
                    Err(_) => bar.fail(),
                }
                (label(&from), to, r.map(|_| ()))
            })
            .collect::<Vec<_>>()
    };
    let mut units = units;
    let mut done = Vec::new();
    if let Some(i) = units.iter().position(|u| u.len() > 1) {
        done.extend(run(units.swap_remove(i)).await);
    }
    let rest: Vec<_> = stream::iter(units).map(run).buffer_unordered(jobs.max(1)).collect().await;
    done.extend(rest.into_iter().flatten());
    done
}

async fn execute_put(
    client: &Client,
    plan: Vec<PutStep>,
    opts: CopyOptions,
    progress: &mut Progress,
    report: &mut Report,
) {
    set_total(&plan, progress);
    // Directories and symlinks made count as copied too: the final sync covers them.
    let any_steps = !plan.is_empty();
    let mut files = Vec::new();
    let mut dirs = Vec::new();
    let mut links = Vec::new();
    for step in plan {
        match step {
            Step::Dir { to, mode, mtime } => dirs.push((to, mode, mtime)),
            Step::Symlink { target, to } => links.push((target, to)),
            Step::File { from, to, size, mtime } => files.push((from, to, SourceId { size, mtime })),
        }
    }
    // The directories one depth at a time (a parent before its children), each depth's at once:
    // a round trip per level of the tree instead of one per directory. Then the symlinks, at once.
    let mut levels = std::collections::BTreeMap::<usize, Vec<(&WirePath, u32)>>::new();
    for (to, mode, _) in &dirs {
        levels.entry(to.components().count()).or_default().push((to, *mode));
    }
    for level in levels.into_values() {
        let made: Vec<_> = stream::iter(level)
            .map(|(to, mode)| async move { (to, remote_mkdir(client, to, mode).await) })
            .buffer_unordered(ENTRIES_AT_ONCE)
            .collect()
            .await;
        for (to, r) in made {
            report.record(progress, "mkdir", &to.to_string(), r);
        }
    }
    let linked: Vec<_> = stream::iter(&links)
        .map(|(target, to)| async move { (to, remote_symlink(client, target, to).await) })
        .buffer_unordered(ENTRIES_AT_ONCE)
        .collect()
        .await;
    for (to, r) in linked {
        report.record(progress, "symlink", &to.to_string(), r);
    }
    let swept = opts.resume && files.len() > 1;
    if swept {
        sweep_remote(client, files.iter().map(|(_, to, id)| (to, id))).await;
    }
    let topts = TransferOptions { preserve: opts.preserve, resume: opts.resume, swept };
    let sync_label = dest_label(&dirs);
    // What this run wrote on the server, to be made durable at the end.
    let mut written: Vec<WirePath> = dirs.iter().map(|(to, _, _)| to.clone()).collect();
    written.extend(links.iter().map(|(_, to)| to.clone()));
    let batches = batch::Batches::new(true);
    let units = batch::group(files, |f| f.2.size, |f| f.1.as_bytes().len());
    let (batches_ref, jobs) = (&batches, opts.jobs);
    let results = copy_units(
        units,
        opts.jobs,
        progress,
        |from| show(from),
        |files| async move {
            let results = match files.as_slice() {
                [(from, to, _, bar)] => vec![transfer::put(client, from, to, topts, bar).await],
                _ => batch::put(client, &files, topts, batches_ref, jobs).await,
            };
            (files, results)
        },
    )
    .await;
    for (label, to, r) in results {
        if r.is_ok() {
            written.push(to);
        }
        report.record(progress, "put", &label, r);
    }
    if opts.preserve {
        // Deepest first: setting a child's times would change its parent's mtime.
        for (to, mode, mtime) in dirs.into_iter().rev() {
            let set = SetAttr { mode: Some(mode), mtime: Some(SetTime::At(mtime)), ..SetAttr::default() };
            if let Err(e) = client.setattr(&to, None, set).await {
                report.record(progress, "setattr", &to.to_string(), Err(e.into()));
            }
        }
    }
    // One sync for the whole run (after the last change, -p included) instead of one per file:
    // success means on the server's disk. Only what this run wrote (`Sync`), so that the run does
    // not wait for other processes' dirty data on the server's file system (a `SyncFs` would).
    if any_steps {
        let started = std::time::Instant::now();
        let synced = batch::sync(client, written, &batches, opts.jobs).await;
        tracing::debug!(elapsed = ?started.elapsed(), "server file system synced");
        if let Err(e) = synced {
            report.record(progress, "sync", &sync_label, Err(e));
        }
    }
    progress.finish();
}

/// What a failed remote sync names: the top directory of the copy, or the home.
fn dest_label(dirs: &[(WirePath, u32, Timestamp)]) -> String {
    dirs.first().map_or_else(|| "~".to_string(), |(d, _, _)| d.to_string())
}

/// Groups `(target, source version)` by the target's directory: `(dir, [(name, id)])`.
fn by_directory<D: Ord + Clone, I>(files: I) -> std::collections::BTreeMap<D, Vec<(Vec<u8>, SourceId)>>
where
    I: IntoIterator<Item = (D, Vec<u8>, SourceId)>,
{
    let mut dirs: std::collections::BTreeMap<D, Vec<(Vec<u8>, SourceId)>> = std::collections::BTreeMap::new();
    for (dir, name, id) in files {
        dirs.entry(dir).or_default().push((name, id));
    }
    dirs
}

/// Removes partial files left by other versions of the files about to be put, listing each target
/// directory once (best effort: a failure only leaves a stale file behind).
async fn sweep_remote<'a>(client: &Client, files: impl Iterator<Item = (&'a WirePath, &'a SourceId)>) {
    let split = files.filter_map(|(to, id)| to.split_last().map(|(dir, name)| (dir, name.to_vec(), *id)));
    for (dir, names) in by_directory(split) {
        let Ok(entries) = client.read_dir(&dir).await else { continue };
        for e in entries {
            if e.attr.kind == FileKind::File && names.iter().any(|(n, id)| resume::is_stale_part(&e.name, n, id)) {
                if let Ok(p) = dir.join(&e.name) {
                    let _ = client.unlink(&p).await;
                }
            }
        }
    }
}

/// The same for the local targets of a get.
fn sweep_local<'a>(files: impl Iterator<Item = (&'a Path, &'a SourceId)>) {
    let split = files.filter_map(|(to, id)| {
        let name = to.file_name()?.as_bytes().to_vec();
        let dir = match to.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        Some((dir, name, *id))
    });
    for (dir, names) in by_directory(split) {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            if names.iter().any(|(n, id)| resume::is_stale_part(e.file_name().as_bytes(), n, id)) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

async fn remote_mkdir(client: &Client, to: &WirePath, mode: u32) -> Result<(), CopyError> {
    match client.mkdir(to, mode & 0o777 | 0o700).await {
        Ok(_) => Ok(()),
        Err(e) if e.code == ErrorCode::Exists => match client.stat(to).await? {
            a if a.kind == FileKind::Dir => Ok(()),
            _ => Err(e.into()),
        },
        Err(e) => Err(e.into()),
    }
}

async fn remote_symlink(client: &Client, target: &[u8], to: &WirePath) -> Result<(), CopyError> {
    match client.symlink(target, to).await {
        Err(e) if e.code == ErrorCode::Exists => {
            client.unlink(to).await?;
            client.symlink(target, to).await?;
            Ok(())
        }
        r => r.map(|_| ()).map_err(CopyError::from),
    }
}

async fn run_get(
    client: &Client,
    sources: Vec<WirePath>,
    dest: PathBuf,
    opts: CopyOptions,
    progress: &mut Progress,
) -> Report {
    let mut report = Report::default();
    let dest_is_dir = dest.is_dir();
    if sources.len() > 1 && !dest_is_dir {
        report.record(progress, "get", &show(&dest), Err(CopyError::Local(io::Error::from_raw_os_error(20))));
        return report;
    }
    let mut plan: Vec<GetStep> = Vec::new();
    for src in &sources {
        match plan_get(client, src, &dest, dest_is_dir, opts.recursive).await {
            Ok(steps) => plan.extend(steps),
            Err(e) => report.record(progress, "get", &src.to_string(), Err(e)),
        }
    }
    execute_get(client, plan, opts, progress, &mut report).await;
    report
}

async fn plan_get(
    client: &Client,
    src: &WirePath,
    dest: &Path,
    dest_is_dir: bool,
    recursive: bool,
) -> Result<Vec<GetStep>, CopyError> {
    let attr = client.stat(src).await?;
    let to = if dest_is_dir {
        let name = last_name(src).ok_or_else(|| CopyError::Unsupported("the source has no name".into()))?;
        dest.join(local_name(&name))
    } else {
        dest.to_path_buf()
    };
    match attr.kind {
        FileKind::Dir if recursive => walk_remote(client, src.clone(), to, attr).await,
        FileKind::Dir => Err(CopyError::Unsupported(format!("{} (use -r)", ErrorCode::IsDir))),
        FileKind::Symlink if recursive => Ok(vec![Step::Symlink { target: client.readlink(src).await?, to }]),
        // A symlink without -r is opened through the server's jail, which keeps it inside the home.
        _ => Ok(vec![Step::File { from: src.clone(), to, size: attr.size, mtime: attr.mtime }]),
    }
}

/// Walks a remote tree (symlinks are not followed) into steps, parents before children.
async fn walk_remote(client: &Client, root: WirePath, to: PathBuf, attr: Attr) -> Result<Vec<GetStep>, CopyError> {
    // Breadth first, one depth at a time, each depth's directories listed at once: a round-trip
    // wait per level of the tree instead of one per directory. A directory's step comes before
    // everything under it.
    let mut steps = Vec::new();
    let mut level = vec![(root, to, attr)];
    while !level.is_empty() {
        let listed: Vec<_> = stream::iter(level)
            .map(|(dir, to, attr)| async move { client.read_dir(&dir).await.map(|entries| (dir, to, attr, entries)) })
            .buffered(ENTRIES_AT_ONCE)
            .collect()
            .await;
        let mut next = Vec::new();
        for listing in listed {
            let (dir, to, attr, entries) = listing?;
            steps.push(Step::Dir { to: to.clone(), mode: attr.perm & 0o7777, mtime: attr.mtime });
            for e in entries {
                let path = dir.join(&e.name)?;
                let child = to.join(local_name(&e.name));
                match e.attr.kind {
                    FileKind::Dir => next.push((path, child, e.attr)),
                    FileKind::Symlink => steps.push(Step::Symlink { target: client.readlink(&path).await?, to: child }),
                    FileKind::File => {
                        steps.push(Step::File { from: path, to: child, size: e.attr.size, mtime: e.attr.mtime })
                    }
                    _ => tracing::warn!(path = %path, "skipping a special file"),
                }
            }
        }
        level = next;
    }
    Ok(steps)
}

async fn execute_get(
    client: &Client,
    plan: Vec<GetStep>,
    opts: CopyOptions,
    progress: &mut Progress,
    report: &mut Report,
) {
    set_total(&plan, progress);
    // Every local directory and symlink this run makes, and later every file it stores: what to
    // make durable at the end.
    let mut targets: Vec<PathBuf> = plan
        .iter()
        .filter_map(|s| match s {
            Step::Dir { to, .. } | Step::Symlink { to, .. } => Some(to.clone()),
            Step::File { .. } => None,
        })
        .collect();
    let first_dir = plan.iter().find_map(|s| match s {
        Step::Dir { to, .. } => Some(to.clone()),
        _ => None,
    });
    let mut files = Vec::new();
    let mut dirs = Vec::new();
    for step in plan {
        match step {
            Step::Dir { to, mode, mtime } => {
                let r = match std::fs::create_dir(&to) {
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists && to.is_dir() => Ok(()),
                    r => r.map_err(CopyError::from),
                };
                report.record(progress, "mkdir", &show(&to), r);
                dirs.push((to, mode, mtime));
            }
            Step::Symlink { target, to } => {
                let _ = std::fs::remove_file(&to);
                let r = std::os::unix::fs::symlink(local_name(&target), &to).map_err(CopyError::from);
                report.record(progress, "symlink", &show(&to), r);
            }
            Step::File { from, to, size, mtime } => files.push((from, to, SourceId { size, mtime })),
        }
    }
    let swept = opts.resume && files.len() > 1;
    if swept {
        sweep_local(files.iter().map(|(_, to, id)| (to.as_path(), id)));
    }
    let topts = TransferOptions { preserve: opts.preserve, resume: opts.resume, swept };
    // Each source with its size from the listing, so that a large file is streamed at once.
    let batches = batch::Batches::new(true);
    // The writeback of what landed runs in the background while the rest arrives (one syncfs of
    // the destination now and then), so that the sync at the end has only the tail to write.
    let flusher = first_dir.map(|d| writeback::Flusher::new(d, files.len()));
    let units = batch::group(files, |f| f.2.size, |f| f.0.as_bytes().len());
    let (batches_ref, jobs, flusher_ref) = (&batches, opts.jobs, &flusher);
    let results = copy_units(
        units,
        opts.jobs,
        progress,
        |from| from.to_string(),
        |files| async move {
            let results = match files.as_slice() {
                [(from, to, id, bar)] => vec![transfer::get_sized(client, from, to, topts, bar, Some(id.size)).await],
                _ => batch::get(client, &files, topts, batches_ref, jobs).await,
            };
            if let Some(f) = flusher_ref {
                f.stored(results.iter().filter(|r| r.is_ok()).count());
            }
            (files, results)
        },
    )
    .await;
    for (label, to, r) in results {
        if r.is_ok() {
            targets.push(to);
        }
        report.record(progress, "get", &label, r);
    }
    if opts.preserve {
        for (to, mode, mtime) in dirs.into_iter().rev() {
            let r = std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode))
                .and_then(|()| std::fs::File::open(&to)?.set_modified(transfer::system_time(mtime)));
            if let Err(e) = r {
                report.record(progress, "setattr", &show(&to), Err(e.into()));
            }
        }
    }
    // Only what this run wrote (or one syncfs per local file system, when that is cheaper).
    if !targets.is_empty() {
        let label = show(&targets[0]);
        let started = std::time::Instant::now();
        let synced = tokio::task::spawn_blocking(move || transfer::sync_local(targets.iter().map(PathBuf::as_path)))
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e)));
        tracing::debug!(elapsed = ?started.elapsed(), "local file systems synced");
        if let Err(e) = synced {
            report.record(progress, "sync", &label, Err(e.into()));
        }
    }
    progress.finish();
}
