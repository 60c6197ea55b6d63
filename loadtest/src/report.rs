//! What a run reports: the human summary, the JSON file (every figure, and
//! the histograms in HdrHistogram's serialized V2 form so runs can be
//! merged and compared), the percentile plot, and the CPU and memory
//! readings taken from /proc.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use hdrhistogram::serialization::{Serializer, V2Serializer};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::run::ThreadResult;

/// CPU seconds (user + system) a process has used, from /proc/PID/stat.
pub fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the whole line.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((utime + stime) / ticks)
}

/// Seconds each CPU has had stolen by the hypervisor (the `steal` column of
/// /proc/stat), indexed by CPU number.
pub fn steal_seconds() -> Vec<f64> {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return Vec::new();
    };
    stat.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .filter_map(|l| l.split_whitespace().nth(8)?.parse::<f64>().ok())
        .map(|t| t / ticks)
        .collect()
}

/// Resident memory of a process in KiB, from /proc/PID/status.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[derive(Serialize, Default)]
pub struct Percentiles {
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p99_9: u64,
    pub p99_99: u64,
    pub max: u64,
    pub mean: f64,
}

impl Percentiles {
    /// "p50 .. p90 .. p99 .. p99.9 .. p99.99 .. max ..".
    fn line(&self) -> String {
        format!(
            "p50 {} p90 {} p99 {} p99.9 {} p99.99 {} max {}",
            self.p50, self.p90, self.p99, self.p99_9, self.p99_99, self.max
        )
    }

    pub fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: h.len(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p99_9: h.value_at_quantile(0.999),
            p99_99: h.value_at_quantile(0.9999),
            max: h.max(),
            mean: h.mean(),
        }
    }
}

#[derive(Serialize, Default)]
pub struct Cpu {
    /// CPU seconds used during the measured window.
    pub harness_seconds: f64,
    pub server_seconds: Option<f64>,
    /// CPU nanoseconds per message measured (none without messages).
    pub harness_ns_per_message: Option<f64>,
    pub server_ns_per_message: Option<f64>,
    /// Seconds the hypervisor took from each CPU during the window. On a
    /// shared VM this is what makes a run unreliable.
    pub steal_seconds: Vec<f64>,
}

#[derive(Serialize, Default)]
pub struct Memory {
    pub server_rss_before_kib: u64,
    pub server_rss_after_kib: u64,
    pub bytes_per_connection: f64,
}

#[derive(Serialize)]
pub struct Report {
    pub scenario: String,
    pub target: String,
    pub threads: usize,
    /// Seconds of the measured window.
    pub measured_seconds: f64,
    pub parameters: BTreeMap<String, String>,
    pub established: u64,
    pub failed: BTreeMap<String, u64>,
    pub sent: u64,
    pub received: u64,
    pub messages_per_second: f64,
    /// Fan-out: deliveries per second arriving inside the window, whenever
    /// they were sent.
    pub arrivals_per_second: f64,
    pub megabytes_per_second: f64,
    /// Fan-out: deliveries expected but not seen, and deliveries out of a
    /// publisher's order.
    pub lost: Option<u64>,
    pub out_of_order: u64,
    pub clean_closes: u64,
    pub errors: u64,
    pub first_errors: Vec<String>,
    pub latency_us: Percentiles,
    /// Fan-out: send to arrival in the subscriber's socket (kernel stamps).
    pub arrival_us: Percentiles,
    /// Fan-out: how late publishes left the harness.
    pub publish_lag_us: Percentiles,
    pub handshake_us: Percentiles,
    /// HdrHistogram V2 serialized form, base64.
    pub latency_histogram: String,
    pub handshake_histogram: String,
    pub cpu: Cpu,
    pub memory: Option<Memory>,
}

fn serialize(h: &Histogram<u64>) -> String {
    let mut bytes = Vec::new();
    match V2Serializer::new().serialize(h, &mut bytes) {
        Ok(_) => BASE64.encode(bytes),
        Err(_) => String::new(),
    }
}

impl Report {
    pub fn new(scenario: &str, target: &str, threads: usize, window: Duration, r: &ThreadResult) -> Report {
        let secs = window.as_secs_f64().max(1e-9);
        Report {
            scenario: scenario.to_string(),
            target: target.to_string(),
            threads,
            measured_seconds: secs,
            parameters: BTreeMap::new(),
            established: r.established,
            failed: r.failures.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            sent: r.sent,
            received: r.received,
            // Only messages whose latency was measured fall in the window.
            messages_per_second: r.latency_us.len() as f64 / secs,
            arrivals_per_second: r.arrived_in_window as f64 / secs,
            megabytes_per_second: r.bytes_received as f64 / secs / 1e6,
            lost: None,
            out_of_order: r.out_of_order,
            clean_closes: r.clean_closes,
            errors: r.errors,
            first_errors: r.first_errors.clone(),
            latency_us: Percentiles::of(&r.latency_us),
            arrival_us: Percentiles::of(&r.arrival_us),
            publish_lag_us: Percentiles::of(&r.lag_us),
            handshake_us: Percentiles::of(&r.handshake_us),
            latency_histogram: serialize(&r.latency_us),
            handshake_histogram: serialize(&r.handshake_us),
            cpu: Cpu::default(),
            memory: None,
        }
    }

    /// Connect failures plus other errors plus lost deliveries.
    pub fn error_count(&self) -> u64 {
        self.failed.values().sum::<u64>() + self.errors + self.lost.unwrap_or(0)
    }

    pub fn print_summary(&self) {
        let mut rows: Vec<(String, String)> = vec![
            ("scenario".into(), format!("{} -> {}", self.scenario, self.target)),
            ("threads".into(), self.threads.to_string()),
        ];
        for (k, v) in &self.parameters {
            rows.push((k.clone(), v.clone()));
        }
        let failed: u64 = self.failed.values().sum();
        let causes: Vec<String> = self.failed.iter().map(|(k, v)| format!("{k} {v}")).collect();
        rows.push((
            "connections".into(),
            format!(
                "{} established, {} failed{}",
                self.established,
                failed,
                if causes.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", causes.join(", "))
                }
            ),
        ));
        if self.handshake_us.count > 0 {
            let h = &self.handshake_us;
            rows.push((
                "handshake µs".into(),
                format!(
                    "p50 {} p90 {} p99 {} p99.9 {} max {}",
                    h.p50, h.p90, h.p99, h.p99_9, h.max
                ),
            ));
        }
        if self.sent > 0 || self.received > 0 {
            rows.push((
                "messages".into(),
                format!(
                    "{} sent, {} received in {:.1} s",
                    self.sent, self.received, self.measured_seconds
                ),
            ));
            rows.push((
                "throughput".into(),
                format!(
                    "{:.0} msg/s, {:.2} MB/s",
                    self.messages_per_second, self.megabytes_per_second
                ),
            ));
        }
        if self.arrivals_per_second > 0.0 {
            rows.push((
                "arrivals".into(),
                format!(
                    "{:.0} msg/s (deliveries arriving in the window, whenever published)",
                    self.arrivals_per_second
                ),
            ));
        }
        if let Some(lost) = self.lost {
            rows.push((
                "delivery".into(),
                format!("{lost} lost, {} out of order", self.out_of_order),
            ));
        }
        if self.latency_us.count > 0 {
            let l = &self.latency_us;
            rows.push(("latency µs".into(), format!("{} (n={})", l.line(), l.count)));
        }
        if self.arrival_us.count > 0 {
            let l = &self.arrival_us;
            rows.push((
                "arrival µs".into(),
                format!("{} (send to socket, kernel stamps)", l.line()),
            ));
        }
        if self.publish_lag_us.count > 0 {
            let l = &self.publish_lag_us;
            rows.push((
                "publish lag µs".into(),
                format!(
                    "p50 {} p99 {} p99.9 {} max {} (the harness's own delay, part of both latencies)",
                    l.p50, l.p99, l.p99_9, l.max
                ),
            ));
        }
        if let Some(m) = &self.memory {
            rows.push((
                "server memory".into(),
                format!(
                    "RSS {} KiB -> {} KiB, {:.0} bytes per connection",
                    m.server_rss_before_kib, m.server_rss_after_kib, m.bytes_per_connection
                ),
            ));
        }
        let c = &self.cpu;
        let mut cpu = format!("harness {:.2} s", c.harness_seconds);
        if let Some(per) = c.harness_ns_per_message {
            cpu += &format!(" ({per:.0} ns/msg)");
        }
        if let Some(s) = c.server_seconds {
            cpu += &format!(", server {s:.2} s");
        }
        if let Some(per) = c.server_ns_per_message {
            cpu += &format!(" ({per:.0} ns/msg)");
        }
        rows.push(("cpu".into(), cpu));
        if !c.steal_seconds.is_empty() {
            let worst = c.steal_seconds.iter().copied().fold(0.0, f64::max);
            let per_cpu: Vec<String> = c
                .steal_seconds
                .iter()
                .enumerate()
                .map(|(i, s)| format!("cpu{i} {s:.2} s"))
                .collect();
            let warning = if worst > 0.05 * self.measured_seconds {
                " (over 5% of the window: the host took CPU, figures are unreliable)"
            } else {
                ""
            };
            rows.push(("steal".into(), format!("{}{warning}", per_cpu.join(", "))));
        }
        rows.push(("closes".into(), format!("{} clean", self.clean_closes)));
        rows.push(("errors".into(), self.errors.to_string()));
        let width = rows.iter().map(|(k, _)| k.chars().count()).max().unwrap_or(0);
        for (k, v) in rows {
            println!("{k:>width$}  {v}");
        }
        for e in &self.first_errors {
            println!("{:>width$}  {e}", "");
        }
    }

    pub fn write_json(&self, path: &Path) -> Result<(), String> {
        let text = serde_json::to_string_pretty(self).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// The HdrHistogram percentile-distribution chart: latency against
/// percentile, the x axis log-scaled in 1/(1-p) so the tail gets room.
pub fn write_plot(path: &Path, title: &str, h: &Histogram<u64>) -> Result<(), String> {
    write_plot_series(path, title, &[("", h)])
}

/// Which histogram of a run's JSON `plot_runs` draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Drawn {
    Latency,
    Handshake,
}

/// Plots earlier runs: each of `series` is `LABEL=FILE[,FILE...]`, the
/// `--json` files of runs whose histograms are merged into one line.
pub fn plot_runs(path: &Path, title: &str, series: &[String], drawn: Drawn) -> Result<(), String> {
    let key = match drawn {
        Drawn::Latency => "latency_histogram",
        Drawn::Handshake => "handshake_histogram",
    };
    let mut lines = Vec::new();
    for spec in series {
        let (label, files) = spec
            .split_once('=')
            .ok_or_else(|| format!("{spec:?}: give a series as LABEL=FILE[,FILE...]"))?;
        let mut merged = crate::run::histogram();
        for file in files.split(',').filter(|f| !f.is_empty()) {
            let text = std::fs::read_to_string(file).map_err(|e| format!("{file}: {e}"))?;
            let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("{file}: {e}"))?;
            let encoded = json[key].as_str().ok_or_else(|| format!("{file}: no {key}"))?;
            let bytes = BASE64.decode(encoded).map_err(|e| format!("{file}: {key}: {e}"))?;
            let h: Histogram<u64> = hdrhistogram::serialization::Deserializer::new()
                .deserialize(&mut bytes.as_slice())
                .map_err(|e| format!("{file}: {key}: {e}"))?;
            merged.add(&h).map_err(|e| format!("{file}: {key}: {e}"))?;
        }
        if !merged.is_empty() {
            lines.push((label, merged));
        }
    }
    let lines: Vec<(&str, &Histogram<u64>)> = lines.iter().map(|(label, h)| (*label, h)).collect();
    write_plot_series(path, title, &lines)
}

/// One latency-by-percentile plot with a line per labelled histogram (an
/// empty label: no legend).
fn write_plot_series(path: &Path, title: &str, series: &[(&str, &Histogram<u64>)]) -> Result<(), String> {
    use plotters::prelude::*;
    if series.iter().all(|(_, h)| h.is_empty()) {
        return Err("no latencies were recorded: nothing to plot".into());
    }
    let lines: Vec<(&str, Vec<(f64, f64)>)> = series
        .iter()
        .map(|(label, h)| {
            let points = h
                .iter_quantiles(1)
                .map(|v| {
                    (
                        1.0 / (1.0 - v.quantile_iterated_to()).max(1e-6),
                        v.value_iterated_to() as f64,
                    )
                })
                .collect();
            (*label, points)
        })
        .collect();
    let x_max = lines
        .iter()
        .flat_map(|(_, p)| p.iter().map(|p| p.0))
        .fold(10.0, f64::max)
        .min(1e6);
    let y_max = series.iter().map(|(_, h)| h.max()).max().unwrap_or(1) as f64 * 1.1;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 500)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d((1.0..x_max).log_scale(), (1.0..y_max.max(2.0)).log_scale())
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("percentile")
            .y_desc("latency (µs)")
            .x_label_formatter(&|x| percentile_label(*x))
            .draw()
            .map_err(|e| e.to_string())?;
        for (i, (label, points)) in lines.into_iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let drawn = chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))
                .map_err(|e| e.to_string())?;
            if !label.is_empty() {
                drawn
                    .label(label)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            }
        }
        if series.iter().any(|(label, _)| !label.is_empty()) {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(|e| e.to_string())?;
        }
        root.present().map_err(|e| e.to_string())?;
    }
    let is_html = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("html"));
    let body = if is_html {
        let mut rows = String::new();
        for (label, h) in series {
            let p = Percentiles::of(h);
            rows.push_str(&format!(
                "<tr><td>{label}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                p.p50, p.p90, p.p99, p.p99_9, p.p99_99, p.max, p.count
            ));
        }
        format!(
            "<!doctype html><meta charset=utf-8><title>{title}</title><h1>{title}</h1>{svg}\
             <table border=1 cellpadding=4><tr><th></th><th>p50</th><th>p90</th><th>p99</th><th>p99.9</th><th>p99.99</th><th>max</th><th>count</th></tr>\
             {rows}</table><p>microseconds</p>"
        )
    } else {
        svg
    };
    std::fs::write(path, body).map_err(|e| format!("{}: {e}", path.display()))
}

/// `x` = 1/(1-p) as a percentile label: 10 -> "90%", 1000 -> "99.9%".
fn percentile_label(x: f64) -> String {
    let p = format!("{:.4}", 100.0 * (1.0 - 1.0 / x));
    format!("{}%", p.trim_end_matches('0').trim_end_matches('.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_ordered_and_serialized_form_round_trips() {
        let mut h = crate::run::histogram();
        for v in 1..=10_000u64 {
            h.record(v).unwrap();
        }
        let p = Percentiles::of(&h);
        assert!(p.p50 <= p.p90 && p.p90 <= p.p99 && p.p99 <= p.p99_9 && p.p99_9 <= p.p99_99 && p.p99_99 <= p.max);
        let bytes = BASE64.decode(serialize(&h)).unwrap();
        let back: Histogram<u64> = hdrhistogram::serialization::Deserializer::new()
            .deserialize(&mut &bytes[..])
            .unwrap();
        assert_eq!(back.len(), h.len());
        assert_eq!(back.value_at_quantile(0.99), h.value_at_quantile(0.99));
    }

    #[test]
    fn labels() {
        assert_eq!(percentile_label(1.0), "0%");
        assert_eq!(percentile_label(10.0), "90%");
        assert_eq!(percentile_label(1000.0), "99.9%");
    }

    #[test]
    fn own_cpu_is_readable() {
        assert!(cpu_seconds(None).is_some());
        assert!(rss_kib(std::process::id()).unwrap() > 0);
        // /proc/stat always lists cpu0.
        assert!(!steal_seconds().is_empty());
    }

    #[test]
    fn plot_writes_svg_and_html() {
        let mut h = crate::run::histogram();
        for v in 1..=1000u64 {
            h.record(v * 3).unwrap();
        }
        let dir = std::env::temp_dir();
        let svg = dir.join(format!("sluice-load-{}.svg", std::process::id()));
        write_plot(&svg, "test", &h).unwrap();
        assert!(std::fs::read_to_string(&svg).unwrap().starts_with("<svg"));
        let html = dir.join(format!("sluice-load-{}.html", std::process::id()));
        write_plot(&html, "test", &h).unwrap();
        assert!(std::fs::read_to_string(&html).unwrap().contains("<table"));
        let _ = std::fs::remove_file(svg);
        let _ = std::fs::remove_file(html);
    }
}
