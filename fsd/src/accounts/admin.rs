//! `fsd user add|passwd|del|quota|list`: edits of the users file, each one load, change, atomic
//! save. A running server picks the change up by itself.

use std::io::{self, BufRead, IsTerminal};
use std::path::{Path, PathBuf};

use super::auth::{hash_password, HashError};
use super::users::{is_valid_name, UserEntry, UsersError, UsersFile};
use crate::config::{ByteSize, Config};

/// Why a user command failed; each is one line for the admin.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Users(#[from] UsersError),
    #[error(transparent)]
    Hash(#[from] HashError),
    #[error(
        "{0:?} is not a valid user name (lowercase letters, digits, _ . -, starting with a letter or _; at most 32)"
    )]
    BadName(String),
    #[error("user {0:?} already exists")]
    Exists(String),
    #[error("no user {0:?}")]
    NoSuchUser(String),
    #[error("empty password refused")]
    EmptyPassword,
    #[error("the passwords do not match")]
    Mismatch,
    #[error("no terminal to ask for the password (use --password-stdin)")]
    NoTerminal,
    #[error("cannot read the password: {0}")]
    ReadPassword(io::Error),
    #[error("argon2 parameters: {0}")]
    Params(String),
    #[error("{path}: {error}")]
    Home { path: PathBuf, error: io::Error },
}

/// One line of `fsd user list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserUsage {
    pub name: String,
    /// Bytes in the user's home (sum of apparent sizes); 0 when there is no home yet.
    pub usage: u64,
    pub quota: u64,
}

impl UserUsage {
    /// Usage as a percentage of the quota.
    pub fn percent(&self) -> f64 {
        if self.quota == 0 {
            return if self.usage == 0 { 0.0 } else { 100.0 };
        }
        self.usage as f64 * 100.0 / self.quota as f64
    }
}

/// Reads a new password: one line from stdin with `from_stdin`, else asked twice without echo
/// on the terminal. An empty password is refused.
///
/// # Errors
/// [`AdminError`] for no terminal, a mismatch, an empty password, or a read error.
pub fn read_new_password(from_stdin: bool) -> Result<String, AdminError> {
    let password = if from_stdin {
        let mut line = String::new();
        io::stdin().lock().read_line(&mut line).map_err(AdminError::ReadPassword)?;
        line.strip_suffix('\n').map(|l| l.strip_suffix('\r').unwrap_or(l)).unwrap_or(&line).to_string()
    } else {
        if !io::stdin().is_terminal() {
            return Err(AdminError::NoTerminal);
        }
        let first = rpassword::prompt_password("New password: ").map_err(AdminError::ReadPassword)?;
        let second = rpassword::prompt_password("Repeat password: ").map_err(AdminError::ReadPassword)?;
        if first != second {
            return Err(AdminError::Mismatch);
        }
        first
    };
    if password.is_empty() {
        return Err(AdminError::EmptyPassword);
    }
    Ok(password)
}

fn check_name(name: &str) -> Result<(), AdminError> {
    if is_valid_name(name) {
        Ok(())
    } else {
        Err(AdminError::BadName(name.to_string()))
    }
}

fn hash(config: &Config, password: &str) -> Result<String, AdminError> {
    if password.is_empty() {
        return Err(AdminError::EmptyPassword);
    }
    let params = config.argon2_params().map_err(|e| AdminError::Params(e.to_string()))?;
    Ok(hash_password(&params, password)?)
}

/// Adds a user.
///
/// # Errors
/// [`AdminError`]: a bad name, an existing user, an empty password, or the users file.
pub fn add(config: &Config, name: &str, quota: Option<ByteSize>, password: &str) -> Result<(), AdminError> {
    check_name(name)?;
    let path = &config.auth.users_file;
    let mut file = UsersFile::load(path)?;
    if file.users.contains_key(name) {
        return Err(AdminError::Exists(name.to_string()));
    }
    file.users.insert(name.to_string(), UserEntry { password: hash(config, password)?, quota });
    file.save(path)?;
    create_home(config, name)
}

/// Creates the user's home (mode 0700) if it does not exist, so it is there before the first
/// login; as root, it is handed to `run_as`, the user the server works as. An existing entry
/// (a kept home, or anything else under that name) is left alone: the server opens homes without
/// following symlinks and refuses what is not a directory.
fn create_home(config: &Config, name: &str) -> Result<(), AdminError> {
    use std::os::unix::fs::DirBuilderExt;
    let home = config.storage.root.join(name);
    let home_err = |error| AdminError::Home { path: home.clone(), error };
    match std::fs::DirBuilder::new().mode(0o700).create(&home) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(home_err(e)),
    }
    if crate::privs::is_root() && !config.run_as.is_empty() {
        let to = crate::privs::lookup(&config.run_as)
            .map_err(|e| home_err(io::Error::new(io::ErrorKind::NotFound, e.to_string())))?;
        // lchown: never follows a link, whatever replaced the directory meanwhile.
        std::os::unix::fs::lchown(&home, Some(to.uid.as_raw()), Some(to.gid.as_raw())).map_err(home_err)?;
    }
    Ok(())
}

/// Changes a user's password (which also revokes their tokens).
///
/// # Errors
/// [`AdminError`]: no such user, an empty password, or the users file.
pub fn passwd(config: &Config, name: &str, password: &str) -> Result<(), AdminError> {
    let path = &config.auth.users_file;
    let mut file = UsersFile::load(path)?;
    let phc = hash(config, password)?;
    let entry = file.users.get_mut(name).ok_or_else(|| AdminError::NoSuchUser(name.to_string()))?;
    entry.password = phc;
    Ok(file.save(path)?)
}

/// Sets a user's quota.
///
/// # Errors
/// [`AdminError`]: no such user, or the users file.
pub fn set_quota(config: &Config, name: &str, quota: ByteSize) -> Result<(), AdminError> {
    let path = &config.auth.users_file;
    let mut file = UsersFile::load(path)?;
    let entry = file.users.get_mut(name).ok_or_else(|| AdminError::NoSuchUser(name.to_string()))?;
    entry.quota = Some(quota);
    Ok(file.save(path)?)
}

/// Deletes a user; with `purge`, also their home.
///
/// # Errors
/// [`AdminError`]: no such user, the users file, or the home that could not be removed.
pub fn del(config: &Config, name: &str, purge: bool) -> Result<(), AdminError> {
    let path = &config.auth.users_file;
    let mut file = UsersFile::load(path)?;
    if file.users.remove(name).is_none() {
        return Err(AdminError::NoSuchUser(name.to_string()));
    }
    file.save(path)?;
    if purge {
        // The name was valid when it was added (the file is validated at load), so it is one
        // plain directory name below the storage root.
        let home = home_of(config, name);
        match std::fs::remove_dir_all(&home) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(AdminError::Home { path: home, error }),
        }
    }
    Ok(())
}

/// Every user with usage and quota, sorted by name.
///
/// # Errors
/// [`AdminError`]: the users file, or a home that cannot be scanned.
pub fn list(config: &Config) -> Result<Vec<UserUsage>, AdminError> {
    let file = UsersFile::load(&config.auth.users_file)?;
    let mut out = Vec::with_capacity(file.users.len());
    for (name, entry) in &file.users {
        let home = home_of(config, name);
        let usage = match crate::home::scan_usage(&home) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(error) => return Err(AdminError::Home { path: home, error }),
        };
        let quota = entry.quota.unwrap_or(config.storage.default_quota).bytes();
        out.push(UserUsage { name: name.clone(), usage, quota });
    }
    Ok(out)
}

fn home_of(config: &Config, name: &str) -> PathBuf {
    Path::new(&config.storage.root).join(name)
}
