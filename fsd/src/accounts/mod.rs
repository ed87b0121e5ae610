//! Who you are: the users file as the server holds it (re-read when it changes), password and
//! token logins with throttling, and the `fsd user ...` commands.
//!
//! [`Accounts`] is what the session layer asks at login. The wire learns only 201 or 401; the log
//! learns why (unknown user, wrong password, expired token, ...). Passwords and tokens are never
//! logged.

pub mod admin;
pub mod auth;
pub mod throttle;
pub mod token;
pub mod users;

use homefs_shared::Token;
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};
use tracing::{info, warn};

use crate::config::Config;
use auth::Hasher;
use throttle::{Throttle, Verdict};
use token::TokenKey;
use users::{UsersError, UsersFile};

/// Why accounts could not be set up at start.
#[derive(Debug, thiserror::Error)]
pub enum AccountsError {
    #[error(transparent)]
    Users(#[from] UsersError),
    #[error("{path}: {error}")]
    TokenKey { path: PathBuf, error: std::io::Error },
    #[error("argon2 parameters: {0}")]
    Params(String),
}

/// The outcome of a login.
pub enum Login {
    /// Logged in: the user, their quota in bytes, and a fresh token.
    Granted { user: String, quota: u64, token: Token },
    /// 401: nothing more is said.
    Denied,
}

/// What a reload of the users file changed, for the homes to apply.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Users whose quota (or the default they fall back to) is now this many bytes.
    pub quotas: Vec<(String, u64)>,
    /// Users that were deleted.
    pub removed: Vec<String>,
}

/// Identifies one version of the users file: an atomic save replaces the inode, an edit in place
/// changes the mtime or length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Stamp {
        Stamp { dev: m.dev(), ino: m.ino(), len: m.len(), mtime: (m.mtime(), m.mtime_nsec()) }
    }
}

/// The users, the login checks, and the token key.
pub struct Accounts {
    path: PathBuf,
    default_quota: u64,
    hasher: Hasher,
    key: TokenKey,
    ttl: Duration,
    throttle: Throttle,
    /// Guards the users as last loaded and the stamp of the file they came from (the stamp of a
    /// version that failed to parse too, so that it is reported once). Held only to copy the `Arc`.
    users: RwLock<(Arc<UsersFile>, Option<Stamp>)>,
}

impl Accounts {
    /// Loads the users file and the token key named by the configuration, and computes the
    /// dummy hash. Blocking (file reads and one argon2 run): call before the runtime starts or
    /// on the blocking pool.
    ///
    /// # Errors
    /// [`AccountsError`] naming the file.
    pub fn load(config: &Config) -> Result<Accounts, AccountsError> {
        let path = config.auth.users_file.clone();
        let stamp = std::fs::metadata(&path).ok().map(|m| Stamp::of(&m));
        let users = UsersFile::load(&path)?;
        let key = TokenKey::load(&config.auth.token_key)
            .map_err(|error| AccountsError::TokenKey { path: config.auth.token_key.clone(), error })?;
        let params = config.argon2_params().map_err(|e| AccountsError::Params(e.to_string()))?;
        let hasher = Hasher::new(params).map_err(|e| AccountsError::Params(e.to_string()))?;
        let a = &config.auth;
        Ok(Accounts {
            path,
            default_quota: config.storage.default_quota.bytes(),
            hasher,
            key,
            ttl: a.token_ttl_secs,
            throttle: Throttle::new(a.throttle_after_failures, a.throttle_base_delay_ms, a.throttle_max_delay_secs),
            users: RwLock::new((Arc::new(users), stamp)),
        })
    }

    fn users(&self) -> Arc<UsersFile> {
        self.users.read().unwrap_or_else(|p| p.into_inner()).0.clone()
    }

    /// Whether `user` is in the users file as last loaded (a session of a deleted user ends).
    pub fn exists(&self, user: &str) -> bool {
        self.users().users.contains_key(user)
    }

    /// The number of users currently known.
    pub fn count(&self) -> usize {
        self.users().users.len()
    }

    /// Logs in with a password. Throttled attempts wait before they are answered.
    pub async fn login_password(&self, user: &str, password: String, peer: IpAddr) -> Login {
        // An invalid name is checked like an unknown user; it is logged and throttled under one
        // key, so a peer cannot fill the log or the throttle's maps with long names.
        let name = if users::is_valid_name(user) { user } else { "<invalid>" };
        if !self.wait_if_throttled(peer, name, "password").await {
            return Login::Denied;
        }
        let entry = self.users().users.get(name).cloned().filter(|_| name == user);
        let known = entry.is_some();
        let ok = self.hasher.verify_async(entry.as_ref().map(|e| e.password.clone()), password).await;
        match entry {
            Some(e) if ok => self.grant(name, &e, peer, "password"),
            _ => {
                self.throttle.fail(peer, name);
                let reason = if known { "wrong password" } else { "unknown user" };
                info!(user = name, %peer, code = 401, method = "password", reason, "login");
                Login::Denied
            }
        }
    }

    /// Logs in with the token of an earlier login.
    pub async fn login_token(&self, token: &Token, peer: IpAddr) -> Login {
        let claimed = TokenKey::claimed_user(token).ok().filter(|u| users::is_valid_name(u));
        let name = claimed.as_deref().unwrap_or("<invalid>");
        if !self.wait_if_throttled(peer, name, "token").await {
            return Login::Denied;
        }
        let entry = self.users().users.get(name).cloned();
        let phc = entry.as_ref().map(|e| e.password.as_str());
        match (self.key.verify(token, SystemTime::now(), phc), entry) {
            (Ok(_), Some(e)) => self.grant(name, &e, peer, "token"),
            (result, _) => {
                self.throttle.fail(peer, name);
                let reason = result.err().map_or_else(|| "unknown user".to_string(), |e| e.to_string());
                info!(user = name, %peer, code = 401, method = "token", reason, "login");
                Login::Denied
            }
        }
    }

    /// Counts the attempt (as failed until it succeeds) and waits out its throttle delay.
    /// Returns whether the credentials may be checked; `false`: deny without checking.
    async fn wait_if_throttled(&self, peer: IpAddr, name: &str, method: &str) -> bool {
        match self.throttle.attempt(peer, name) {
            Verdict::CheckAfter(delay) if delay.is_zero() => true,
            Verdict::CheckAfter(delay) => {
                warn!(user = name, %peer, delay_ms = delay.as_millis() as u64, "login throttled");
                tokio::time::sleep(delay).await;
                true
            }
            Verdict::DenyAfter(delay) => {
                warn!(user = name, %peer, delay_ms = delay.as_millis() as u64, "login refused: too many attempts queued");
                tokio::time::sleep(delay).await;
                info!(user = name, %peer, code = 401, method, reason = "throttled", "login");
                false
            }
        }
    }

    fn grant(&self, user: &str, entry: &users::UserEntry, peer: IpAddr, method: &str) -> Login {
        self.throttle.succeed(peer, user);
        info!(user, %peer, code = 201, method, "login");
        let token = self.key.issue(user, SystemTime::now() + self.ttl, &entry.password);
        let quota = entry.quota.map_or(self.default_quota, |q| q.bytes());
        Login::Granted { user: user.to_string(), quota, token }
    }

    /// Re-reads the users file if it changed since the last look. A file that fails to parse
    /// keeps the old users (the error is returned once per version of the file).
    ///
    /// # Errors
    /// [`UsersError`] for a changed file that cannot be read or parsed.
    pub async fn reload_if_changed(&self) -> Result<Option<Changes>, UsersError> {
        let io_err = |error| UsersError::Io { path: self.path.clone(), error };
        let meta = tokio::fs::metadata(&self.path).await.map_err(io_err)?;
        let stamp = Some(Stamp::of(&meta));
        if self.users.read().unwrap_or_else(|p| p.into_inner()).1 == stamp {
            return Ok(None);
        }
        let text = tokio::fs::read_to_string(&self.path).await;
        let parsed = text.map_err(io_err).and_then(|t| UsersFile::parse(&self.path, &t));
        let mut guard = self.users.write().unwrap_or_else(|p| p.into_inner());
        guard.1 = stamp;
        let new = Arc::new(parsed?);
        let old = std::mem::replace(&mut guard.0, new.clone());
        drop(guard);
        let quota = |e: &users::UserEntry| e.quota.map_or(self.default_quota, |q| q.bytes());
        let mut changes = Changes::default();
        for (name, entry) in &new.users {
            if old.users.get(name).map(quota) != Some(quota(entry)) {
                changes.quotas.push((name.clone(), quota(entry)));
            }
        }
        changes.removed = old.users.keys().filter(|n| !new.users.contains_key(*n)).cloned().collect();
        Ok(Some(changes))
    }
}
