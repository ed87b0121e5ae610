//! Helpers for the end-to-end tests: servers, mounts and netcp runs. The test files read as scenarios.
