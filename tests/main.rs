//! End-to-end tests: one binary; each module is a group of scenarios.
mod concurrency;
mod jail;
mod login;
mod ops;
mod quota;
