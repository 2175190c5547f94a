//! The standard process metrics of Prometheus clients, read from `/proc`
//! at each scrape: `process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, `process_virtual_memory_bytes`,
//! `process_open_fds`, `process_max_fds`, `process_start_time_seconds`.
//!
//! **Invariant:** a scrape never fails because of these. A file that cannot
//! be read or parsed (another OS, a hardened `/proc`) leaves its metrics out
//! of that scrape, and the rest of the text is unchanged. The parsers are
//! pure functions of the files' text, tested on fixed samples.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;

/// Clock ticks per second of `/proc/<pid>/stat`'s times (`USER_HZ`). It is
/// 100 on every Linux architecture Rust targets (the kernel ABI fixes it,
/// whatever `CONFIG_HZ` is); the Go client's `procfs` assumes the same.
const USER_HZ: f64 = 100.0;

/// Reads `/proc/self` on each scrape.
#[derive(Debug)]
pub(super) struct ProcessCollector;

/// What one scrape could read; `None` where it could not.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub(super) struct ProcessSample {
    pub(super) cpu_seconds: Option<f64>,
    pub(super) resident_bytes: Option<u64>,
    pub(super) virtual_bytes: Option<u64>,
    pub(super) open_fds: Option<u64>,
    pub(super) max_fds: Option<u64>,
    pub(super) start_time_seconds: Option<f64>,
}

impl ProcessSample {
    /// Reads the current process's files.
    fn read() -> ProcessSample {
        let file = |name: &str| std::fs::read_to_string(name).ok();
        let stat = file("/proc/self/stat").and_then(|text| parse_stat(&text));
        let status = file("/proc/self/status");
        let boot_time = file("/proc/stat").and_then(|text| parse_boot_time(&text));
        ProcessSample {
            cpu_seconds: stat.map(|s| (s.utime + s.stime) as f64 / USER_HZ),
            resident_bytes: status.as_deref().and_then(|s| status_kib(s, "VmRSS:")).map(|k| k * 1024),
            virtual_bytes: status.as_deref().and_then(|s| status_kib(s, "VmSize:")).map(|k| k * 1024),
            open_fds: std::fs::read_dir("/proc/self/fd").ok().map(|dir| dir.count() as u64),
            max_fds: file("/proc/self/limits").and_then(|text| parse_max_fds(&text)),
            start_time_seconds: stat.zip(boot_time).map(|(s, boot)| boot as f64 + s.starttime as f64 / USER_HZ),
        }
    }
}

/// The fields of `/proc/<pid>/stat` used here, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Stat {
    pub(super) utime: u64,
    pub(super) stime: u64,
    /// Since boot.
    pub(super) starttime: u64,
}

/// `/proc/<pid>/stat`: `pid (comm) state …`; `comm` may hold spaces and
/// parentheses, so fields are counted after the last `)`. utime, stime and
/// starttime are fields 14, 15 and 22 (proc(5)).
pub(super) fn parse_stat(text: &str) -> Option<Stat> {
    let (_, rest) = text.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state).
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(Stat { utime: field(14)?, stime: field(15)?, starttime: field(22)? })
}

/// `btime` of `/proc/stat`: the boot time in Unix seconds.
pub(super) fn parse_boot_time(text: &str) -> Option<u64> {
    text.lines().find_map(|line| line.strip_prefix("btime ")?.trim().parse().ok())
}

/// A `Name:   1234 kB` line of `/proc/<pid>/status`, in KiB.
pub(super) fn status_kib(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find_map(|line| line.strip_prefix(name))?;
    let mut words = line.split_whitespace();
    let value = words.next()?.parse().ok()?;
    (words.next() == Some("kB")).then_some(value)
}

/// The soft limit of `Max open files` in `/proc/<pid>/limits`; `None` when
/// unlimited.
pub(super) fn parse_max_fds(text: &str) -> Option<u64> {
    let line = text.lines().find_map(|line| line.strip_prefix("Max open files"))?;
    line.split_whitespace().next()?.parse().ok()
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        encode_sample(&ProcessSample::read(), &mut encoder)
    }
}

/// Writes what `sample` holds; the names get their unit (and `_total` for
/// the counter) from the encoder, as registered metrics do.
pub(super) fn encode_sample(sample: &ProcessSample, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    if let Some(seconds) = sample.cpu_seconds {
        let metric = ConstCounter::new(seconds);
        let help = "Total user and system CPU time spent in seconds.";
        metric.encode(encoder.encode_descriptor("process_cpu", help, Some(&Unit::Seconds), metric.metric_type())?)?;
    }
    let gauges = [
        ("process_resident_memory", "Resident memory size in bytes.", Some(Unit::Bytes), sample.resident_bytes),
        ("process_virtual_memory", "Virtual memory size in bytes.", Some(Unit::Bytes), sample.virtual_bytes),
        ("process_open_fds", "Number of open file descriptors.", None, sample.open_fds),
        ("process_max_fds", "Maximum number of open file descriptors.", None, sample.max_fds),
    ];
    for (name, help, unit, value) in gauges {
        if let Some(value) = value.and_then(|v| i64::try_from(v).ok()) {
            let metric = ConstGauge::new(value);
            metric.encode(encoder.encode_descriptor(name, help, unit.as_ref(), metric.metric_type())?)?;
        }
    }
    if let Some(seconds) = sample.start_time_seconds {
        let metric = ConstGauge::new(seconds);
        let help = "Start time of the process since unix epoch in seconds.";
        let unit = Some(&Unit::Seconds);
        metric.encode(encoder.encode_descriptor("process_start_time", help, unit, metric.metric_type())?)?;
    }
    Ok(())
}
