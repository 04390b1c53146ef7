//! The kernel settings a run needs, checked before anything starts: a run
//! of N connections holds 2N sockets on this host (both ends are here), and
//! the defaults of a 24 GiB machine stop short of that well before memory
//! does. As root, the settings that are too low are raised for the run and
//! put back when it ends (on success, on an error, and on Ctrl-C or
//! SIGTERM: see `interrupt`); as another user, the run stops before it
//! starts, naming each setting and the value it needs. A setting that is
//! already high enough is left alone. See kernel-tuning/README.md.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::bail;

/// Kernel memory of one idle TCP socket: `tcp_sock`, the socket inode,
/// `struct file`, dentry, poll or io_uring entry. `herald-bench idle` at
/// 100,000 measured 5,012 B for a bare socket and 5,361 B for a gateway's
/// (the slab delta per connection, halved), rounded up.
const KERNEL_BYTES_PER_SOCKET: u64 = 5_400;
/// Herald's user space per connection: 657 B measured idle at 100,000,
/// times 1.15, its peak while pushing to everyone, rounded up.
const GATEWAY_BYTES_PER_CONNECTION: u64 = 760;
/// The load generator per client, its process's base included: 2,320 B
/// measured at 100,000 (`load_generator_bytes_per_conn`), rounded up.
const WORKER_BYTES_PER_CONNECTION: u64 = 2_400;
/// One conntrack entry: the `nf_conntrack` slab object (256 B) and its
/// share of the hash table and extensions.
const CONNTRACK_BYTES_PER_ENTRY: u64 = 320;
/// A gateway before its connections (runtime, io_uring ring, receive
/// buffers): ~15 MiB measured, rounded up.
const PROCESS_BASE_BYTES: u64 = 16 << 20;
/// TCP buffer memory per connection at the peak of a broadcast to
/// everyone: the message queued in the client's socket until it is read,
/// charged in whole pages (3,930 B measured at 100,000, from
/// /proc/net/sockstat). What `net.ipv4.tcp_mem` must leave room for.
const TCP_BUFFER_BYTES_PER_CONNECTION: u64 = 4096;

/// The accept queue each gateway shard asks for; the kernel caps it at
/// `net.core.somaxconn`.
const GATEWAY_LISTEN_BACKLOG: u64 = 4096;

/// What a run puts on this host.
#[derive(Debug, Clone, Copy)]
pub struct Needs {
    /// Connections at once (each is two sockets here: client and server).
    pub connections: u64,
    /// Server processes (gateways, brokers, bare acceptors) at once.
    pub servers: u64,
    /// Load-generator worker processes.
    pub workers: u64,
    /// The most clients one worker holds, and its source addresses: each
    /// (source, destination) pair has the ephemeral port range to itself.
    pub clients_per_worker: u64,
    pub sources_per_worker: u64,
}

/// The host's state that the needs are compared with.
#[derive(Debug, Clone, Default)]
pub struct Host {
    /// Files open now (first field of `fs.file-nr`).
    pub files_open: u64,
    /// Conntrack entries now, if the table exists.
    pub conntrack_count: Option<u64>,
    /// `MemAvailable`, in bytes.
    pub memory_available: u64,
    /// The unit of `net.ipv4.tcp_mem`.
    pub page_size: u64,
}

/// A setting and the value it is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub name: &'static str,
    pub current: String,
    pub wanted: String,
    /// Why the run needs it, in a few words.
    pub why: String,
}

/// The settings that are too low for `needs`, given `read` (a setting's
/// current value, whitespace-separated numbers; None: not in this kernel,
/// e.g. no conntrack).
pub fn plan(
    needs: &Needs,
    host: &Host,
    read: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<Vec<Change>> {
    let n = needs.connections;
    let page_size = host.page_size.max(1);
    let numbers = |name: &str| -> anyhow::Result<Option<Vec<u64>>> {
        let Some(text) = read(name) else {
            return Ok(None);
        };
        let values = text
            .split_whitespace()
            .map(str::parse::<u64>)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| anyhow::anyhow!("{name} is {text:?}: not numbers"))?;
        anyhow::ensure!(!values.is_empty(), "{name} is empty");
        Ok(Some(values))
    };
    let mut changes = Vec::new();
    let mut at_least = |name: &'static str, need: u64, why: String| -> anyhow::Result<()> {
        if let Some(values) = numbers(name)?
            && values[0] < need
        {
            changes.push(Change {
                name,
                current: values[0].to_string(),
                wanted: need.to_string(),
                why,
            });
        }
        Ok(())
    };

    // Two files per connection (its two sockets), a tenth more for what
    // else the run's processes open (pipes, API calls, storage), and the
    // files open on the host already.
    at_least(
        "fs.file-max",
        host.files_open + 2 * n + n / 10 + 10_000,
        format!("{n} connections are {} sockets on this host", 2 * n),
    )?;

    // One entry per connection, and as many again: a phase's connections
    // (the bare sockets before Herald's, a storm's dropped ones) stay in
    // the table in TIME_WAIT for nf_conntrack_tcp_timeout_time_wait
    // (120 s) while the next phase connects. A full table drops new
    // connections without a word.
    let conntrack = host.conntrack_count.unwrap_or(0) + 2 * n + n / 10;
    at_least(
        "net.netfilter.nf_conntrack_max",
        conntrack,
        format!("an entry per connection, for two phases of {n} at once"),
    )?;
    // Lookups walk a bucket's chain: at most ~4 entries each at the peak.
    at_least(
        "net.netfilter.nf_conntrack_buckets",
        conntrack.div_ceil(4),
        "conntrack hash chains of at most ~4 entries".to_owned(),
    )?;

    at_least(
        "net.core.somaxconn",
        GATEWAY_LISTEN_BACKLOG,
        "the accept queue a gateway asks for (a connect storm waits in it)".to_owned(),
    )?;

    // In pages, for all TCP buffers together: idle sockets hold none, but
    // a broadcast to everyone holds about a page per connection until the
    // clients have read it. Pressure at 1.5 times that (past it the kernel
    // trims every socket's buffers), the hard limit at twice that (past it
    // the kernel drops what arrives, and the senders retransmit).
    if let Some(mem) = numbers("net.ipv4.tcp_mem")?
        && mem.len() == 3
    {
        let pages = n * TCP_BUFFER_BYTES_PER_CONNECTION / page_size;
        let (pressure, max) = (mem[1].max(pages + pages / 2), mem[2].max(2 * pages));
        if (pressure, max) != (mem[1], mem[2]) {
            changes.push(Change {
                name: "net.ipv4.tcp_mem",
                current: join(&mem),
                wanted: join(&[mem[0], pressure, max]),
                why: format!("a broadcast queued to each of {n} connections at once"),
            });
        }
    }

    // With IP_BIND_ADDRESS_NO_PORT a port is picked per (source address,
    // destination), so each pair has the whole range. A worker's clients
    // are spread over its sources; twice that leaves room for a previous
    // phase's sockets in TIME_WAIT on the same pair.
    if let Some(range) = numbers("net.ipv4.ip_local_port_range")?
        && range.len() == 2
    {
        let per_pair = needs
            .clients_per_worker
            .div_ceil(needs.sources_per_worker.max(1));
        if range[1].saturating_sub(range[0]) + 1 < 2 * per_pair {
            let low = 65_535u64.saturating_sub(2 * per_pair).max(1024);
            changes.push(Change {
                name: "net.ipv4.ip_local_port_range",
                current: join(&range),
                wanted: join(&[low.min(range[0]), 65_535]),
                why: format!("{per_pair} clients per (source address, gateway) pair"),
            });
        }
    }
    Ok(changes)
}

fn join(values: &[u64]) -> String {
    values
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The memory the run takes at its peak, in bytes: both ends' sockets,
/// Herald's and the load generator's user space, conntrack entries (if
/// the table exists), each gateway's base, and the socket buffers of a
/// broadcast to everyone (as the kernel charges them: an upper bound).
pub fn memory_estimate(needs: &Needs, host: &Host) -> u64 {
    let n = needs.connections;
    let conntrack = if host.conntrack_count.is_some() {
        2 * n * CONNTRACK_BYTES_PER_ENTRY
    } else {
        0
    };
    n * (2 * KERNEL_BYTES_PER_SOCKET
        + GATEWAY_BYTES_PER_CONNECTION
        + WORKER_BYTES_PER_CONNECTION
        + TCP_BUFFER_BYTES_PER_CONNECTION)
        + conntrack
        + needs.servers * PROCESS_BASE_BYTES
}

fn path(name: &str) -> String {
    format!("/proc/sys/{}", name.replace('.', "/"))
}

/// A setting's value, its fields separated by single spaces; None when
/// this kernel has no such setting.
pub fn read(name: &str) -> Option<String> {
    let text = std::fs::read_to_string(path(name)).ok()?;
    Some(text.split_whitespace().collect::<Vec<_>>().join(" "))
}

fn write(name: &str, value: &str) -> std::io::Result<()> {
    std::fs::write(path(name), value)
}

/// The settings changed for this run, with their values before, in the
/// order they were changed: restored in reverse by `restore`, from the
/// guard or from the signal handler, whichever comes first.
static CHANGED: Mutex<Vec<(&'static str, String)>> = Mutex::new(Vec::new());

/// Puts back every setting changed for the run. With `wait_conntrack`,
/// first lets the run's conntrack entries expire (up to the TIME_WAIT
/// timeout) if lowering `nf_conntrack_max` now would leave the table
/// over full, which would drop the host's new connections until they did.
pub fn restore(wait_conntrack: bool) {
    let changed = std::mem::take(&mut *CHANGED.lock().unwrap_or_else(|e| e.into_inner()));
    for (name, old) in changed.into_iter().rev() {
        if wait_conntrack && name == "net.netfilter.nf_conntrack_max" {
            wait_for_conntrack_below(&old);
        }
        match write(name, &old) {
            Ok(()) => eprintln!("herald-bench: restored {name} = {old}"),
            Err(error) => {
                eprintln!(
                    "herald-bench: cannot restore {name} to {old} ({error}): run sysctl -w {name}=\"{old}\""
                )
            }
        }
    }
}

fn wait_for_conntrack_below(max: &str) {
    let Ok(max) = max.parse::<u64>() else { return };
    let count = || read("net.netfilter.nf_conntrack_count").and_then(|c| c.parse::<u64>().ok());
    let timeout = read("net.netfilter.nf_conntrack_tcp_timeout_time_wait")
        .and_then(|t| t.parse::<u64>().ok())
        .unwrap_or(120);
    let deadline = Instant::now() + Duration::from_secs(timeout + 10);
    let mut said = false;
    while let Some(entries) = count().filter(|&c| c > max) {
        if Instant::now() > deadline {
            break;
        }
        if !said {
            eprintln!(
                "herald-bench: waiting for the run's {entries} conntrack entries to expire \
                 (below {max}) before lowering nf_conntrack_max (at most {timeout} s)"
            );
            said = true;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Restores the settings when dropped (the end of the run, or an error
/// or panic unwinding through it).
pub struct Guard(());

impl Drop for Guard {
    fn drop(&mut self) {
        restore(true);
    }
}

/// Whether this process runs as root (and may change sysctls).
fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The host's state now.
pub fn host() -> anyhow::Result<Host> {
    let files_open = read("fs.file-nr")
        .and_then(|text| text.split(' ').next()?.parse().ok())
        .unwrap_or(0);
    let conntrack_count =
        read("net.netfilter.nf_conntrack_count").and_then(|c| c.parse::<u64>().ok());
    Ok(Host {
        files_open,
        conntrack_count,
        memory_available: crate::procfs::memory_available_bytes()?,
        page_size: crate::procfs::page_size(),
    })
}

/// Checks the host against `needs`; as root, raises what is too low and
/// returns the guard that puts it back. Fails before anything starts when
/// a setting is too low and this is not root, or when the run would not
/// fit in memory.
pub fn prepare(needs: &Needs) -> anyhow::Result<Guard> {
    let host = host()?;
    let estimate = memory_estimate(needs, &host);
    let gib = |bytes: u64| bytes as f64 / (1u64 << 30) as f64;
    if needs.connections >= 100_000 {
        eprintln!(
            "herald-bench: {} connections: {} server processes, {} load-generator workers; \
             about {:.1} GiB of memory at the peak ({:.1} GiB available)",
            needs.connections,
            needs.servers,
            needs.workers,
            gib(estimate),
            gib(host.memory_available)
        );
    }
    if estimate > host.memory_available {
        bail!(
            "{} connections need about {:.1} GiB (kernel ~{} B per socket, both ends here), \
             {:.1} GiB is available: fewer connections, or more memory",
            needs.connections,
            gib(estimate),
            KERNEL_BYTES_PER_SOCKET,
            gib(host.memory_available)
        );
    }
    let changes = plan(needs, &host, read)?;
    if changes.is_empty() {
        return Ok(Guard(()));
    }
    if !is_root() {
        let list: Vec<String> = changes
            .iter()
            .map(|c| {
                format!(
                    "  {} is {}, needs {}: {}\n    sysctl -w {}=\"{}\"",
                    c.name, c.current, c.wanted, c.why, c.name, c.wanted
                )
            })
            .collect();
        bail!(
            "kernel settings too low for {} connections (run as root and the benchmark raises \
             them for the run and restores them after, or raise them yourself):\n{}",
            needs.connections,
            list.join("\n")
        );
    }
    let guard = Guard(());
    for change in &changes {
        // Recorded first: a write that fails halfway is restored too.
        CHANGED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((change.name, change.current.clone()));
        if let Err(error) = write(change.name, &change.wanted) {
            bail!(
                "cannot set {} to {} ({error}); it needs at least that for {} connections ({})",
                change.name,
                change.wanted,
                needs.connections,
                change.why
            );
        }
        eprintln!(
            "herald-bench: raised {} from {} to {} for this run: {}\n  \
             (restored at the end; should the run be killed with SIGKILL: \
             sysctl -w {}=\"{}\")",
            change.name, change.current, change.wanted, change.why, change.name, change.current
        );
    }
    Ok(guard)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn needs(connections: u64) -> Needs {
        Needs {
            connections,
            servers: connections.div_ceil(15_000),
            workers: connections.div_ceil(15_000),
            clients_per_worker: 15_000,
            sources_per_worker: 16,
        }
    }

    /// This machine's defaults (24 GiB, Linux 6.18), conntrack loaded.
    fn defaults(name: &str) -> Option<String> {
        Some(
            match name {
                "fs.file-max" => "2466170",
                "net.netfilter.nf_conntrack_max" => "262144",
                "net.netfilter.nf_conntrack_buckets" => "262144",
                "net.core.somaxconn" => "4096",
                "net.ipv4.tcp_mem" => "287898 383867 575796",
                "net.ipv4.ip_local_port_range" => "32768 60999",
                _ => return None,
            }
            .to_owned(),
        )
    }

    fn host() -> Host {
        Host {
            files_open: 1_000,
            conntrack_count: Some(0),
            memory_available: 22 << 30,
            page_size: 4096,
        }
    }

    #[test]
    fn a_small_run_changes_nothing() {
        assert_eq!(plan(&needs(20_000), &host(), defaults).unwrap(), vec![]);
    }

    #[test]
    fn a_million_raises_conntrack_and_tcp_memory_but_not_what_is_high_enough() {
        let changes = plan(&needs(1_000_000), &host(), defaults).unwrap();
        let names: Vec<&str> = changes.iter().map(|c| c.name).collect();
        assert_eq!(
            names,
            [
                "net.netfilter.nf_conntrack_max",
                "net.netfilter.nf_conntrack_buckets",
                "net.ipv4.tcp_mem"
            ]
        );
        assert_eq!(changes[0].wanted, "2100000");
        assert_eq!(changes[1].wanted, "525000");
        // min kept; pressure and max raised to what a fan-out to all takes.
        assert_eq!(changes[2].wanted, "287898 1500000 2000000");
    }

    #[test]
    fn file_max_counts_both_ends_and_what_is_open() {
        let low = |name: &str| match name {
            "fs.file-max" => Some("500000".to_owned()),
            _ => None,
        };
        let changes = plan(&needs(300_000), &host(), low).unwrap();
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].name, "fs.file-max");
        assert_eq!(
            changes[0].wanted,
            (1_000 + 600_000 + 30_000 + 10_000).to_string()
        );
    }

    #[test]
    fn without_conntrack_nothing_is_asked_of_it() {
        let no_conntrack = |name: &str| {
            if name.starts_with("net.netfilter") {
                None
            } else {
                defaults(name)
            }
        };
        let changes = plan(&needs(300_000), &host(), no_conntrack).unwrap();
        assert!(changes.iter().all(|c| !c.name.starts_with("net.netfilter")));
    }

    #[test]
    fn a_narrow_port_range_is_widened() {
        let narrow = |name: &str| match name {
            "net.ipv4.ip_local_port_range" => Some("60000 60999".to_owned()),
            _ => None,
        };
        let changes = plan(&needs(300_000), &host(), narrow).unwrap();
        assert_eq!(changes[0].wanted, "60000 65535");
    }

    #[test]
    fn a_million_fits_in_24_gib() {
        let bytes = memory_estimate(&needs(1_000_000), &host());
        assert!(bytes < 20 << 30, "{bytes}");
        assert!(bytes > 16 << 30, "{bytes}");
    }
}
