//! The layer rule, held against the code: a module imports only from layers below its own.
//!
//! The layers and the import graph are written once, in `docs/architecture.md`, between
//! `<!-- layers -->` / `<!-- graph -->` markers; this test reads both, reads every
//! `crate::…` path in `forwarder/src` (tests included, comments not), and fails when
//!
//! * a module imports one on its own layer or a higher one (a back-arrow), naming the file
//!   and line;
//! * a module of `lib.rs` is missing from the layer table, or the table names one that does
//!   not exist;
//! * the graph in the document differs from the code's (it prints the right one), so the
//!   picture cannot drift;
//! * a sans-IO module (the `<!-- sans-io -->` list: STYLE A1) reads the clock or the OS's
//!   randomness, or reaches a system call or file descriptor, outside its tests.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "a test: a failure to read the sources is the test failing"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// One `crate::` reference: the module named, where.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Import {
    from: String,
    to: String,
    file: String,
    line: usize,
}

#[test]
fn every_import_points_down_the_layers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("../docs/architecture.md"))
        .expect("read docs/architecture.md");
    let layers = parse_layers(&doc).expect("docs/architecture.md: the layer table");
    let declared = lib_modules(&std::fs::read_to_string(root.join("src/lib.rs")).unwrap());
    let listed: BTreeSet<String> = layers.keys().cloned().collect();
    assert_eq!(
        listed, declared,
        "the layer table in docs/architecture.md must list exactly the modules of lib.rs"
    );
    let imports = read_imports(&root.join("src"));
    let wrong = back_arrows(&layers, &imports);
    assert!(
        wrong.is_empty(),
        "imports against the layer order of docs/architecture.md:\n{}",
        wrong.join("\n")
    );
    let graph = render_graph(&layers, &imports);
    let written = section(&doc, "graph").expect("docs/architecture.md: the graph block");
    assert_eq!(
        written.trim(),
        graph.trim(),
        "docs/architecture.md's graph differs from the code's; the code's is:\n{graph}"
    );
}

/// What a sans-IO module may not name outside its tests: the clock, OS randomness, and
/// the ways to a system call or a file descriptor (errno constants from `libc` are data).
const IO_WORDS: &[&str] = &[
    "Instant::now",
    "SystemTime",
    "RandomState",
    "getrandom",
    "std::fs",
    "File::",
    "nix::",
    "libc::c_",
    "libc::sys",
    "std::process",
    "std::thread",
    "std::os::",
    "mio::",
    "tokio::",
    "TcpStream",
    "TcpListener",
    "UdpSocket",
    "unsafe",
];

#[test]
fn the_sans_io_modules_read_no_clock_and_make_no_system_call() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("../docs/architecture.md")).unwrap();
    let pure: BTreeSet<&str> = section(&doc, "sans-io")
        .expect("docs/architecture.md: the sans-io list")
        .split('`')
        .skip(1)
        .step_by(2)
        .collect();
    assert!(pure.contains("engine") && pure.contains("wire"), "{pure:?}");
    let src = root.join("src");
    let mut found = Vec::new();
    for file in rust_files(&src) {
        let rel = file
            .strip_prefix(&src)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let top = rel.split('/').next().unwrap_or("").trim_end_matches(".rs");
        if !pure.contains(top) || rel.starts_with("engine/tests/") || rel == "engine/fake.rs" {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        found.extend(io_words(&rel, &text));
    }
    assert!(
        found.is_empty(),
        "sans-IO code doing I/O:\n{}",
        found.join("\n")
    );
}

#[test]
fn io_in_sans_io_code_is_caught_but_not_in_its_tests() {
    let text = "let t = Instant::now();\n// Instant::now in a comment\n#[cfg(test)]\nmod tests {\n    fn t() { Instant::now(); }\n}\n";
    assert_eq!(
        io_words("engine/mod.rs", text),
        ["engine/mod.rs:1: Instant::now"]
    );
}

/// The I/O words of `text` before its test module.
fn io_words(file: &str, text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut lines = text.lines().enumerate().peekable();
    while let Some((n, raw)) = lines.next() {
        if raw.trim() == "#[cfg(test)]"
            && lines
                .peek()
                .is_some_and(|(_, l)| l.trim_start().starts_with("mod "))
        {
            break;
        }
        let line = raw.split("//").next().unwrap_or("");
        for word in IO_WORDS {
            if line.contains(word) {
                out.push(format!("{file}:{}: {word}", n + 1));
            }
        }
    }
    out
}

/// The check itself fails on a back-arrow (so the test above can fail).
#[test]
fn a_back_arrow_is_caught() {
    let layers = parse_layers(
        "<!-- layers -->\n| layer | modules |\n|---|---|\n| top | `engine` |\n| bottom | `wire`, `frames` |\n<!-- /layers -->",
    )
    .unwrap();
    let mut imports = Vec::new();
    scan(
        "wire",
        "wire/mod.rs",
        "use crate::frames;\n// crate::engine in a comment is no import\nuse crate::{engine::Engine, wire};\n",
        &mut imports,
    );
    let wrong = back_arrows(&layers, &imports);
    assert_eq!(wrong.len(), 2, "{wrong:?}");
    assert!(
        wrong[0].contains("wire/mod.rs:1: wire -> frames"),
        "same layer: {wrong:?}"
    );
    assert!(
        wrong[1].contains("wire/mod.rs:3: wire -> engine"),
        "{wrong:?}"
    );
}

/// Module → rank (0 = the top layer), from the table between the `layers` markers: one row
/// per layer, top first, the layer's modules in backticks in the second column.
fn parse_layers(doc: &str) -> Option<BTreeMap<String, usize>> {
    let table = section(doc, "layers")?;
    let mut out = BTreeMap::new();
    let rows = table
        .lines()
        .filter(|l| l.starts_with('|') && !l.starts_with("|---") && !l.starts_with("| layer"));
    for (rank, row) in rows.enumerate() {
        let modules = row.split('|').nth(2)?;
        for m in modules.split('`').skip(1).step_by(2) {
            out.insert(m.to_string(), rank);
        }
    }
    Some(out)
}

/// The text between `<!-- NAME -->` and `<!-- /NAME -->`.
fn section<'a>(doc: &'a str, name: &str) -> Option<&'a str> {
    let start = doc.find(&format!("<!-- {name} -->"))? + name.len() + 9;
    let end = doc.find(&format!("<!-- /{name} -->"))?;
    doc.get(start..end)
}

fn lib_modules(lib: &str) -> BTreeSet<String> {
    lib.lines()
        .filter_map(|l| l.trim().strip_prefix("pub mod "))
        .map(|m| m.trim_end_matches(';').to_string())
        .collect()
}

fn read_imports(src: &Path) -> Vec<Import> {
    let mut out = Vec::new();
    for file in rust_files(src) {
        let rel = file
            .strip_prefix(src)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let Some(top) = rel.split('/').next().map(|t| t.trim_end_matches(".rs")) else {
            continue;
        };
        if top == "lib" || top == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        scan(top, &rel, &text, &mut out);
    }
    out
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// Every `crate::NAME` and `crate::{NAME…, NAME…}` outside `//` comments of `text`.
fn scan(top: &str, file: &str, text: &str, out: &mut Vec<Import>) {
    let mut pending_group: Option<(String, usize)> = None;
    for (n, raw) in text.lines().enumerate() {
        let line = raw.split("//").next().unwrap_or("");
        let mut rest = line;
        if let Some((mut group, start)) = pending_group.take() {
            group.push_str(line);
            if close_group(&group) {
                push_group(top, file, start, &group, out);
            } else {
                pending_group = Some((group, start));
            }
            continue;
        }
        while let Some(at) = rest.find("crate::") {
            let before = rest[..at].chars().next_back();
            rest = &rest[at + 7..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
                continue;
            }
            if rest.starts_with('{') {
                let group = rest.to_string();
                if close_group(&group) {
                    push_group(top, file, n + 1, &group, out);
                } else {
                    pending_group = Some((group, n + 1));
                }
                break;
            }
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            push(top, file, n + 1, &name, out);
        }
    }
}

fn close_group(group: &str) -> bool {
    let mut depth = 0i32;
    for c in group.chars() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return true;
                }
            }
            _ => {}
        }
    }
    false
}

/// The first name of each top-level item of a `{a::b, c, d::{e, f}}` group.
fn push_group(top: &str, file: &str, line: usize, group: &str, out: &mut Vec<Import>) {
    let mut depth = 0;
    let mut item_start = false;
    let mut name = String::new();
    for c in group.chars() {
        let ident = c.is_alphanumeric() || c == '_';
        if depth == 1 && item_start && ident {
            name.push(c);
            continue;
        }
        if !name.is_empty() {
            push(top, file, line, &std::mem::take(&mut name), out);
            item_start = false;
        }
        match c {
            '{' => {
                depth += 1;
                item_start = depth == 1;
            }
            '}' => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            ',' if depth == 1 => item_start = true,
            _ => {}
        }
    }
}

fn push(top: &str, file: &str, line: usize, name: &str, out: &mut Vec<Import>) {
    if name.is_empty() || name == "self" || name == top {
        return;
    }
    out.push(Import {
        from: top.to_string(),
        to: name.to_string(),
        file: file.to_string(),
        line,
    });
}

fn back_arrows(layers: &BTreeMap<String, usize>, imports: &[Import]) -> Vec<String> {
    imports
        .iter()
        .filter_map(|i| {
            let from = layers.get(&i.from)?;
            match layers.get(&i.to) {
                Some(to) if to > from => None,
                Some(_) => Some(format!(
                    "{}:{}: {} -> {} (a lower layer may not import its own or a higher one)",
                    i.file, i.line, i.from, i.to
                )),
                None => Some(format!(
                    "{}:{}: {} -> {} (not in the layer table)",
                    i.file, i.line, i.from, i.to
                )),
            }
        })
        .collect()
}

/// One line per module, top layer first: `module → what it imports`.
fn render_graph(layers: &BTreeMap<String, usize>, imports: &[Import]) -> String {
    let mut edges: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for i in imports {
        edges.entry(&i.from).or_default().insert(&i.to);
    }
    let mut modules: Vec<(&usize, &String)> = layers.iter().map(|(m, r)| (r, m)).collect();
    modules.sort();
    let mut out = String::from("```\n");
    for (_, m) in modules {
        let to = edges.get(m.as_str()).map_or_else(String::new, |s| {
            s.iter().copied().collect::<Vec<_>>().join(", ")
        });
        let arrow = if to.is_empty() {
            "(no imports)".to_string()
        } else {
            format!("→ {to}")
        };
        out.push_str(&format!("{m:<9} {arrow}\n"));
    }
    out.push_str("```");
    out
}
