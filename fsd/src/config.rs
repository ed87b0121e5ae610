//! The server's configuration: one [`Config`] read from `fsd.toml`, with every default in
//! `impl Default`, validated once at load. Sizes are [`ByteSize`]s (from the shared crate).

pub use homefs_shared::size::{ByteSize, ByteSizeError};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The commented configuration template that `fsd init` writes; it parses to `Config::default()`.
pub const TEMPLATE: &str = include_str!("../../conf/fsd.toml");

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {error}")]
    Read { path: PathBuf, error: std::io::Error },
    #[error("{path}:{}: {message}", at.map_or_else(String::new, |(l, c)| format!("{l}:{c}")))]
    Parse { path: PathBuf, at: Option<(usize, usize)>, message: String },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// Everything fsd can be told. Key names are a fixed interface (see `conf/fsd.toml`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// User to switch to after binding, when started as root; empty: no switch.
    pub run_as: String,
    pub listen: Listen,
    pub storage: Storage,
    pub limits: Limits,
    pub auth: Auth,
    pub log: Log,
}

/// `[listen]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Listen {
    pub addr: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `[storage]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Storage {
    pub root: PathBuf,
    pub default_quota: ByteSize,
}

/// `[limits]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_user: usize,
    pub max_in_flight_per_session: usize,
    #[serde(with = "secs")]
    pub idle_timeout_secs: Duration,
    #[serde(with = "secs")]
    pub handshake_timeout_secs: Duration,
    #[serde(with = "secs")]
    pub login_timeout_secs: Duration,
    #[serde(with = "secs")]
    pub write_timeout_secs: Duration,
    #[serde(with = "secs")]
    pub shutdown_timeout_secs: Duration,
    pub max_frame_bytes: u32,
    pub max_blocking_threads: usize,
    /// File data read for answers and not yet sent, over all connections together.
    pub max_buffered_reads: ByteSize,
    /// File data received in requests and not yet handled, over all connections together.
    pub max_buffered_writes: ByteSize,
}

/// `[auth]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Auth {
    pub users_file: PathBuf,
    pub token_key: PathBuf,
    #[serde(with = "secs")]
    pub token_ttl_secs: Duration,
    pub argon2_memory_kib: u32,
    pub argon2_iterations: u32,
    pub argon2_parallelism: u32,
    pub throttle_after_failures: u32,
    #[serde(with = "millis")]
    pub throttle_base_delay_ms: Duration,
    #[serde(with = "secs")]
    pub throttle_max_delay_secs: Duration,
}

/// `[log]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Log {
    /// Empty: stderr.
    pub file: PathBuf,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            run_as: String::new(),
            listen: Listen {
                addr: format!("0.0.0.0:{}", homefs_shared::DEFAULT_PORT),
                cert: "cert.pem".into(),
                key: "key.pem".into(),
            },
            storage: Storage { root: "homes".into(), default_quota: ByteSize(10 << 30) },
            limits: Limits {
                max_connections: 1024,
                max_connections_per_user: 64,
                max_in_flight_per_session: 64,
                idle_timeout_secs: Duration::from_secs(300),
                handshake_timeout_secs: Duration::from_secs(10),
                login_timeout_secs: Duration::from_secs(30),
                write_timeout_secs: Duration::from_secs(30),
                shutdown_timeout_secs: Duration::from_secs(30),
                max_frame_bytes: homefs_shared::MAX_FRAME_BYTES,
                max_blocking_threads: 16,
                max_buffered_reads: ByteSize(24 << 20),
                max_buffered_writes: ByteSize(24 << 20),
            },
            auth: Auth {
                users_file: "users.toml".into(),
                token_key: "token.key".into(),
                token_ttl_secs: Duration::from_secs(7 * 24 * 3600),
                // The argon2 crate's defaults (OWASP's second recommendation).
                argon2_memory_kib: 19456,
                argon2_iterations: 2,
                argon2_parallelism: 1,
                throttle_after_failures: 3,
                throttle_base_delay_ms: Duration::from_millis(500),
                throttle_max_delay_secs: Duration::from_secs(30),
            },
            log: Log { file: PathBuf::new() },
        }
    }
}

// The sections' defaults come from `Config::default()`, so that it stays the only place
// defaults live; serde needs them for a section that the file gives only in part.
macro_rules! section_default {
    ($($ty:ident => $field:ident),*) => {$(
        impl Default for $ty {
            fn default() -> $ty {
                Config::default().$field
            }
        }
    )*};
}
section_default!(Listen => listen, Storage => storage, Limits => limits, Auth => auth, Log => log);

impl Config {
    /// Reads, parses and validates a configuration file, and resolves its relative paths against
    /// the file's directory.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|error| ConfigError::Read { path: path.to_path_buf(), error })?;
        let mut config: Config = toml::from_str(&text).map_err(|e| {
            let (at, message) = toml_error(&text, &e);
            ConfigError::Parse { path: path.to_path_buf(), at, message }
        })?;
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let dir = std::path::absolute(dir).map_err(|error| ConfigError::Read { path: dir.to_path_buf(), error })?;
        config.resolve_paths(&dir);
        config.validate().map_err(|reason| ConfigError::Invalid { path: path.to_path_buf(), reason })?;
        Ok(config)
    }

    /// Makes every relative path absolute against `dir` (an empty log file stays empty).
    pub fn resolve_paths(&mut self, dir: &Path) {
        for p in [
            &mut self.listen.cert,
            &mut self.listen.key,
            &mut self.storage.root,
            &mut self.auth.users_file,
            &mut self.auth.token_key,
            &mut self.log.file,
        ] {
            if !p.as_os_str().is_empty() && p.is_relative() {
                *p = dir.join(&*p);
            }
        }
    }

    /// Checks what serde cannot: ranges and combinations.
    ///
    /// # Errors
    /// A one-line reason naming the key.
    pub fn validate(&self) -> Result<(), String> {
        let l = &self.limits;
        if l.max_frame_bytes < 64 << 10 || l.max_frame_bytes > homefs_shared::MAX_FRAME_BYTES {
            return Err(format!(
                "limits.max_frame_bytes must be between 65536 and {} (the protocol's maximum)",
                homefs_shared::MAX_FRAME_BYTES
            ));
        }
        for (key, v) in [
            ("limits.max_connections", l.max_connections),
            ("limits.max_connections_per_user", l.max_connections_per_user),
            ("limits.max_in_flight_per_session", l.max_in_flight_per_session),
            ("limits.max_blocking_threads", l.max_blocking_threads),
        ] {
            if v == 0 {
                return Err(format!("{key} must be at least 1"));
            }
        }
        // Semaphores hold at most this many permits.
        if l.max_connections > tokio::sync::Semaphore::MAX_PERMITS
            || l.max_in_flight_per_session > tokio::sync::Semaphore::MAX_PERMITS
            || l.max_connections_per_user > tokio::sync::Semaphore::MAX_PERMITS
        {
            return Err("limits: a connection or request limit is too large".into());
        }
        let reads = l.max_buffered_reads.bytes();
        if reads < u64::from(homefs_shared::MAX_DATA_BYTES) || reads > 1 << 50 {
            return Err(format!(
                "limits.max_buffered_reads must be between {} (one read) and 1P",
                homefs_shared::MAX_DATA_BYTES
            ));
        }
        let writes = l.max_buffered_writes.bytes();
        if writes < u64::from(homefs_shared::MAX_FRAME_BYTES) || writes > 1 << 50 {
            return Err(format!(
                "limits.max_buffered_writes must be between {} (one frame) and 1P",
                homefs_shared::MAX_FRAME_BYTES
            ));
        }
        for (key, d) in [
            ("limits.idle_timeout_secs", l.idle_timeout_secs),
            ("limits.handshake_timeout_secs", l.handshake_timeout_secs),
            ("limits.login_timeout_secs", l.login_timeout_secs),
            ("limits.write_timeout_secs", l.write_timeout_secs),
            ("auth.token_ttl_secs", self.auth.token_ttl_secs),
        ] {
            if d.is_zero() {
                return Err(format!("{key} must be at least 1"));
            }
        }
        self.argon2_params().map_err(|e| format!("auth.argon2_*: {e}"))?;
        if self.listen.addr.parse::<std::net::SocketAddr>().is_err() {
            return Err(format!(
                "listen.addr {:?} is not an address with a port (e.g. 0.0.0.0:7373)",
                self.listen.addr
            ));
        }
        Ok(())
    }

    /// The argon2id parameters for new hashes and the dummy hash.
    ///
    /// # Errors
    /// When the configured costs are out of argon2's ranges.
    pub fn argon2_params(&self) -> Result<argon2::Params, argon2::Error> {
        let a = &self.auth;
        argon2::Params::new(a.argon2_memory_kib, a.argon2_iterations, a.argon2_parallelism, None)
    }
}

/// A TOML error as one line: its line and column (1-based) in `text`, and its message.
pub(crate) fn toml_error(text: &str, e: &toml::de::Error) -> (Option<(usize, usize)>, String) {
    let at = e.span().map(|span| {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        (line, column)
    });
    (at, e.message().trim().replace('\n', " "))
}

/// `*_secs` keys: whole seconds in the file, a `Duration` in the code.
mod secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_secs)
    }
}

/// `*_ms` keys: milliseconds in the file, a `Duration` in the code.
mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_is_the_default() {
        let parsed: Config = toml::from_str(TEMPLATE).expect("the template parses");
        assert_eq!(parsed, Config::default());
        Config::default().validate().expect("the defaults are valid");
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(toml::from_str::<Config>("[limits]\nmax_conections = 3\n").is_err());
        assert!(toml::from_str::<Config>("colour = 1\n").is_err());
    }

    #[test]
    fn missing_keys_take_defaults() {
        let c: Config = toml::from_str("[limits]\nidle_timeout_secs = 7\n").unwrap();
        assert_eq!(c.limits.idle_timeout_secs, Duration::from_secs(7));
        assert_eq!(c.limits.max_connections, 1024);
        assert_eq!(c.auth, Config::default().auth);
    }

    #[test]
    fn relative_paths_resolve_against_the_config_dir() {
        let mut c = Config::default();
        c.auth.token_key = "/abs/token.key".into();
        c.resolve_paths(Path::new("/etc/homefs"));
        assert_eq!(c.listen.cert, Path::new("/etc/homefs/cert.pem"));
        assert_eq!(c.storage.root, Path::new("/etc/homefs/homes"));
        assert_eq!(c.auth.token_key, Path::new("/abs/token.key"));
        assert_eq!(c.log.file, Path::new(""));
    }

    #[test]
    fn byte_size_in_toml() {
        #[derive(Deserialize)]
        struct T {
            a: ByteSize,
            b: ByteSize,
        }
        let t: T = toml::from_str("a = \"2G\"\nb = 4096\n").unwrap();
        assert_eq!((t.a, t.b), (ByteSize(2 << 30), ByteSize(4096)));
    }
}
