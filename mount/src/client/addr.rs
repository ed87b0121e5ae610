//! Parsing `[USER@]HOST[:PORT]` into a [`ServerAddr`], and printing it back as the `host:port` key
//! that known_hosts uses.

use std::fmt;

use super::ServerAddr;

/// Why a server address could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    #[error("empty server address")]
    Empty,
    #[error("empty user name before '@' in {0:?}")]
    EmptyUser(String),
    #[error("empty host name in {0:?}")]
    EmptyHost(String),
    #[error("unclosed '[' in {0:?} (write an IPv6 address as [ADDR] or [ADDR]:PORT)")]
    Bracket(String),
    #[error("bad port {port:?} in {addr:?} (a number from 1 to 65535)")]
    Port { addr: String, port: String },
}

impl ServerAddr {
    /// Parses `[USER@]HOST[:PORT]`. An IPv6 address goes in brackets (`[::1]:7373`); a bare IPv6
    /// address without port is also taken as a host. The port defaults to
    /// [`homefs_shared::DEFAULT_PORT`]; the user stays `None` when not given (see
    /// [`ServerAddr::user_or_default`]).
    ///
    /// # Errors
    /// [`AddrError`] naming what is wrong.
    pub fn parse(s: &str) -> Result<ServerAddr, AddrError> {
        if s.is_empty() {
            return Err(AddrError::Empty);
        }
        let (user, rest) = match s.rsplit_once('@') {
            Some(("", _)) => return Err(AddrError::EmptyUser(s.to_string())),
            Some((u, rest)) => (Some(u.to_string()), rest),
            None => (None, s),
        };
        let (host, port) = if let Some(inner) = rest.strip_prefix('[') {
            let (host, after) = inner.split_once(']').ok_or_else(|| AddrError::Bracket(s.to_string()))?;
            match after {
                "" => (host, None),
                _ => match after.strip_prefix(':') {
                    Some(p) => (host, Some(p)),
                    None => return Err(AddrError::Bracket(s.to_string())),
                },
            }
        } else if rest.matches(':').count() > 1 {
            // A bare IPv6 address: no port can be told apart, so none is taken.
            (rest, None)
        } else {
            match rest.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (rest, None),
            }
        };
        if host.is_empty() {
            return Err(AddrError::EmptyHost(s.to_string()));
        }
        let port = match port {
            None => homefs_shared::DEFAULT_PORT,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 => n,
                _ => return Err(AddrError::Port { addr: s.to_string(), port: p.to_string() }),
            },
        };
        Ok(ServerAddr { user, host: host.to_string(), port })
    }

    /// The user given in the address, else `$USER`, else `None`.
    pub fn user_or_default(&self) -> Option<String> {
        self.user.clone().or_else(|| std::env::var("USER").ok().filter(|u| !u.is_empty()))
    }

    /// `host:port` (`[v6]:port`), the form TCP connects to and known_hosts records.
    pub fn host_port(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for ServerAddr {
    /// `[USER@]HOST:PORT`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(u) = &self.user {
            write!(f, "{u}@")?;
        }
        f.write_str(&self.host_port())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use homefs_shared::DEFAULT_PORT;

    fn addr(user: Option<&str>, host: &str, port: u16) -> ServerAddr {
        ServerAddr { user: user.map(str::to_string), host: host.to_string(), port }
    }

    #[test]
    fn forms() {
        assert_eq!(ServerAddr::parse("h").unwrap(), addr(None, "h", DEFAULT_PORT));
        assert_eq!(ServerAddr::parse("u@h:99").unwrap(), addr(Some("u"), "h", 99));
        assert_eq!(ServerAddr::parse("[::1]:5").unwrap(), addr(None, "::1", 5));
        assert_eq!(ServerAddr::parse("u@[fe80::1]").unwrap(), addr(Some("u"), "fe80::1", DEFAULT_PORT));
        assert_eq!(ServerAddr::parse("::1").unwrap(), addr(None, "::1", DEFAULT_PORT));
        assert_eq!(ServerAddr::parse("127.0.0.1:7").unwrap().host_port(), "127.0.0.1:7");
        assert_eq!(ServerAddr::parse("[::1]:7").unwrap().host_port(), "[::1]:7");
    }

    #[test]
    fn errors() {
        assert_eq!(ServerAddr::parse(""), Err(AddrError::Empty));
        assert!(matches!(ServerAddr::parse("@h"), Err(AddrError::EmptyUser(_))));
        assert!(matches!(ServerAddr::parse("u@"), Err(AddrError::EmptyHost(_))));
        assert!(matches!(ServerAddr::parse("h:0"), Err(AddrError::Port { .. })));
        assert!(matches!(ServerAddr::parse("h:x"), Err(AddrError::Port { .. })));
        assert!(matches!(ServerAddr::parse("h:70000"), Err(AddrError::Port { .. })));
        assert!(matches!(ServerAddr::parse("[::1"), Err(AddrError::Bracket(_))));
        assert!(matches!(ServerAddr::parse("[::1]x"), Err(AddrError::Bracket(_))));
    }
}
