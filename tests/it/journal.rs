//! What an operator reads: journald's native protocol under systemd, readable lines elsewhere, the
//! progress line on a terminal, and -v/-q.
//!
//! The journald test needs no journald: the binary runs in a private mount namespace where
//! /run/systemd/journal/socket is a datagram socket this test listens on, and JOURNAL_STREAM names
//! its stderr — exactly the two things systemd provides. It needs root (to unshare the mount
//! namespace), which CI has.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::Duration;

use crate::common::run::{unprivileged, Case};
use crate::common::wait::require_root;

/// Parses one datagram of journald's native protocol: `KEY=value\n`, or for values with
/// newlines `KEY\n` + 64-bit little-endian length + value + `\n`.
fn parse_native(mut d: &[u8]) -> HashMap<String, String> {
    let mut fields = HashMap::new();
    while !d.is_empty() {
        let nl = d.iter().position(|&b| b == b'\n').unwrap_or(d.len());
        let line = &d[..nl];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            fields.insert(
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            );
            d = &d[(nl + 1).min(d.len())..];
        } else {
            let key = String::from_utf8_lossy(line).into_owned();
            let rest = &d[nl + 1..];
            let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
            fields.insert(key, String::from_utf8_lossy(&rest[8..8 + len]).into_owned());
            d = &rest[(8 + len + 1).min(rest.len())..];
        }
    }
    fields
}

#[test]
fn under_systemd_the_journal_gets_structured_fields() {
    if !require_root(
        "journal::under_systemd_the_journal_gets_structured_fields",
        "it gives the binary a private /run/systemd/journal",
    ) {
        return;
    }
    let c = Case::new("journald");
    c.write("ok.txt", b"fine");
    let locked = c.write("locked.txt", b"no");
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o000)).unwrap();

    let jdir = c.root.join("journal");
    fs::create_dir(&jdir).unwrap();
    let sock = UnixDatagram::bind(jdir.join("socket")).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let stderr_path = c.root.join("stderr");
    let stderr = fs::File::create(&stderr_path).unwrap();
    let meta = stderr.metadata().unwrap();

    // -v: the per-upload lines (PATH=, KEY=, BYTES=) are at debug level.
    let mut cmd = c.command(&["-v", "run"], unprivileged());
    cmd.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
    cmd.stderr(stderr);
    let jdir_c = std::ffi::CString::new(jdir.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: only system calls run between fork and exec, no allocation or locking.
    unsafe {
        cmd.pre_exec(move || {
            use nix::mount::{mount, MsFlags};
            crate::common::run::private_mount_namespace()?;
            crate::common::run::mount_tmpfs(c"/run")?;
            nix::unistd::mkdir(
                "/run/systemd",
                nix::sys::stat::Mode::from_bits_truncate(0o755),
            )?;
            nix::unistd::mkdir(
                "/run/systemd/journal",
                nix::sys::stat::Mode::from_bits_truncate(0o755),
            )?;
            mount(
                Some(jdir_c.as_c_str()),
                "/run/systemd/journal",
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )?;
            Ok(())
        });
    }
    let status = cmd.status().unwrap();
    let mut entries = Vec::new();
    let mut buf = vec![0u8; 65536];
    while let Ok(n) = sock.recv(&mut buf) {
        entries.push(parse_native(&buf[..n]));
    }
    let plain = fs::read_to_string(&stderr_path).unwrap();
    assert_eq!(
        status.code(),
        Some(2),
        "entries: {entries:?}\nstderr: {plain}"
    );
    assert!(
        plain.is_empty(),
        "under journald nothing goes to stderr: {plain}"
    );

    let summary = entries
        .iter()
        .find(|e| {
            e.get("MESSAGE_ID").map(String::as_str) == Some(nightcopy::report::SUMMARY_MESSAGE_ID)
        })
        .unwrap_or_else(|| panic!("no summary entry in {entries:?}"));
    for (field, want) in [
        ("OUTCOME", "file-errors"),
        ("LAST_SUCCESS", "0"),
        ("FILES_TRANSFERRED", "1"),
        ("BYTES_TRANSFERRED", "4"),
        ("CHECKS", "0"),
        ("TRANSFER_ERRORS", "1"),
        ("EXIT_CODE", "2"),
        ("SYSLOG_IDENTIFIER", "nightcopy"),
        ("PRIORITY", "4"),
    ] {
        assert_eq!(
            summary.get(field).map(String::as_str),
            Some(want),
            "{field} in {summary:?}"
        );
    }
    assert!(summary["ELAPSED_SECONDS"].parse::<f64>().unwrap() > 0.0);
    assert!(
        summary["MESSAGE"].contains("backup completed with errors"),
        "{summary:?}"
    );

    let error = entries
        .iter()
        .find(|e| e.get("ERROR_KIND").map(String::as_str) == Some("unreadable"))
        .unwrap_or_else(|| panic!("no per-file error entry in {entries:?}"));
    assert_eq!(Path::new(&error["PATH"]), locked);
    assert_eq!(error["PRIORITY"], "4");

    let upload = entries
        .iter()
        .find(|e| e.contains_key("KEY"))
        .unwrap_or_else(|| panic!("no upload entry in {entries:?}"));
    assert_eq!(upload["KEY"], c.key("ok.txt"));
    assert_eq!(upload["BYTES"], "4");
    assert_eq!(Path::new(&upload["PATH"]), c.src.join("ok.txt"));
}

#[test]
fn on_a_terminal_a_progress_line_is_drawn_and_never_under_a_pipe() {
    let mut c = Case::new("progress");
    c.write("slow.bin", &vec![3u8; 300 * 1024]);
    c.transfer_extra = "  bandwidth-limit: 100KiB\n".into();
    // `script` gives the binary a pseudo-terminal as stderr, as a person's shell would.
    let cmd = c.command(&["run"], None);
    let program = cmd.get_program().to_owned();
    let args: Vec<String> = cmd
        .get_args()
        .map(|a| shell_quote(&a.to_string_lossy()))
        .collect();
    let inner = format!(
        "{} {}",
        shell_quote(&program.to_string_lossy()),
        args.join(" ")
    );
    let mut script = std::process::Command::new("script");
    script.args(["-qec", &inner, "/dev/null"]);
    script.env_clear();
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            script.env(k, v);
        }
    }
    script.env("TERM", "xterm");
    let out = script.output().expect("script(1) from util-linux");
    let tty = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{tty}");
    // The live line ("N scanned, N uploaded (…), N unchanged, N errors, …/s") is not the summary.
    assert!(
        tty.contains(" unchanged, "),
        "no progress line on a terminal:\n{tty}"
    );

    // Through a pipe (as under cron or systemd): no progress line, only log lines.
    let mut c2 = Case::new("progress-pipe");
    c2.write("a.txt", b"a");
    c2.transfer_extra = c.transfer_extra.clone();
    let piped = c2.run(&["run"]);
    assert_eq!(piped.code, 0);
    assert!(!piped.stderr.contains(" unchanged, "), "{}", piped.stderr);
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[test]
fn quiet_and_verbose_change_what_is_said() {
    let c = Case::new("verbosity");
    c.write("a.txt", b"a");
    let verbose = c.run(&["-v", "run"]);
    assert_eq!(verbose.code, 0);
    assert!(
        verbose.stderr.contains("uploaded"),
        "-v lists each upload: {}",
        verbose.stderr
    );
    c.write("b.txt", b"b");
    let quiet = c.run(&["-q", "run"]);
    assert_eq!(quiet.code, 0);
    assert!(
        quiet.stderr.is_empty(),
        "-q keeps a good run silent: {}",
        quiet.stderr
    );
}
