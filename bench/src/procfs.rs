//! Readings from /proc: a process's resident memory and CPU time, the
//! kernel's slab, and a description of the machine.

use std::fs;

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
    let text = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("process {pid} is gone"))?;
    kib_field(&text, "VmRSS").context("no VmRSS in /proc/PID/status")
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

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf takes no pointers.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
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
    fn cpu_ticks_skip_a_command_name_with_spaces() {
        let stat = "42 (herald shard) S 1 42 42 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 4 0";
        assert_eq!(parse_stat_cpu_ticks(stat).unwrap(), 325);
        assert!(parse_stat_cpu_ticks("42 (x) S 1").is_err());
    }
}
