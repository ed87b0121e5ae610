//! fsd's entry point: parses the command line, sets up logging, runs the command and maps the
//! outcome to an exit code. `serve` binds, loads, drops root and confines itself *before* it
//! builds the runtime, so that no thread ever holds root while requests are served.

mod cli;

use anyhow::Context;
use clap::Parser;
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

use cli::{Cli, Command, UserCommand};
use fsd::accounts::admin;
use fsd::config::{ByteSize, Config};
use fsd::{confine, privs, State};

fn main() -> ExitCode {
    // clap exits with status 2 on a bad command line.
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fsd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Init { dir, listen, run_as } => {
            init_logging(Path::new(""))?;
            let opts = fsd::init::InitOptions { listen, run_as };
            let inst = fsd::init::init(&dir, &opts).with_context(|| format!("fsd init {}", dir.display()))?;
            println!("created {}", inst.config_file.display());
            if !inst.run_as.is_empty() {
                println!("run_as {} (the storage root and users file belong to it)", inst.run_as);
            }
            println!("fingerprint {}", inst.fingerprint);
            println!("next: fsd user add NAME --config {}", inst.config_file.display());
        }
        Command::Serve { config, listen, log_file } => {
            let untuned = tune_malloc();
            return serve(&config.path, listen, log_file, untuned);
        }
        Command::User(cmd) => {
            init_logging(Path::new(""))?;
            user(cmd)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn load_config(path: &Path) -> anyhow::Result<Config> {
    Config::load(path).with_context(|| "cannot load the configuration (give --config or set FSD_CONFIG)")
}

fn user(cmd: UserCommand) -> anyhow::Result<()> {
    match cmd {
        UserCommand::Add { name, quota, password_stdin, config } => {
            let config = load_config(&config.path)?;
            let password = admin::read_new_password(password_stdin)?;
            admin::add(&config, &name, quota, &password).with_context(|| format!("cannot add user {name}"))?;
            println!("added user {name}");
        }
        UserCommand::Passwd { name, password_stdin, config } => {
            let config = load_config(&config.path)?;
            let password = admin::read_new_password(password_stdin)?;
            admin::passwd(&config, &name, &password).with_context(|| format!("cannot change {name}'s password"))?;
            println!("changed the password of {name}");
        }
        UserCommand::Del { name, purge, config } => {
            let config = load_config(&config.path)?;
            admin::del(&config, &name, purge).with_context(|| format!("cannot delete user {name}"))?;
            println!("deleted user {name}{}", if purge { " and their home" } else { " (home kept)" });
        }
        UserCommand::Quota { name, size, config } => {
            let config = load_config(&config.path)?;
            admin::set_quota(&config, &name, size).with_context(|| format!("cannot set {name}'s quota"))?;
            println!("quota of {name} is {size}");
        }
        UserCommand::List { config } => {
            let config = load_config(&config.path)?;
            let rows = admin::list(&config).context("cannot list users")?;
            let mut out = io::stdout().lock();
            let header = format!(
                "{:<32} {:>8} {:>8} {:>6} {:>15} {:>15}",
                "USER", "USED", "QUOTA", "USE%", "USED_BYTES", "QUOTA_BYTES"
            );
            let mut write = || -> io::Result<()> {
                writeln!(out, "{header}")?;
                for r in &rows {
                    writeln!(
                        out,
                        "{:<32} {:>8} {:>8} {:>5.1}% {:>15} {:>15}",
                        r.name,
                        ByteSize(r.usage).human(),
                        ByteSize(r.quota).human(),
                        r.percent(),
                        r.usage,
                        r.quota
                    )?;
                }
                out.flush()
            };
            // A closed pipe (`fsd user list | head`) is not a failure.
            if let Err(e) = write() {
                if e.kind() != io::ErrorKind::BrokenPipe {
                    return Err(e).context("stdout");
                }
            }
        }
    }
    Ok(())
}

/// glibc malloc settings for the server. glibc reads them from the environment only when a
/// process starts (setting them later takes `mallopt`, which is unsafe), so `serve` re-executes
/// itself once with them set; the pid stays the same. Why, measured under the benchmark's netcp
/// runs: glibc gives threads that allocate at once their own arenas (up to 8 per core), each
/// keeping what is freed in it, and raises its mmap threshold to the largest block freed so far,
/// so after one argon2 login (19 MiB) every later login and every 4 MiB frame comes from an arena
/// and stays there: fsd grew by 19 MiB a login and peaked at 240 MiB. With one arena (freed frames
/// reused by every thread, no page faults) and a fixed 8 MiB threshold (argon2's memory and any
/// other block that large goes back to the kernel when freed): under 40 MiB, same throughput.
/// A 32 MiB trim threshold keeps freed frames mapped instead of trimming and faulting them back:
/// writing 1 GiB through a mount, 110k-151k page faults -> 3.6k, same 26 MiB peak.
const MALLOC_ENV: [(&str, &str); 3] =
    [("MALLOC_ARENA_MAX", "1"), ("MALLOC_MMAP_THRESHOLD_", "8388608"), ("MALLOC_TRIM_THRESHOLD_", "33554432")];

/// Re-executes fsd with [`MALLOC_ENV`] unless any of it, or `GLIBC_TUNABLES`, is set already
/// (after the re-exec, or by the operator, whose choice stands). Returns only when it does not
/// re-execute: `Some` says why it could not.
fn tune_malloc() -> Option<io::Error> {
    use std::os::unix::process::CommandExt;
    if !cfg!(all(target_os = "linux", target_env = "gnu"))
        || MALLOC_ENV.iter().any(|(k, _)| std::env::var_os(k).is_some())
        || std::env::var_os("GLIBC_TUNABLES").is_some()
    {
        return None;
    }
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return Some(e),
    };
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| exe.clone().into_os_string());
    // `exec` returns only on failure.
    Some(std::process::Command::new(&exe).arg0(arg0).args(args).envs(MALLOC_ENV).exec())
}

fn serve(
    config_path: &Path,
    listen: Option<String>,
    log_file: Option<PathBuf>,
    untuned: Option<io::Error>,
) -> anyhow::Result<ExitCode> {
    let mut config = load_config(config_path)?;
    if let Some(addr) = listen {
        config.listen.addr = addr;
    }
    if let Some(file) = log_file {
        config.log.file = std::path::absolute(&file).with_context(|| format!("--log-file {}", file.display()))?;
    }
    config.validate().map_err(anyhow::Error::msg).context("--listen")?;
    init_logging(&config.log.file)?;
    if let Some(e) = untuned {
        warn!(error = %e, "cannot re-execute with the malloc settings; memory use may be higher");
    }
    let config_dir = std::path::absolute(config_path)
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."));

    // Everything that may need root happens here, while the process has one thread.
    let addr: std::net::SocketAddr = config.listen.addr.parse().context("listen.addr")?;
    let listener = std::net::TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
    listener.set_nonblocking(true).context("listener")?;
    let max_blocking = config.limits.max_blocking_threads;
    let state = State::load(config).context("cannot start")?;
    let rules = confine::prepare(&state.config, &config_dir)
        .inspect_err(|e| warn!(error = %e, "cannot prepare the Landlock rules; running unconfined"))
        .ok();
    if privs::is_root() {
        if state.config.run_as.is_empty() {
            warn!("running as root with no run_as: requests are served with root's power");
        } else {
            let to = privs::lookup(&state.config.run_as)?;
            privs::drop_to(&to)?;
            info!(user = to.name, uid = to.uid.as_raw(), gid = to.gid.as_raw(), "dropped root privileges");
            // Reloads read the users file as run_as: say now if they cannot.
            if let Err(e) = std::fs::File::open(&state.config.auth.users_file) {
                let file = state.config.auth.users_file.display().to_string();
                warn!(file, error = %e, "run_as cannot read the users file: changes to it will not be picked up");
            }
        }
    } else if !state.config.run_as.is_empty() {
        info!(run_as = state.config.run_as, "not started as root; run_as ignored");
    }
    if let Some(rules) = rules {
        match confine::enforce(rules) {
            Ok(status) => info!(landlock = status, "file system confinement"),
            Err(e) => warn!(error = %e, "Landlock refused; running unconfined"),
        }
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(max_blocking)
        .thread_name("fsd")
        .build()
        .context("cannot start the runtime")?;
    let result = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).context("listener")?;
        let signals = fsd::shutdown::Signals::register().context("cannot install signal handlers")?;
        let local = listener.local_addr().context("listener")?;
        let announce = || -> io::Result<()> {
            let mut out = io::stdout().lock();
            writeln!(out, "listening on {local}")?;
            writeln!(out, "fingerprint {}", state.fingerprint())?;
            out.flush()
        };
        if let Err(e) = announce() {
            warn!(error = %e, "cannot print the listening address");
        }
        info!(addr = %local, fingerprint = state.fingerprint(), "listening");
        fsd::serve(listener, Arc::new(state), signals.recv()).await;
        anyhow::Ok(())
    });
    // Blocking tasks cut off at the shutdown deadline are not waited for again.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result?;
    info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// Installs the one subscriber: `RUST_LOG` (default `info`), to stderr or appended to `file`.
fn init_logging(file: &Path) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if file.as_os_str().is_empty() {
        builder.with_ansi(io::stderr().is_terminal()).with_writer(io::stderr).init();
    } else {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(file)
            .with_context(|| format!("cannot open log file {}", file.display()))?;
        builder.with_ansi(false).with_writer(std::sync::Mutex::new(f)).init();
    }
    Ok(())
}
