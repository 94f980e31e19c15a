//! `nightcopy status`: the last run as the state directory recorded it — when, how it ended, its
//! figures, and the last success — for a person, or as JSON for a script.

use crate::config::Config;
use crate::{exit, fsutil, state};

pub fn run(config: &Config, json: bool) -> u8 {
    let Some(record) = state::read_record(&config.state_dir.0) else {
        eprintln!("no run recorded in {} yet", config.state_dir.0.display());
        return exit::FATAL;
    };
    let now = fsutil::unix_now();
    if json {
        let mut v = serde_json::to_value(&record).unwrap_or_default();
        v["seconds_since_start"] = serde_json::json!(now.saturating_sub(record.started));
        if let Some(t) = record.last_success_started {
            v["seconds_since_last_success"] = serde_json::json!(now.saturating_sub(t));
        }
        println!("{v:#}");
    } else {
        print!("{}", state::describe(&record, now));
    }
    exit::SUCCESS
}
