//! `sluice-load`: the load-test harness. Measures any RFC 6455 server the
//! same way: connections, echo throughput, open-loop latency, fan-out.

mod abuse;
mod client;
mod report;
mod run;
mod scenario;

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};

use client::Target;
use report::{cpu_seconds, rss_kib, Memory, Report};
use run::{run_threads, Driver, Live, ThreadBody};
use scenario::Common;

/// `connect` reads the server's memory this long before the hold ends.
const MEMORY_PROBE_BEFORE_HOLD_ENDS: Duration = Duration::from_millis(250);

#[derive(Parser)]
#[command(version, about = "Load-test harness for WebSocket servers")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Attacks, together, for a bounded time: handshake floods from many
    /// source addresses, slowloris handshakes, oversized frames, invalid
    /// tokens, message floods; each counted by how the server answered.
    Abuse {
        /// Route to attack: ws://HOST:PORT/path.
        #[arg(long)]
        url: String,
        /// Source addresses to attack from, e.g. 127.0.1.1-127.0.1.250.
        #[arg(long)]
        source: Option<String>,
        /// Seconds to attack.
        #[arg(short = 't', long, default_value_t = 60.0)]
        duration: f64,
        /// Upgrade requests per second, each closed once answered.
        #[arg(long, default_value_t = 1000.0)]
        flood_rate: f64,
        /// Connections that send their request head a byte a second.
        #[arg(long, default_value_t = 200)]
        slowloris: usize,
        /// Upgraded connections per second that announce a 2^40-byte frame.
        #[arg(long, default_value_t = 50.0)]
        oversized_rate: f64,
        /// Upgrade requests per second with a forged, malformed or expired token.
        #[arg(long, default_value_t = 200.0)]
        bad_token_rate: f64,
        /// Connections sending messages as fast as the socket takes them.
        #[arg(long, default_value_t = 20)]
        floods: usize,
        /// Write the outcomes as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Open N connections at a bounded rate and hold them.
    Connect {
        #[command(flatten)]
        common: CommonArgs,
        /// Connections to open.
        #[arg(short = 'n', long, default_value_t = 1000)]
        connections: usize,
        /// Handshakes per second, over all threads.
        #[arg(long, default_value_t = 2000.0)]
        rate: f64,
        /// Seconds to hold the connections once all are open.
        #[arg(long, default_value_t = 5.0)]
        hold: f64,
    },
    /// Closed-loop echo: C connections x D messages of S bytes in flight.
    Echo {
        #[command(flatten)]
        common: CommonArgs,
        /// Connections, each its own closed loop.
        #[arg(short = 'c', long, default_value_t = 100)]
        connections: usize,
        /// Messages each connection keeps in flight.
        #[arg(short = 'd', long, default_value_t = 16)]
        in_flight: usize,
        /// Payload bytes of each message.
        #[arg(short = 's', long, default_value_t = 32)]
        size: usize,
        /// Write each message with its own `send`, as independent clients
        /// do. By default a connection writes every message it owes (the
        /// echoes of one read) in one `send`, as a pipelining client does.
        #[arg(long)]
        write_each: bool,
        #[command(flatten)]
        window: Window,
    },
    /// Open-loop latency at a fixed total rate, corrected for coordinated omission.
    Latency {
        #[command(flatten)]
        common: CommonArgs,
        /// Connections the rate is spread over, each sending at its share of
        /// it, staggered.
        #[arg(short = 'c', long, default_value_t = 100)]
        connections: usize,
        /// Messages per second, over all connections.
        #[arg(short = 'r', long, default_value_t = 10_000.0)]
        rate: f64,
        /// Payload bytes (at least 8: the send time rides in the payload).
        #[arg(short = 's', long, default_value_t = 32)]
        size: usize,
        /// Never block: each thread's loop spins instead of waiting for
        /// replies (waking a sleeping thread costs tens of microseconds).
        #[arg(long)]
        busy_poll: bool,
        #[command(flatten)]
        window: Window,
    },
    /// Connection churn: C clients, each connecting, sending one message,
    /// reading its echo and closing, over and over.
    Churn {
        #[command(flatten)]
        common: CommonArgs,
        /// Clients cycling at once.
        #[arg(short = 'c', long, default_value_t = 50)]
        concurrency: usize,
        /// Payload bytes of each client's one message.
        #[arg(short = 's', long, default_value_t = 32)]
        size: usize,
        #[command(flatten)]
        window: Window,
    },
    /// Publish/subscribe fan-out: N subscribers on K topics, P publishers at R msg/s.
    Fanout {
        #[command(flatten)]
        common: CommonArgs,
        /// Subscriber connections; subscriber n takes topic n % --topics.
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
        /// Topics the subscribers are spread over and publishes go to.
        #[arg(long, default_value_t = 1)]
        topics: usize,
        /// Publisher connections, each publishing to the topics in turn;
        /// they share --rate.
        #[arg(long, default_value_t = 1)]
        publishers: usize,
        /// Publishes per second, over all publishers.
        #[arg(short = 'r', long, default_value_t = 100.0)]
        rate: f64,
        /// Payload bytes (at least the harness's stamp, about 30).
        #[arg(short = 's', long, default_value_t = 64)]
        size: usize,
        /// What the clients speak: the native protocol (with --sub-msg and
        /// --pub-prefix), or STOMP 1.2 (CONNECT, then SUBSCRIBE to and SEND
        /// to /topic/<topic>; the URL's path should be a STOMP route).
        #[arg(long, value_enum, default_value_t = scenario::FanoutProtocol::Native)]
        protocol: scenario::FanoutProtocol,
        /// STOMP: give every subscription an id of its own (`sub-<n>`);
        /// otherwise each is `sub-0`, as stomp.js names a client's first.
        #[arg(long)]
        distinct_ids: bool,
        /// Subscribe message; `{topic}` becomes the topic name.
        #[arg(long, default_value = "SUB {topic}")]
        sub_msg: String,
        /// Text before each publish's payload; `{topic}` becomes the topic name.
        #[arg(long, default_value = "PUB {topic} ")]
        pub_prefix: String,
        /// Topic names are this prefix and a number.
        #[arg(long, default_value = "load.")]
        topic_prefix: String,
        /// Milliseconds for subscriptions to settle before publishing.
        #[arg(long, default_value_t = 500)]
        settle_ms: u64,
        /// Publishers connect here instead of --url: another node of a
        /// cluster, or another listener or route (ws://, or wss:// with
        /// --ca).
        #[arg(long)]
        pub_url: Option<String>,
        /// Never block: each thread's loop spins instead of waiting for
        /// deliveries, so the server's sends never pay for waking it.
        #[arg(long)]
        busy_poll: bool,
        #[command(flatten)]
        window: Window,
    },
    /// Draws the latency percentiles of earlier runs (their --json files),
    /// one line per series, in one plot.
    Plot {
        /// The plot to write (.svg, or .html with a table).
        #[arg(long)]
        out: PathBuf,
        /// The plot's title.
        #[arg(long, default_value = "latency by percentile")]
        title: String,
        /// LABEL=FILE[,FILE...]: a series; the histograms of its files are merged.
        #[arg(required = true)]
        series: Vec<String>,
        /// Which histogram to draw.
        #[arg(long, value_enum, default_value_t = report::Drawn::Latency)]
        histogram: report::Drawn,
    },
}

#[derive(Args)]
struct CommonArgs {
    /// Server to measure: ws://HOST:PORT/path, or wss:// (TLS; give --ca).
    #[arg(long)]
    url: String,
    /// PEM file of the certificates a wss:// server's chain must lead to.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Load threads, each its own monoio runtime.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// The load threads' I/O driver: auto takes io_uring where the kernel
    /// has it, else epoll.
    #[arg(long, value_enum, default_value_t = Driver::Auto)]
    driver: Driver,
    /// Source addresses, e.g. 127.0.0.1-127.0.0.50, to go past one address's ports.
    #[arg(long)]
    source: Option<String>,
    /// A connection whose TCP connect and handshake take longer than this
    /// counts as a failure.
    #[arg(long, default_value_t = 5000)]
    connect_timeout_ms: u64,
    /// Server process to read CPU and memory from.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Write every figure, histograms included, as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the latency percentile plot (.svg, or .html with a table).
    #[arg(long)]
    report: Option<PathBuf>,
    /// Exit non-zero when failures + errors + losses exceed this.
    #[arg(long, default_value_t = 0)]
    max_errors: u64,
    /// Offer permessage-deflate without context takeover (RFC 7692) and
    /// send every message compressed; a server that declines fails the
    /// connection. Of what comes back compressed, only the first 256
    /// bytes are inflated (where the stamps are).
    #[arg(long)]
    deflate: bool,
    /// With --deflate: offer it as browsers do, context takeover left to
    /// the server; what it compresses with takeover is inflated whole, by
    /// each connection's own inflater (a client cost). What we send is
    /// still compressed message by message.
    #[arg(long, requires = "deflate")]
    deflate_takeover: bool,
    /// Payloads are JSON-like text (records of ids, prices and words, as
    /// market data is) instead of one byte repeated, so compression meets
    /// what real traffic gives it.
    #[arg(long)]
    json_payload: bool,
}

#[derive(Args)]
struct Window {
    /// Seconds measured, after the warm-up.
    #[arg(short = 't', long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of traffic before measuring starts.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
}

fn parse_sources(spec: &str) -> Result<Vec<IpAddr>, String> {
    let bad = || format!("--source {spec:?}: give an address or a range like 127.0.0.1-127.0.0.50");
    let (a, b) = spec.split_once('-').unwrap_or((spec, spec));
    let a: Ipv4Addr = a.trim().parse().map_err(|_| bad())?;
    let b: Ipv4Addr = b.trim().parse().map_err(|_| bad())?;
    let (a, b) = (u32::from(a), u32::from(b));
    if b < a || b - a > 65_535 {
        return Err(bad());
    }
    Ok((a..=b).map(|ip| IpAddr::V4(Ipv4Addr::from(ip))).collect())
}

fn seconds(s: f64, what: &str) -> Result<Duration, String> {
    Duration::try_from_secs_f64(s).map_err(|_| format!("{what}: {s} is not a duration in seconds"))
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sluice-load: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode, String> {
    let (args, name) = match &cli.scenario {
        Scenario::Connect { common, .. } => (common, "connect"),
        Scenario::Echo { common, .. } => (common, "echo"),
        Scenario::Latency { common, .. } => (common, "latency"),
        Scenario::Churn { common, .. } => (common, "churn"),
        Scenario::Fanout { common, .. } => (common, "fanout"),
        Scenario::Plot {
            out,
            title,
            series,
            histogram,
        } => {
            report::plot_runs(out, title, series, *histogram)?;
            return Ok(ExitCode::SUCCESS);
        }
        Scenario::Abuse {
            url,
            source,
            duration,
            flood_rate,
            slowloris,
            oversized_rate,
            bad_token_rate,
            floods,
            json,
        } => {
            let target = Target::parse(url)?;
            if target.tls.is_some() || url.starts_with("wss://") {
                return Err("abuse attacks ws:// routes (the attacks are the same over TLS)".into());
            }
            let sources = source.as_deref().map(parse_sources).transpose()?.unwrap_or_default();
            let plan = abuse::Plan {
                duration: seconds(*duration, "--duration")?,
                flood_rate: *flood_rate,
                slowloris: *slowloris,
                oversized_rate: *oversized_rate,
                bad_token_rate: *bad_token_rate,
                floods: *floods,
            };
            let outcomes = abuse::run(target, sources, plan);
            for (attack, by_outcome) in &outcomes {
                let total: u64 = by_outcome.values().sum();
                let detail: Vec<String> = by_outcome.iter().map(|(o, n)| format!("{o} {n}")).collect();
                println!("{attack:>20}  {total} attempts: {}", detail.join(", "));
            }
            if let Some(path) = json {
                let text = serde_json::to_string_pretty(&outcomes).map_err(|e| e.to_string())?;
                std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
            }
            return Ok(ExitCode::SUCCESS);
        }
    };
    if args.threads == 0 || args.threads > 256 {
        return Err("--threads must be 1..=256".into());
    }
    let mut target = Target::parse(&args.url)?.with_ca(args.ca.as_deref())?;
    target.deflate = args.deflate;
    target.deflate_takeover = args.deflate_takeover;
    let sources = args
        .source
        .as_deref()
        .map(parse_sources)
        .transpose()?
        .unwrap_or_default();
    let live = Arc::new(Live::default());
    let common = Arc::new(Common {
        target,
        threads: args.threads,
        sources,
        connect_timeout: Duration::from_millis(args.connect_timeout_ms),
        busy_poll: matches!(
            cli.scenario,
            Scenario::Latency { busy_poll: true, .. } | Scenario::Fanout { busy_poll: true, .. }
        ),
        epoch: Instant::now(),
        epoch_realtime_ns: realtime_ns(),
        live: live.clone(),
        json: args.json_payload,
    });
    let mut params = std::collections::BTreeMap::new();
    let mut fanout_plan = None;
    let (body, warmup, window, connections): (ThreadBody, Duration, Option<Duration>, usize) = match &cli.scenario {
        Scenario::Connect {
            connections,
            rate,
            hold,
            ..
        } => {
            if *rate <= 0.0 {
                return Err("--rate must be above 0".into());
            }
            params.insert("connections".into(), connections.to_string());
            params.insert("rate".into(), format!("{rate}/s"));
            params.insert("hold".into(), format!("{hold} s"));
            let plan = Arc::new(scenario::ConnectPlan {
                connections: *connections,
                rate: *rate,
                hold: seconds(*hold, "--hold")?,
            });
            let c = common.clone();
            (
                Arc::new(move |i| Box::pin(scenario::connect(c.clone(), plan.clone(), i))),
                Duration::ZERO,
                None,
                *connections,
            )
        }
        Scenario::Echo {
            connections,
            in_flight,
            size,
            write_each,
            window: w,
            ..
        } => {
            params.insert(
                "connections x in flight x bytes".into(),
                format!("{connections} x {in_flight} x {size}"),
            );
            let writes = if *write_each {
                "one message per send"
            } else {
                "a read's echoes per send"
            };
            params.insert("writes".into(), writes.into());
            let plan = Arc::new(scenario::EchoPlan {
                connections: *connections,
                in_flight: (*in_flight).max(1),
                size: *size,
                write_each: *write_each,
                warmup: seconds(w.warmup, "--warmup")?,
                duration: seconds(w.duration, "--duration")?,
            });
            let (warmup, duration) = (plan.warmup, plan.duration);
            let c = common.clone();
            (
                Arc::new(move |i| Box::pin(scenario::echo(c.clone(), plan.clone(), i))),
                warmup,
                Some(duration),
                *connections,
            )
        }
        Scenario::Latency {
            connections,
            rate,
            size,
            window: w,
            ..
        } => {
            if *rate <= 0.0 || *size < 8 {
                return Err("--rate must be above 0 and --size at least 8".into());
            }
            params.insert("connections".into(), connections.to_string());
            params.insert("rate".into(), format!("{rate} msg/s"));
            params.insert("bytes".into(), size.to_string());
            let plan = Arc::new(scenario::LatencyPlan {
                connections: *connections,
                rate: *rate,
                size: *size,
                warmup: seconds(w.warmup, "--warmup")?,
                duration: seconds(w.duration, "--duration")?,
            });
            let (warmup, duration) = (plan.warmup, plan.duration);
            let c = common.clone();
            (
                Arc::new(move |i| Box::pin(scenario::latency(c.clone(), plan.clone(), i))),
                warmup,
                Some(duration),
                *connections,
            )
        }
        Scenario::Churn {
            concurrency,
            size,
            window: w,
            ..
        } => {
            if *concurrency == 0 {
                return Err("--concurrency must be above 0".into());
            }
            params.insert("clients cycling".into(), concurrency.to_string());
            params.insert("bytes".into(), size.to_string());
            params.insert(
                "cycle".into(),
                "connect, one message and its echo, close 1000; latency is the whole cycle".into(),
            );
            let plan = Arc::new(scenario::ChurnPlan {
                concurrency: *concurrency,
                size: *size,
                warmup: seconds(w.warmup, "--warmup")?,
                duration: seconds(w.duration, "--duration")?,
            });
            let (warmup, duration) = (plan.warmup, plan.duration);
            let c = common.clone();
            (
                Arc::new(move |i| Box::pin(scenario::churn(c.clone(), plan.clone(), i))),
                warmup,
                Some(duration),
                *concurrency,
            )
        }
        Scenario::Plot { .. } | Scenario::Abuse { .. } => unreachable!("plot and abuse return before any run"),
        Scenario::Fanout {
            subscribers,
            topics,
            publishers,
            rate,
            size,
            protocol,
            distinct_ids,
            sub_msg,
            pub_prefix,
            topic_prefix,
            settle_ms,
            pub_url,
            busy_poll,
            window: w,
            ..
        } => {
            if *rate <= 0.0 || *topics == 0 || *publishers == 0 {
                return Err("--rate, --topics and --publishers must be above 0".into());
            }
            params.insert(
                "subscribers / topics / publishers".into(),
                format!("{subscribers} / {topics} / {publishers}"),
            );
            params.insert("publish rate".into(), format!("{rate} msg/s"));
            params.insert("protocol".into(), format!("{protocol:?}").to_lowercase());
            let publish_target = match pub_url {
                Some(url) => {
                    params.insert("publishers' url".into(), url.clone());
                    Some(Target::parse(url)?.with_ca(args.ca.as_deref())?)
                }
                None => None,
            };
            if args.threads > 1 {
                params.insert(
                    "publishers".into(),
                    if *busy_poll {
                        "a thread of their own".into()
                    } else {
                        "a thread of their own, real-time priority (SCHED_FIFO) when allowed".into()
                    },
                );
            }
            let plan = Arc::new(scenario::FanoutPlan {
                subscribers: *subscribers,
                topics: *topics,
                publishers: *publishers,
                rate: *rate,
                size: *size,
                warmup: seconds(w.warmup, "--warmup")?,
                duration: seconds(w.duration, "--duration")?,
                speech: protocol.speech(sub_msg, pub_prefix, *distinct_ids),
                topic_prefix: topic_prefix.clone(),
                settle: Duration::from_millis(*settle_ms),
                publish_target,
            });
            let warmup = plan.settle + plan.warmup;
            let duration = plan.duration;
            fanout_plan = Some(plan.clone());
            let c = common.clone();
            (
                Arc::new(move |i| Box::pin(scenario::fanout(c.clone(), plan.clone(), i))),
                warmup,
                Some(duration),
                subscribers + publishers,
            )
        }
    };

    let rss_before = args.server_pid.and_then(rss_kib);
    // CPU is sampled over the measured window only (after the warm-up).
    let cpu_sampler = {
        let pid = args.server_pid;
        let epoch = common.epoch;
        std::thread::spawn(move || {
            std::thread::sleep(warmup.saturating_sub(epoch.elapsed()));
            (
                cpu_seconds(None),
                pid.and_then(|p| cpu_seconds(Some(p))),
                report::steal_seconds(),
                Instant::now(),
            )
        })
    };
    // The connect scenario reads the server's memory while every connection
    // is held: at the end of the hold (a server may settle idle connections
    // into a cheaper state after a while), and at least a second after the
    // last connection settled.
    let memory_probe = match (&cli.scenario, args.server_pid) {
        (
            Scenario::Connect {
                connections,
                rate,
                hold,
                ..
            },
            Some(pid),
        ) => {
            let ramp = Duration::from_secs_f64(*connections as f64 / rate);
            let hold_ends = common.epoch + ramp + Duration::from_secs_f64(*hold);
            let live = live.clone();
            let total = *connections as u64;
            Some(std::thread::spawn(move || {
                // Wait for the ramp, then for every connection to settle (bounded).
                let give_up = Instant::now() + ramp + Duration::from_secs(30);
                while live.established.load(Ordering::Relaxed) + live.failed.load(Ordering::Relaxed) < total
                    && Instant::now() < give_up
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
                let probe_at = (Instant::now() + Duration::from_secs(1)).max(
                    hold_ends
                        .checked_sub(MEMORY_PROBE_BEFORE_HOLD_ENDS)
                        .unwrap_or(hold_ends),
                );
                std::thread::sleep(probe_at.saturating_duration_since(Instant::now()));
                rss_kib(pid)
            }))
        }
        _ => None,
    };

    let result = run_threads(args.threads, args.driver, live.clone(), body)?;
    let (harness_cpu0, server_cpu0, steal0, measured_from) = cpu_sampler.join().map_err(|_| "cpu sampler failed")?;
    let window = window.unwrap_or_else(|| measured_from.elapsed());
    let mut report = Report::new(name, &args.url, args.threads, window, &result);
    report.parameters = params;
    // Per message: CPU over the window divided by the messages measured in it.
    let measured = result.latency_us.len();
    let per_message = |cpu: f64| (measured > 0).then(|| cpu * 1e9 / measured as f64);
    if let (Some(a), Some(b)) = (harness_cpu0, cpu_seconds(None)) {
        report.cpu.harness_seconds = b - a;
        report.cpu.harness_ns_per_message = per_message(b - a);
    }
    report.cpu.steal_seconds = report::steal_seconds()
        .iter()
        .zip(&steal0)
        .map(|(b, a)| b - a)
        .collect();
    if let (Some(a), Some(b)) = (server_cpu0, args.server_pid.and_then(|p| cpu_seconds(Some(p)))) {
        report.cpu.server_seconds = Some(b - a);
        report.cpu.server_ns_per_message = per_message(b - a);
    }
    if let (Some(before), Some(probe)) = (rss_before, memory_probe) {
        if let Some(after) = probe.join().ok().flatten() {
            report.memory = Some(Memory {
                server_rss_before_kib: before,
                server_rss_after_kib: after,
                bytes_per_connection: (after as f64 - before as f64) * 1024.0 / connections.max(1) as f64,
            });
        }
    }
    if name == "latency" {
        // Open loop: every message sent in the window is owed a reply (the
        // run waits for late ones before closing).
        report.lost = Some(result.sent.saturating_sub(result.received));
    }
    if let Some(plan) = &fanout_plan {
        report.lost = Some(
            plan.expected_deliveries(&result.published)
                .saturating_sub(result.received),
        );
    }
    report.print_summary();
    if let Some(path) = &args.json {
        report.write_json(path)?;
    }
    if let Some(path) = &args.report {
        report::write_plot(
            path,
            &format!("sluice-load {name}: latency by percentile, {}", args.url),
            &result.latency_us,
        )?;
    }
    if report.error_count() > args.max_errors {
        eprintln!(
            "sluice-load: {} failures/errors/losses, more than --max-errors {}",
            report.error_count(),
            args.max_errors
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// Now on the realtime clock, in nanoseconds since 1970.
fn realtime_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}
