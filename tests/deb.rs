//! The Debian package, built and installed for real: `cargo deb` packages
//! the herald binary this test suite built, `dpkg -i` installs it, the
//! installed unit's `ExecStart` runs as its user under its limits until
//! `/readyz` answers, and `dpkg --purge` leaves the machine as it was.
//!
//! It needs root, dpkg and cargo-deb under the target dir
//! (scripts/install-test-tools.sh); without them it is skipped with a
//! message, except under CI=true, where it fails. It is one test function
//! because every step works on the one `herald` package of the machine.
//! systemd is not started: where it is not PID 1 (containers, CI) there is
//! none to start the unit, so the test runs the unit's command line itself.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const PACKAGE: &str = "herald";
const UNIT: &str = "/usr/lib/systemd/system/herald.service";
const STATE_DIR: &str = "/var/lib/herald";
/// Where files of the package, of its maintainer scripts and of
/// deb-systemd-helper can be: every path under them named `*herald*` is
/// compared before the install and after the purge.
const TRACE_ROOTS: [&str; 5] = [
    "/etc",
    "/var/lib",
    "/usr/bin",
    "/usr/share",
    "/usr/lib/systemd",
];
/// CAP_SYS_RESOURCE's bit in /proc/self/status `CapEff`: raising a hard
/// limit needs it.
const CAP_SYS_RESOURCE: u32 = 24;
/// How long the server may take to drain and exit after SIGTERM: its drain
/// with no clients is immediate.
const EXIT_WAIT: Duration = Duration::from_secs(30);

#[test]
fn the_debian_package_installs_runs_as_its_unit_and_purges_cleanly() {
    let Some(cargo_deb) = prerequisites() else {
        return;
    };
    let before = traces();
    assert!(
        !installed() && user_id(PACKAGE).is_none() && !Path::new(STATE_DIR).exists(),
        "this machine already has a herald package, user or {STATE_DIR}: the test would \
         purge them (traces: {before:?})"
    );

    let out = tempfile::tempdir().unwrap();
    let deb = build_package(&cargo_deb, out.path());
    let package = Installed::install(&deb);

    // The files, the user, the state directory and the configuration.
    let binary = std::fs::metadata("/usr/bin/herald").expect("/usr/bin/herald installed");
    assert_eq!(binary.mode() & 0o777, 0o755);
    let uid = user_id(PACKAGE).expect("postinst creates the herald user");
    let gid = group_id(PACKAGE).expect("postinst creates the herald group");
    let state = std::fs::metadata(STATE_DIR).expect("postinst creates /var/lib/herald");
    assert_eq!((state.uid(), state.gid()), (uid, gid), "{STATE_DIR} owner");
    assert_eq!(state.mode() & 0o777, 0o750);

    let unit = Unit::read(Path::new(UNIT));
    assert_eq!(unit.get("User"), PACKAGE);
    assert_eq!(unit.get("StateDirectory"), PACKAGE);
    assert_eq!(unit.get("NoNewPrivileges"), "yes");
    verify_unit();
    let exec_start: Vec<String> = unit
        .get("ExecStart")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let config = exec_start
        .iter()
        .position(|arg| arg == "--config")
        .and_then(|at| exec_start.get(at + 1))
        .map(PathBuf::from)
        .expect("ExecStart names --config");

    let text = std::fs::read_to_string(&config).expect("postinst writes the configuration");
    let conf = std::fs::metadata(&config).unwrap();
    assert_eq!(
        (conf.uid(), conf.gid()),
        (0, gid),
        "{} owner",
        config.display()
    );
    assert_eq!(
        conf.mode() & 0o777,
        0o640,
        "the admin key is not for everyone"
    );
    let admin_key = admin_key(&text);
    assert!(
        admin_key.len() == 64 && admin_key.bytes().all(|byte| byte.is_ascii_hexdigit()),
        "postinst puts 32 random bytes in hex in [admin] api_key, not {admin_key:?}"
    );

    // Installing again (as an upgrade does) keeps the configuration as the
    // operator left it.
    let edited = format!("{text}# edited by the operator\n");
    std::fs::write(&config, &edited).unwrap();
    package.reinstall(&deb);
    assert_eq!(std::fs::read_to_string(&config).unwrap(), edited);

    let limits = Limits::of(&unit);
    // `herald config check` on the installed configuration, as the unit
    // runs the server: its user, its limits.
    let check = limits
        .as_user(PACKAGE, &exec_start[0])
        .args(["config", "check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success(),
        "herald config check failed:\n{report}{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(
        report.contains(&format!(
            "open files (hard limit, ulimit -Hn): {}, ",
            limits.nofile
        )),
        "config check ran under the limit it was given:\n{report}"
    );

    // systemd kills what is still running TimeoutStopSec after SIGTERM:
    // the longest drain the installed configuration allows must fit. The
    // effective configuration is the TOML after its heading, up to the next
    // heading or line of news.
    let effective: String = report
        .split_once("# the effective configuration, secrets masked\n")
        .expect("config check prints the effective configuration")
        .1
        .lines()
        .take_while(|line| !line.starts_with("# ") && !line.starts_with("herald: "))
        .map(|line| format!("{line}\n"))
        .collect();
    let effective: toml::Value = toml::from_str(&effective).unwrap();
    let gateway = &effective["gateway"];
    // drain_spread_secs is newer than drain_timeout_secs: counted where
    // this binary has it.
    let drain_secs = gateway["drain_timeout_secs"].as_integer().unwrap()
        + gateway
            .get("drain_spread_secs")
            .map_or(0, |secs| secs.as_integer().unwrap());
    let stop_secs: i64 = unit
        .get("TimeoutStopSec")
        .parse()
        .expect("TimeoutStopSec in plain seconds");
    assert!(
        stop_secs > drain_secs,
        "TimeoutStopSec={stop_secs} must outlast the drain ({drain_secs} s)"
    );

    // The unit's command line, as the herald user under the unit's limits,
    // on ephemeral loopback ports (whatever else the machine runs on 7070
    // and 8080 stays undisturbed).
    let mut server = Server::start(
        limits
            .as_user(PACKAGE, &exec_start[0])
            .args(&exec_start[1..])
            .args([
                "--gateway-listen",
                "127.0.0.1:0",
                "--api-listen",
                "127.0.0.1:0",
            ])
            .current_dir(unit.get("WorkingDirectory")),
    );
    assert!(
        server
            .startup
            .contains(&format!("open-file limit {}", limits.nofile)),
        "the server sized its gateway to the limit it was given:\n{}",
        server.startup
    );
    assert!(
        server.startup.contains(", uring)"),
        "the gateway runs on io_uring under the unit's settings:\n{}",
        server.startup
    );
    assert_eq!(http_status(&server.api, "/readyz", None), 200);
    assert_eq!(
        http_status(&server.api, "/v1/admin/apps", Some(&admin_key)),
        200,
        "the generated admin key opens the admin API"
    );
    let status = server.terminate();
    assert!(status.success(), "SIGTERM drains and exits 0, not {status}");
    let database = std::fs::metadata(Path::new(STATE_DIR).join("herald.db"))
        .expect("the server keeps its database in the state directory");
    assert_eq!(database.uid(), uid);

    package.purge();
    assert!(!installed());
    assert_eq!(user_id(PACKAGE), None, "purge removes the herald user");
    assert_eq!(group_id(PACKAGE), None, "purge removes the herald group");
    assert_eq!(traces(), before, "purge leaves no file behind");
}

/// cargo-deb, when the machine can run the test: root, dpkg and cargo-deb.
fn prerequisites() -> Option<PathBuf> {
    let cargo_deb = target_dir().join("tools/cargo-deb/bin/cargo-deb");
    // SAFETY: geteuid has no preconditions.
    let missing = if unsafe { libc::geteuid() } != 0 {
        Some("installing a package needs root".to_owned())
    } else if Command::new("dpkg").arg("--version").output().is_err() {
        Some("no dpkg on this machine".to_owned())
    } else if !cargo_deb.exists() {
        Some(format!(
            "no {}: run scripts/install-test-tools.sh",
            cargo_deb.display()
        ))
    } else {
        None
    };
    match missing {
        None => Some(cargo_deb),
        Some(reason) if std::env::var_os("CI").is_some() => {
            panic!("the Debian package test cannot run: {reason}")
        }
        Some(reason) => {
            eprintln!("skipped: {reason}");
            None
        }
    }
}

/// The target dir the herald binary under test was built in.
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_herald"))
        .ancestors()
        .nth(2)
        .expect("the binary is in <target>/<profile>/")
        .to_owned()
}

/// Packages the binary the test suite built (`--no-build`, profile dev: its
/// `target/debug/herald`) rather than building a release one.
fn build_package(cargo_deb: &Path, out: &Path) -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let output = run(Command::new(cargo_deb)
        .arg("deb")
        .arg("--manifest-path")
        .arg(&manifest)
        .args(["--no-build", "--profile", "dev", "--fast", "--output"])
        .arg(out)
        .env("CARGO_TARGET_DIR", target_dir()));
    let deb = PathBuf::from(String::from_utf8(output.stdout).unwrap().trim());
    assert!(
        deb.starts_with(out) && deb.extension().is_some_and(|ext| ext == "deb"),
        "cargo deb prints the package it made, not {deb:?}"
    );
    deb
}

/// The installed package; purged when dropped, so a failing test does not
/// leave it on the machine.
struct Installed {
    purged: bool,
}

impl Installed {
    fn install(deb: &Path) -> Installed {
        let installed = Installed { purged: false };
        run(Command::new("dpkg").arg("--install").arg(deb));
        installed
    }

    fn reinstall(&self, deb: &Path) {
        run(Command::new("dpkg").arg("--install").arg(deb));
    }

    fn purge(mut self) {
        self.purged = true;
        run(Command::new("dpkg").args(["--purge", PACKAGE]));
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        if !self.purged {
            let _ = Command::new("dpkg").args(["--purge", PACKAGE]).status();
        }
    }
}

fn installed() -> bool {
    Command::new("dpkg-query")
        .args(["--show", "--showformat=${db:Status-Status}", PACKAGE])
        .output()
        .is_ok_and(|output| output.stdout == b"installed")
}

/// `systemd-analyze verify` on the installed unit, where the machine has
/// it: any complaint fails the test.
fn verify_unit() {
    let Ok(output) = Command::new("systemd-analyze")
        .args(["verify", UNIT])
        .output()
    else {
        eprintln!("no systemd-analyze here: the unit is not verified");
        return;
    };
    let complaints = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && complaints.trim().is_empty(),
        "systemd-analyze verify {UNIT}:\n{complaints}"
    );
}

/// The `[Service]` settings of a unit file.
struct Unit {
    settings: Vec<(String, String)>,
}

impl Unit {
    fn read(path: &Path) -> Unit {
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
        let mut section = "";
        let mut settings = Vec::new();
        for line in text.lines().map(str::trim) {
            if line.starts_with('[') {
                section = line;
            } else if section == "[Service]"
                && !line.starts_with('#')
                && let Some((key, value)) = line.split_once('=')
            {
                settings.push((key.to_owned(), value.to_owned()));
            }
        }
        Unit { settings }
    }

    fn get(&self, key: &str) -> &str {
        self.settings
            .iter()
            .find(|(name, _)| name == key)
            .map(|(_, value)| value.as_str())
            .unwrap_or_else(|| panic!("the unit sets no {key}"))
    }
}

/// The open-file and locked-memory limits the test runs the server with:
/// the unit's, or, where this process may not raise its hard limits
/// (no CAP_SYS_RESOURCE, as in a container), the highest it has.
struct Limits {
    nofile: u64,
    memlock: u64,
}

impl Limits {
    fn of(unit: &Unit) -> Limits {
        let nofile = systemd_limit(unit.get("LimitNOFILE"));
        let memlock = systemd_limit(unit.get("LimitMEMLOCK"));
        // systemd cannot give a process more open files than fs.nr_open.
        let nr_open: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(
            nofile <= nr_open,
            "LimitNOFILE={nofile} is above fs.nr_open ({nr_open}): the unit would not start"
        );
        if may_raise_hard_limits() {
            return Limits { nofile, memlock };
        }
        let have = Limits {
            nofile: hard_limit(libc::RLIMIT_NOFILE),
            memlock: hard_limit(libc::RLIMIT_MEMLOCK),
        };
        eprintln!(
            "this process may not raise hard limits (no CAP_SYS_RESOURCE): the unit's \
             LimitNOFILE={nofile} and LimitMEMLOCK={memlock} become {} and {}",
            nofile.min(have.nofile),
            memlock.min(have.memlock)
        );
        Limits {
            nofile: nofile.min(have.nofile),
            memlock: memlock.min(have.memlock),
        }
    }

    /// `program` run as `user` under these limits: prlimit sets them, and
    /// setpriv changes the user without a PAM session that could reset them.
    fn as_user(&self, user: &str, program: &str) -> Command {
        let mut command = Command::new("prlimit");
        command
            .arg(format!("--nofile={0}:{0}", prlimit_value(self.nofile)))
            .arg(format!("--memlock={0}:{0}", prlimit_value(self.memlock)))
            .args(["--", "setpriv"])
            .arg(format!("--reuid={user}"))
            .arg(format!("--regid={user}"))
            .args(["--init-groups", "--", program]);
        command
    }
}

/// A systemd resource limit in its unit (bytes, with a binary K, M, G or T
/// suffix, or `infinity`) as a number of bytes or files.
fn systemd_limit(value: &str) -> u64 {
    if value == "infinity" {
        return libc::RLIM_INFINITY;
    }
    let (digits, shift) = match value.as_bytes().last() {
        Some(b'K') => (&value[..value.len() - 1], 10),
        Some(b'M') => (&value[..value.len() - 1], 20),
        Some(b'G') => (&value[..value.len() - 1], 30),
        Some(b'T') => (&value[..value.len() - 1], 40),
        _ => (value, 0),
    };
    let number: u64 = digits
        .parse()
        .unwrap_or_else(|_| panic!("not a systemd limit: {value:?}"));
    number << shift
}

fn prlimit_value(limit: u64) -> String {
    if limit == libc::RLIM_INFINITY {
        "unlimited".to_owned()
    } else {
        limit.to_string()
    }
}

fn may_raise_hard_limits() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .map(|hex| u64::from_str_radix(hex.trim(), 16).unwrap())
        .expect("CapEff in /proc/self/status");
    effective & (1 << CAP_SYS_RESOURCE) != 0
}

fn hard_limit(resource: libc::__rlimit_resource_t) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only the struct we pass.
    assert_eq!(unsafe { libc::getrlimit(resource, &mut limit) }, 0);
    limit.rlim_max
}

/// The running server and what it printed up to its API's address.
struct Server {
    child: Child,
    api: String,
    startup: String,
}

impl Server {
    fn start(command: &mut Command) -> Server {
        let mut child = command
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the unit's command");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut startup = String::new();
        let api = loop {
            let line = match lines.next() {
                Some(line) => line.unwrap(),
                None => {
                    let status = child.wait().unwrap();
                    panic!("the server exited ({status}) before listening:\n{startup}")
                }
            };
            startup.push_str(&line);
            startup.push('\n');
            if let Some(address) = line.strip_prefix("herald: api listening on ") {
                break address.trim().to_owned();
            }
        };
        // Keep reading so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server {
            child,
            api,
            startup,
        }
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + EXIT_WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the server did not exit within {EXIT_WAIT:?} of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.try_wait().unwrap().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The status code of a GET, with a bearer key if given.
fn http_status(address: &str, path: &str, bearer: Option<&str>) -> u16 {
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let authorization = bearer
        .map(|key| format!("Authorization: Bearer {key}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\n{authorization}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"))
}

/// `[admin] api_key` of a configuration.
fn admin_key(text: &str) -> String {
    let config: toml::Value = toml::from_str(text).expect("the installed config is TOML");
    config["admin"]["api_key"]
        .as_str()
        .expect("[admin] api_key")
        .to_owned()
}

fn user_id(name: &str) -> Option<u32> {
    getent("passwd", name)
}

fn group_id(name: &str) -> Option<u32> {
    getent("group", name)
}

/// The id (third field) of a passwd or group entry.
fn getent(database: &str, name: &str) -> Option<u32> {
    let output = Command::new("getent")
        .args([database, name])
        .output()
        .unwrap();
    let line = String::from_utf8(output.stdout).unwrap();
    line.split(':').nth(2).map(|id| id.parse().unwrap())
}

/// Every path under `TRACE_ROOTS` whose name holds "herald".
fn traces() -> BTreeSet<PathBuf> {
    let mut found = BTreeSet::new();
    let mut pending: Vec<PathBuf> = TRACE_ROOTS.iter().map(PathBuf::from).collect();
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_name().to_string_lossy().contains(PACKAGE) {
                found.insert(path.clone());
            }
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                pending.push(path);
            }
        }
    }
    found
}

/// Runs `command`, which must succeed; its output.
fn run(command: &mut Command) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("{command:?}: {error}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}
