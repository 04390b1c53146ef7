//! The TypeScript SDK (`sdk/js`): its own unit tests (Node's test runner),
//! then the browser end-to-end test, `sdk/js/e2e/browser.mjs`: the example
//! page in headless Chromium connects over wss to the real `herald serve`,
//! receives a push, survives a `kill -9` of the server without getting the
//! acked push again, and saves a screenshot to
//! `target/browser-test/screenshot.png`.
//!
//! Needs Node 20+, Debian's chromium and the SDK's npm packages
//! (`scripts/install-test-tools.sh`, which `scripts/start-services.sh`
//! runs). Without them the test is skipped, except with CI=true.

mod support;

use std::path::Path;
use std::process::Command;

use support::herald_bin;

const TEST: &str = "js_sdk_unit_tests_and_browser_end_to_end";

#[test]
fn js_sdk_unit_tests_and_browser_end_to_end() {
    let Some((sdk, chromium)) = support::browser_tools(TEST) else {
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));

    // The unit tests build the SDK (dist/) that the example page imports.
    let unit = Command::new("npm")
        .arg("test")
        .current_dir(&sdk)
        .output()
        .expect("run npm test");
    assert!(
        unit.status.success(),
        "the JS SDK's unit tests failed:\n{}\n{}",
        String::from_utf8_lossy(&unit.stdout),
        String::from_utf8_lossy(&unit.stderr)
    );
    let summary = String::from_utf8_lossy(&unit.stdout);
    for line in summary
        .lines()
        .filter(|l| l.starts_with("# ") && !l.starts_with("# Subtest"))
    {
        println!("js sdk {line}");
    }

    let screenshot = root.join("target/browser-test/screenshot.png");
    let _ = std::fs::remove_file(&screenshot);
    let browser = Command::new("node")
        .arg("e2e/browser.mjs")
        .arg(&screenshot)
        .env("HERALD_BIN", herald_bin())
        .env("CHROMIUM", &chromium)
        .current_dir(&sdk)
        .output()
        .expect("run the browser test");
    assert!(
        browser.status.success(),
        "the browser test failed:\n{}\n{}",
        String::from_utf8_lossy(&browser.stdout),
        String::from_utf8_lossy(&browser.stderr)
    );
    print!("{}", String::from_utf8_lossy(&browser.stdout));
    assert!(
        screenshot.exists(),
        "no screenshot at {}",
        screenshot.display()
    );
}
