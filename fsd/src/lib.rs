//! fsd: the homefs server. `serve` runs the accept loop on a listener that is already bound, so
//! the binary passes the real one and tests pass one bound to port 0.
#![deny(unsafe_code)]

pub mod accounts;
pub mod config;
pub mod confine;
pub mod home;
pub mod init;
mod notice_sender;
pub mod ops;
pub mod privs;
pub mod session;
pub mod shutdown;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{error, info, warn, Instrument};

use accounts::{Accounts, AccountsError};
use config::Config;
use home::Homes;
use ops::LockTable;

/// The unit in which data is counted against `limits.max_buffered_reads` and
/// `limits.max_buffered_writes` (so a 4 MiB read takes 64 permits and a 1-byte read one).
pub const READ_BUDGET_UNIT: u64 = 64 << 10;

/// How often the users file is checked for changes.
const USERS_POLL: Duration = Duration::from_secs(1);

/// Why the server cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Tls(#[from] homefs_shared::tls::TlsError),
    #[error(transparent)]
    Accounts(#[from] AccountsError),
    #[error("storage root {path}: {error}")]
    Storage { path: PathBuf, error: std::io::Error },
}

/// Everything the connections share.
pub struct State {
    /// The configuration, validated, with absolute paths.
    pub config: Config,
    pub accounts: Accounts,
    pub homes: Homes,
    pub locks: Arc<LockTable>,
    tls: tokio_rustls::TlsAcceptor,
    fingerprint: String,
    /// The server's connection limit; each connection holds a permit for its life.
    connections: Arc<Semaphore>,
    /// `limits.max_buffered_reads` in [`READ_BUDGET_UNIT`]s: a Read takes its share before its
    /// data is read and gives it back once the writer has sent it.
    pub(crate) read_budget: Arc<Semaphore>,
    /// `limits.max_buffered_writes` in [`READ_BUDGET_UNIT`]s: a request's data takes its share
    /// once it has arrived (before the next frame is read) and gives it back once handled.
    pub(crate) write_budget: Arc<Semaphore>,
    /// Guards the per-user connection limits, one semaphore per user who has logged in.
    per_user: Mutex<HashMap<String, Arc<Semaphore>>>,
    next_conn_id: AtomicU64,
}

impl State {
    /// Reads the certificate and key, the users file and token key, and opens the storage root.
    /// Blocking: call it before the runtime starts (the binary does so before dropping
    /// privileges) or on the blocking pool.
    ///
    /// # Errors
    /// [`StartError`] naming the file.
    pub fn load(config: Config) -> Result<State, StartError> {
        let certs = homefs_shared::tls::load_certs(&config.listen.cert)?;
        let key = homefs_shared::tls::load_key(&config.listen.key)?;
        let fingerprint = homefs_shared::tls::fingerprint(&certs[0]);
        let tls = homefs_shared::tls::server_config(certs, key)?;
        let accounts = Accounts::load(&config)?;
        let homes = Homes::open_root(&config.storage.root)
            .map_err(|error| StartError::Storage { path: config.storage.root.clone(), error })?;
        let budget_units = config.limits.max_buffered_reads.bytes() / READ_BUDGET_UNIT;
        let write_units = config.limits.max_buffered_writes.bytes() / READ_BUDGET_UNIT;
        Ok(State {
            connections: Arc::new(Semaphore::new(config.limits.max_connections)),
            // Validated: at most 1P, so at most 2^34 units, well under MAX_PERMITS.
            read_budget: Arc::new(Semaphore::new(usize::try_from(budget_units).unwrap_or(usize::MAX >> 4))),
            write_budget: Arc::new(Semaphore::new(usize::try_from(write_units).unwrap_or(usize::MAX >> 4))),
            config,
            accounts,
            homes,
            locks: Arc::new(LockTable::default()),
            tls: tokio_rustls::TlsAcceptor::from(tls),
            fingerprint,
            per_user: Mutex::new(HashMap::new()),
            next_conn_id: AtomicU64::new(1),
        })
    }

    /// Bytes of `limits.max_buffered_reads` not held by reads now (for tests and diagnostics).
    pub fn read_budget_free(&self) -> u64 {
        self.read_budget.available_permits() as u64 * READ_BUDGET_UNIT
    }

    /// Bytes of `limits.max_buffered_writes` not held by requests now (for tests and diagnostics).
    pub fn write_budget_free(&self) -> u64 {
        self.write_budget.available_permits() as u64 * READ_BUDGET_UNIT
    }

    /// The certificate's fingerprint (`SHA256:...`), which clients pin.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// A permit of `user`'s connection limit, if one is free; dropping it frees it.
    pub fn try_user_permit(&self, user: &str) -> Option<OwnedSemaphorePermit> {
        let sem = {
            let mut map = self.per_user.lock().unwrap_or_else(|p| p.into_inner());
            let limit = self.config.limits.max_connections_per_user;
            map.entry(user.to_string()).or_insert_with(|| Arc::new(Semaphore::new(limit))).clone()
        };
        sem.try_acquire_owned().ok()
    }
}

/// Accepts connections until `shutdown` completes, then stops accepting, lets every connection
/// finish its in-flight requests (bounded by `shutdown_timeout_secs`) and returns.
pub async fn serve(listener: TcpListener, state: Arc<State>, shutdown: impl Future<Output = ()>) {
    let (trigger, conn_shutdown) = shutdown::channel();
    let watcher = tokio::spawn(watch_users(state.clone()));
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        while conns.try_join_next().is_some() {}
        // Wait for room before accepting: past the limit, connections wait in the backlog.
        let permit = tokio::select! {
            p = state.connections.clone().acquire_owned() => p.expect("the connection semaphore is never closed"),
            _ = &mut shutdown => break,
        };
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning on the error.
                    error!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let id = state.next_conn_id.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!("conn", id, peer = %peer, user = tracing::field::Empty);
        conns.spawn(session::run(tcp, peer, state.clone(), conn_shutdown.clone(), id, permit).instrument(span));
    }
    drop(listener);
    watcher.abort();
    // Each connection finishes the requests it has received (a frame that has begun to arrive
    // included) by `finish_by`, then flushes with the write timeout: past both, what is left is
    // cut off.
    let limits = &state.config.limits;
    let finish_by = tokio::time::Instant::now() + limits.shutdown_timeout_secs;
    trigger.trigger(finish_by);
    info!(connections = conns.len(), "stopped accepting; waiting for connections to finish");
    let bound = finish_by + limits.write_timeout_secs;
    if tokio::time::timeout_at(bound, async { while conns.join_next().await.is_some() {} }).await.is_err() {
        warn!(left = conns.len(), "connections still open at the shutdown deadline; closing them");
        conns.abort_all();
        while conns.join_next().await.is_some() {}
    }
}

/// Re-reads the users file when it changes and applies quota changes and deletions to the homes.
async fn watch_users(state: Arc<State>) {
    let mut tick = tokio::time::interval(USERS_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error = None;
    loop {
        tick.tick().await;
        match state.accounts.reload_if_changed().await {
            Ok(None) => last_error = None,
            Ok(Some(changes)) => {
                last_error = None;
                info!(users = state.accounts.count(), removed = changes.removed.len(), "users file reloaded");
                for (user, quota) in &changes.quotas {
                    state.homes.set_quota(user, *quota);
                }
                for user in &changes.removed {
                    state.homes.forget(user);
                }
            }
            Err(e) => {
                let text = e.to_string();
                if last_error.as_ref() != Some(&text) {
                    error!(error = %text, "users file reload failed; keeping the previous users");
                    last_error = Some(text);
                }
            }
        }
    }
}
