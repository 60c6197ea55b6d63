//! `sluice`: flags and config file -> Config -> server::run.

use std::process::ExitCode;

use clap::Parser;
use sluice::config::{LogFormat, Options};
use tracing_subscriber::EnvFilter;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A thread-per-core WebSocket gateway.
#[derive(Parser)]
#[command(version, about, after_help = AFTER_HELP)]
struct Cli {
    /// TOML file of options: each key a flag's name without `--`, `_` for
    /// `-` (listen = "0.0.0.0:8080"), and [[route]] tables; flags override it.
    #[arg(long, help_heading = "Listeners and workers")]
    config: Option<std::path::PathBuf>,
    #[command(flatten)]
    options: Options,
}

const AFTER_HELP: &str = "\
Routes come from the --config file only, as [[route]] tables (path, protocol =
echo | pubsub | stomp | backend, subprotocols, auth, deflate, upstream, hooks
...); without any, the routes are /echo, /ws (pub/sub) and /stomp (STOMP 1.2).
docs/CONFIGURATION.md lists every option and route key.

Environment:
  SLUICE_LOG  log filter, e.g. debug or sluice=debug,info [default: info]

Signals: SIGTERM or SIGINT drains (1001 to every client), SIGHUP reloads the
TLS certificate and key.";

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The file is read before logging starts, since it may choose the log
    // format; an error reading it is logged once logging has started.
    let file = cli.config.as_deref().map(Options::from_file).transpose();
    let format = cli.options.log_format.or_else(|| match &file {
        Ok(file) => file.as_ref().and_then(|f| f.log_format),
        // Its error is written as the file asks, if it says.
        Err(_) => cli.config.as_deref().and_then(Options::log_format_in),
    });
    init_logging(format.unwrap_or(LogFormat::Text));
    let file = match file {
        Ok(file) => file.unwrap_or_default(),
        Err(e) => return fail(&e),
    };
    raise_open_files_limit();
    let cpus = core_affinity::get_core_ids().map_or(1, |c| c.len().max(1));
    let config = match cli.options.over(file).validate(cpus) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    match sluice::server::run(config) {
        Ok(stats) => {
            tracing::info!(
                accepted = stats.accepted,
                upgraded = stats.upgraded,
                health_checks = stats.health_checks,
                messages_in = stats.messages_in,
                bytes_in = stats.bytes_in,
                closed = ?stats.closed,
                close_sent = ?stats.close_sent,
                rejected = ?stats.rejected,
                handshake_timeouts = stats.handshake_timeouts,
                parks = stats.parks,
                resumes = stats.resumes,
                publishes = stats.publishes,
                deliveries = stats.deliveries,
                dropped = stats.dropped,
                slow_consumers = stats.slow_consumers,
                publish_holds = stats.publish_holds,
                refused_max_connections = stats.refused_max_connections,
                refused_max_per_ip = stats.refused_max_per_ip,
                refused_handshake_rate = stats.refused_handshake_rate,
                refused_sockets = stats.refused_sockets,
                refused_admin = stats.refused_admin,
                rate_limited = stats.rate_limited,
                "stopped"
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

/// Log lines go to standard error, filtered by `SLUICE_LOG`.
fn init_logging(format: LogFormat) {
    // The NATS client logs each of its events at info; sluice logs what
    // they mean.
    let default = || EnvFilter::new("info,async_nats=warn");
    let (filter, bad) = match std::env::var("SLUICE_LOG") {
        Ok(text) => match EnvFilter::try_new(&text) {
            Ok(filter) => (filter, None),
            Err(e) => (default(), Some((text, e))),
        },
        Err(_) => (default(), None),
    };
    let lines = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => lines
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => lines.json().with_ansi(false).init(),
    }
    if let Some((text, error)) = bad {
        tracing::warn!("SLUICE_LOG={text:?} is not a filter ({error}): logging at info");
    }
}

/// Every connection is a file: take the hard limit on open files as the
/// soft one (the default `--max-connections` follows from it).
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write one rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                tracing::warn!(error = %std::io::Error::last_os_error(), "cannot raise the open-files limit");
            }
        }
    }
}

/// An error at start: logged once (on standard error, as every log line).
fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    tracing::error!("{e}");
    ExitCode::from(2)
}
