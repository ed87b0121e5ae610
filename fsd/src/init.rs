//! `fsd init DIR`: a ready-to-serve instance: `fsd.toml` (the commented template with the listen
//! address and run_as filled in), an empty users file, the storage root, the token key and a
//! self-signed certificate. Refuses to touch an existing instance.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::config::{Config, TEMPLATE};
use crate::privs;

/// What `fsd init` is told.
#[derive(Debug, Clone, Default)]
pub struct InitOptions {
    /// `--listen ADDR`; default the template's `0.0.0.0:7373`.
    pub listen: Option<String>,
    /// `--run-as USER`; default `nobody` when run as root, none otherwise.
    pub run_as: Option<String>,
}

/// What was made.
#[derive(Debug, Clone)]
pub struct Instance {
    pub config_file: PathBuf,
    pub fingerprint: String,
    /// The user the server will switch to; empty: none.
    pub run_as: String,
}

/// Why the instance could not be made.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("{0} already exists; refusing to overwrite an existing instance")]
    Exists(PathBuf),
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: io::Error },
    #[error("--listen {0:?} is not an address with a port (e.g. 0.0.0.0:7373)")]
    BadListen(String),
    #[error(transparent)]
    RunAs(#[from] privs::PrivsError),
    #[error("cannot make the certificate: {0}")]
    Cert(rcgen::Error),
    #[error("the generated configuration does not parse (a bug): {0}")]
    Template(String),
}

/// The user a root-run server switches to when none is named.
const DEFAULT_RUN_AS: &str = "nobody";

/// Makes an instance in `dir` (created if missing).
///
/// # Errors
/// [`InitError`], naming the file.
pub fn init(dir: &Path, opts: &InitOptions) -> Result<Instance, InitError> {
    let listen = opts.listen.clone().unwrap_or_else(|| Config::default().listen.addr);
    if listen.parse::<std::net::SocketAddr>().is_err() {
        return Err(InitError::BadListen(listen));
    }
    let run_as = match &opts.run_as {
        Some(name) if !name.is_empty() => Some(privs::lookup(name)?),
        Some(_) => None,
        None if privs::is_root() => privs::lookup(DEFAULT_RUN_AS).ok(),
        None => None,
    };
    let d = Config::default();
    let names = [Path::new("fsd.toml"), &d.auth.users_file, &d.auth.token_key, &d.listen.cert, &d.listen.key];
    for name in names.iter().copied().chain([d.storage.root.as_path()]) {
        let path = dir.join(name);
        if path.symlink_metadata().is_ok() {
            return Err(InitError::Exists(path));
        }
    }
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |error| InitError::Io { path, error }
    };
    fs::DirBuilder::new().recursive(true).mode(0o755).create(dir).map_err(io_err(dir))?;

    let run_as_name = run_as.as_ref().map_or(String::new(), |r| r.name.clone());
    let config_text = fill_template(&listen, &run_as_name)?;
    let config_file = dir.join("fsd.toml");
    write_new(&config_file, config_text.as_bytes(), 0o644)?;
    let users_file = dir.join(&d.auth.users_file);
    write_new(&users_file, crate::accounts::users::HEADER.as_bytes(), 0o600)?;
    write_new(&dir.join(&d.auth.token_key), &rand::random::<[u8; 32]>(), 0o600)?;

    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    names.extend(hostname());
    let cert = rcgen::generate_simple_self_signed(names).map_err(InitError::Cert)?;
    write_new(&dir.join(&d.listen.cert), cert.cert.pem().as_bytes(), 0o644)?;
    write_new(&dir.join(&d.listen.key), cert.signing_key.serialize_pem().as_bytes(), 0o600)?;
    let fingerprint = homefs_shared::tls::fingerprint(cert.cert.der());

    let root = dir.join(&d.storage.root);
    fs::DirBuilder::new().mode(0o700).create(&root).map_err(io_err(&root))?;
    if let Some(r) = &run_as {
        // The server reads the users file again after dropping root (reloads) and works in the
        // storage root as run_as; the key files stay root's, read once before the switch.
        for path in [&root, &users_file] {
            std::os::unix::fs::chown(path, Some(r.uid.as_raw()), Some(r.gid.as_raw())).map_err(io_err(path))?;
        }
    }
    Ok(Instance { config_file, fingerprint, run_as: run_as_name })
}

/// The template with `listen.addr` and `run_as` set, checked to parse.
fn fill_template(listen: &str, run_as: &str) -> Result<String, InitError> {
    let quote = |s: &str| toml::Value::String(s.to_string()).to_string();
    let default_addr = format!("addr = {}", quote(&Config::default().listen.addr));
    let text = TEMPLATE.replacen("run_as = \"\"", &format!("run_as = {}", quote(run_as)), 1).replacen(
        &default_addr,
        &format!("addr = {}", quote(listen)),
        1,
    );
    let parsed: Config = toml::from_str(&text).map_err(|e| InitError::Template(e.to_string()))?;
    if parsed.listen.addr != listen || parsed.run_as != run_as {
        return Err(InitError::Template("listen.addr or run_as did not take".into()));
    }
    Ok(text)
}

/// Creates a file that must not exist yet, with `mode`.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InitError> {
    let write = || -> io::Result<()> {
        let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    write().map_err(|error| InitError::Io { path: path.to_path_buf(), error })
}

/// This machine's host name, if it is one a certificate can carry.
fn hostname() -> Option<String> {
    let name = fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim().to_ascii_lowercase();
    let ok = !name.is_empty()
        && name != "localhost"
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    ok.then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_takes_listen_and_run_as() {
        let text = fill_template("127.0.0.1:0", "nobody").unwrap();
        let c: Config = toml::from_str(&text).unwrap();
        assert_eq!(c.listen.addr, "127.0.0.1:0");
        assert_eq!(c.run_as, "nobody");
        let mut d = Config::default();
        d.listen.addr = "127.0.0.1:0".into();
        d.run_as = "nobody".into();
        assert_eq!(c, d);
    }
}
