//! netcp: verified, resumable copies to and from a homefs server, and the FTP-style shell.
//! Thin: parse the command line, connect, hand over to `homefs_mount::copy`, map the result to an
//! exit status.

use std::ffi::OsString;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use homefs_mount::client::login_args::LoginArgs;
use homefs_mount::client::{Client, ConnectError, ServerAddr};
use homefs_mount::copy::progress::{Output, Progress};
use homefs_mount::copy::rate;
use homefs_mount::copy::remote::{wire_path, Location};
use homefs_mount::copy::shell::{Shell, ShellEnd};
use homefs_mount::copy::transfer::{TransferOptions, IN_FLIGHT};
use homefs_mount::copy::tree::{self, CopyOptions, Direction};

/// Exit statuses (also in `--help`).
mod status {
    pub const OK: u8 = 0;
    pub const SOME_FAILED: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const CONNECT: u8 = 3;
    pub const UNVERIFIED: u8 = 4;
}

const AFTER_HELP: &str = "\
Remote paths: [USER@]HOST[:PORT]:PATH
  An argument with no ':' or with a '/' before its first ':' is local (./a:b is a local file).
  HOST ends at the first ':'; an IPv6 address goes in brackets: [::1]:PATH, alice@[::1]:7373:PATH.
  If digits and another ':' follow the host, the digits are the port: host:7373:dir/file.
  Otherwise the rest is the path: host:7373 is the file '7373' (write host:7373: for the home).
  PATH is relative to the home; an empty PATH or '/' is the home itself.
  The remote side gives the direction: local SOURCEs to a remote DEST (put), or remote SOURCEs on
  one server to a local DEST (get).

Transfers are verified (BLAKE3 of the whole file on both ends; a mismatch is retried once) and
written under a temporary name (.NAME.TAG.homefs-part) renamed into place once verified. Running
the same command again after an interruption continues from what is there, after checking it on
both sides; a source that changed starts over. --no-resume always copies everything.
Files up to 256 KiB go in batches (up to 64 files or 1 MiB a request), others up to 1 MiB in one
request each; each is stored under a temporary name and renamed once its hash matched.

Durability: netcp exits 0 only after everything it copied is on disk, and syncs once, at the
end, only what it wrote: after a put, the server makes what this run wrote durable (Sync: the files, directories and
links it stored; an older server syncs the home's file system, SyncFs); after a get, netcp
does the same locally (an fsync of each file, or one syncfs when that is cheaper), with writeback
started while the data arrived. A failed sync counts as a failed file.

Exit status:
  0  everything copied and verified
  1  some files failed (each named on stderr as 'netcp: OP PATH: reason')
  2  usage error
  3  login or connection failed (401, unreachable, certificate not trusted, connection lost)
  4  a file did not verify, even after a retry";

/// Copy files to and from a homefs server, verified and resumable.
#[derive(Parser, Debug)]
#[command(
    name = "netcp",
    version,
    after_help = AFTER_HELP,
    args_conflicts_with_subcommands = true,
    override_usage = "netcp [OPTIONS] SOURCE... DEST\n       netcp shell [OPTIONS] [USER@]HOST[:PORT]"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// SOURCE... DEST: local paths and [USER@]HOST[:PORT]:PATH.
    #[arg(value_name = "PATH", num_args = 2.., required = true)]
    paths: Vec<OsString>,

    /// Copy directories and their contents; symlinks are copied as symlinks.
    #[arg(short = 'r', long)]
    recursive: bool,

    #[command(flatten)]
    common: CommonArgs,

    /// Copy N files at once.
    #[arg(short = 'j', long = "jobs", value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    jobs: u16,

    #[command(flatten)]
    login: LoginArgs,
}

/// Options of both copies and the shell.
#[derive(clap::Args, Debug, Clone, Copy)]
struct CommonArgs {
    /// Keep the mode and modification time.
    #[arg(short = 'p', long)]
    preserve: bool,

    /// Print nothing but errors.
    #[arg(short = 'q', long)]
    quiet: bool,

    /// Copy whole files, ignoring partial copies left by an interrupted run.
    #[arg(long)]
    no_resume: bool,

    /// Limit the transfer to RATE per second, all files and jobs together: 500K, 20M, 1G (a
    /// plain number is KiB, as rsync's --bwlimit); 0 is no limit.
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    bwlimit: Option<u64>,
}

/// `--bwlimit`'s RATE in bytes per second: a size (`20M`), or a plain number of KiB (rsync's).
fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        return t.parse::<u64>().ok().and_then(|k| k.checked_mul(1024)).ok_or_else(|| format!("rate too large: {s}"));
    }
    t.parse::<homefs_shared::size::ByteSize>().map(|b| b.bytes()).map_err(|e| e.to_string())
}

#[derive(Subcommand, Debug)]
enum Command {
    /// An FTP-style shell: ls pwd cd mkdir rmdir rm get put lcd lpwd lls help exit. Reads one
    /// command per line from a pipe and stops with a non-zero status at the first failure.
    Shell {
        /// [USER@]HOST[:PORT]
        server: String,

        #[command(flatten)]
        common: CommonArgs,

        #[command(flatten)]
        login: LoginArgs,
    },
}

/// glibc malloc settings for netcp, as fsd has them (fsd/src/main.rs `MALLOC_ENV`, which says
/// why each). glibc reads them only when a process starts (later takes `mallopt`, which is
/// unsafe), so netcp re-executes itself once with them set; the pid, arguments, descriptors
/// (a `--password-stdin` pipe not read yet) and the rest of the environment stay the same.
/// Measured on a 1 GiB get: every 256 KiB frame is read into a fresh buffer, which glibc
/// allocated in a thread's arena and trimmed (madvise) once the writer freed it, so each frame
/// was faulted in again: 17% of netcp's CPU in page faults, 3% in madvise (perf).
const MALLOC_ENV: [(&str, &str); 3] =
    [("MALLOC_ARENA_MAX", "1"), ("MALLOC_MMAP_THRESHOLD_", "8388608"), ("MALLOC_TRIM_THRESHOLD_", "33554432")];

/// Re-executes netcp with [`MALLOC_ENV`] unless any of it, or `GLIBC_TUNABLES`, is set already
/// (after the re-exec, or by the user, whose choice stands). Returns only when it does not
/// re-execute; a failed re-exec leaves netcp running as it is (only slower).
fn tune_malloc() {
    use std::os::unix::process::CommandExt;
    if !cfg!(all(target_os = "linux", target_env = "gnu"))
        || MALLOC_ENV.iter().any(|(k, _)| std::env::var_os(k).is_some())
        || std::env::var_os("GLIBC_TUNABLES").is_some()
    {
        return;
    }
    let Ok(exe) = std::env::current_exe() else { return };
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| exe.clone().into_os_string());
    // `exec` returns only on failure.
    let _ = std::process::Command::new(&exe).arg0(arg0).args(args).envs(MALLOC_ENV).exec();
}

fn main() -> ExitCode {
    tune_malloc();
    let filter = tracing_subscriber::EnvFilter::try_from_env("NETCP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("netcp: {e:#}");
            ExitCode::from(status::SOME_FAILED)
        }
    }
}

fn usage(msg: &str) -> anyhow::Result<u8> {
    eprintln!("netcp: {msg}");
    Ok(status::USAGE)
}

fn run(cli: Cli) -> anyhow::Result<u8> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    if let Some(Command::Shell { server, common, login }) = cli.command {
        let Some(client) = connect_or_report(&runtime, &login, &server, true, 1)? else {
            return Ok(status::CONNECT);
        };
        rate::set_limit(common.bwlimit.unwrap_or(0));
        let opts = TransferOptions { preserve: common.preserve, resume: !common.no_resume, swept: false };
        let shell = Shell::new(client, runtime.handle().clone(), opts, common.quiet);
        return Ok(match shell.run() {
            ShellEnd::Done => status::OK,
            ShellEnd::Failed => status::SOME_FAILED,
        });
    }

    rate::set_limit(cli.common.bwlimit.unwrap_or(0));
    let mut locations: Vec<Location> = cli.paths.iter().map(|a| Location::parse(a)).collect();
    let Some(dest) = locations.pop() else { return usage("SOURCE... DEST needed") };
    let direction_and_server = match dest {
        Location::Remote { server, path } => {
            let mut sources = Vec::new();
            for l in locations {
                match l {
                    Location::Local(p) => sources.push(p),
                    Location::Remote { .. } => {
                        return usage("a remote SOURCE needs a local DEST (no remote to remote)")
                    }
                }
            }
            let dest =
                wire_path(&path).with_context(|| format!("bad remote path {}", String::from_utf8_lossy(&path)))?;
            (Direction::Put { sources, dest }, server)
        }
        Location::Local(dest) => {
            let mut sources = Vec::new();
            let mut server: Option<String> = None;
            for l in locations {
                match l {
                    Location::Local(p) => {
                        return usage(&format!("{}: one side must be remote ([USER@]HOST[:PORT]:PATH)", p.display()))
                    }
                    Location::Remote { server: s, path } => {
                        if server.as_ref().is_some_and(|known| *known != s) {
                            return usage("all remote SOURCEs must be on one server");
                        }
                        server = Some(s);
                        sources.push(
                            wire_path(&path)
                                .with_context(|| format!("bad remote path {}", String::from_utf8_lossy(&path)))?,
                        );
                    }
                }
            }
            let Some(server) = server else { return usage("no remote path") };
            (Direction::Get { sources, dest }, server)
        }
    };
    let (direction, server) = direction_and_server;
    let Some(client) = connect_or_report(&runtime, &cli.login, &server, false, usize::from(cli.jobs))? else {
        return Ok(status::CONNECT);
    };
    let opts = CopyOptions {
        recursive: cli.recursive,
        preserve: cli.common.preserve,
        resume: !cli.common.no_resume,
        jobs: usize::from(cli.jobs),
    };
    let mut progress = Progress::new(Output::detect(cli.common.quiet));
    let report = runtime.block_on(tree::run(&client, direction, opts, &mut progress));
    // The run's profile in round trips (NETCP_LOG=netcp=debug).
    tracing::debug!(requests = ?client.request_counts(), "requests sent");
    Ok(if report.unverified > 0 {
        status::UNVERIFIED
    } else if report.disconnected || (report.failed > 0 && !client.is_connected()) {
        status::CONNECT
    } else if report.failed > 0 {
        status::SOME_FAILED
    } else {
        status::OK
    })
}

/// Connects and logs in; prints the reason and returns `None` when that fails. The shell also
/// prints the login outcome as the original program did (`201 logged in as alice`).
fn connect_or_report(
    runtime: &tokio::runtime::Runtime,
    login: &LoginArgs,
    server: &str,
    shell: bool,
    jobs: usize,
) -> anyhow::Result<Option<Client>> {
    let addr = match ServerAddr::parse(server) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("netcp: {server}: {e}");
            return Ok(None);
        }
    };
    let client_name = format!("netcp {}", env!("CARGO_PKG_VERSION"));
    let (mut options, password) = match login.connect_options(&addr, &client_name) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("netcp: connect {server}: {e:#}");
            return Ok(None);
        }
    };
    // Each file keeps IN_FLIGHT requests going, and -j files run at once.
    options.max_in_flight = options.max_in_flight.max(IN_FLIGHT * jobs + 4);
    match runtime.block_on(Client::connect(options, password)) {
        Ok(client) => {
            if shell {
                println!("201 logged in as {}", client.user());
            }
            Ok(Some(client))
        }
        Err(ConnectError::Denied) => {
            if shell {
                println!("401 login incorrect");
            }
            eprintln!("netcp: login {server}: login incorrect (401)");
            Ok(None)
        }
        Err(e) => {
            eprintln!("netcp: connect {server}: {e}");
            Ok(None)
        }
    }
}
