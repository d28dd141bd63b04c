//! `--stats`: what the VMM costs, measured from inside, for the benchmark against Firecracker's
//! published budget (8 CPU ms from process start to the guest's first instruction, 5 MiB of VMM
//! memory beyond guest RAM).
//!
//! - Time: from `main()` to vCPU 0 entering its first KVM_RUN (exec and dynamic loading, about
//!   a millisecond, are not seen from inside).
//! - CPU: the sum of every thread's on-CPU time (`/proc/self/task/*/schedstat`) at that moment.
//! - Memory: at exit, VmHWM/VmRSS from `/proc/self/status` and the resident part of the guest
//!   RAM mappings from `/proc/self/smaps`; overhead = RSS minus resident guest RAM.
//!
//! The `/proc` files are opened before the main thread's seccomp filter and re-read at exit.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::time::Duration;

use crate::devices::metrics::DeviceMetrics;

/// Sum of on-CPU nanoseconds over every thread of this process.
pub fn cpu_ns_all_threads() -> std::io::Result<u64> {
    let mut total = 0u64;
    for entry in std::fs::read_dir("/proc/self/task")? {
        let path = entry?.path().join("schedstat");
        if let Ok(s) = std::fs::read_to_string(path) {
            total += s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok(total)
}

/// Files kept open for the exit report.
#[derive(Debug)]
pub struct ExitProbe {
    status: File,
    smaps: File,
    guest: Vec<(u64, u64)>,
}

impl ExitProbe {
    /// Opens the files; `guest` lists the host address ranges of guest RAM.
    pub fn open(guest: Vec<(u64, u64)>) -> std::io::Result<Self> {
        Ok(Self {
            status: File::open("/proc/self/status")?,
            smaps: File::open("/proc/self/smaps")?,
            guest,
        })
    }

    /// Plain `read` calls: std's `read_to_string` would `statx` the file for a size hint,
    /// which the main thread's filter does not allow.
    fn reread(f: &mut File) -> String {
        let mut out = Vec::new();
        let mut buf = [0u8; 8192];
        if f.seek(SeekFrom::Start(0)).is_ok() {
            while let Ok(n) = f.read(&mut buf) {
                match buf.get(..n) {
                    Some(chunk) if n > 0 => out.extend_from_slice(chunk),
                    _ => break,
                }
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// (VmRSS KiB, VmHWM KiB, resident guest RAM KiB).
    pub fn memory(&mut self) -> (u64, u64, u64) {
        let status = Self::reread(&mut self.status);
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let smaps = Self::reread(&mut self.smaps);
        (
            field("VmRSS:"),
            field("VmHWM:"),
            guest_rss_kib(&smaps, &self.guest),
        )
    }
}

/// Resident KiB of the mappings that start inside `guest` ranges.
pub fn guest_rss_kib(smaps: &str, guest: &[(u64, u64)]) -> u64 {
    let mut total = 0;
    let mut in_guest = false;
    for line in smaps.lines() {
        let head = line.split_whitespace().next().unwrap_or("");
        if let Some((a, _)) = head.split_once('-')
            && let Ok(start) = u64::from_str_radix(a, 16)
        {
            in_guest = guest.iter().any(|(s, l)| start >= *s && start < s + l);
            continue;
        }
        if in_guest && let Some(v) = line.strip_prefix("Rss:") {
            total += v
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    total
}

/// The report line.
pub fn line(
    first_run: Option<Duration>,
    cpu_ns: u64,
    mem: (u64, u64, u64),
    devices: &[(String, std::sync::Arc<dyn DeviceMetrics>)],
) -> String {
    let (rss, hwm, guest) = mem;
    let devs: Vec<String> = devices
        .iter()
        .map(|(name, m)| format!("\"{name}\":{}", m.json()))
        .collect();
    format!(
        "moat-vmm stats: {{\"main_to_first_kvm_run_us\":{},\"cpu_us_at_first_kvm_run\":{},\
         \"rss_kib\":{rss},\"hwm_kib\":{hwm},\"guest_rss_kib\":{guest},\"overhead_kib\":{},\
         \"devices\":{{{}}}}}",
        first_run.map_or(-1, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX)),
        cpu_ns / 1000,
        rss.saturating_sub(guest),
        devs.join(","),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_rss_counts_only_guest_mappings() {
        let smaps = "1000-2000 rw-p 0 0 0\nRss:                 8 kB\n\
                     7000-9000 rw-p 0 0 0\nRss:               100 kB\n";
        assert_eq!(guest_rss_kib(smaps, &[(0x7000, 0x2000)]), 100);
    }

    #[test]
    fn cpu_time_is_measurable() {
        assert!(cpu_ns_all_threads().is_ok_and(|n| n > 0));
    }
}
