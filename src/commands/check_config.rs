//! `nightcopy check-config`: the config was loaded and validated before this runs (an invalid one
//! exits 78 there); this prints the effective config, defaults filled in and secrets hidden, so
//! an operator or Ansible's `validate:` sees exactly what a run will use.

use crate::config::Config;
use crate::exit;

pub fn run(config: &Config) -> u8 {
    print!("{config}");
    exit::SUCCESS
}
