//! The layering of `src/`: every dependency between its top-level modules
//! points one way, down this list, as docs/ARCHITECTURE.md's table says.
//! A module may name (`crate::<module>`) only the modules it lists; a
//! lower one naming a higher one fails this test, with the file and line.

use std::path::Path;

/// Top-level modules, lowest first, and the modules each may use.
const LAYERS: &[(&str, &[&str])] = &[
    ("ws", &[]),
    ("tls", &[]),
    ("topic", &[]),
    ("stats", &[]),
    ("sys", &["tls"]),
    ("auth", &["ws", "topic"]),
    ("config", &["ws", "tls", "topic", "auth"]),
    ("proto", &["ws", "topic"]),
    ("pubsub", &["ws", "topic", "stats", "sys", "config", "proto"]),
    (
        "conn",
        &[
            "ws", "tls", "topic", "stats", "sys", "auth", "config", "proto", "pubsub",
        ],
    ),
    (
        "admin",
        &["ws", "topic", "stats", "auth", "config", "proto", "pubsub", "conn"],
    ),
    (
        "server",
        &[
            "ws", "tls", "topic", "stats", "sys", "auth", "config", "proto", "pubsub", "conn", "admin",
        ],
    ),
];

/// The top-level module a file of `src/` belongs to (`None`: the crate
/// roots, which wire modules together).
fn module_of(relative: &Path) -> Option<String> {
    let first = relative.components().next()?.as_os_str().to_str()?.to_string();
    match first.strip_suffix(".rs") {
        Some("lib" | "main") => None,
        Some(name) => Some(name.to_string()),
        None => Some(first),
    }
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The crate modules a line names: `crate::<name>` (or `crate::{a, b}`)
/// outside comments. `super::super` is refused outright: it could reach
/// past a module's own top without naming where.
fn named(line: &str) -> Vec<String> {
    let code = line.split("//").next().unwrap_or("");
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect()
    };
    let mut names = Vec::new();
    for (at, m) in code.match_indices("crate::") {
        if code[..at].ends_with(|c: char| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let rest = &code[at + m.len()..];
        match rest.strip_prefix('{') {
            Some(group) => names.extend(group.split(['}', ',']).map(ident).filter(|n| !n.is_empty())),
            None => names.push(ident(rest)),
        }
    }
    if code.contains("super::super") {
        names.push("super::super".to_string());
    }
    names
}

#[test]
fn the_layers_are_ordered_and_every_module_is_placed() {
    let order: Vec<&str> = LAYERS.iter().map(|(m, _)| *m).collect();
    for (i, (module, allowed)) in LAYERS.iter().enumerate() {
        for dep in *allowed {
            let at = order.iter().position(|m| m == dep);
            assert!(
                at.is_some_and(|at| at < i),
                "{module} may use {dep}, which is not below it"
            );
        }
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    for file in &files {
        if let Some(module) = module_of(file.strip_prefix(&src).unwrap()) {
            assert!(
                order.contains(&module.as_str()),
                "{module} is in no layer: add it to LAYERS"
            );
        }
    }
}

#[test]
fn no_module_uses_one_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut wrong = Vec::new();
    for file in &files {
        let relative = file.strip_prefix(&src).unwrap();
        let Some(module) = module_of(relative) else { continue };
        let allowed = LAYERS
            .iter()
            .find(|(m, _)| *m == module)
            .map_or(&[][..], |(_, allowed)| *allowed);
        let text = std::fs::read_to_string(file).unwrap();
        for (n, line) in text.lines().enumerate() {
            for dep in named(line) {
                if dep != module && !allowed.contains(&dep.as_str()) {
                    wrong.push(format!("src/{}:{}: {module} uses {dep}", relative.display(), n + 1));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "dependencies against the layers:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_check_sees_what_it_checks() {
    assert_eq!(named("use crate::conn::shard::Shard;"), ["conn"]);
    assert_eq!(
        named("    let x = crate::pubsub::Hub::new(crate::ws::X);"),
        ["pubsub", "ws"]
    );
    assert_eq!(named("// crate::conn in a comment"), Vec::<String>::new());
    assert_eq!(named("let notcrate::x = 1;"), Vec::<String>::new());
    assert_eq!(named("use crate::{conn, ws::Opcode};"), ["conn", "ws"]);
    assert_eq!(named("use super::super::x;"), ["super::super"]);
    assert_eq!(module_of(Path::new("conn/shard/tests.rs")).as_deref(), Some("conn"));
    assert_eq!(module_of(Path::new("tls.rs")).as_deref(), Some("tls"));
    assert_eq!(module_of(Path::new("lib.rs")), None);
}
