//! SQLite's page caches in a region of their own, allocated at startup.
//!
//! Left to `malloc`, the page caches grow into the heap as the inbox grows
//! (the writer's bound is 16 MiB) and churn in it (a reader's cache is
//! emptied whenever the writer commits): a node's resident memory rose
//! through an hour of churn as they filled. SQLite can instead take its
//! pages from one fixed array of page-sized slots
//! (`SQLITE_CONFIG_PAGECACHE`), sized here to the caches' bounds. SQLite
//! writes a free-list link into every slot when it takes the array, so the
//! whole of it is resident from the first open: the caches' memory is
//! taken once, up front, and does not grow afterwards (static allocation,
//! as TIGER_STYLE asks). Pages past the array, which only a process with
//! several databases needs, come from `malloc` as before.

use std::ffi::c_int;
use std::sync::OnceLock;

use libsqlite3_sys as ffi;

/// The database page size: SQLite's default, which Herald does not change.
const PAGE_BYTES: usize = 4_096;

/// The region, once reserved for the process.
static REGION: OnceLock<Option<Region>> = OnceLock::new();

/// SQLite's page slots.
#[derive(Debug)]
struct Region {
    /// Slots times the bytes of one (a page and SQLite's header for it).
    len: usize,
}

/// Gives SQLite a page-cache region of `caches_kib` (the bounds of the
/// caches of one database's connections), once per process, before the
/// first connection opens (SQLite takes it only before it initializes).
/// When SQLite cannot take it, it keeps allocating pages with `malloc`, as
/// it would have.
pub(crate) fn reserve_page_caches(caches_kib: usize) {
    REGION.get_or_init(|| reserve(caches_kib));
}

/// The bytes of the region, all resident once SQLite has it; zero
/// without one.
pub(crate) fn page_cache_region_bytes() -> u64 {
    match REGION.get() {
        Some(Some(region)) => region.len as u64,
        _ => 0,
    }
}

fn reserve(caches_kib: usize) -> Option<Region> {
    let mut header: c_int = 0;
    // SAFETY: SQLITE_CONFIG_PCACHE_HDRSZ writes one int through the pointer.
    let rc =
        unsafe { ffi::sqlite3_config(ffi::SQLITE_CONFIG_PCACHE_HDRSZ, &mut header as *mut c_int) };
    let header = usize::try_from(header)
        .ok()
        .filter(|_| rc == ffi::SQLITE_OK)?;
    let slot_bytes = (PAGE_BYTES + header).next_multiple_of(8);
    let slots = caches_kib * 1_024 / PAGE_BYTES;
    let len = slot_bytes * slots;
    let (slot, count) = (
        c_int::try_from(slot_bytes).ok()?,
        c_int::try_from(slots).ok()?,
    );
    // SQLite keeps the region for the rest of the process: it is leaked,
    // and u64 words keep its slots 8-byte aligned as SQLite asks.
    let region: &'static mut [u64] = vec![0u64; len / 8].leak();
    // SAFETY: the region is `slots` slots of `slot_bytes` (a multiple of
    // 8), 8-byte aligned, used by no one else and never freed.
    let rc = unsafe {
        ffi::sqlite3_config(
            ffi::SQLITE_CONFIG_PAGECACHE,
            region.as_mut_ptr().cast::<std::ffi::c_void>(),
            slot,
            count,
        )
    };
    if rc != ffi::SQLITE_OK {
        // SQLite was initialized already (another library opened a
        // database first): it keeps using malloc; the region is a
        // one-off loss of the process.
        tracing::debug!(rc, "SQLite refused a page-cache region");
        return None;
    }
    Some(Region { len })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_caches_take_their_pages_from_the_region() {
        reserve_page_caches(1_024);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        runtime.block_on(async {
            let saver = crate::Saver::open_sqlite(&dir.path().join("t.db"), Default::default())
                .await
                .unwrap();
            let region = page_cache_region_bytes();
            assert!(region > 0, "SQLite took no region");
            assert!(saver.engine_memory_bytes().unwrap() >= region);
            // The migrations read and wrote pages: they came from the slots.
            let (mut used, mut highwater) = (0i64, 0i64);
            // SAFETY: writes the two counters; reads SQLite's statistics.
            let rc = unsafe {
                ffi::sqlite3_status64(
                    ffi::SQLITE_STATUS_PAGECACHE_USED,
                    &mut used,
                    &mut highwater,
                    0,
                )
            };
            assert_eq!(rc, ffi::SQLITE_OK);
            assert!(highwater > 0, "no page came from the region");
        });
    }
}
