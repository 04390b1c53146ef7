//! Runs `conn_memory`'s churn test (thousands of connections killed by a
//! reset mid-send and mid-receive, on both drivers) a second time, built
//! with AddressSanitizer, so that `cargo test --workspace` (and so CI)
//! shows no buffer of the gateway's is used after it is freed, overrun, or
//! leaked. The io_uring driver is what this is for: the kernel owns receive
//! buffers and reads send buffers until a completion says otherwise, and a
//! lifetime mistake there is silent in a normal build.
//!
//! How, on the pinned stable toolchain: `-Zsanitizer=address` is unstable,
//! so the inner build sets `RUSTC_BOOTSTRAP=1`; the ASan runtime ships in
//! rust-std for x86_64-unknown-linux-gnu, so nothing is downloaded and no
//! `-Zbuild-std` (which would need rust-src) is used. The standard library
//! is therefore not instrumented, but the allocator is (ASan replaces
//! malloc and free), so every access from Herald's and its dependencies'
//! code to freed or out-of-bounds heap memory is caught. The receive
//! buffer ring is a mapping, not heap, so the driver poisons its buffers
//! itself while the kernel owns them (`--cfg herald_asan`, see
//! `driver/uring.rs`). What ASan cannot see is the kernel's own access
//! through io_uring (a send buffer freed before its completion would go
//! unreported); it sees the shard's reads and writes around it.
//!
//! A toolchain that cannot do this is a skip outside CI and a failure
//! under CI=true, so CI never passes without having run it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The host target here, whose rust-std ships the ASan runtime. Named
/// explicitly so that RUSTFLAGS reach only the target's crates: without
/// `--target`, build scripts and proc macros would be instrumented too, and
/// rustc cannot load an instrumented proc macro.
const TARGET: &str = "x86_64-unknown-linux-gnu";
const CHURN_TEST: &str = "connections_killed_mid_send_and_mid_receive_leave_nothing_behind";
/// Frame pointers: ASan records where each block was allocated and freed
/// with a frame-pointer unwinder, so without them those stacks stop short.
/// `herald_asan` turns on the io_uring driver's poisoning of its receive
/// buffers while the kernel owns them (see `driver/uring.rs`).
const RUSTFLAGS: &str = "-Zsanitizer=address -Cforce-frame-pointers=yes --cfg herald_asan";
/// `detect_leaks=1`: LeakSanitizer reports heap blocks nothing points to at
/// exit. The churn test joins its gateway before it returns, and statics
/// and thread-locals still point to what they hold, so a report here is a
/// real leak. The test's own heap count compares later rounds with the
/// first, so a block lost once (in the first round, or at shutdown) slips
/// by it, and LeakSanitizer does not.
/// `halt_on_error=1`: the first error ends the run with a non-zero exit.
const ASAN_OPTIONS: &str = "detect_leaks=1:halt_on_error=1";

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|ci| !ci.is_empty() && ci != "false" && ci != "0")
}

/// Where the instrumented build goes: its own target directory, beside the
/// workspace's (`CARGO_TARGET_TMPDIR` is `<target>/tmp`), so the inner
/// cargo neither waits on the outer build's lock nor evicts its artifacts,
/// and a second run reuses the first's.
fn asan_target_dir() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().unwrap_or(tmp).join("asan")
}

/// Whether this toolchain can build and run an ASan program, checked on a
/// tiny one that reads freed memory: it must be built, run, and stopped by
/// an ASan report. `Err` says why not.
fn toolchain_can_sanitize(dir: &Path) -> Result<(), String> {
    if !cfg!(all(target_os = "linux", target_arch = "x86_64")) {
        return Err(format!("the ASan runtime used here is {TARGET}'s"));
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let source = dir.join("probe.rs");
    std::fs::write(
        &source,
        "fn main() {\n\
         \x20   let v = std::hint::black_box(vec![1u8; 16]);\n\
         \x20   let p = v.as_ptr();\n\
         \x20   drop(v);\n\
         \x20   std::process::exit(i32::from(unsafe { p.add(1).read() }));\n\
         }\n",
    )
    .map_err(|e| format!("{}: {e}", source.display()))?;
    let binary = dir.join("probe");
    // The rustc cargo would use: RUSTC if set, else the one on PATH, run
    // from the workspace so rustup picks the pinned toolchain.
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let built = Command::new(&rustc)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("RUSTC_BOOTSTRAP", "1")
        .args([
            "--edition",
            "2024",
            "-Zsanitizer=address",
            "--target",
            TARGET,
        ])
        .arg("-o")
        .arg(&binary)
        .arg(&source)
        .output()
        .map_err(|e| format!("running {}: {e}", Path::new(&rustc).display()))?;
    if !built.status.success() {
        return Err(format!(
            "rustc -Zsanitizer=address --target {TARGET} failed ({}): {}",
            built.status,
            String::from_utf8_lossy(&built.stderr).trim()
        ));
    }
    let ran = Command::new(&binary)
        .env("ASAN_OPTIONS", ASAN_OPTIONS)
        .output()
        .map_err(|e| format!("running the ASan probe: {e}"))?;
    let stderr = String::from_utf8_lossy(&ran.stderr);
    if ran.status.success() || !stderr.contains("heap-use-after-free") {
        return Err(format!(
            "the ASan probe's use after free went unreported ({}): {}",
            ran.status,
            stderr.trim()
        ));
    }
    Ok(())
}

#[test]
fn the_churn_test_finds_nothing_under_address_sanitizer() {
    let target_dir = asan_target_dir();
    if let Err(why) = toolchain_can_sanitize(&target_dir.join("probe")) {
        assert!(
            !in_ci(),
            "CI=true and the churn test cannot run under AddressSanitizer: {why}"
        );
        // Straight to stderr, past the test harness's capture, so that the
        // skip is seen.
        let _ = writeln!(
            std::io::stderr(),
            "asan: skipped (not under CI): the churn test cannot run under AddressSanitizer: {why}"
        );
        return;
    }

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let run = Command::new(cargo)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("RUSTC_BOOTSTRAP", "1")
        .env("RUSTFLAGS", RUSTFLAGS)
        // Would take precedence over RUSTFLAGS.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env("ASAN_OPTIONS", ASAN_OPTIONS)
        .args([
            "test",
            "--locked",
            "-p",
            "herald-room",
            "--test",
            "conn_memory",
        ])
        .args(["--target", TARGET])
        .arg("--target-dir")
        .arg(&target_dir)
        // Only the churn test (the heap budgets are not ASan's business,
        // and its allocator would skew them), with its per-round lines in
        // the output this test shows when it fails.
        .args(["--", CHURN_TEST, "--exact", "--nocapture"])
        .output()
        .expect("running cargo");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    // Captured by the harness: shown when this fails, or with --nocapture.
    println!("{stdout}");
    eprintln!("{stderr}");
    let report = stderr.lines().chain(stdout.lines()).find(|line| {
        line.contains("ERROR: AddressSanitizer") || line.contains("ERROR: LeakSanitizer")
    });
    assert!(
        run.status.success() && report.is_none(),
        "the churn test under AddressSanitizer failed ({}): {}",
        run.status,
        report.unwrap_or("see its output above")
    );
    assert!(
        stdout.contains("1 passed"),
        "the churn test under AddressSanitizer did not run: {stdout}"
    );
}
