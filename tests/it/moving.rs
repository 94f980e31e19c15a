//! The filesystem moving underneath a run: files rewritten, grown or shrunk while they are read,
//! files and directories that vanish between the scan and the upload. A file is recorded as backed up only when what S3 holds is
//! what was read and the file did not change meanwhile.

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::fcntl::AT_FDCWD;
use nix::sys::fanotify::{
    EventFFlags, Fanotify, FanotifyEvent, FanotifyResponse, InitFlags, MarkFlags, MaskFlags,
    Response,
};

use crate::common::proxy::Op;
use crate::common::run::{pseudo_random, Case, Output};
use crate::common::s3::s3;
use crate::common::wait::require_root;

#[test]
fn a_file_rewritten_while_it_is_read_is_never_recorded_and_is_left_for_the_next_run() {
    let mut c = Case::new("rewritten");
    c.write("calm.txt", b"calm");
    let hot = c.write("hot.bin", &pseudo_random(12 * 1024 * 1024, 4)); // multipart, 3 parts
                                                                       // Slow the read down so the rewrites land inside it.
    c.transfer_extra = "  bandwidth-limit: 4MiB\n".into();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, hot) = (stop.clone(), hot.clone());
        std::thread::spawn(move || {
            let mut f = fs::OpenOptions::new().write(true).open(&hot).unwrap();
            let mut n = 0u8;
            while !stop.load(Ordering::SeqCst) {
                // Same size, new bytes: only the stat (mtime/ctime) can tell.
                f.seek(SeekFrom::Start(u64::from(n) * 4096)).unwrap();
                f.write_all(&[n; 16]).unwrap();
                n = n.wrapping_add(1);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let out = c.run(&["run"]);
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert_eq!(out.figure("transfer errors"), 1);
    assert!(
        out.stderr.contains("hot.bin") && out.stderr.contains("kept changing"),
        "{}",
        out.stderr
    );
    // Tried twice, aborted twice, never completed; the calm file went through.
    assert_eq!(c.count(Op::CompleteMultipartUpload), 0, "{:?}", c.ops());
    assert_eq!(c.count(Op::AbortMultipartUpload), 2, "{:?}", c.ops());
    assert_eq!(s3().list_keys(&c.dest), [c.key("calm.txt")]);
    let manifest = fs::read_to_string(c.state_dir().join("manifest")).unwrap();
    assert!(!manifest.contains("hot.bin"), "{manifest}");
    // Once it is quiet, the next run backs it up with the content it has then.
    c.transfer_extra.clear();
    let again = c.run(&["run"]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert_eq!(again.figure("files transferred"), 1);
    assert_eq!(
        s3().get(&c.dest, &c.key("hot.bin")).body,
        fs::read(&hot).unwrap()
    );
}

#[test]
fn files_that_vanish_after_the_scan_are_counted_not_errors() {
    let mut c = Case::new("vanish");
    for i in 0..20 {
        c.write(&format!("f{i:02}.bin"), &pseudo_random(16 * 1024, i));
    }
    // 64 KiB/s with a one-second burst: four files at once, then four a second.
    c.transfer_extra = "  bandwidth-limit: 64KiB\n  concurrency: 1\n".into();
    let child = c
        .command(&["run"], None)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while c.count(Op::PutObject) == 0 {
        assert!(started.elapsed() < Duration::from_secs(20), "no PUT seen");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The walk is far ahead of the uploads by now: remove the tail of the tree.
    for i in 12..20 {
        fs::remove_file(c.src.join(format!("f{i:02}.bin"))).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let summary = stderr
        .lines()
        .rev()
        .find(|l| l.contains(" vanished"))
        .unwrap();
    assert!(summary.contains("0 transfer errors"), "{summary}");
    // Each deleted file was either uploaded before it went or counted as vanished: how many of
    // each depends on timing, the sum does not.
    let vanished: usize = summary
        .split(", ")
        .find_map(|p| p.strip_suffix(" vanished"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{summary}"));
    assert!(
        vanished >= 1,
        "nothing vanished: the deletes came too late ({summary})"
    );
    assert_eq!(s3().list_keys(&c.dest).len() + vanished, 20, "{summary}");
}

/// The trees a real filesystem holds that a walk trips on: a directory nobody may read, a symlink
/// loop (with `symlinks: follow`), a path deeper than PATH_MAX, a sparse file, an empty file.
/// Each has its outcome (docs/failure-modes.md); the run goes on and copies everything else.
#[test]
fn awkward_trees_never_stop_the_run() {
    use std::os::unix::fs::PermissionsExt;
    let mut c = Case::new("awkward");
    c.source_extra = "  symlinks: follow\n".into();
    c.write("a-first.txt", b"first");
    c.write("empty", b"");
    c.write("locked/inner/secret.txt", b"never seen");
    fs::set_permissions(c.src.join("locked"), fs::Permissions::from_mode(0o000)).unwrap();
    fs::create_dir(c.src.join("loop")).unwrap();
    std::os::unix::fs::symlink("..", c.src.join("loop/up")).unwrap();
    // Sparse: 10 MiB of hole, then a few bytes (multipart at the test's 6 MiB threshold).
    {
        let mut f = fs::File::create(c.src.join("sparse.bin")).unwrap();
        f.seek(SeekFrom::Start(10 * 1024 * 1024)).unwrap();
        f.write_all(b"end").unwrap();
    }
    // Deeper than PATH_MAX (4,096 bytes): built one directory at a time, relative to the last.
    let mut dir = nix::fcntl::open(
        &c.src,
        nix::fcntl::OFlag::O_DIRECTORY,
        nix::sys::stat::Mode::empty(),
    )
    .unwrap();
    let name = "d".repeat(250);
    nix::sys::stat::mkdirat(
        &dir,
        "deep",
        nix::sys::stat::Mode::from_bits_truncate(0o755),
    )
    .unwrap();
    dir = nix::fcntl::openat(
        &dir,
        "deep",
        nix::fcntl::OFlag::O_DIRECTORY,
        nix::sys::stat::Mode::empty(),
    )
    .unwrap();
    for _ in 0..20 {
        nix::sys::stat::mkdirat(
            &dir,
            name.as_str(),
            nix::sys::stat::Mode::from_bits_truncate(0o755),
        )
        .unwrap();
        dir = nix::fcntl::openat(
            &dir,
            name.as_str(),
            nix::fcntl::OFlag::O_DIRECTORY,
            nix::sys::stat::Mode::empty(),
        )
        .unwrap();
    }
    let fd = nix::fcntl::openat(
        &dir,
        "deep.txt",
        nix::fcntl::OFlag::O_CREAT | nix::fcntl::OFlag::O_WRONLY,
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    nix::unistd::write(&fd, b"too deep").unwrap();
    c.write("z-last.txt", b"last");

    let out = c.run_with(&["run"], crate::common::run::unprivileged());
    fs::set_permissions(c.src.join("locked"), fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(out.code, 2, "{}", out.stderr);
    // The unreadable directory, the loop and the deep file: one error each, named. The walk
    // opens each directory relative to its parent, so it gets below PATH_MAX; the file there has
    // a key over S3's limit.
    assert_eq!(out.figure("transfer errors"), 3, "{}", out.stderr);
    for says in [
        "src/locked: Permission denied",
        "loop/up: symlink loop: not followed",
        "deep.txt: its key would be",
        "over S3's limit of 1024",
    ] {
        assert!(out.stderr.contains(says), "{says:?} not in\n{}", out.stderr);
    }
    assert_eq!(
        s3().list_keys(&c.dest),
        [
            c.key("a-first.txt"),
            c.key("empty"),
            c.key("sparse.bin"),
            c.key("z-last.txt")
        ]
    );
    let mut sparse = vec![0u8; 10 * 1024 * 1024];
    sparse.extend_from_slice(b"end");
    assert_eq!(s3().get(&c.dest, &c.key("sparse.bin")).body, sparse);
    assert!(s3().get(&c.dest, &c.key("empty")).body.is_empty());
}

/// Holds each open (and, when asked, each read) of the files and directories it watches until the
/// test answers it — fanotify permission events — so a test changes the tree at an exact point of
/// a run: inside a read that takes microseconds, or after the scan has seen a directory and before
/// its files are opened. A writer racing the read could not promise either. Needs root.
struct Gate(Fanotify);

/// Why a test with a [`Gate`] needs root.
const FANOTIFY: &str = "it holds nightcopy's reads with fanotify permission events";

/// One open or read, held until `Gate::allow`.
struct Access {
    event: FanotifyEvent,
    path: PathBuf,
    read: bool,
}

impl Gate {
    fn new() -> Gate {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test holds nightcopy's reads with fanotify: run as root (CI does)"
        );
        Gate(
            Fanotify::init(
                InitFlags::FAN_CLASS_CONTENT | InitFlags::FAN_CLOEXEC | InitFlags::FAN_NONBLOCK,
                EventFFlags::O_RDONLY | EventFFlags::O_CLOEXEC | EventFFlags::O_LARGEFILE,
            )
            .unwrap(),
        )
    }

    /// Holds every open of `path` (a file or a directory) and, with `reads`, every read of it.
    fn watch(&self, path: &Path, reads: bool) {
        let mut mask = MaskFlags::FAN_OPEN_PERM | MaskFlags::FAN_ONDIR;
        if reads {
            mask |= MaskFlags::FAN_ACCESS_PERM;
        }
        self.0
            .mark(MarkFlags::FAN_MARK_ADD, mask, AT_FDCWD, Some(path))
            .unwrap();
    }

    fn allow(&self, access: Access) {
        let fd = access.event.fd().expect("a permission event has a file");
        self.0
            .write_response(FanotifyResponse::new(fd, Response::FAN_ALLOW))
            .unwrap();
    }

    /// Runs nightcopy, handing each held access to `on_access`, which must allow it sooner or
    /// later. Ends when nightcopy exits (or fails the test after a minute).
    fn run(&self, c: &Case, args: &[&str], mut on_access: impl FnMut(&Gate, Access)) -> Output {
        let stderr_path = c.root.join("stderr");
        let mut child = c
            .command(args, None)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&stderr_path).unwrap())
            .spawn()
            .unwrap();
        let started = Instant::now();
        let status = loop {
            match self.0.read_events() {
                Ok(events) => {
                    for event in events {
                        let Some(fd) = event.fd() else { continue };
                        let path =
                            fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
                        let read = event.mask().contains(MaskFlags::FAN_ACCESS_PERM);
                        on_access(self, Access { event, path, read });
                    }
                }
                Err(nix::errno::Errno::EAGAIN) => {
                    if let Some(status) = child.try_wait().unwrap() {
                        break status;
                    }
                    if started.elapsed() > Duration::from_secs(60) {
                        child.kill().unwrap();
                        child.wait().unwrap();
                        panic!("the run did not end within a minute");
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => panic!("fanotify: {e}"),
            }
        };
        Output {
            code: status.code().unwrap_or(-1),
            stdout: String::new(),
            stderr: fs::read_to_string(&stderr_path).unwrap(),
        }
    }
}

/// A file that nightcopy will see change inside its read: `limit` times, once per open, at the
/// first read after the open.
struct Changing {
    name: &'static str,
    path: PathBuf,
    writer: fs::File,
    limit: usize,
    changes: usize,
    armed: bool,
}

/// Files of each size class (read into memory; hashed, then streamed by the SDK; multipart) that
/// grow or shrink inside every read, and one small file that changes in its first read only.
/// Each changing file must end up a transfer error naming it, with nothing in the bucket and
/// nothing in the manifest for it; the one that changed once is retried and sent as it is after
/// its change; and once the files are quiet, the next run backs them up as they are then.
fn files_changing_while_they_are_read_are_never_recorded(hint: &str, grow: bool) {
    let c = Case::new(hint);
    c.write("calm.txt", b"calm");
    // Read into memory (up to SMALL_BODY); hashed, then streamed (below the test's 6 MiB
    // threshold); multipart (3 parts); and the one that changes once.
    let sizes = [
        ("hot-memory.bin", 64 * 1024),
        ("hot-streamed.bin", 3 * 1024 * 1024),
        ("hot-multipart.bin", 12 * 1024 * 1024),
        ("once.bin", 64 * 1024),
    ];
    let gate = Gate::new();
    let mut files: Vec<Changing> = sizes
        .iter()
        .enumerate()
        .map(|(i, &(name, size))| {
            let path = c.write(name, &pseudo_random(size, i as u8 + 1));
            // Opened before the watch: the gate would hold this open too.
            let writer = fs::OpenOptions::new().write(true).open(&path).unwrap();
            gate.watch(&path, true);
            Changing {
                name,
                writer,
                path,
                limit: if name == "once.bin" { 1 } else { usize::MAX },
                changes: 0,
                armed: false,
            }
        })
        .collect();
    let out = gate.run(&c, &["run"], |gate, access| {
        if let Some(f) = files.iter_mut().find(|f| f.path == access.path) {
            if !access.read {
                f.armed = true;
            } else if f.armed {
                f.armed = false;
                if f.changes < f.limit {
                    let len = f.writer.metadata().unwrap().len();
                    if grow {
                        let more = pseudo_random(4096, f.changes as u8 + 100);
                        f.writer.write_all_at(&more, len).unwrap();
                    } else {
                        f.writer.set_len(len - 4096).unwrap();
                    }
                    f.changes += 1;
                }
            }
        }
        gate.allow(access);
    });
    drop(gate);

    assert_eq!(out.code, 2, "{}", out.stderr);
    assert_eq!(out.figure("transfer errors"), 3, "{}", out.stderr);
    for f in &files {
        let says = format!("{}: kept changing while it was read", f.name);
        if f.name == "once.bin" {
            assert_eq!(f.changes, 1, "{}", f.name);
            assert!(!out.stderr.contains(&says), "{}", out.stderr);
        } else {
            // Changed in the first read and again in the retry's: read twice, never more.
            assert_eq!(f.changes, 2, "{}", f.name);
            assert!(
                out.stderr.contains(&says),
                "{says:?} not in\n{}",
                out.stderr
            );
        }
    }
    assert_eq!(c.count(Op::CompleteMultipartUpload), 0, "{:?}", c.ops());
    assert_eq!(c.count(Op::AbortMultipartUpload), 2, "{:?}", c.ops());
    // Nothing of the changing files reached the bucket; the one that changed once went up as it
    // is after its change, a whole version of it.
    assert_eq!(
        s3().list_keys(&c.dest),
        [c.key("calm.txt"), c.key("once.bin")]
    );
    assert_eq!(
        s3().get(&c.dest, &c.key("once.bin")).body,
        fs::read(c.src.join("once.bin")).unwrap()
    );
    let manifest = fs::read_to_string(c.state_dir().join("manifest")).unwrap();
    assert!(
        !manifest.contains("hot-") && manifest.contains("once.bin"),
        "{manifest}"
    );

    // Quiet now: the next run backs them up with the content they have then.
    let again = c.run(&["run"]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert_eq!(again.figure("files transferred"), 3, "{}", again.stderr);
    for f in files.iter().filter(|f| f.name != "once.bin") {
        let body = s3().get(&c.dest, &c.key(f.name)).body;
        assert!(body == fs::read(&f.path).unwrap(), "{}", f.name);
    }
}

#[test]
fn a_file_that_grows_while_it_is_read_is_never_recorded_and_is_left_for_the_next_run() {
    if !require_root(
        "moving::a_file_that_grows_while_it_is_read_is_never_recorded_and_is_left_for_the_next_run",
        FANOTIFY,
    ) {
        return;
    }
    files_changing_while_they_are_read_are_never_recorded("grows", true);
}

#[test]
fn a_file_that_shrinks_while_it_is_read_is_never_recorded_and_is_left_for_the_next_run() {
    if !require_root(
        "moving::a_file_that_shrinks_while_it_is_read_is_never_recorded_and_is_left_for_the_next_run",
        FANOTIFY,
    ) {
        return;
    }
    files_changing_while_they_are_read_are_never_recorded("shrinks", false);
}

/// The walk has listed `gone/` and stat'ed its files, the uploads have not reached them: the
/// directory is removed then. Each of its files is counted as vanished — no error, exit 0 — and
/// the rest of the tree is copied.
#[test]
fn a_directory_that_vanishes_between_the_scan_and_the_upload_is_counted_not_an_error() {
    if !require_root(
        "moving::a_directory_that_vanishes_between_the_scan_and_the_upload_is_counted_not_an_error",
        FANOTIFY,
    ) {
        return;
    }
    let mut c = Case::new("vanish-dir");
    // One file at a time, so the first upload, held below, keeps every other file waiting; and a
    // walk on one thread, which does its work in key order (the directory `a/`, its stats,
    // `gone/`, its stats, then `later/`), so the order the gate relies on holds.
    c.transfer_extra = "  concurrency: 1\n".into();
    c.source_extra = "  walk-concurrency: 1\n".into();
    let before: Vec<PathBuf> = (0..4)
        .map(|i| c.write(&format!("a/f{i}.txt"), format!("a{i}").as_bytes()))
        .collect();
    let gone: Vec<PathBuf> = (0..5)
        .map(|i| c.write(&format!("gone/f{i}.txt"), format!("gone{i}").as_bytes()))
        .collect();
    // Walked after `gone/`: when the walk opens it, every file of `gone/` has been stat'ed.
    c.write("later/last.txt", b"last");
    let (gone_dir, later_dir) = (c.src.join("gone"), c.src.join("later"));

    let gate = Gate::new();
    for p in &before {
        gate.watch(p, false);
    }
    gate.watch(&gone_dir, false);
    gate.watch(&later_dir, false);
    // The first upload's open is held, and the walk may enter `gone/` only once it is; when the
    // walk then enters `later/`, `gone/` is removed and the upload goes on.
    let (mut held_upload, mut held_walk, mut removed) = (None, None, false);
    let out = gate.run(&c, &["run"], |gate, access| {
        if removed {
            gate.allow(access);
        } else if access.path == gone_dir {
            match held_upload {
                Some(_) => gate.allow(access),
                None => held_walk = Some(access),
            }
        } else if access.path == later_dir {
            gate.allow(access);
            for p in &gone {
                fs::remove_file(p).unwrap();
            }
            fs::remove_dir(&gone_dir).unwrap();
            removed = true;
            if let Some(upload) = held_upload.take() {
                gate.allow(upload);
            }
        } else {
            assert!(held_upload.is_none(), "a second upload at concurrency 1");
            held_upload = Some(access);
            if let Some(walk) = held_walk.take() {
                gate.allow(walk);
            }
        }
    });
    drop(gate);

    assert!(removed, "the walk never entered later/:\n{}", out.stderr);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.figure("transfer errors"), 0, "{}", out.stderr);
    assert_eq!(out.figure("scanned"), 10, "{}", out.stderr);
    assert_eq!(out.figure("vanished"), 5, "{}", out.stderr);
    for i in 0..5 {
        let says = format!("gone/f{i}.txt: vanished before it could be read");
        assert!(
            out.stderr.contains(&says),
            "{says:?} not in\n{}",
            out.stderr
        );
    }
    let mut want: Vec<String> = (0..4).map(|i| c.key(&format!("a/f{i}.txt"))).collect();
    want.push(c.key("later/last.txt"));
    assert_eq!(s3().list_keys(&c.dest), want);
    let manifest = fs::read_to_string(c.state_dir().join("manifest")).unwrap();
    assert!(!manifest.contains("gone/"), "{manifest}");
}
