//! The command line as the manual page tells it: `nightcopy generate-man` (hidden, run when the
//! .deb is built) prints one roff page with a subsection for every subcommand `--help` lists.

use std::process::Command;

fn nightcopy(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_nightcopy"))
        .args(args)
        .env_remove("NIGHTCOPY_CONFIG")
        .output()
        .expect("start nightcopy");
    assert!(out.status.success(), "nightcopy {args:?}: {out:?}");
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

#[test]
fn the_manual_page_is_roff_and_has_every_subcommand() {
    let help = nightcopy(&["--help"]);
    // clap's "Commands:" block: one indented name per line, up to the blank line.
    let subcommands: Vec<&str> = help
        .lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .collect();
    assert!(subcommands.contains(&"run"), "no subcommands in:\n{help}");
    assert!(
        !help.contains("generate-man"),
        "the generator is listed:\n{help}"
    );

    let page = nightcopy(&["generate-man"]);
    assert!(
        page.lines().any(|l| l.starts_with(".TH nightcopy 1 ")),
        "not a roff page for nightcopy(1):\n{page}"
    );
    for section in [
        ".SH NAME",
        ".SH SYNOPSIS",
        ".SH COMMANDS",
        ".SH \"EXIT STATUS\"",
        ".SH FILES",
    ] {
        assert!(
            page.lines().any(|l| l == section),
            "{section} missing:\n{page}"
        );
    }
    for name in &subcommands {
        let heading = format!(".SS \"nightcopy {name}\"");
        assert!(
            page.lines().any(|l| l == heading),
            "{heading} missing:\n{page}"
        );
    }
    assert!(
        !page.contains("generate-man"),
        "the generator is on the page"
    );
    for code in ["0", "1", "2", "3", "4", "64", "75", "78"] {
        assert!(
            page.contains(&format!("\n\\fB{code}\\fR\n")),
            "exit code {code} missing"
        );
    }
}
