//! Readings from /proc: a process's resident memory and CPU time, the
//! kernel's slab, and a description of the machine.

use std::fs;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;

/// A `Key:   123 kB` line's number, in bytes.
fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| kib * 1024)
}

/// Resident memory of a process, in bytes.
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    Ok(rss(pid)?.total)
}

/// A process's resident memory and the file-backed part of it.
#[derive(Default)]
pub struct Rss {
    pub total: u64,
    /// `RssFile`: pages of mapped files, chiefly the executable's code and
    /// read-only data, which every process running it shares and the kernel
    /// can drop and read again.
    pub file: u64,
}

/// Resident memory of a process, in bytes, with its file-backed part.
pub fn rss(pid: u32) -> anyhow::Result<Rss> {
    let text = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("process {pid} is gone"))?;
    Ok(Rss {
        total: kib_field(&text, "VmRSS").context("no VmRSS in /proc/PID/status")?,
        file: kib_field(&text, "RssFile").context("no RssFile in /proc/PID/status")?,
    })
}

/// The process listening on `addr` (TCP, IPv4): the socket's inode from
/// /proc/net/tcp, then the process holding a descriptor to it.
pub fn listener_pid(addr: std::net::SocketAddr) -> anyhow::Result<u32> {
    let std::net::SocketAddr::V4(addr) = addr else {
        bail!("{addr}: only IPv4 gateways can be measured");
    };
    let table = fs::read_to_string("/proc/net/tcp")?;
    let inode = table
        .lines()
        .skip(1)
        .find_map(|line| listening_inode(line, addr))
        .with_context(|| format!("nothing listens on {addr}"))?;
    let target = format!("socket:[{inode}]");
    for process in fs::read_dir("/proc")?.flatten() {
        let Ok(pid) = process.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(fds) = fs::read_dir(process.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if fs::read_link(fd.path()).is_ok_and(|link| link.as_os_str() == target.as_str()) {
                return Ok(pid);
            }
        }
    }
    bail!("no process of this user holds the socket listening on {addr}")
}

/// The inode of a /proc/net/tcp line if it is a listener on `addr` (or on
/// the wildcard address with its port).
fn listening_inode(line: &str, addr: std::net::SocketAddrV4) -> Option<u64> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (ip, port) = fields.get(1)?.split_once(':')?;
    const LISTEN: &str = "0A";
    if *fields.get(3)? != LISTEN || u16::from_str_radix(port, 16).ok()? != addr.port() {
        return None;
    }
    // The kernel prints the address's in-memory (network order) u32 in hex.
    let ip = std::net::Ipv4Addr::from(u32::from_be(u32::from_str_radix(ip, 16).ok()?));
    (ip == *addr.ip() || ip.is_unspecified()).then(|| fields.get(9)?.parse().ok())?
}

/// The kernel's slab memory (`Slab:` of /proc/meminfo), in bytes: where
/// socket, inode, file and poll structures live.
pub fn slab_bytes() -> anyhow::Result<u64> {
    let text = fs::read_to_string("/proc/meminfo")?;
    kib_field(&text, "Slab").context("no Slab in /proc/meminfo")
}

/// `MemAvailable` of /proc/meminfo, in bytes: what can be taken without
/// swapping.
pub fn memory_available_bytes() -> anyhow::Result<u64> {
    let text = fs::read_to_string("/proc/meminfo")?;
    kib_field(&text, "MemAvailable").context("no MemAvailable in /proc/meminfo")
}

/// The memory all TCP sockets' buffers hold now (`mem` of the TCP line of
/// /proc/net/sockstat, in pages, the unit of `net.ipv4.tcp_mem`), in bytes.
pub fn tcp_buffer_bytes() -> anyhow::Result<u64> {
    let text = fs::read_to_string("/proc/net/sockstat")?;
    parse_sockstat_tcp_mem(&text)
        .map(|pages| pages * page_size())
        .context("no TCP mem in /proc/net/sockstat")
}

fn parse_sockstat_tcp_mem(text: &str) -> Option<u64> {
    let fields: Vec<&str> = text
        .lines()
        .find(|l| l.starts_with("TCP:"))?
        .split_whitespace()
        .collect();
    let at = fields.iter().position(|&f| f == "mem")?;
    fields.get(at + 1)?.parse().ok()
}

/// User plus system CPU time of a process, in seconds.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat_cpu_ticks(&text).map(|ticks| ticks as f64 / clock_ticks_per_second())
}

fn parse_stat_cpu_ticks(stat: &str) -> anyhow::Result<u64> {
    // The command name may hold spaces; fields resume after its ')'.
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3 of stat(5), utime 14 and stime 15.
    if fields.len() < 13 {
        bail!("short stat line");
    }
    Ok(fields[11].parse::<u64>()? + fields[12].parse::<u64>()?)
}

/// The page size: the unit of `net.ipv4.tcp_mem` and of sockstat's `mem`.
pub fn page_size() -> u64 {
    // SAFETY: sysconf takes no pointers.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 { size as u64 } else { 4096 }
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf takes no pointers.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// Samples, on a thread of its own, the summed RSS of some processes, the
/// TCP buffer memory of the host and its available memory, keeping the
/// extremes, until `finish`.
pub struct PeakSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Peaks>,
}

/// What `PeakSampler` saw.
#[derive(Debug, Clone, Copy, Default)]
pub struct Peaks {
    /// The highest summed RSS of the processes.
    pub rss: u64,
    /// The most memory TCP buffers held (what `net.ipv4.tcp_mem` limits).
    pub tcp_buffers: u64,
    /// The least `MemAvailable` of the host.
    pub memory_available_min: u64,
}

impl PeakSampler {
    pub fn start(pids: Vec<u32>, interval: Duration) -> PeakSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let mut peaks = Peaks {
                    memory_available_min: u64::MAX,
                    ..Peaks::default()
                };
                loop {
                    let rss: u64 = pids.iter().filter_map(|&pid| rss_bytes(pid).ok()).sum();
                    peaks.rss = peaks.rss.max(rss);
                    peaks.tcp_buffers = peaks.tcp_buffers.max(tcp_buffer_bytes().unwrap_or(0));
                    if let Ok(available) = memory_available_bytes() {
                        peaks.memory_available_min = peaks.memory_available_min.min(available);
                    }
                    if stop.load(Ordering::Relaxed) {
                        return peaks;
                    }
                    std::thread::sleep(interval);
                }
            }
        });
        PeakSampler { stop, thread }
    }

    pub fn finish(self) -> Peaks {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cpus: usize,
    pub memory_bytes: u64,
    pub kernel: String,
}

pub fn machine() -> Machine {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name")?.split_once(':'))
        .map_or_else(
            || "unknown".to_owned(),
            |(_, model)| model.trim().to_owned(),
        );
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    Machine {
        cpu_model,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_bytes: kib_field(&meminfo, "MemTotal").unwrap_or(0),
        kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "unknown".to_owned(), |k| k.trim().to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_is_found_by_its_address_and_its_process() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        assert_eq!(listener_pid(addr).unwrap(), std::process::id());
        drop(listener);
        assert!(listener_pid(addr).is_err());
    }

    #[test]
    fn kib_fields_are_read_in_bytes() {
        let status = "Name:\therald\nVmPeak:\t  9000 kB\nVmRSS:\t    1234 kB\n";
        assert_eq!(kib_field(status, "VmRSS"), Some(1234 * 1024));
        assert_eq!(kib_field(status, "VmSwap"), None);
        let meminfo = "MemTotal:       24000000 kB\nSlab:             181996 kB\n";
        assert_eq!(kib_field(meminfo, "Slab"), Some(181_996 * 1024));
    }

    #[test]
    fn sockstat_gives_the_tcp_buffer_pages() {
        let text = "sockets: used 38\nTCP: inuse 15 orphan 0 tw 2 alloc 18 mem 232\n\
                    UDP: inuse 0 mem 7\n";
        assert_eq!(parse_sockstat_tcp_mem(text), Some(232));
    }

    #[test]
    fn cpu_ticks_skip_a_command_name_with_spaces() {
        let stat = "42 (herald shard) S 1 42 42 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 4 0";
        assert_eq!(parse_stat_cpu_ticks(stat).unwrap(), 325);
        assert!(parse_stat_cpu_ticks("42 (x) S 1").is_err());
    }
}
