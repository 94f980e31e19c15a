//! The manifest's copy in the bucket: a host whose state directory is empty (new, or rebuilt)
//! uses it, so its first run sends no data for unchanged files and still catches a file whose
//! mtime went backwards; a copy for another source, or a damaged one, is refused loudly.

use std::fs;
use std::io::{BufRead, Read};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};

use crate::common::proxy::Op;
use crate::common::run::Case;
use crate::common::s3::s3;

const COPY_KEY: &str = ".nightcopy/manifest.gz";

fn set_mtime(path: &std::path::Path, t: SystemTime) {
    fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

#[test]
fn a_rebuilt_host_uses_the_copy_sends_no_data_and_catches_a_backward_mtime() {
    let c = Case::new("rebuilt");
    for i in 0..30 {
        c.write(
            &format!("d{}/f{i:02}.txt", i % 3),
            format!("file {i:02}").as_bytes(),
        );
    }
    let out = c.run(&["run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stderr.contains("manifest copied to s3://"),
        "{}",
        out.stderr
    );
    let own = s3().own_requests(&c.dest);
    let copies = own
        .iter()
        .filter(|r| r.op == Op::PutObject && r.key == c.key(COPY_KEY));
    assert_eq!(copies.count(), 1);

    // The host is rebuilt: its state directory is gone.
    fs::remove_dir_all(c.state_dir()).unwrap();
    let puts = c.count(Op::PutObject);
    let seen = s3().requests(&c.dest).len();
    let out = c.run(&["run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stderr.contains("using the copy in the bucket"),
        "{}",
        out.stderr
    );
    assert_eq!(out.figure("files transferred"), 0, "{}", out.stderr);
    assert_eq!(out.figure("checks"), 30, "{}", out.stderr);
    assert_eq!(c.count(Op::PutObject), puts, "no data was sent");
    let rerun: Vec<_> = s3().requests(&c.dest).into_iter().skip(seen).collect();
    eprintln!(
        "rebuilt-host run: {:?} (plus, for the copy, one GET and one PUT)",
        crate::common::proxy::count(&rerun)
    );
    assert!(rerun
        .iter()
        .all(|r| matches!(r.op, Op::ListObjectsV2 | Op::Other)));
    assert!(fs::read_to_string(c.state_dir().join("manifest"))
        .unwrap()
        .contains("d0/f00.txt\t"));

    // Rebuilt again, and meanwhile a file was rewritten at the same size with an older mtime
    // (a restore from elsewhere, `touch -d`, an application that keeps mtimes): the upload time
    // alone would call it unchanged; the manifest's copy knows its mtime.
    fs::remove_dir_all(c.state_dir()).unwrap();
    let changed = c.write("d1/f01.txt", b"FILE 01");
    set_mtime(
        &changed,
        SystemTime::now() - Duration::from_secs(30 * 86_400),
    );
    let out = c.run(&["run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.figure("files transferred"), 1, "{}", out.stderr);
    assert_eq!(c.count(Op::PutObject), puts + 1);
    assert_eq!(s3().get(&c.dest, "d1/f01.txt").body, b"FILE 01");
    c.assert_no_delete();
}

#[test]
fn a_copy_made_for_another_source_or_damaged_is_not_used_and_says_so() {
    let first = Case::new("copy-source");
    first.write("a.txt", b"a");
    assert_eq!(first.run(&["run"]).code, 0);

    // Another tree writing to the same destination: the copy is not its manifest.
    let other = Case::on(s3(), first.dest.clone());
    other.write("a.txt", b"a");
    let out = other.run(&["run", "--dry-run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("is not used: it was made for another source")
            && out
                .stderr
                .contains("deciding by size and upload time this once"),
        "{}",
        out.stderr
    );
    assert!(
        !other.state_dir().join("manifest").exists(),
        "a dry run leaves no state"
    );

    // A damaged copy (here: not gzip at all) is refused the same way.
    s3().block_on(
        s3().direct_client()
            .put_object()
            .bucket(&first.dest.bucket)
            .key(first.key(COPY_KEY))
            .body(b"\x1f\x8b not really".to_vec().into())
            .send(),
    )
    .unwrap();
    fs::remove_dir_all(first.state_dir()).unwrap();
    let out = first.run(&["run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stderr.contains("is not used: it cannot be read")
            || out.stderr.contains("is not used: it is damaged"),
        "{}",
        out.stderr
    );
    // The run went on without it, and left a good copy for the next.
    let out = {
        fs::remove_dir_all(first.state_dir()).unwrap();
        first.run(&["run"])
    };
    assert!(
        out.stderr.contains("using the copy in the bucket"),
        "{}",
        out.stderr
    );
}

#[test]
fn restore_and_verify_never_see_the_copy_as_a_file() {
    let c = Case::new("copy-hidden");
    c.write("a.txt", b"a");
    assert_eq!(c.run(&["run"]).code, 0);
    assert!(s3().list_all_keys(&c.dest).contains(&c.key(COPY_KEY)));
    let out = c.run(&["verify"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(!out.stdout.contains("manifest.gz"), "{}", out.stdout);
    let (to, out) = c.restore_into("restored");
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(!to.join(".nightcopy").exists());
    assert_eq!(fs::read(to.join("a.txt")).unwrap(), b"a");
    // A source with a top-level .nightcopy of its own: left out, so it never takes the key.
    c.write(".nightcopy/manifest.gz", b"a user's file");
    let out = c.run(&["run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stderr.contains("1 excluded"), "{}", out.stderr);
}

/// The first line of the copy a run left in the bucket: names this destination and source.
fn preamble_of(c: &Case) -> serde_json::Value {
    let gz = s3().get(&c.dest, &c.key(COPY_KEY)).body;
    let mut line = String::new();
    std::io::BufReader::new(flate2::read::GzDecoder::new(&gz[..]))
        .read_line(&mut line)
        .unwrap();
    serde_json::from_str(&line).unwrap()
}

/// A gzip file holding `head` and then `n` bytes `byte`, written by hand: one fixed-Huffman
/// block whose run is a literal and then matches of 258 bytes at distance 1 (13 bits each), so
/// 512 MiB take 3.4 MB and no compressor time (flate2, unoptimised in a test build, takes seconds
/// per hundred MiB). RFC 1951 3.2.6 and RFC 1952.
fn gzip_of_run(head: &[u8], byte: u8, n: u64) -> Vec<u8> {
    struct Bits {
        out: Vec<u8>,
        acc: u64,
        used: u32,
    }
    impl Bits {
        /// `count` bits of `value`, least significant first (block header).
        fn put(&mut self, value: u64, count: u32) {
            self.acc |= value << self.used;
            self.used += count;
            while self.used >= 8 {
                self.out.push(self.acc as u8);
                self.acc >>= 8;
                self.used -= 8;
            }
        }
        /// A Huffman code, most significant bit first.
        fn code(&mut self, code: u32, len: u32) {
            self.put(u64::from(code.reverse_bits() >> (32 - len)), len);
        }
        fn literal(&mut self, b: u8) {
            match b {
                0..=143 => self.code(0x30 + u32::from(b), 8),
                _ => self.code(0x190 + u32::from(b - 144), 9),
            }
        }
    }
    let mut bits = Bits {
        out: vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255],
        acc: 0,
        used: 0,
    };
    bits.put(0b011, 3); // the final block, fixed codes
    head.iter().for_each(|b| bits.literal(*b));
    let mut left = n;
    if left > 0 {
        bits.literal(byte);
        left -= 1;
    }
    while left >= 258 {
        bits.code(0b1100_0101, 8); // symbol 285: length 258
        bits.code(0, 5); // distance code 0: distance 1
        left -= 258;
    }
    (0..left).for_each(|_| bits.literal(byte));
    bits.code(0, 7); // symbol 256: end of block
    if bits.used > 0 {
        bits.put(0, 8 - bits.used);
    }
    let mut crc = flate2::Crc::new();
    crc.update(head);
    let mut mib = flate2::Crc::new();
    mib.update(&vec![byte; 1 << 20]);
    (0..n >> 20).for_each(|_| crc.combine(&mib));
    crc.update(&vec![byte; (n % (1 << 20)) as usize]);
    let mut out = bits.out;
    out.extend(crc.sum().to_le_bytes());
    out.extend((((head.len() as u64) + n) as u32).to_le_bytes());
    out
}

/// Hex SHA-256 of `n` bytes `byte`.
fn sha256_of_run(byte: u8, n: u64) -> String {
    let mut h = Sha256::new();
    let mib = vec![byte; 1 << 20];
    (0..n >> 20).for_each(|_| h.update(&mib));
    h.update(&mib[..(n % (1 << 20)) as usize]);
    hex::encode(h.finalize())
}

/// Replaces the copy in the bucket with `head` + `n` bytes `byte`.
fn put_copy_of_run(c: &Case, head: &[u8], byte: u8, n: u64) -> usize {
    let gz = gzip_of_run(head, byte, n);
    let len = gz.len();
    s3().block_on(
        s3().direct_client()
            .put_object()
            .bucket(&c.dest.bucket)
            .key(c.key(COPY_KEY))
            .body(gz.into())
            .send(),
    )
    .unwrap();
    len
}

/// Runs the binary to its end, watching its peak RSS (VmHWM) every 10 ms; the last reading
/// before it exits is the peak of everything it did until then.
fn run_measured(c: &Case, args: &[&str]) -> (crate::common::run::Output, u64) {
    let log = c.root.join("measured.log");
    let mut child = c
        .command(args, None)
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak_kib = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the run did not end in 120 s");
        let hwm = fs::read_to_string(&status_file).ok().and_then(|s| {
            let line = s.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.to_owned();
            line.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        });
        peak_kib = peak_kib.max(hwm.unwrap_or(0));
        std::thread::sleep(Duration::from_millis(10));
    };
    let out = crate::common::run::Output {
        code: status.code().unwrap_or(-1),
        stdout: String::new(),
        stderr: fs::read_to_string(&log).unwrap(),
    };
    assert!(peak_kib > 0, "no VmHWM read: {}", out.stderr);
    (out, peak_kib)
}

#[test]
fn the_bomb_builder_makes_real_gzip() {
    let gz = gzip_of_run(b"head \xe9\n", b'x', 3 * (1 << 20) + 1000);
    let mut plain = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut plain)
        .unwrap();
    let mut want = b"head \xe9\n".to_vec();
    want.extend(vec![b'x'; 3 * (1 << 20) + 1000]);
    assert!(plain == want, "{} bytes", plain.len());
    assert!(gz.len() < 25_000, "{} bytes", gz.len());
}

/// A copy is whatever anyone who can write the prefix put there, and restore reads it as root:
/// 3.4 MB of gzip holding one line of 512 MiB, with a preamble for this destination and source
/// and its checksum right. Before the limits, the copy was installed and the manifest's reader
/// held that line whole (a 4 GB one was an OOM kill).
#[test]
fn a_manifest_copy_holding_one_endless_line_is_refused_in_bounded_memory() {
    let c = Case::new("copy-line-bomb");
    c.write("a.txt", b"a");
    assert_eq!(c.run(&["run"]).code, 0);
    const LINE: u64 = 512 << 20;
    let mut preamble = preamble_of(&c);
    preamble["entries"] = 0.into();
    preamble["sha256"] = sha256_of_run(b'a', LINE).into();
    let head = format!("{preamble}\n");
    let size = put_copy_of_run(&c, head.as_bytes(), b'a', LINE);
    assert!(size < 4 << 20, "{size} bytes of gzip");
    fs::remove_dir_all(c.state_dir()).unwrap();

    let (out, peak_kib) = run_measured(&c, &["run"]);
    eprintln!("peak RSS of the run: {} MiB", peak_kib / 1024);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let warning = format!(
        "the manifest copy s3://{}/{}{COPY_KEY} is not used: it is larger than nightcopy reads: \
         line 2 is longer than 8.0 KiB; deciding by size and upload time this once",
        c.dest.bucket, c.dest.prefix
    );
    assert!(out.stderr.contains(&warning), "{}", out.stderr);
    assert!(
        !out.stderr.contains("using the copy in the bucket"),
        "{}",
        out.stderr
    );
    // The run went on: its own manifest, and a good copy again for the next one.
    assert!(fs::read_to_string(c.state_dir().join("manifest"))
        .unwrap()
        .contains("a.txt\t"));
    assert_eq!(preamble_of(&c)["entries"], 1);
    // A debug build's run over one file stays near 40 MiB; the line alone is 512.
    assert!(peak_kib < 160 * 1024, "peak RSS {} MiB", peak_kib / 1024);
    let left: Vec<_> = fs::read_dir(c.state_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().contains("manifest.gz") || n == "manifest.fetched")
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// 1 MiB of gzip that inflates to 256 MiB of lines, with a preamble claiming 1,000 entries: it
/// is refused at line 1,003, not written out whole to be found damaged after.
#[test]
fn a_manifest_copy_inflating_past_what_it_claims_is_refused_at_once() {
    let c = Case::new("copy-bomb");
    c.write("a.txt", b"a");
    assert_eq!(c.run(&["run"]).code, 0);
    const BODY: u64 = 256 << 20;
    let mut preamble = preamble_of(&c);
    preamble["entries"] = 1000.into();
    preamble["sha256"] = sha256_of_run(b'\n', BODY).into();
    put_copy_of_run(&c, format!("{preamble}\n").as_bytes(), b'\n', BODY);
    fs::remove_dir_all(c.state_dir()).unwrap();
    for args in [&["run", "--dry-run"][..], &["run"]] {
        let out = c.run(args);
        assert_eq!(out.code, 0, "{}", out.stderr);
        assert!(
            out.stderr.contains(&format!(
                "{COPY_KEY} is not used: it is damaged: it holds more lines than the 1000 \
                 entries it claims; deciding by size and upload time this once"
            )),
            "{args:?}: {}",
            out.stderr
        );
    }
}

/// The key file as the role installs it: hex and a newline, mode 600.
fn auth_key(c: &Case, name: &str, byte: u8) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = c.root.join(name);
    fs::write(&p, format!("{}\n", hex::encode([byte; 32]))).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
    p
}

#[test]
fn with_auth_key_file_a_host_takes_only_a_copy_its_fleet_sealed() {
    let mut c = Case::new("copy-sealed");
    for i in 0..5 {
        c.write(&format!("f{i}.txt"), format!("file {i}").as_bytes());
    }
    let ours = auth_key(&c, "ours.key", 1);
    let base = c.top_extra.clone();
    c.top_extra = format!("{base}auth-key-file: {}\n", ours.display());
    let out = c.run(&["run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(preamble_of(&c)["mac"].is_string(), "the copy is sealed");

    // A rebuilt host with the same key adopts it: nothing is sent again.
    fs::remove_dir_all(c.state_dir()).unwrap();
    let out = c.run(&["run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stderr.contains("using the copy in the bucket"),
        "{}",
        out.stderr
    );
    assert_eq!(out.figure("files transferred"), 0, "{}", out.stderr);

    // A host with another key refuses it, says why, and goes on without it.
    let theirs = auth_key(&c, "theirs.key", 2);
    c.top_extra = format!("{base}auth-key-file: {}\n", theirs.display());
    fs::remove_dir_all(c.state_dir()).unwrap();
    let out = c.run(&["run", "--dry-run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stderr.contains(
            "is not used: it is not authenticated with auth-key-file: its MAC does not match"
        ),
        "{}",
        out.stderr
    );

    // A copy written without a key (by anyone who can write the prefix) is refused by a host
    // with one.
    c.top_extra = base.clone();
    fs::remove_dir_all(c.state_dir()).unwrap();
    assert_eq!(c.run(&["run"]).code, 0);
    assert!(preamble_of(&c).get("mac").is_none(), "an unsealed copy");
    c.top_extra = format!("{base}auth-key-file: {}\n", ours.display());
    fs::remove_dir_all(c.state_dir()).unwrap();
    let out = c.run(&["run", "--dry-run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("not authenticated with auth-key-file: it carries no MAC"),
        "{}",
        out.stderr
    );
}
