//! Login options that netmount and netcp both take (`#[command(flatten)]`), and the step that
//! turns them and a [`ServerAddr`] into [`ConnectOptions`] and a [`PasswordFn`]. OWNED BY: client.
//!
//! The password never comes from argv: `--password-file F` (its first line), else the
//! `HOMEFS_PASSWORD` environment variable, else a prompt without echo on the terminal.

use anyhow::Context as _;
use std::io::IsTerminal as _;
use std::path::PathBuf;

use super::{
    known_hosts, ConnectOptions, PasswordFn, ServerAddr, Trust, DEFAULT_MAX_IN_FLIGHT, DEFAULT_RECONNECT_TIMEOUT,
};

/// The environment variable a script can give the password in.
pub const PASSWORD_ENV: &str = "HOMEFS_PASSWORD";

/// How to log in and which server certificate to trust.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LoginArgs {
    /// Read the password from the first line of FILE (else $HOMEFS_PASSWORD, else ask on the terminal).
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// Pin an unknown server's certificate in known_hosts without asking (for scripts).
    #[arg(long)]
    pub accept_new: bool,
    /// Trust only the server certificate with this fingerprint (as printed by `fsd serve`).
    #[arg(long, value_name = "SHA256:...", conflicts_with = "ca")]
    pub fingerprint: Option<String>,
    /// Trust server certificates signed by the CA in FILE (PEM); the host name must match.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// The known_hosts file [default: $XDG_CONFIG_HOME/homefs/known_hosts or ~/.config/homefs/known_hosts].
    #[arg(long, value_name = "FILE")]
    pub known_hosts: Option<PathBuf>,
}

impl LoginArgs {
    /// How the certificate is trusted: `--fingerprint`, else `--ca`, else known_hosts.
    ///
    /// # Errors
    /// When no known_hosts file is given and no default location can be found.
    pub fn trust(&self) -> anyhow::Result<Trust> {
        if let Some(fp) = &self.fingerprint {
            anyhow::ensure!(fp.starts_with("SHA256:"), "--fingerprint {fp}: expected the form SHA256:...");
            return Ok(Trust::Fingerprint(fp.clone()));
        }
        if let Some(ca) = &self.ca {
            return Ok(Trust::Ca(ca.clone()));
        }
        let file = match &self.known_hosts {
            Some(f) => f.clone(),
            None => known_hosts::default_path()?,
        };
        Ok(Trust::KnownHosts { file, accept_new: self.accept_new })
    }

    /// Where the password will come from, checked now so that a missing one is reported before
    /// connecting; the returned function reads it only when called (after the certificate is
    /// trusted).
    ///
    /// # Errors
    /// When no password source is available (no file, no variable, no terminal), saying how to
    /// give one.
    pub fn password_fn(&self) -> anyhow::Result<PasswordFn> {
        if let Some(file) = &self.password_file {
            let file = file.clone();
            return Ok(Box::new(move || {
                let text = std::fs::read_to_string(&file)
                    .with_context(|| format!("cannot read password file {}", file.display()))?;
                let line = text.lines().next().unwrap_or("").to_string();
                anyhow::ensure!(!line.is_empty(), "password file {} is empty", file.display());
                Ok(line)
            }));
        }
        if std::env::var_os(PASSWORD_ENV).is_some() {
            return Ok(Box::new(|| {
                std::env::var(PASSWORD_ENV).with_context(|| format!("${PASSWORD_ENV} is not valid UTF-8"))
            }));
        }
        anyhow::ensure!(
            std::io::stdin().is_terminal(),
            "no password: give --password-file FILE or set {PASSWORD_ENV} (there is no terminal to ask on)"
        );
        Ok(Box::new(|| rpassword::prompt_password("Password: ").context("cannot read the password from the terminal")))
    }

    /// The options and password source for `addr`, with the defaults for the reconnect timeout
    /// and requests in flight (a caller may change the fields afterwards).
    ///
    /// # Errors
    /// When the user is unknown (no `USER@` and no `$USER`), or as [`LoginArgs::trust`] and
    /// [`LoginArgs::password_fn`].
    pub fn connect_options(
        &self,
        addr: &ServerAddr,
        client_name: &str,
    ) -> anyhow::Result<(ConnectOptions, PasswordFn)> {
        let user = addr.user_or_default().context("no user name: write USER@HOST or set $USER")?;
        let opts = ConnectOptions {
            server: addr.clone(),
            user,
            trust: self.trust()?,
            interactive: std::io::stdin().is_terminal(),
            reconnect_timeout: DEFAULT_RECONNECT_TIMEOUT,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            client_name: client_name.to_string(),
        };
        Ok((opts, self.password_fn()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        login: LoginArgs,
    }

    #[test]
    fn parses_flags() {
        let cli = Cli::try_parse_from(["x", "--accept-new", "--known-hosts", "/k", "--password-file", "/p"]).unwrap();
        assert!(cli.login.accept_new);
        match cli.login.trust().unwrap() {
            Trust::KnownHosts { file, accept_new } => assert!(accept_new && file == std::path::Path::new("/k")),
            other => panic!("{other:?}"),
        }
        let cli = Cli::try_parse_from(["x", "--fingerprint", "SHA256:abc"]).unwrap();
        assert!(matches!(cli.login.trust().unwrap(), Trust::Fingerprint(f) if f == "SHA256:abc"));
        assert!(Cli::try_parse_from(["x", "--fingerprint", "SHA256:a", "--ca", "c"]).is_err());
        assert!(Cli::try_parse_from(["x", "--password", "secret"]).is_err(), "no password in argv");
    }

    #[test]
    fn password_file_first_line() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, "s3cret\nignored\n").unwrap();
        let args = LoginArgs { password_file: Some(f), ..Default::default() };
        assert_eq!(args.password_fn().unwrap()().unwrap(), "s3cret");
    }
}
