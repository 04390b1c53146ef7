//! The open-file limit (RLIMIT_NOFILE) and how many connections the
//! gateway may hold under it: every connection is one open file.

use anyhow::Context;

/// Files kept for everything but client connections: the API's listener
/// and its callers' connections, storage, Redis, the shards' rings and the
/// process's own files (a running node has a few dozen open). A small limit
/// keeps a quarter instead.
pub const OTHER_FILES_MAX: u64 = 1024;

/// The limit in force, after raising it as far as allowed.
struct OpenFileLimit {
    limit: u64,
    /// The soft limit the process started with, when it was lower.
    raised_from: Option<u64>,
}

impl OpenFileLimit {
    /// Raises the soft limit to the hard one, as servers that hold many
    /// sockets do: the soft limit is often a default of 1024 that only
    /// guards programs that leak files.
    fn raise() -> anyhow::Result<OpenFileLimit> {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes only the struct we pass.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
            return Err(std::io::Error::last_os_error()).context("cannot read the open-file limit");
        }
        let started_at = limit.rlim_cur;
        if started_at >= limit.rlim_max {
            return Ok(OpenFileLimit {
                limit: started_at,
                raised_from: None,
            });
        }
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit only reads the struct we pass. A refusal (a hard
        // limit above fs.nr_open) leaves the limit as it was.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Ok(OpenFileLimit {
                limit: started_at,
                raised_from: None,
            });
        }
        Ok(OpenFileLimit {
            limit: limit.rlim_max,
            raised_from: Some(started_at),
        })
    }

    fn other_files(&self) -> u64 {
        (self.limit / 4).min(OTHER_FILES_MAX)
    }

    /// The files left for client connections.
    fn for_connections(&self) -> u64 {
        self.limit - self.other_files()
    }

    /// "open-file limit L[, raised from S]".
    fn describe(&self) -> String {
        match self.raised_from {
            Some(from) => format!("open-file limit {}, raised from {from}", self.limit),
            None => format!("open-file limit {}", self.limit),
        }
    }
}

/// `gateway.connections_per_shard_max` with the limit raised first: the
/// configured value, or, when the file does not set it, the connections
/// the open-file limit leaves room for, split over the shards (at least
/// one each), said in one line. A configured value the limit cannot serve
/// gets one warning: the connections past the limit would fail at accept.
pub fn connections_per_shard(configured: Option<usize>, shards: usize) -> anyhow::Result<usize> {
    let limit = OpenFileLimit::raise()?;
    let for_connections = limit.for_connections();
    let Some(per_shard) = configured else {
        let per_shard = per_shard_within(for_connections, shards);
        println!(
            "herald: the gateway holds up to {} connections ({shards} shards x {per_shard}; \
             {}, less {} kept for other files); set gateway.connections_per_shard_max to choose",
            per_shard * shards,
            limit.describe(),
            limit.other_files(),
        );
        return Ok(per_shard);
    };
    let connections = (per_shard as u64).saturating_mul(shards as u64);
    if connections > for_connections {
        eprintln!(
            "herald: warning: gateway.connections_per_shard_max = {per_shard} lets {shards} shards \
             hold {connections} connections, but the {} leaves room for {for_connections} ({} kept \
             for other files); raise `ulimit -n` (see kernel-tuning/) or lower the setting",
            limit.describe(),
            limit.other_files(),
        );
    }
    Ok(per_shard)
}

/// `files` connections split over `shards`, at least one each.
fn per_shard_within(files: u64, shards: usize) -> usize {
    usize::try_from(files / shards as u64)
        .unwrap_or(usize::MAX)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn for_connections(limit: u64) -> u64 {
        OpenFileLimit {
            limit,
            raised_from: None,
        }
        .for_connections()
    }

    #[test]
    fn a_large_limit_keeps_1024_files_and_a_small_one_a_quarter() {
        assert_eq!(for_connections(1_048_576), 1_047_552);
        assert_eq!(for_connections(20_000), 18_976);
        assert_eq!(for_connections(1024), 768);
        assert_eq!(for_connections(0), 0);
    }

    #[test]
    fn the_connections_are_split_over_the_shards_at_least_one_each() {
        assert_eq!(per_shard_within(18_976, 2), 9_488);
        assert_eq!(per_shard_within(768, 3), 256);
        assert_eq!(per_shard_within(3, 8), 1);
    }
}
