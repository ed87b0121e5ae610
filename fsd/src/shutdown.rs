//! The shutdown signal: SIGTERM/SIGINT become one future for `serve`, and `serve` tells each
//! connection through a [`Shutdown`] listener (mini-redis `shutdown.rs`, on a `watch` channel so a
//! late subscriber still sees that shutdown began). The signal carries the deadline by which
//! connections must have finished their in-flight requests, so every connection works to the
//! same bound as `serve`, however late it notices.

use std::io;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;
use tokio::time::Instant;

/// Listens for the server's shutdown.
#[derive(Clone)]
pub struct Shutdown {
    /// `None` while serving; the finishing deadline once shutdown began.
    rx: watch::Receiver<Option<Instant>>,
}

/// Starts the shutdown of every [`Shutdown`] made from it; dropping it does too.
pub struct ShutdownTrigger {
    tx: watch::Sender<Option<Instant>>,
}

/// A trigger and a listener to clone for each connection.
pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(None);
    (ShutdownTrigger { tx }, Shutdown { rx })
}

impl ShutdownTrigger {
    /// Tells every listener to shut down, finishing in-flight requests by `deadline`.
    pub fn trigger(&self, deadline: Instant) {
        self.tx.send_replace(Some(deadline));
    }
}

impl Shutdown {
    /// Whether shutdown has begun.
    pub fn is_shutdown(&self) -> bool {
        self.rx.borrow().is_some() || self.rx.has_changed().is_err()
    }

    /// By when in-flight requests must be finished: `None` while serving (or when the trigger
    /// was dropped without a deadline; the caller then applies its own bound).
    pub fn deadline(&self) -> Option<Instant> {
        *self.rx.borrow()
    }

    /// Completes once shutdown has begun (at once if it already has).
    pub async fn recv(&mut self) {
        // An error means the trigger is gone, which also means shut down.
        let _ = self.rx.wait_for(Option::is_some).await;
    }
}

/// SIGTERM and SIGINT, registered up front so that a signal sent right after fsd says it is
/// listening is not missed.
pub struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    /// Installs the handlers. Must run inside the runtime.
    ///
    /// # Errors
    /// When a handler cannot be installed.
    pub fn register() -> io::Result<Signals> {
        Ok(Signals { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())? })
    }

    /// Completes on the first SIGTERM or SIGINT.
    pub async fn recv(mut self) {
        let name = tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutting down");
    }
}
