//! The shape of the source, checked: commands stand side by side on top and never import each
//! other; the machinery below never imports a command; no two machinery modules import each
//! other, however indirectly; and inside a command, no two files do. Read from every path a file
//! names through `crate::`, `super::`, `self::` or a module it declares, in every file in `src/`.

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

/// The module a file holds, as path segments: `commands/run/mod.rs` is `commands::run`,
/// `commands/run/copy.rs` is `commands::run::copy`.
fn module_of(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .with_extension("")
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// The unit a module belongs to: `commands::<name>` for a command, else its top-level module.
fn unit_of(module: &[String]) -> String {
    match module {
        [c, name, ..] if c == "commands" => format!("commands::{name}"),
        [first, ..] => first.clone(),
        [] => unreachable!("a path names at least one module"),
    }
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The paths of a `use` tree or an expression path starting at `text` (just past a leading
/// `crate::`, `super::` …): `a::b::C` is one, `a::{b, c::D}` two.
fn paths_at(text: &str) -> Vec<Vec<String>> {
    fn tree(text: &str) -> (Vec<Vec<String>>, usize) {
        let mut prefix = Vec::new();
        let mut at = 0;
        loop {
            let rest = &text[at..];
            let trimmed = rest.trim_start();
            at += rest.len() - trimmed.len();
            if let Some(group) = trimmed.strip_prefix('{') {
                at += 1;
                let mut out = Vec::new();
                let mut inner = group;
                loop {
                    let (paths, used) = tree(inner);
                    out.extend(paths.into_iter().map(|p| [prefix.clone(), p].concat()));
                    at += used;
                    inner = &inner[used..];
                    let skip = inner.len() - inner.trim_start().len();
                    at += skip;
                    inner = inner.trim_start();
                    match inner.chars().next() {
                        Some(',') => {
                            at += 1;
                            inner = &inner[1..];
                        }
                        Some('}') => return (out, at + 1),
                        _ => return (out, at),
                    }
                }
            }
            let name: String = trimmed.chars().take_while(|c| is_ident(*c)).collect();
            if name.is_empty() {
                return (vec![prefix], at);
            }
            at += name.len();
            prefix.push(name);
            match text[at..].strip_prefix("::") {
                Some(_) => at += 2,
                None => return (vec![prefix], at),
            }
        }
    }
    tree(text).0
}

/// Every module path a source text names, made absolute: `crate::a::b`, `super::b` and
/// `self::b` from the module `module` holds, and `b::c` for a module `b` the text declares.
fn named_paths(text: &str, module: &[String]) -> Vec<Vec<String>> {
    let declared: BTreeSet<String> = text
        .lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let l = l.strip_prefix("pub ").unwrap_or(l);
            let name = l.strip_prefix("mod ")?.strip_suffix(';')?;
            Some(name.trim().to_owned())
        })
        .collect();
    let mut out = Vec::new();
    // Where `self::` points: the file's module, or an inline module (`mod tests {`) in it.
    let mut here = module.to_vec();
    for line in text.lines() {
        let code = line.trim_start();
        if code.starts_with("//") {
            continue;
        }
        // A comment after the code ("//" after a space: not the one in "https://").
        let code = code.split(" //").next().unwrap_or_default();
        if let Some(inline) = line
            .strip_prefix("mod ")
            .or_else(|| line.strip_prefix("pub(crate) mod "))
            .and_then(|l| l.strip_suffix(" {"))
        {
            here = [module, &[inline.to_owned()]].concat();
        }
        let mut at = 0;
        while at < code.len() {
            let rest = &code[at..];
            let Some(start) = rest.find(|c: char| is_ident(c)) else {
                break;
            };
            let word: String = rest[start..].chars().take_while(|c| is_ident(*c)).collect();
            let before = &code[..at + start];
            at += start + word.len();
            let after = &code[at..];
            // `$crate::` inside a macro names the crate the macro expands in; `x::y::word` is the
            // middle of a path already read.
            if before.ends_with('$') || before.ends_with("::") || !after.starts_with("::") {
                continue;
            }
            let base: Vec<String> = match word.as_str() {
                "crate" => Vec::new(),
                "self" => here.clone(),
                "super" => {
                    let mut base = here.clone();
                    base.pop();
                    let mut tail = &after[2..];
                    while let Some(more) = tail.strip_prefix("super::") {
                        base.pop();
                        at += "super::".len();
                        tail = more;
                    }
                    base
                }
                w if declared.contains(w) => module.to_vec(),
                _ => continue,
            };
            let from = match word.as_str() {
                "crate" | "self" | "super" => at + 2,
                _ => at - word.len(),
            };
            for path in paths_at(&code[from..]) {
                // The summary macro lives in report.
                let path = match path.first().map(String::as_str) {
                    Some("summary") if word == "crate" => vec!["report".to_owned()],
                    _ => path,
                };
                let full = [base.clone(), path].concat();
                if !full.is_empty() {
                    out.push(full);
                }
            }
        }
    }
    out
}

/// The units (top-level modules, and commands) a source text in `module` names.
fn imports(text: &str, module: &[String]) -> BTreeSet<String> {
    named_paths(text, module)
        .iter()
        .map(|p| unit_of(p))
        .collect()
}

/// Each file's module and text, `main.rs` and `lib.rs` aside (they name every unit).
fn sources() -> Vec<(Vec<String>, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files
        .into_iter()
        .filter_map(|file| {
            let rel = file.strip_prefix(&src).unwrap();
            if rel == Path::new("main.rs") || rel == Path::new("lib.rs") {
                return None;
            }
            Some((module_of(rel), fs::read_to_string(&file).unwrap()))
        })
        .collect()
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, text) in sources() {
        let unit = unit_of(&module);
        let deps = graph.entry(unit.clone()).or_default();
        deps.extend(imports(&text, &module).into_iter().filter(|d| *d != unit));
    }
    graph
}

/// Inside each command: which of its files (modules) each file names. A path is the file of the
/// longest module it begins with.
fn file_graph() -> BTreeMap<String, BTreeSet<String>> {
    let sources: Vec<_> = sources()
        .into_iter()
        .filter(|(m, _)| m.first().is_some_and(|c| c == "commands") && m.len() > 1)
        .collect();
    let files: BTreeSet<Vec<String>> = sources.iter().map(|(m, _)| m.clone()).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, text) in &sources {
        let deps = graph.entry(module.join("::")).or_default();
        for path in named_paths(text, module) {
            let file = (1..=path.len())
                .rev()
                .map(|n| &path[..n])
                .find(|p| files.contains(*p));
            if let Some(file) = file.filter(|f| *f != module.as_slice()) {
                deps.insert(file.join("::"));
            }
        }
    }
    graph
}

/// Depth-first search for cycles; every one found is in the panic.
fn assert_no_loop(graph: &BTreeMap<String, BTreeSet<String>>, what: &str) {
    fn visit(
        unit: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        loops: &mut Vec<String>,
    ) {
        if let Some(at) = path.iter().position(|u| u == unit) {
            loops.push(format!("{} -> {unit}", path[at..].join(" -> ")));
            return;
        }
        if done.contains(unit) {
            return;
        }
        path.push(unit.to_owned());
        for dep in graph.get(unit).into_iter().flatten() {
            visit(dep, graph, path, done, loops);
        }
        path.pop();
        done.insert(unit.to_owned());
    }
    let (mut done, mut loops) = (BTreeSet::new(), Vec::new());
    for unit in graph.keys() {
        visit(unit, graph, &mut Vec::new(), &mut done, &mut loops);
    }
    assert!(loops.is_empty(), "{what} loops:\n{}", loops.join("\n"));
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
    assert_no_loop(&graph(), "import");
}

#[test]
fn no_two_files_of_a_command_import_each_other() {
    let graph = file_graph();
    assert!(graph.contains_key("commands::run::copy"), "{graph:?}");
    assert_no_loop(&graph, "file import");
}

#[test]
fn the_reader_finds_imports_in_every_form() {
    let text = "use crate::config::Config;\nuse crate::{exit, fsutil::ns};\n// crate::commented\n\
                let x = crate::store::memory::Op::Put; crate::summary!(0, \"x\");\n\
                $crate::exit::severity(1); use crate::commands::run::RunOptions;";
    let got: Vec<String> = imports(text, &["plan".to_owned()]).into_iter().collect();
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

#[test]
fn the_reader_resolves_super_self_and_declared_modules() {
    let module: Vec<String> = ["commands", "run", "copy"].map(String::from).into();
    let text = "mod inner;\nuse super::RunOptions;\nuse super::{coordinate::Coordinator, x};\n\
                let r = super::super::verify::run(); self::inner::f(); inner::g();\n\
                let q = crate::queue::Queues::new(); // super::commented\n\
                mod tests {\n    use super::*;\n}";
    let got: BTreeSet<String> = named_paths(text, &module)
        .iter()
        .map(|p| p.join("::"))
        .collect();
    let want = [
        "commands::run::RunOptions",
        "commands::run::coordinate::Coordinator",
        "commands::run::x",
        "commands::verify::run",
        "commands::run::copy::inner::f",
        "commands::run::copy::inner::g",
        "queue::Queues::new",
        "commands::run::copy",
    ];
    assert_eq!(got, want.into_iter().map(String::from).collect());
    let units: Vec<String> = imports(text, &module).into_iter().collect();
    assert_eq!(units, ["commands::run", "commands::verify", "queue"]);
}
