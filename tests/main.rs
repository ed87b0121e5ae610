//! End-to-end tests: one binary; each module is a group of scenarios.
mod concurrency;
mod jail;
mod login;
mod mount_behind;
mod mount_cli;
mod mount_create;
mod mount_create_review;
mod mount_fsx;
mod mount_model;
mod mount_multi;
mod mount_roundtrips;
mod mount_shell;
mod netcp_copy;
mod netcp_resume;
mod netcp_shell;
mod ops;
mod quota;
