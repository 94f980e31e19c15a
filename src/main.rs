//! The `nightcopy` command: parses the command line, sets up logging, calls the library and maps
//! the result to the documented exit code. Nothing else lives here.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use nightcopy::config::{Config, ConfigError, DEFAULT_PATH};
use nightcopy::report::Outcome;
use nightcopy::{exit, RunOptions};

const EXIT_CODES: &str = "\
Exit codes:
  0   success (check-config: the file is valid)
  1   fatal error: the message says what to do; nothing more was backed up
  2   the run completed, but some files could not be backed up (named in the log)
  64  usage error on the command line
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
        /// Print each planned upload with its reason; upload nothing, change no state.
        #[arg(long)]
        dry_run: bool,
    },
    /// Validate a config file and print the effective config (defaults filled in).
    CheckConfig {
        #[arg(long, env = "NIGHTCOPY_CONFIG", default_value = DEFAULT_PATH)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                exit::USAGE
            } else {
                exit::SUCCESS
            });
        }
    };
    init_logging(&cli);
    ExitCode::from(match cli.command {
        Command::CheckConfig { config } => check_config(&config),
        Command::Run { config, dry_run } => run(&config, dry_run),
    })
}

fn init_logging(cli: &Cli) {
    let level = match (cli.quiet, cli.verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        _ => "trace",
    };
    // Our own crate at the chosen level; the SDK's internals only when asked for with RUST_LOG.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("warn,nightcopy={level}")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

fn load(path: &std::path::Path) -> Result<Config, u8> {
    Config::load(path).map_err(|e| {
        tracing::error!("{e}");
        match e {
            ConfigError::Read { .. } | ConfigError::Invalid { .. } => exit::CONFIG,
        }
    })
}

fn check_config(path: &std::path::Path) -> u8 {
    match load(path) {
        Ok(c) => {
            print!("{c}");
            exit::SUCCESS
        }
        Err(code) => code,
    }
}

fn run(path: &std::path::Path, dry_run: bool) -> u8 {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return exit::FATAL;
        }
    };
    let opts = RunOptions { dry_run };
    match runtime.block_on(nightcopy::run(&config, &opts)) {
        Ok(report) => match report.outcome {
            Outcome::Success => {
                tracing::info!("{report}");
                exit::SUCCESS
            }
            Outcome::FileErrors => {
                tracing::warn!("{report}");
                exit::FILE_ERRORS
            }
        },
        Err(nightcopy::Fatal::Config(m)) => {
            tracing::error!("config {}: {m}", path.display());
            exit::CONFIG
        }
        Err(e) => {
            tracing::error!("backup failed: {e}");
            exit::FATAL
        }
    }
}
