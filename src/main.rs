//! `sluice`: flags and config file -> Config -> server::run.

use std::process::ExitCode;

use clap::Parser;
use sluice::config::Options;
use tracing_subscriber::EnvFilter;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A thread-per-core WebSocket gateway.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// TOML file of options; flags override it.
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    #[command(flatten)]
    options: Options,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        // The NATS client logs each of its events at info; sluice logs
        // what they mean.
        .with_env_filter(
            EnvFilter::try_from_env("SLUICE_LOG").unwrap_or_else(|_| EnvFilter::new("info,async_nats=warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let file = match &cli.config {
        Some(path) => match Options::from_file(path) {
            Ok(o) => o,
            Err(e) => return fail(&e),
        },
        None => Options::default(),
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
