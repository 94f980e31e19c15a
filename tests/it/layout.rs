//! The shape of the source, checked: commands stand side by side on top and never import each
//! other; the machinery below never imports a command; and no two machinery modules import each
//! other, however indirectly. Read from the `crate::` paths of every file in `src/`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The unit a file belongs to: `commands::<name>` for a command, else its top-level module.
fn unit_of(rel: &Path) -> String {
    let parts: Vec<String> = rel
        .with_extension("")
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    match parts.as_slice() {
        [c, name, ..] if c == "commands" && name != "mod" => format!("commands::{name}"),
        [first, ..] => first.clone(),
        [] => unreachable!(),
    }
}

/// The top-level modules (and, for `commands`, the command) a source text names by `crate::`.
fn imports(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let code = line.trim_start();
        if code.starts_with("//") {
            continue;
        }
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            // `$crate::` inside a macro names the crate the macro expands in: not an import.
            let is_macro = rest[..at].ends_with('$');
            rest = &rest[at + "crate::".len()..];
            if is_macro {
                continue;
            }
            let names: Vec<&str> = match rest.strip_prefix('{') {
                Some(group) => group
                    .split('}')
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .map(|n| n.trim().split("::").next().unwrap_or_default())
                    .collect(),
                None => vec![rest
                    .split(|c: char| !c.is_alphanumeric() && c != '_')
                    .next()
                    .unwrap_or_default()],
            };
            for name in names.into_iter().filter(|n| !n.is_empty()) {
                let unit = match name {
                    // The summary macro lives in report.
                    "summary" => "report".to_owned(),
                    "commands" => {
                        let after = rest.strip_prefix("commands::").unwrap_or_default();
                        let command = after
                            .split(|c: char| !c.is_alphanumeric() && c != '_')
                            .next()
                            .unwrap_or_default();
                        format!("commands::{command}")
                    }
                    n => n.to_owned(),
                };
                out.insert(unit);
            }
        }
    }
    out
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(&src).unwrap();
        if rel == Path::new("main.rs") || rel == Path::new("lib.rs") {
            continue;
        }
        let unit = unit_of(rel);
        let text = fs::read_to_string(&file).unwrap();
        let deps = graph.entry(unit.clone()).or_default();
        deps.extend(imports(&text).into_iter().filter(|d| *d != unit));
    }
    graph
}

#[test]
fn commands_stand_side_by_side_over_machinery_that_never_imports_them() {
    let graph = graph();
    assert!(graph.contains_key("commands::run") && graph.contains_key("store"));
    for (unit, deps) in &graph {
        // A command importing another, or machinery importing one: main.rs alone imports them.
        let command = deps.iter().find(|d| d.starts_with("commands"));
        assert!(command.is_none(), "{unit} imports {}", command.unwrap());
    }
}

#[test]
fn no_two_modules_import_each_other() {
    let graph = graph();
    // Depth-first search for a cycle; the path found is printed.
    fn visit(
        unit: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) {
        if let Some(at) = path.iter().position(|u| u == unit) {
            panic!("import loop: {} -> {unit}", path[at..].join(" -> "));
        }
        if done.contains(unit) {
            return;
        }
        path.push(unit.to_owned());
        for dep in graph.get(unit).into_iter().flatten() {
            visit(dep, graph, path, done);
        }
        path.pop();
        done.insert(unit.to_owned());
    }
    let mut done = BTreeSet::new();
    for unit in graph.keys() {
        visit(unit, &graph, &mut Vec::new(), &mut done);
    }
}

#[test]
fn the_reader_finds_imports_in_every_form() {
    let text = "use crate::config::Config;\nuse crate::{exit, fsutil::ns};\n// crate::commented\n\
                let x = crate::store::memory::Op::Put; crate::summary!(0, \"x\");\n\
                $crate::exit::severity(1); use crate::commands::run::RunOptions;";
    let got: Vec<String> = imports(text).into_iter().collect();
    assert_eq!(
        got,
        [
            "commands::run",
            "config",
            "exit",
            "fsutil",
            "report",
            "store"
        ]
    );
}
