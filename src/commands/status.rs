//! `nightcopy status`: the last run as the state directory recorded it — when, how it ended, its
//! figures, and the last success — for a person, or as JSON for a script.

use crate::config::Config;
use crate::error::Fatal;
use crate::fsutil;
use crate::report::Ending;
use crate::state::{self, RunRecord};

pub fn run(config: &Config, json: bool) -> Ending {
    match state::read_record(&config.state_dir.0) {
        Some(record) => {
            show(&record, json);
            Ending::SUCCESS
        }
        None => {
            let e = Fatal::NoRecord(config.state_dir.0.display().to_string());
            // On stderr as it is, like the record on stdout: a person or a script reads both.
            eprintln!("{e}");
            e.ending()
        }
    }
}

fn show(record: &RunRecord, json: bool) {
    let now = fsutil::unix_now();
    if json {
        let mut v = serde_json::to_value(record).unwrap_or_default();
        v["seconds_since_start"] = serde_json::json!(now.saturating_sub(record.started));
        if let Some(t) = record.last_success_started {
            v["seconds_since_last_success"] = serde_json::json!(now.saturating_sub(t));
        }
        println!("{v:#}");
    } else {
        print!("{}", state::describe(record, now));
    }
}
