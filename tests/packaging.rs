//! The packaging files that CI cannot exercise here (no base image can be
//! fetched, so the container is not built): the seccomp profile is
//! Docker's default plus io_uring and nothing else, and the Dockerfile
//! builds with the pinned toolchain.

use serde_json::Value;

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR")))
        .unwrap_or_else(|error| panic!("cannot read {path}: {error}"))
}

fn json(path: &str) -> Value {
    serde_json::from_str(&read(path)).unwrap_or_else(|error| panic!("{path}: {error}"))
}

const IO_URING: [&str; 3] = ["io_uring_setup", "io_uring_enter", "io_uring_register"];

#[test]
fn the_seccomp_profile_is_dockers_default_plus_io_uring() {
    let default = json("packaging/docker/docker-default-seccomp.json");
    let profile = json("packaging/docker/seccomp-io-uring.json");
    assert_eq!(profile["defaultAction"], "SCMP_ACT_ERRNO");
    // Everything but the syscall rules is Docker's.
    for key in ["defaultAction", "defaultErrnoRet", "archMap"] {
        assert_eq!(profile[key], default[key], "{key}");
    }
    let default_rules = default["syscalls"].as_array().unwrap();
    let rules = profile["syscalls"].as_array().unwrap();
    assert_eq!(
        &rules[..default_rules.len()],
        &default_rules[..],
        "Docker's rules, unchanged"
    );
    let [added] = &rules[default_rules.len()..] else {
        panic!(
            "one rule more than Docker's, not {}",
            rules.len() - default_rules.len()
        );
    };
    assert_eq!(added["action"], "SCMP_ACT_ALLOW");
    let names: Vec<&str> = added["names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|name| name.as_str().unwrap())
        .collect();
    assert_eq!(names, IO_URING);
    // Docker's default itself does not allow them: the rule is needed.
    let allowed_by_default = default_rules
        .iter()
        .filter(|rule| rule["action"] == "SCMP_ACT_ALLOW")
        .flat_map(|rule| rule["names"].as_array().unwrap())
        .any(|name| IO_URING.contains(&name.as_str().unwrap()));
    assert!(!allowed_by_default);
}

#[test]
fn the_dockerfile_builds_with_the_pinned_toolchain() {
    let toolchain = read("rust-toolchain.toml");
    let channel = toolchain
        .lines()
        .find_map(|line| line.strip_prefix("channel = "))
        .expect("rust-toolchain.toml names a channel")
        .trim_matches('"');
    let dockerfile = read("packaging/docker/Dockerfile");
    assert!(
        dockerfile.contains(&format!("FROM rust:{channel}-")),
        "the Dockerfile's build stage should use rust {channel}"
    );
    assert!(dockerfile.contains("seccomp-io-uring.json"));
}
