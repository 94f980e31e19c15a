//! Waiting in a test: for a condition, polled until it holds, and failing with what never came
//! when it does not — a wait never ends in carrying on as if it had; and for tests that need
//! root, saying by name that they did not run instead of passing.

use std::io::Write;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Polls `done` every `every` until it holds or `limit` passes (it is asked once more then);
/// whether it held. For a caller that asserts with context of its own (a log, a count).
pub fn until(limit: Duration, every: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(every);
    }
}

/// Polls `done` every 20 ms until it holds; fails the test naming `what` when `limit` passes
/// first.
#[track_caller]
pub fn wait_for(limit: Duration, what: &str, done: impl FnMut() -> bool) {
    assert!(
        until(limit, Duration::from_millis(20), done),
        "waited {limit:?} for {what}: it never came"
    );
}

/// Waits until the clock reads a whole second later than `second` (Unix time) and returns the
/// time then: for a test of something the program records in whole seconds.
#[track_caller]
pub fn clock_past_second(second: u64) -> SystemTime {
    let mut now = SystemTime::now();
    wait_for(
        Duration::from_secs(5),
        &format!("the clock to pass second {second}"),
        || {
            now = SystemTime::now();
            now.duration_since(UNIX_EPOCH).unwrap().as_secs() > second
        },
    );
    now
}

/// Whether the test `name` can run here, where it needs root (`why`: what it does with it). As
/// root, true. Otherwise the test does not pass as if it had run: it fails saying so — unless
/// `NIGHTCOPY_ALLOW_NOT_RUN=1`, when it prints `NOT RUN (needs root): NAME` on the terminal (past
/// the test harness's capture of a passing test's output) and returns false, and the test returns
/// at once. CI runs the tests as root: there every one runs.
#[track_caller]
pub fn require_root(name: &str, why: &str) -> bool {
    nix::unistd::geteuid().is_root() || not_run(name, "needs root", why)
}

/// A test, or part of one, that cannot run here (`reason`, `why`): fails the test, or with
/// `NIGHTCOPY_ALLOW_NOT_RUN=1` says `NOT RUN (REASON): NAME — WHY` on the terminal and returns
/// false.
#[track_caller]
pub fn not_run(name: &str, reason: &str, why: &str) -> bool {
    let line = format!("NOT RUN ({reason}): {name} — {why}");
    if std::env::var_os("NIGHTCOPY_ALLOW_NOT_RUN").is_some_and(|v| v == "1") {
        // Straight to the terminal: `eprintln!` in a test that passes is swallowed.
        let _ = writeln!(std::io::stderr().lock(), "{line}");
        false
    } else {
        panic!("{line}\n(NIGHTCOPY_ALLOW_NOT_RUN=1 lets the rest of the suite pass without it)")
    }
}
