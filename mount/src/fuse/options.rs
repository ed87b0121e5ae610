//! The `-o` mount options of netmount, parsed once into [`MountOptions`] (sshfs style:
//! comma-separated, repeatable). Unknown options are refused with their name.

use std::time::Duration;

/// The default attribute/entry cache lifetime (`-o cache_ttl=SECONDS`).
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(1);
/// The default bound on waiting for a lost connection (`-o reconnect_timeout=SECONDS`).
pub const DEFAULT_RECONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// What the user asked for with `-o`.
#[derive(Debug, Clone, PartialEq)]
pub struct MountOptions {
    /// `ro`: read-only mount.
    pub read_only: bool,
    /// `allow_other`: users other than the one who mounted may use the mount.
    pub allow_other: bool,
    /// `cache_ttl=SECONDS`: how long attributes, entries and negative entries are trusted.
    pub cache_ttl: Duration,
    /// Whether `cache_ttl` was given: then it bounds the cache even when the server sends
    /// change notices (which otherwise lengthen it, see `notices.rs`).
    pub cache_ttl_given: bool,
    /// `reconnect_timeout=SECONDS`: how long a call waits for a lost connection to come back.
    pub reconnect_timeout: Duration,
    /// `noexec`, `nosuid` (default), `nodev` (default), `noatime`: passed to the kernel.
    pub noexec: bool,
    pub noatime: bool,
    /// `create_behind` (default) / `no_create_behind`: whether a new small file is answered at
    /// `create` and stored in one request at its first close (`creates.rs`). Off, every create
    /// waits for the server, as a shared-writer workload that races on new names may want.
    pub create_behind: bool,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            read_only: false,
            allow_other: false,
            cache_ttl: DEFAULT_CACHE_TTL,
            cache_ttl_given: false,
            reconnect_timeout: DEFAULT_RECONNECT_TIMEOUT,
            noexec: false,
            noatime: false,
            create_behind: true,
        }
    }
}

/// Why an option string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    #[error("unknown mount option '{0}' (known: ro, rw, allow_other, cache_ttl=SECONDS, reconnect_timeout=SECONDS, no_create_behind)")]
    Unknown(String),
    #[error("mount option '{name}' needs a number of seconds, got '{value}'")]
    BadSeconds { name: String, value: String },
}

impl MountOptions {
    /// Applies every `-o` argument in order (later ones win), each a comma-separated list.
    ///
    /// # Errors
    /// [`OptionError`] naming the first option that is unknown or malformed.
    pub fn parse<'a>(lists: impl IntoIterator<Item = &'a str>) -> Result<MountOptions, OptionError> {
        let mut o = MountOptions::default();
        for list in lists {
            for opt in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                o.apply(opt)?;
            }
        }
        Ok(o)
    }

    fn apply(&mut self, opt: &str) -> Result<(), OptionError> {
        let (name, value) = match opt.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (opt, None),
        };
        match (name, value) {
            ("ro", None) => self.read_only = true,
            ("rw", None) => self.read_only = false,
            ("allow_other", None) => self.allow_other = true,
            ("noexec", None) => self.noexec = true,
            ("exec", None) => self.noexec = false,
            ("noatime", None) => self.noatime = true,
            ("create_behind", None) => self.create_behind = true,
            ("no_create_behind", None) => self.create_behind = false,
            ("atime" | "relatime", None) => self.noatime = false,
            ("cache_ttl", Some(v)) => {
                self.cache_ttl = seconds(name, v)?;
                self.cache_ttl_given = true;
            }
            ("reconnect_timeout", Some(v)) => self.reconnect_timeout = seconds(name, v)?,
            // What mount(8) and fstab pass along to every helper; they mean nothing to us
            // (nodev/nosuid are always on for a FUSE mount).
            (
                "defaults" | "auto" | "noauto" | "user" | "users" | "nouser" | "_netdev" | "nofail" | "nodev"
                | "nosuid" | "dev" | "suid" | "async",
                None,
            ) => {}
            (n, _) if n.starts_with("x-") || n.starts_with("comment=") => {}
            _ => return Err(OptionError::Unknown(opt.to_string())),
        }
        Ok(())
    }
}

fn seconds(name: &str, value: &str) -> Result<Duration, OptionError> {
    let bad = || OptionError::BadSeconds { name: name.to_string(), value: value.to_string() };
    let secs: f64 = value.parse().map_err(|_| bad())?;
    if !secs.is_finite() || !(0.0..=86_400.0 * 365.0).contains(&secs) {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_known_options() {
        let o = MountOptions::parse(["ro,cache_ttl=5", "reconnect_timeout=0.5,allow_other"]).unwrap();
        assert!(o.read_only && o.allow_other);
        assert_eq!(o.cache_ttl, Duration::from_secs(5));
        assert_eq!(o.reconnect_timeout, Duration::from_millis(500));
        assert_eq!(MountOptions::parse([]).unwrap(), MountOptions::default());
        assert!(!MountOptions::parse(["ro,rw,_netdev,noauto,x-systemd.automount"]).unwrap().read_only);
        assert!(MountOptions::default().create_behind);
        assert!(!MountOptions::parse(["no_create_behind"]).unwrap().create_behind);
        assert!(MountOptions::parse(["no_create_behind,create_behind"]).unwrap().create_behind);
    }

    #[test]
    fn refuses_unknown_and_malformed() {
        assert_eq!(MountOptions::parse(["ro,bogus"]), Err(OptionError::Unknown("bogus".into())));
        assert!(matches!(MountOptions::parse(["cache_ttl=x"]), Err(OptionError::BadSeconds { .. })));
        assert!(matches!(MountOptions::parse(["cache_ttl=-1"]), Err(OptionError::BadSeconds { .. })));
        assert!(matches!(MountOptions::parse(["cache_ttl"]), Err(OptionError::Unknown(_))));
    }
}
