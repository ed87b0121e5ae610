//! End-to-end tests: one binary; each module is a group of scenarios.
