//! The state directory against someone who can put links in it. nightcopy runs as root or with
//! CAP_DAC_READ_SEARCH, and in the packaged setup its state directory belongs to the service user:
//! a link planted at a name nightcopy writes took that write to any file, as root under
//! `sudo nightcopy restore`. Both tests failed on the code before the fix (the audit's finding
//! "root writes through planted links in the state directory").

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::common::run::{pseudo_random, Case};
use crate::common::wait::require_root;

/// Files outside the state directory, each with a link to it planted at a name in the state
/// directory (or the metrics directory) that nightcopy writes or used to write.
struct Victims {
    dir: tempfile::TempDir,
    planted: Vec<(PathBuf, PathBuf)>,
}

impl Victims {
    fn new() -> Victims {
        Victims {
            dir: tempfile::tempdir().unwrap(),
            planted: Vec::new(),
        }
    }

    /// A link at `link` to a new file of its own.
    fn plant(&mut self, link: PathBuf) {
        let target = self
            .dir
            .path()
            .join(format!("victim-{}", self.planted.len()));
        fs::write(&target, Self::content(&link)).unwrap();
        symlink(&target, &link).unwrap();
        self.planted.push((link, target));
    }

    fn content(link: &Path) -> String {
        format!("root's file, linked from {}\n", link.display())
    }

    /// Every target still holds what it held, and the victims' directory nothing else.
    fn assert_untouched(&self) {
        for (link, target) in &self.planted {
            assert_eq!(
                fs::read_to_string(target).unwrap(),
                Self::content(link),
                "written through the link at {}",
                link.display()
            );
        }
        let files = fs::read_dir(self.dir.path()).unwrap().count();
        assert_eq!(
            files,
            self.planted.len(),
            "a file was created through a link"
        );
    }
}

/// The name of the record of a multipart upload of `key` (state/uploads.rs).
fn upload_record(c: &Case, key: &str) -> String {
    let destination = format!(
        "{}|{}|{}",
        c.server.endpoint.trim_end_matches('/'),
        c.dest.bucket,
        c.dest.prefix
    );
    let mut h = Sha256::new();
    h.update(destination.as_bytes());
    h.update([0]);
    h.update(key.as_bytes());
    format!("{}.json", hex::encode(h.finalize()))
}

#[test]
fn links_planted_at_the_state_files_names_are_never_written_through() {
    let mut c = Case::new("statedir-links");
    c.write("a.txt", b"a");
    c.write("d/b.txt", b"b");
    // Above multipart-threshold (6 MiB): its upload is recorded in uploads/ while it runs.
    let big = pseudo_random(7 << 20, 3);
    c.write("big.bin", &big);
    let metrics_dir = c.root.join("textfile");
    fs::create_dir(&metrics_dir).unwrap();
    c.metrics = format!(
        "metrics:\n  cloudwatch: false\n  textfile: {}\n",
        metrics_dir.join("nightcopy.prom").display()
    );
    let state = c.state_dir();
    fs::create_dir_all(state.join("uploads")).unwrap();
    let mut victims = Victims::new();

    // The lock: refused, with what to do, and nothing sent.
    victims.plant(state.join("lock"));
    let out = c.run(&["run"]);
    victims.assert_untouched();
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("is not a plain file of its own")
            && out.stderr.contains(&format!("rm {}/lock", state.display())),
        "{}",
        out.stderr
    );
    assert!(c.ops().is_empty(), "{:?}", c.ops());
    fs::remove_file(state.join("lock")).unwrap();

    // The temp names a run wrote before it renamed: the manifest, the run record, the
    // compressed copy it uploads, an upload's record, the metrics textfile; and the names of the
    // night's snapshot: the walk's spool, the body, the object it uploads.
    for name in [
        "manifest.new",
        "last-run.json.new",
        "manifest.gz.upload.new",
        "snapshot.tree.gz",
        "snapshot.tree.gz.new",
        "snapshot.body.gz",
        "snapshot.body.gz.new",
        "snapshot.gz",
        "snapshot.gz.new",
    ] {
        victims.plant(state.join(name));
    }
    let record = upload_record(&c, &c.key("big.bin"));
    victims.plant(state.join("uploads").join(format!("{record}.new")));
    victims.plant(metrics_dir.join("nightcopy.prom.new"));
    let out = c.run(&["run"]);
    victims.assert_untouched();
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.figure("files transferred"), 3, "{}", out.stderr);
    for file in [
        state.join("manifest"),
        state.join("last-run.json"),
        metrics_dir.join("nightcopy.prom"),
    ] {
        let meta = fs::symlink_metadata(&file).unwrap();
        assert!(meta.file_type().is_file(), "{}", file.display());
    }

    // A host without its manifest fetches the copy: its download and the manifest it installs.
    fs::remove_file(state.join("manifest")).unwrap();
    victims.plant(state.join("manifest.gz.download.new"));
    let out = c.run(&["run"]);
    victims.assert_untouched();
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stderr.contains("using the copy in the bucket"),
        "{}",
        out.stderr
    );
    assert_eq!(out.figure("files transferred"), 0, "{}", out.stderr);

    // A restore of every object (not of a snapshot, which is read into an unnamed file) reads
    // the copy into a file of its own.
    fs::remove_file(state.join("manifest")).unwrap();
    victims.plant(state.join("manifest.fetched.new"));
    let to = c.root.join("restored");
    let out = c.run(&["restore", "--include-deleted", "--to", to.to_str().unwrap()]);
    victims.assert_untouched();
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stderr.contains("using the copy in the bucket"),
        "{}",
        out.stderr
    );
    assert_eq!(fs::read(to.join("big.bin")).unwrap(), big);
    c.assert_no_delete();
}

/// Needs root, to give the state directory away.
#[test]
fn a_state_directory_another_user_owns_is_refused_by_every_command() {
    if !require_root(
        "statedir::a_state_directory_another_user_owns_is_refused_by_every_command",
        "it gives the state directory to uid 12345",
    ) {
        return;
    }
    let c = Case::new("statedir-owner");
    c.write("a.txt", b"a");
    let state = c.state_dir();
    fs::create_dir(&state).unwrap();
    nix::unistd::chown(&state, Some(nix::unistd::Uid::from_raw(12345)), None)
        .expect("the state directory is given to uid 12345");
    let to = c.root.join("restored");
    let to = to.to_str().unwrap();
    for args in [
        &["run"][..],
        &["run", "--dry-run"],
        &["status"],
        &["verify"],
        &["restore", "--to", to],
        &["worker"],
    ] {
        let out = c.run(args);
        assert_eq!(out.code, 1, "{args:?}: {}", out.stderr);
        let refusal: Vec<_> = out
            .stderr
            .lines()
            .filter(|l| l.contains("belongs to uid 12345"))
            .collect();
        assert!(
            refusal.len() == 1
                && refusal[0].contains(&format!("chown -R root {}", state.display())),
            "{args:?}: {}",
            out.stderr
        );
    }
    assert!(c.ops().is_empty(), "{:?}", c.ops());
    // Nothing was written there, not even the record of the refusal.
    assert_eq!(fs::read_dir(&state).unwrap().count(), 0);
    assert!(!Path::new(to).exists());
}
