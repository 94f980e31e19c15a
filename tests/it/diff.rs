//! `nightcopy diff`: the real binary on a tree backed up twice, against a real S3 server — what
//! changed between the two snapshots, named path by path with the right class, narrowed by
//! `--path`, as JSON, and the errors an operator meets before there are two snapshots.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::UNIX_EPOCH;

use crate::common::run::{Case, Output};
use crate::common::wait::clock_past_second;

/// The lines of a text diff as (class, path), the path as printed (escaped), each line checked
/// to be tab-separated with the class first and the path last.
fn changes(out: &Output) -> Vec<(String, String)> {
    out.stdout
        .lines()
        .map(|l| {
            let fields: Vec<&str> = l.split('\t').collect();
            assert!(fields.len() >= 3, "class, detail, path: {l:?}");
            let class = fields[0];
            assert!(
                ["added", "removed", "changed", "metadata"].contains(&class),
                "{l:?}"
            );
            (class.to_owned(), fields[fields.len() - 1].to_owned())
        })
        .collect()
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(c, p)| ((*c).to_owned(), (*p).to_owned()))
        .collect()
}

/// The next run starts in a later second than the last, so its snapshot sorts after.
fn next_second() {
    let now = std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    clock_past_second(now);
}

#[test]
fn diff_names_what_changed_between_two_nights() {
    let c = Case::new("diff");
    let s = &c.src;

    // No snapshot yet: one line that says what to do, nothing on stdout.
    let out = c.run(&["diff"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    assert!(
        out.stderr.contains("no snapshot under") && out.stderr.contains("nightcopy run"),
        "{}",
        out.stderr
    );

    c.write("keep.txt", b"the same both nights");
    c.write("changed.txt", b"first night");
    let chmod = c.write("chmod.txt", b"only its mode changes");
    fs::set_permissions(&chmod, fs::Permissions::from_mode(0o644)).unwrap();
    c.write("gone.txt", b"deleted before the second night");
    c.write("old-dir/a.txt", b"a");
    c.write("old-dir/sub/b.txt", b"b");
    let out = c.run(&["run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);

    let out = c.run(&["diff"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    let errors: Vec<&str> = out.stderr.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "{}", out.stderr);
    assert!(errors[0].contains("only one snapshot"), "{}", out.stderr);

    // The second night.
    next_second();
    fs::write(s.join("changed.txt"), b"second night, longer").unwrap();
    fs::set_permissions(&chmod, fs::Permissions::from_mode(0o600)).unwrap();
    fs::remove_file(s.join("gone.txt")).unwrap();
    fs::rename(s.join("old-dir"), s.join("new-dir")).unwrap();
    // A name with a newline: printed escaped, never as a line of its own.
    c.write("new\nfile.txt", b"added on the second night");
    let out = c.run(&["run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);

    let out = c.run(&["diff"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let all = pairs(&[
        ("changed", "changed.txt"),
        ("metadata", "chmod.txt"),
        ("removed", "gone.txt"),
        // Key order: "new%0Afile.txt" sorts before "new-dir/".
        ("added", "new\\nfile.txt"),
        ("added", "new-dir"),
        ("added", "new-dir/a.txt"),
        ("added", "new-dir/sub"),
        ("added", "new-dir/sub/b.txt"),
        ("removed", "old-dir"),
        ("removed", "old-dir/a.txt"),
        ("removed", "old-dir/sub"),
        ("removed", "old-dir/sub/b.txt"),
    ]);
    assert_eq!(changes(&out), all, "{}", out.stdout);
    let lines: BTreeSet<&str> = out.stdout.lines().collect();
    for want in [
        "metadata\tmode 644→600\tchmod.txt",
        "removed\tfile\tgone.txt",
        "added\tdir\tnew-dir",
        "removed\tdir\told-dir/sub",
    ] {
        assert!(lines.contains(want), "{want:?} in\n{}", out.stdout);
    }
    let changed = out.stdout.lines().find(|l| l.ends_with("\tchanged.txt"));
    assert!(
        changed.is_some_and(|l| l.contains("\tsize 11→20\t") && l.contains("\tsha256\t")),
        "{}",
        out.stdout
    );
    assert!(
        out.stderr
            .contains("5 added, 5 removed, 1 changed, 1 metadata only"),
        "{}",
        out.stderr
    );

    // The ids, from `nightcopy snapshots`: with OLDER alone, OLDER against the latest — here the
    // same two; and given in the other order, the other way round.
    let listed = c.run(&["snapshots", "--json"]);
    assert_eq!(listed.code, 0, "{}", listed.stderr);
    let ids: Vec<String> = listed
        .stdout
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 2, "{}", listed.stdout);
    let out = c.run(&["diff", &ids[0]]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(changes(&out), all);
    let out = c.run(&["diff", &ids[1], &ids[0]]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let back: Vec<(String, String)> = all
        .iter()
        .map(|(class, p)| {
            let class = match class.as_str() {
                "added" => "removed",
                "removed" => "added",
                other => other,
            };
            (class.to_owned(), p.clone())
        })
        .collect();
    assert_eq!(changes(&out), back);

    // --path narrows to one directory (relative, or absolute below source.path) or one file.
    let out = c.run(&["diff", "--path", "new-dir"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(changes(&out), all[4..8].to_vec());
    let sub = s.join("old-dir/sub");
    let out = c.run(&["diff", "--path", sub.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(changes(&out), all[10..12].to_vec());
    let out = c.run(&["diff", "--path", "chmod.txt"]);
    assert_eq!(changes(&out), all[1..2].to_vec());
    let out = c.run(&["diff", "--path", "keep.txt"]);
    assert_eq!((out.code, out.stdout.as_str()), (0, ""), "{}", out.stderr);

    // --json: one object per line, the same paths and classes.
    let out = c.run(&["diff", "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let objects: Vec<serde_json::Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    let from_json: Vec<(String, String)> = objects
        .iter()
        .map(|v| {
            (
                v["change"].as_str().unwrap().to_owned(),
                v["path"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(from_json, all);
    let chmod = objects.iter().find(|v| v["path"] == "chmod.txt").unwrap();
    assert_eq!(chmod["kind"], "file");
    assert_eq!(
        chmod["changes"],
        serde_json::json!([{"what": "mode", "old": "644", "new": "600"}])
    );
    let odd = objects.iter().find(|v| v["change"] == "added").unwrap();
    assert_eq!(odd["raw_path"], "new%0Afile.txt");
    assert_eq!(
        objects.iter().find(|v| v["path"] == "old-dir").unwrap()["kind"],
        "dir"
    );

    // Ids that name no snapshot are usage errors; a --path outside the source too.
    let out = c.run(&["diff", "20200101T000000Z-00000000"]);
    assert_eq!(out.code, 64, "{}", out.stderr);
    assert!(out.stderr.contains("no such snapshot"), "{}", out.stderr);
    let out = c.run(&["diff", "not-an-id"]);
    assert_eq!(out.code, 64, "{}", out.stderr);
    let out = c.run(&["diff", "--path", "/elsewhere"]);
    assert_eq!(out.code, 64, "{}", out.stderr);
    c.assert_no_delete();
}
