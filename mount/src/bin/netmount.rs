//! netmount: mount a homefs home with FUSE. Thin: parse the command line, check the mountpoint,
//! go to the background, log in, mount, serve until unmounted; map the outcome to an exit code.

use anyhow::Context as _;
use clap::Parser;
use homefs_mount::client::login_args::LoginArgs;
use homefs_mount::client::{Client, ServerAddr};
use homefs_mount::fuse::ops::Remote;
use homefs_mount::fuse::options::MountOptions;
use homefs_mount::fuse::session::{self, MountSpec};
use homefs_mount::fuse::{daemon, mountpoint, notices};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

const EXIT_CODES: &str = "\
Exit status:
  0  mounted (in the background, or, with -f, served until unmounted); with -u, unmounted
  1  not mounted: bad password (401), unreachable server, untrusted certificate, bad or busy
     mountpoint, unknown option; the reason is printed on one line
  2  bad command line

Examples:
  netmount alice@files.example.org ~/remote
  HOMEFS_PASSWORD=... netmount --accept-new alice@host:7373 /mnt/alice -o ro,cache_ttl=5
  netmount -u ~/remote";

/// Mount a user's remote homefs home, so ordinary tools work in it.
#[derive(Debug, Parser)]
#[command(name = "netmount", version, after_help = EXIT_CODES)]
struct Cli {
    /// The server, [USER@]HOST[:PORT] (with -u: the mountpoint).
    #[arg(value_name = "[USER@]HOST[:PORT]")]
    server: Option<String>,
    /// The directory to mount on.
    #[arg(value_name = "MOUNTPOINT")]
    mountpoint: Option<PathBuf>,
    /// Mount options, comma-separated: ro, allow_other, cache_ttl=SECONDS (60 with a server that
    /// sends change notices, else 1), reconnect_timeout=SECONDS (30), no_create_behind (every
    /// create waits for the server; by default a new file is stored at its first close).
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Stay in the foreground (serve until unmounted).
    #[arg(short = 'f', long)]
    foreground: bool,
    /// Log every request to stderr (implies -f).
    #[arg(long)]
    debug: bool,
    /// Unmount MOUNTPOINT (as fusermount3 -u).
    #[arg(short = 'u', long)]
    unmount: bool,
    #[command(flatten)]
    login: LoginArgs,
    /// Internal: the background child of a netmount without -f.
    #[arg(long = "daemon-child", hide = true)]
    daemon_child: bool,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("netmount: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if cli.unmount {
        let target = cli.mountpoint.clone().or_else(|| cli.server.clone().map(PathBuf::from));
        let target = target.context("-u needs the MOUNTPOINT")?;
        mountpoint::unmount(&target, false)?;
        return Ok(ExitCode::SUCCESS);
    }
    let (Some(server), Some(mount_dir)) = (cli.server.clone(), cli.mountpoint.clone()) else {
        eprintln!("netmount: usage: netmount [USER@]HOST[:PORT] MOUNTPOINT [-o OPTIONS] (see --help)");
        return Ok(ExitCode::from(2));
    };
    let options = MountOptions::parse(cli.options.iter().map(String::as_str))?;
    let addr = ServerAddr::parse(&server)?;
    let abs = mountpoint::check(&mount_dir)?;
    let (mut connect, password) = cli.login.connect_options(&addr, concat!("netmount ", env!("CARGO_PKG_VERSION")))?;
    connect.reconnect_timeout = options.reconnect_timeout;

    let foreground = cli.foreground || cli.debug;
    if !foreground && !cli.daemon_child {
        let args: Vec<_> = std::env::args_os().skip(1).collect();
        return Ok(match daemon::spawn_and_wait_ready(&args) {
            Ok(()) => ExitCode::SUCCESS,
            // The child printed its reason; pass its status on.
            Err((_, Some(code))) => ExitCode::from(u8::try_from(code).ok().filter(|c| *c != 0).unwrap_or(1)),
            Err((e, None)) => return Err(e.into()),
        });
    }

    init_tracing(cli.debug);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("netmount").build()?;
    let fsname = format!("{}@{}", connect.user, addr.host_port());
    let client = rt
        .block_on(Client::connect(connect, password))
        // ConnectError's message already names its cause; `{:#}` would repeat it.
        .map_err(|e| anyhow::anyhow!("cannot log in to {}: {e}", addr.host_port()))?;
    let remote = rt.block_on(session::prepare(client, &options))?;
    let notified_ttl = if options.cache_ttl_given { options.cache_ttl } else { notices::NOTIFIED_CACHE_TTL };
    let spec = MountSpec { mountpoint: abs.clone(), fsname, options };
    let mounted = session::mount(remote.clone(), rt.handle().clone(), &spec)?;
    // Before going to the background: once netmount returns, other mounts' changes are seen.
    let stats = Arc::new(notices::NoticeStats::default());
    rt.block_on(notices::start(&remote, notified_ttl, stats.clone()));
    rt.spawn(unmount_on_signal(abs.clone()));
    rt.spawn(log_counts_on_signal(remote, stats));
    if cli.daemon_child {
        daemon::ready_and_detach(cli.debug).context("cannot go to the background")?;
    }
    tracing::info!(mountpoint = %abs.display(), auto_unmount = mounted.auto_unmount, "mounted");
    mounted.run().with_context(|| format!("serving {}", abs.display()))?;
    tracing::info!(mountpoint = %abs.display(), "unmounted");
    // In-flight tasks answer a kernel that is gone; do not wait long for them.
    rt.shutdown_timeout(Duration::from_secs(2));
    Ok(ExitCode::SUCCESS)
}

/// SIGINT, SIGTERM or SIGHUP: unmount (lazily, so open files do not stop it); the FUSE session
/// then ends and `run` returns.
async fn unmount_on_signal(path: PathBuf) {
    use tokio::signal::unix::{signal, SignalKind};
    let kinds = [SignalKind::interrupt(), SignalKind::terminate(), SignalKind::hangup()];
    let mut streams = Vec::new();
    for k in kinds {
        match signal(k) {
            Ok(s) => streams.push(s),
            Err(e) => tracing::error!(error = %e, "cannot install a signal handler"),
        }
    }
    let waits = streams.iter_mut().map(|s| Box::pin(s.recv()));
    let _ = futures::future::select_all(waits).await;
    tracing::info!("signal: unmounting");
    let p = path.clone();
    match tokio::task::spawn_blocking(move || mountpoint::unmount(Path::new(&p), true)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "unmount on signal failed"),
        Err(e) => tracing::error!(error = %e, "unmount task failed"),
    }
}

/// SIGUSR1: logs the round trips so far by kind, the requests answered from the cache and the
/// change notices applied (`--debug` or `RUST_LOG` shows them; the profile of a running mount).
async fn log_counts_on_signal(remote: Arc<Remote>, stats: Arc<notices::NoticeStats>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut usr1 = match signal(SignalKind::user_defined1()) {
        Ok(s) => s,
        Err(e) => return tracing::error!(error = %e, "cannot install the SIGUSR1 handler"),
    };
    while usr1.recv().await.is_some() {
        let requests = remote.client.request_counts();
        let requests = requests.iter().map(|(k, n)| format!("{k}={n}")).collect::<Vec<_>>().join(" ");
        let (entries, listed) = remote.cache.size();
        tracing::info!(
            requests = %requests,
            hits = %remote.hits.show(),
            notices = %stats.show(),
            entries,
            listed,
            "counts so far"
        );
    }
}

fn init_tracing(debug: bool) {
    let default = if debug { "homefs_mount=debug,info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter).init();
}
