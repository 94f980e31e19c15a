//! The `nightcopy` command: parses the command line, sets up logging (journald under systemd,
//! readable lines plus a progress line on a terminal), calls the library and returns its exit code.
//! Nothing else lives here, but the manual page rendered from this same definition.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::OnceLock;

use clap::{CommandFactory, Parser, Subcommand};
use nightcopy::commands;
use nightcopy::commands::diff::DiffOptions;
use nightcopy::commands::restore::{self, RestoreOptions, ThawOptions};
use nightcopy::commands::run::RunOptions;
use nightcopy::commands::verify::VerifyOptions;
use nightcopy::config::{Config, DEFAULT_PATH};
use nightcopy::error::Fatal;
use nightcopy::guard;
use nightcopy::report::Ending;
use nightcopy::store::ThawTier;
use tracing_subscriber::prelude::*;

const EXIT_CODES: &str = "\
Exit codes (docs/exit-codes.md):
  0   success (check-config: the file is valid)
  1   fatal error: the message says what to do; LastSuccess=0 was published
  2   the run completed, but more files than success-max-errors could not be backed up;
      restore: some files could not be restored; verify: some files could not be checked
  3   the backup succeeded, but its metrics could not be published
  4   verify found problems: files missing, of another size or content, or corrupt
  5   restore --thaw: archived objects are thawing; run the same command again later
  64  usage error on the command line
  75  skipped: another run holds the lock, or the last success is within guard.min-interval
  78  invalid config file";

#[derive(Parser)]
#[command(version, about = "Additive-only nightly backup of a filesystem to S3", after_help = EXIT_CODES)]
struct Cli {
    /// More detail: -v lists every upload, -vv every decision.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Only warnings and errors.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Back up the source tree to the bucket.
    Run {
        #[arg(long, env = "NIGHTCOPY_CONFIG", default_value = DEFAULT_PATH)]
        config: PathBuf,
        /// Print each planned upload with its reason; upload nothing, change no state, publish
        /// no metrics.
        #[arg(long)]
        dry_run: bool,
        /// Run even if the last success is within guard.min-interval (the lock still applies).
        #[arg(long)]
        force: bool,
    },
    /// Validate a config file and print the effective config (defaults filled in).
    CheckConfig {
        #[arg(long, env = "NIGHTCOPY_CONFIG", default_value = DEFAULT_PATH)]
        config: PathBuf,
        /// Also check the bucket with the credentials a run would use: reachable, listable,
        /// Object Lock enabled if the config asks for it, versioned (a warning if not).
        #[arg(long)]
        remote: bool,
    },
    /// Compare the source with the bucket, read-only: files missing, of another size or
    /// content, corrupt objects. One line per problem on stdout.
    Verify {
        #[arg(long, env = "NIGHTCOPY_CONFIG", default_value = DEFAULT_PATH)]
        config: PathBuf,
        /// Re-read and hash every local file; compare with the recorded SHA-256.
        #[arg(long)]
        full: bool,
        /// Download and hash N files picked at random, end to end.
        #[arg(long, value_name = "N", default_value_t = 0)]
        sample: usize,
        /// JSON Lines on stdout: one object per problem, then a summary object.
        #[arg(long)]
        json: bool,
    },
    /// Restore the tree of a snapshot (the latest by default) into a directory (docs/restore.md).
    Restore {
        #[arg(long, env = "NIGHTCOPY_CONFIG", default_value = DEFAULT_PATH)]
        config: PathBuf,
        /// The directory to restore into; paths below source.path are recreated below it.
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
        /// Only this file or directory: relative to source.path, or absolute below it.
        #[arg(long, value_name = "SUBPATH")]
        path: Option<PathBuf>,
        /// Restore the newest snapshot whose run had completed by TIME (with --include-deleted,
        /// or where no snapshot is that old: each object's version at TIME):
        /// 2026-11-20T23:00:00Z, 2026-11-20T23:00:00+01:00, @UNIX-SECONDS or "36h ago".
        #[arg(long, value_name = "TIME", value_parser = as_of_ns)]
        as_of: Option<i64>,
        /// Restore this snapshot (`nightcopy snapshots` lists them).
        #[arg(long, value_name = "ID", conflicts_with_all = ["as_of", "include_deleted"])]
        snapshot: Option<String>,
        /// Restore every object under the path instead of a snapshot's tree: files deleted or
        /// renamed long ago come back too (for a bucket written before snapshots existed, or to
        /// dig out an old file).
        #[arg(long)]
        include_deleted: bool,
        /// Create the device nodes a snapshot records (as root; never by default).
        #[arg(long)]
        devices: bool,
        /// Replace files that already exist under DIR (by default they are kept).
        #[arg(long)]
        overwrite: bool,
        /// Print what would be restored; download and write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Keep set-user-ID/set-group-ID bits from the objects' metadata. Off by default: the
        /// metadata is not covered by any checksum, and whoever can write the bucket prefix
        /// could otherwise plant a set-uid-root program (docs/restore.md).
        #[arg(long)]
        keep_setid: bool,
        /// Have S3 thaw each archived object (GLACIER, DEEP_ARCHIVE, an Intelligent-Tiering
        /// archive tier) the restore meets, once; everything readable is restored, and the
        /// restore ends with exit 5: run the same command again once they are thawed
        /// (docs/restore.md, "Cold storage classes"). Costs money: see a --dry-run first.
        #[arg(long)]
        thaw: bool,
        /// How fast, and at what price, a thaw is done: bulk (the cheapest: GLACIER 5-12 hours,
        /// DEEP_ARCHIVE within 48), standard (3-5 hours, within 12) or expedited (GLACIER only,
        /// 1-5 minutes; DEEP_ARCHIVE gets standard). Also what a dry run's estimate is priced at.
        #[arg(long, value_name = "TIER", default_value = "bulk", value_parser = thaw_tier)]
        thaw_tier: ThawTier,
        /// How many days a thawed copy stays readable (billed as STANDARD storage meanwhile).
        #[arg(long, value_name = "DAYS", default_value_t = restore::thaw_days(),
              value_parser = clap::value_parser!(u32).range(1..))]
        thaw_days: u32,
    },
    /// Compare two snapshots of the tree: which paths were added, removed, changed (a file's size
    /// or SHA-256, a link's target, the kind of path) or changed only in their metadata (mode,
    /// owner, mtime, extended attributes). Without ids, the last two snapshots; with OLDER alone,
    /// OLDER against the latest.
    ///
    /// One line per path on stdout, in key order, tab-separated: the class (added, removed,
    /// changed, metadata), then the kind of an added or removed path or what differs (such as
    /// the mode, with its old and new value), then the path, escaped, always last. A renamed directory is its old
    /// paths removed and its new ones added. The summary is the closing log line.
    Diff {
        #[arg(long, env = "NIGHTCOPY_CONFIG", default_value = DEFAULT_PATH)]
        config: PathBuf,
        /// The older snapshot's id, such as 20261206T020000Z-0a1b2c3d (`nightcopy snapshots`
        /// lists them); default: the one before the latest.
        #[arg(value_name = "OLDER", value_parser = snapshot_id)]
        older: Option<String>,
        /// The newer snapshot's id; default: the latest.
        #[arg(value_name = "NEWER", value_parser = snapshot_id)]
        newer: Option<String>,
        /// Only this file or directory: relative to source.path, or absolute below it.
        #[arg(long, value_name = "SUBPATH")]
        path: Option<PathBuf>,
        /// One JSON object per line: change, path (escaped), raw_path (percent-encoded bytes),
        /// kind, and for a changed path changes: [{what, old, new}].
        #[arg(long)]
        json: bool,
    },
    /// List the snapshots of the destination, oldest first: one line each with its id, when its
    /// run started and ended (UTC), files, bytes, errors (files that run could not back up) and
    /// host. Each completed run writes one. A snapshot that is damaged, made for another
    /// destination or not sealed with auth-key-file is named on stderr and left out.
    Snapshots {
        #[arg(long, env = "NIGHTCOPY_CONFIG", default_value = DEFAULT_PATH)]
        config: PathBuf,
        /// One JSON object per line: id, started, ended, files, bytes, errors, host.
        #[arg(long)]
        json: bool,
    },
    /// Take batches from the work queue of a distributed run and upload them (a long-running
    /// service on each worker host; docs/scale-out.md).
    Worker {
        #[arg(long, env = "NIGHTCOPY_CONFIG", default_value = DEFAULT_PATH)]
        config: PathBuf,
    },
    /// List the dead-letter queue's batches of a distributed run, one line per file.
    Dlq {
        #[arg(long, env = "NIGHTCOPY_CONFIG", default_value = DEFAULT_PATH)]
        config: PathBuf,
        /// Send each batch back to the work queue for the workers to try again.
        #[arg(long)]
        redrive: bool,
    },
    /// Show the last run: when, outcome, figures, last success.
    Status {
        #[arg(long, env = "NIGHTCOPY_CONFIG", default_value = DEFAULT_PATH)]
        config: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Print the manual page (roff) on stdout; the .deb installs it as nightcopy(1).
    #[command(hide = true)]
    GenerateMan,
}

/// `--as-of`, parsed with the command line: a time that makes no sense is a usage error (exit 64)
/// before anything is read.
fn as_of_ns(arg: &str) -> Result<i64, restore::select::AsOfError> {
    restore::select::parse_as_of(arg, std::time::SystemTime::now())
}

fn thaw_tier(arg: &str) -> Result<ThawTier, String> {
    ThawTier::parse(arg).ok_or_else(|| "one of bulk, standard, expedited".to_owned())
}

/// A snapshot id on the command line, checked with it: one that no run could have made is a usage
/// error (exit 64) before anything is read.
fn snapshot_id(arg: &str) -> Result<String, String> {
    match nightcopy::snapshot::is_id(arg) {
        true => Ok(arg.to_owned()),
        false => Err("not a snapshot id, which looks like 20261206T020000Z-0a1b2c3d".to_owned()),
    }
}

fn main() -> ExitCode {
    ExitCode::from(start().exit_code())
}

/// Parses the command line, sets up logging and runs the command; how it ended is the exit code.
fn start() -> Ending {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            // --help and --version are printed the same way, and are no error.
            return match e.use_stderr() {
                true => Ending::Usage,
                false => Ending::SUCCESS,
            };
        }
    };
    // Reads no config and logs nothing: it runs at build time, on the build host.
    if matches!(cli.command, Command::GenerateMan) {
        return print_man_page();
    }
    let show_bar = matches!(
        cli.command,
        Command::Run { .. } | Command::Restore { .. } | Command::Worker { .. }
    ) && !cli.quiet;
    let bar = init_logging(&cli, show_bar);
    let ending = dispatch(cli.command, bar.clone());
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    ending
}

/// Loads the config once, builds the runtime once for the commands that talk to AWS, and runs
/// the command.
fn dispatch(command: Command, bar: Option<indicatif::ProgressBar>) -> Ending {
    let config = match Config::load(command.config_path()) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            return Ending::Config;
        }
    };
    // Every command that reads or writes the state directory first refuses one that another user
    // owns or can write. `run` checks it in its own guard, where the failure is recorded and
    // published like any other.
    let state_dir = &config.state_dir.0;
    let checked = match &command {
        Command::Worker { .. } => guard::prepare_state_dir(state_dir),
        Command::Restore { .. } | Command::Verify { .. } | Command::Status { .. } => {
            guard::check_state_dir(state_dir)
        }
        _ => Ok(()),
    };
    if let Err(e) = checked {
        let e = Fatal::from(e);
        tracing::error!("{e}");
        return e.ending();
    }
    let async_command = match command {
        Command::CheckConfig { remote: false, .. } => return commands::check_config::run(&config),
        Command::Status { json, .. } => return commands::status::run(&config, json),
        other => other,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return Ending::FAILED;
        }
    };
    runtime.block_on(async move {
        match async_command {
            Command::Run { dry_run, force, .. } => {
                commands::run::run(&config, &RunOptions { dry_run, force }, bar).await
            }
            Command::Verify {
                full, sample, json, ..
            } => commands::verify::run(&config, &VerifyOptions { full, sample, json }).await,
            Command::Restore {
                to,
                path,
                as_of,
                overwrite,
                dry_run,
                keep_setid,
                snapshot,
                include_deleted,
                devices,
                thaw,
                thaw_tier,
                thaw_days,
                ..
            } => {
                let opts = RestoreOptions {
                    to,
                    path,
                    as_of_ns: as_of,
                    overwrite,
                    dry_run,
                    keep_setid,
                    snapshot,
                    include_deleted,
                    devices,
                    thaw: ThawOptions {
                        request: thaw,
                        tier: thaw_tier,
                        days: thaw_days,
                    },
                };
                restore::run(&config, &opts, bar).await
            }
            Command::Diff {
                older,
                newer,
                path,
                json,
                ..
            } => {
                let opts = DiffOptions {
                    older,
                    newer,
                    path,
                    json,
                };
                commands::diff::run(&config, &opts).await
            }
            Command::Snapshots { json, .. } => commands::snapshots::run(&config, json).await,
            Command::Worker { .. } => commands::worker::run(&config, bar).await,
            Command::Dlq { redrive, .. } => commands::dlq::run(&config, redrive).await,
            Command::CheckConfig { .. } => commands::check_config::remote(&config).await,
            Command::Status { .. } | Command::GenerateMan => unreachable!("run above"),
        }
    })
}

impl Command {
    fn config_path(&self) -> &Path {
        match self {
            Command::Run { config, .. }
            | Command::Worker { config }
            | Command::Dlq { config, .. }
            | Command::CheckConfig { config, .. }
            | Command::Verify { config, .. }
            | Command::Restore { config, .. }
            | Command::Snapshots { config, .. }
            | Command::Diff { config, .. }
            | Command::Status { config, .. } => config,
            Command::GenerateMan => Path::new(DEFAULT_PATH),
        }
    }
}

/// One page for the whole command, as `--help` of each subcommand would read in a terminal: clap's
/// own sections for the top level, then one subsection per subcommand (its synopsis, description
/// and options, also rendered by clap_mangen), then the exit codes and the files. A page per
/// subcommand (clap_mangen's default, nightcopy-run(1) …) would be eight pages for one program.
fn print_man_page() -> Ending {
    use clap_mangen::roff::{bold, roman, Roff};
    use clap_mangen::Man;
    use std::io::Write;

    let cmd = Cli::command();
    // clap_mangen renders whole sections; inside a subsection their .SH lines are dropped.
    fn body(render: impl Fn(&mut Vec<u8>) -> std::io::Result<()>) -> std::io::Result<String> {
        let mut out = Vec::new();
        render(&mut out)?;
        Ok(String::from_utf8_lossy(&out)
            .lines()
            .filter(|l| !l.starts_with(".SH "))
            .map(|l| format!("{l}\n"))
            .collect())
    }
    let render = || -> std::io::Result<Vec<u8>> {
        let man = Man::new(cmd.clone());
        let mut page = Vec::new();
        man.render_title(&mut page)?;
        man.render_name_section(&mut page)?;
        man.render_synopsis_section(&mut page)?;
        man.render_description_section(&mut page)?;
        man.render_options_section(&mut page)?;
        page.extend_from_slice(b".SH COMMANDS\n");
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            let name = format!("nightcopy {}", sub.get_name());
            let sub_man = Man::new(sub.clone().bin_name(&name));
            let mut roff = Roff::new();
            roff.control("SS", [name.as_str()]);
            roff.to_writer(&mut page)?;
            page.extend_from_slice(body(|w| sub_man.render_synopsis_section(w))?.as_bytes());
            page.extend_from_slice(b".PP\n");
            page.extend_from_slice(body(|w| sub_man.render_description_section(w))?.as_bytes());
            page.extend_from_slice(body(|w| sub_man.render_options_section(w))?.as_bytes());
        }
        // EXIT_CODES is laid out for a terminal: "  CODE  text" lines, continued by indented ones.
        let mut roff = Roff::new();
        roff.control("SH", ["EXIT STATUS"]);
        for line in EXIT_CODES.lines().skip(1) {
            let text = line.trim_start();
            match text.split_once(char::is_whitespace) {
                Some((code, rest)) if code.chars().all(|c| c.is_ascii_digit()) => {
                    roff.control("TP", []);
                    roff.text([bold(code)]);
                    roff.text([roman(rest.trim_start())]);
                }
                _ => {
                    roff.text([roman(text)]);
                }
            }
        }
        roff.control("SH", ["FILES"]);
        roff.control("TP", []);
        roff.text([bold(DEFAULT_PATH)]);
        roff.text([roman(
            "The config file (or --config, or $NIGHTCOPY_CONFIG); every key is explained in \
             /usr/share/doc/nightcopy/examples/nightcopy.example.yaml.",
        )]);
        roff.control("TP", []);
        roff.text([bold("/var/lib/nightcopy")]);
        roff.text([roman(
            "The state directory (state-dir): manifest, lock and the last run's record.",
        )]);
        roff.control("SH", ["SEE ALSO"]);
        roff.text([roman(
            "systemctl(1), journalctl(1); /usr/share/doc/nightcopy/operations.md (the runbook), \
             exit-codes.md, restore.md and the other documents beside it.",
        )]);
        roff.to_writer(&mut page)?;
        man.render_version_section(&mut page)?;
        Ok(page)
    };
    match render().and_then(|page| std::io::stdout().write_all(&page)) {
        Ok(()) => Ending::SUCCESS,
        Err(e) => {
            eprintln!("cannot write the manual page: {e}; check that stdout is writable");
            Ending::FAILED
        }
    }
}

/// Under systemd, stderr is the journal stream: log there natively, with structured fields.
/// systemd documents the check: JOURNAL_STREAM holds the device and inode of stderr.
fn under_journald() -> bool {
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    let Ok(meta) = nix::sys::stat::fstat(std::io::stderr()) else {
        return false;
    };
    dev.parse() == Ok(meta.st_dev) && ino.parse() == Ok(meta.st_ino)
}

static BAR: OnceLock<indicatif::ProgressBar> = OnceLock::new();

/// Log lines on a terminal go around the progress line, not through it.
struct BarWriter;

impl std::io::Write for BarWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match BAR.get() {
            Some(bar) if !bar.is_finished() => bar.suspend(|| std::io::stderr().write(buf)),
            _ => std::io::stderr().write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

fn init_logging(cli: &Cli, want_bar: bool) -> Option<indicatif::ProgressBar> {
    let level = match (cli.quiet, cli.verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        _ => "trace",
    };
    // Our own crate at the chosen level; the SDK's internals only when asked for with RUST_LOG.
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
            // The SDK warns on every GET of a multipart object that it cannot check its
            // composite checksum; restore and verify check those themselves.
            tracing_subscriber::EnvFilter::new(format!(
                "warn,aws_sdk_s3::http_response_checksum=error,nightcopy={level}"
            ))
        })
    };
    if under_journald() {
        match tracing_journald::layer() {
            Ok(layer) => {
                let layer = layer
                    .with_field_prefix(None)
                    .with_syslog_identifier("nightcopy".into());
                tracing_subscriber::registry()
                    .with(layer.with_filter(filter()))
                    .init();
                return None;
            }
            Err(e) => eprintln!("journald not reachable ({e}); logging to stderr"),
        }
    }
    let bar = (want_bar && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        let _ = BAR.set(bar.clone());
        bar
    });
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(|| BarWriter)
                // The structured fields are for journald; on a terminal each message already says
                // everything (path, reason), and the fields would only repeat it.
                .fmt_fields(tracing_subscriber::fmt::format::debug_fn(
                    |w, field, value| {
                        if field.name() == "message" {
                            write!(w, "{value:?}")
                        } else {
                            Ok(())
                        }
                    },
                ))
                .with_target(false)
                .with_ansi(std::io::stderr().is_terminal())
                .with_filter(filter()),
        )
        .init();
    bar
}
