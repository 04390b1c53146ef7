//! Ctrl-C, SIGTERM and SIGHUP during a run: the processes the benchmark
//! started are killed and the kernel settings it raised are put back
//! before it exits, as at the end of a run. Without this, the default
//! action of those signals would end the process without running any
//! destructor, leaving gateways and workers running and the settings
//! raised.
//!
//! The signals are blocked in every thread (set before any thread starts,
//! and inherited) and taken by one thread with sigwait(2), so the cleanup
//! runs as ordinary code rather than in a signal handler. Children inherit
//! the blocked signals: one that is to take a signal (a gateway drained by
//! SIGTERM) is started with `unblock_signals_in`.

use std::sync::Mutex;

/// The processes started by this run, killed on a signal.
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());

const SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// Blocks the signals in this thread (and the threads it starts) and
/// starts the thread that takes them. Call before any other thread starts.
pub fn install() {
    // SAFETY: sigset_t and sigaction are plain data, initialised before
    // use; sigaction with a null new action only reads the current one, and
    // pthread_sigmask only reads the set.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in SIGNALS {
            // A signal ignored from the start stays ignored (nohup, or
            // SIGINT for a shell's background job); the rest are taken.
            let mut action: libc::sigaction = std::mem::zeroed();
            libc::sigaction(signal, std::ptr::null(), &mut action);
            if action.sa_sigaction != libc::SIG_IGN {
                libc::sigaddset(&mut set, signal);
            }
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    std::thread::spawn(move || {
        let mut signal: libc::c_int = 0;
        // SAFETY: `set` and `signal` are valid for the call.
        while unsafe { libc::sigwait(&set, &mut signal) } != 0 {}
        let name = match signal {
            libc::SIGINT => "SIGINT",
            libc::SIGTERM => "SIGTERM",
            _ => "SIGHUP",
        };
        eprintln!(
            "\nherald-bench: {name}: stopping the servers and workers and restoring the kernel \
             settings"
        );
        kill_children();
        // No waiting for the run's conntrack entries: whoever interrupts
        // wants the prompt back (lowering the limit under the count only
        // delays new connections until the entries expire, 120 s at most).
        crate::tuning::restore(false);
        std::process::exit(128 + signal);
    });
}

/// Has `command`'s process start with no signal blocked, as a process
/// started from a shell does.
pub fn unblock_signals_in(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: between fork and exec the closure only calls sigemptyset(3)
    // and pthread_sigmask(3), which are async-signal-safe, on its own set.
    unsafe {
        command.pre_exec(|| {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            Ok(())
        });
    }
}

/// Records a process this run started.
pub fn register(pid: u32) {
    lock().push(pid);
}

/// Kills and reaps `child`, and forgets it: under the registry's lock, so
/// the signal thread never kills a pid that was reaped (and maybe reused).
pub fn kill_and_forget(child: &mut std::process::Child) {
    let mut children = lock();
    let pid = child.id();
    children.retain(|&p| p != pid);
    let _ = child.kill();
    let _ = child.wait();
}

/// Forgets a child that was reaped elsewhere.
pub fn forget(pid: u32) {
    lock().retain(|&p| p != pid);
}

fn kill_children() {
    let mut children = lock();
    for &pid in children.iter() {
        // SAFETY: kill(2) and waitpid(2) on our own unreaped children.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
        }
    }
    for &pid in children.iter() {
        // SAFETY: as above; a null status pointer is allowed.
        unsafe {
            libc::waitpid(pid as libc::pid_t, std::ptr::null_mut(), 0);
        }
    }
    children.clear();
}

fn lock() -> std::sync::MutexGuard<'static, Vec<u32>> {
    CHILDREN.lock().unwrap_or_else(|e| e.into_inner())
}
