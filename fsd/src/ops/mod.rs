//! What a logged-in client does: one function per request kind, dispatched from
//! [`AuthedSession::handle`]. Every filesystem syscall runs on the blocking pool through the jail.
//!
//! OWNED BY: the fsd-ops work (home/, ops/). The session layer uses only what is declared here.

use bytes::Bytes;
use homefs_shared::{Request, Response, WireError};
use std::sync::Arc;

use crate::home::UserHome;

pub mod lock;

pub use lock::LockTable;

/// A session after login: cannot exist without a user. Holds the session's open files.
pub struct AuthedSession {
    // private fields: see the implementation
    _private: (),
}

impl AuthedSession {
    /// A session of `home`'s user. `locks` is the server-wide lock table, so that two sessions of
    /// one user see each other's locks; `id` is unique per connection (the lock owner's scope).
    pub fn new(_home: Arc<UserHome>, _locks: Arc<LockTable>, _id: u64) -> AuthedSession {
        todo!("fsd-ops")
    }

    /// The user's name.
    pub fn user(&self) -> &str {
        todo!("fsd-ops")
    }

    /// Answers one file request (not Hello/Login/Resume, which the session layer handles).
    /// Returns the response and the data that follows it (non-empty only for `Read`).
    /// Safe to call concurrently for many requests of one session.
    ///
    /// # Errors
    /// A [`WireError`] whose code is the errno the client should see.
    pub async fn handle(&self, _request: Request, _data: Bytes) -> Result<(Response, Bytes), WireError> {
        todo!("fsd-ops")
    }

    /// Ends the session: releases its locks and closes its open files. Called once, by the
    /// session layer, after the connection is gone and in-flight requests have finished.
    pub async fn end(&self) {
        todo!("fsd-ops")
    }
}
