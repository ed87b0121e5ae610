//! Landlock: after start, fsd confines itself to its storage root (read/write), its config
//! directory and the users file's directory (read: the server only re-reads the users file; the
//! `fsd user` commands that write it are other, unconfined processes), its log file (write) and
//! `/proc/meminfo` (read: the dirty data that decides how a `Sync` is done), so that
//! even a bug in path handling cannot reach the rest of the machine. Best effort: on a kernel
//! without Landlock the server runs unconfined and says so.

use landlock::{
    path_beneath_rules, Access, AccessFs, Ruleset, RulesetAttr, RulesetCreated, RulesetCreatedAttr, RulesetError,
    RulesetStatus, ABI,
};
use std::path::Path;

use crate::config::Config;

/// Why the confinement could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error(transparent)]
    Landlock(#[from] RulesetError),
}

/// The newest Landlock ABI we know; older kernels get what they support (best effort).
const ABI_VERSION: ABI = ABI::V5;

/// Builds the rules while every path can still be opened (before privileges are dropped: the
/// run_as user may not be able to traverse the config directory's parents).
///
/// # Errors
/// [`ConfineError`] when a path cannot be opened for its rule.
pub fn prepare(config: &Config, config_dir: &Path) -> Result<RulesetCreated, ConfineError> {
    let all = AccessFs::from_all(ABI_VERSION);
    let read = AccessFs::from_read(ABI_VERSION);
    let users_dir = config.auth.users_file.parent().unwrap_or(Path::new("/"));
    let mut ruleset = Ruleset::default()
        .handle_access(all)?
        .create()?
        .add_rules(path_beneath_rules([&config.storage.root], all))?
        .add_rules(path_beneath_rules([config_dir, users_dir], read))?;
    // Read only, one file: how much data waits for writeback decides whether a netcp `Sync` is
    // cheaper as one `syncfs` or as an fsync per path (ops/whole.rs). Without it, the server
    // assumes nothing else is dirty.
    let meminfo = Path::new("/proc/meminfo");
    if meminfo.is_file() {
        ruleset = ruleset.add_rules(path_beneath_rules([meminfo], AccessFs::ReadFile))?;
    }
    if !config.log.file.as_os_str().is_empty() {
        ruleset = ruleset.add_rules(path_beneath_rules([&config.log.file], AccessFs::from_write(ABI_VERSION)))?;
    }
    Ok(ruleset)
}

/// Restricts this thread and every thread it creates later (so: before the runtime starts).
/// Returns whether the kernel enforces the rules fully, partly, or not at all, for the log.
///
/// # Errors
/// [`ConfineError`] when the kernel refuses the restriction.
pub fn enforce(ruleset: RulesetCreated) -> Result<&'static str, ConfineError> {
    let status = ruleset.restrict_self()?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => "fully enforced",
        RulesetStatus::PartiallyEnforced => "partially enforced (older kernel ABI)",
        RulesetStatus::NotEnforced => "not enforced (no Landlock in this kernel)",
    })
}
