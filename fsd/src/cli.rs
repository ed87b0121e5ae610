//! The command line: `fsd init | serve | user {add,passwd,del,quota,list}` (clap derive; the doc
//! comments are the help text).

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

use fsd::config::ByteSize;

const EXIT_CODES: &str = "\
Exit status:
  0  success (for serve: stopped cleanly by SIGTERM or SIGINT)
  1  failure (the reason is printed on one line)
  2  bad command line";

/// homefs server: TLS file server with per-user jails and quotas.
#[derive(Debug, Parser)]
#[command(name = "fsd", version, after_help = EXIT_CODES)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Make a ready-to-serve instance in DIR: fsd.toml, users.toml, homes/, token.key and a
    /// self-signed certificate (cert.pem, key.pem). Refuses to overwrite an existing instance.
    #[command(after_help = EXIT_CODES)]
    Init {
        /// Directory of the new instance (created if missing).
        dir: PathBuf,
        /// Address and port to listen on.
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
        /// User the server switches to after binding when started as root (default as root:
        /// nobody).
        #[arg(long, value_name = "USER")]
        run_as: Option<String>,
    },
    /// Serve an instance. Prints `listening on ADDR` and `fingerprint SHA256:...` once it accepts
    /// connections.
    #[command(after_help = EXIT_CODES)]
    Serve {
        #[command(flatten)]
        config: ConfigArg,
        /// Listen on this address instead of the configured one (port 0: any free port).
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
        /// Append log lines to this file instead of the configured one or stderr.
        #[arg(long, value_name = "FILE")]
        log_file: Option<PathBuf>,
    },
    /// Manage users (a running server picks changes up by itself).
    #[command(subcommand)]
    User(UserCommand),
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Add a user; asks for the password twice without echo.
    #[command(after_help = EXIT_CODES)]
    Add {
        name: String,
        /// The user's quota (e.g. 500M, 20G); default: the configured default_quota.
        #[arg(long, value_name = "SIZE")]
        quota: Option<ByteSize>,
        /// Read the password as one line from stdin instead of asking.
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Change a user's password (revokes their session tokens).
    #[command(after_help = EXIT_CODES)]
    Passwd {
        name: String,
        /// Read the password as one line from stdin instead of asking.
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Delete a user; their home is kept unless --purge.
    #[command(after_help = EXIT_CODES)]
    Del {
        name: String,
        /// Also delete the user's home and everything in it.
        #[arg(long)]
        purge: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Set a user's quota.
    #[command(after_help = EXIT_CODES)]
    Quota {
        name: String,
        /// The new quota (e.g. 500M, 20G, 1.5T).
        size: ByteSize,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// List users with usage, quota and the percentage used.
    #[command(after_help = EXIT_CODES)]
    List {
        #[command(flatten)]
        config: ConfigArg,
    },
}

/// `--config F`, shared by every command that reads an instance.
#[derive(Debug, Args)]
pub struct ConfigArg {
    /// The configuration file.
    #[arg(long = "config", value_name = "FILE", env = "FSD_CONFIG", default_value = "fsd.toml")]
    pub path: PathBuf,
}
