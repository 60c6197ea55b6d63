//! The layering of `src/`: every dependency between its top-level modules
//! points one way, down this list, as docs/ARCHITECTURE.md's table says.
//! A module may name (`crate::<module>`, `$crate::<module>`, or through
//! enough `super::`s to reach the crate's root) only the modules it lists;
//! a lower one naming a higher one fails this test, with the file and line.
//! What could reach around the check fails it too: `crate` other than at
//! the head of a path (`use crate as x`), a glob of the crate's root, and
//! a name at the root that is no module (a re-export in `lib.rs`).
//!
//! The files are read as Rust tokens: comments and the insides of string
//! and character literals are not code, a `use` group may span lines, and
//! inline `mod x { ... }` blocks count as a level for `super`.

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

/// What a file refers to that is not a module of `LAYERS` (and so is
/// never allowed).
const GLOB: &str = "a glob of the crate's root";
const ALIAS: &str = "`crate` other than at the head of a path";

/// The module path of a file of `src/` (`None`: the crate roots, which
/// wire modules together): `pubsub/sessions/tests.rs` is
/// `pubsub::sessions::tests`, `pubsub/mod.rs` is `pubsub`.
fn module_path(relative: &Path) -> Option<Vec<String>> {
    let mut path: Vec<String> = relative
        .components()
        .map(|c| c.as_os_str().to_str().unwrap().to_string())
        .collect();
    let last = path.pop()?;
    match last.strip_suffix(".rs")? {
        "lib" | "main" if path.is_empty() => return None,
        "mod" => {}
        name => path.push(name.to_string()),
    }
    Some(path)
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

/// `text` with comments and the insides of string and character literals
/// blanked (newlines kept, so lines still count).
fn code_of(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
        } else if c == '"' {
            // A raw string's hashes come before its quote: r#"..."#.
            let hashes = chars[..i].iter().rev().take_while(|&&h| h == '#').count();
            let raw = i > hashes && chars[i - hashes - 1] == 'r';
            out.push('"');
            i += 1;
            while i < chars.len() {
                if !raw && chars[i] == '\\' {
                    out.push(' ');
                    out.push(blank(chars.get(i + 1).copied().unwrap_or(' ')));
                    i += 2;
                    continue;
                }
                if chars[i] == '"' && (0..hashes).all(|k| chars.get(i + 1 + k) == Some(&'#')) {
                    out.push('"');
                    i += 1;
                    break;
                }
                out.push(blank(chars[i]));
                i += 1;
            }
        } else if c == '\'' && (next == Some('\\') || chars.get(i + 2) == Some(&'\'')) {
            // A character literal ('x', '\'', '\u{..}'); not a lifetime.
            out.push(' ');
            i += 1;
            while i < chars.len() {
                if chars[i] == '\\' {
                    out.push_str("  ");
                    i += 2;
                } else if chars[i] == '\'' {
                    out.push(' ');
                    i += 1;
                    break;
                } else {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// Tokens of `code` with their lines: identifiers (`$crate` as one),
/// `::`, and single punctuation characters.
fn tokens(code: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (n, line) in code.lines().enumerate() {
        let chars: Vec<char> = line.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            let ident = |c: char| c.is_alphanumeric() || c == '_';
            if ident(c) || (c == '$' && chars.get(i + 1).is_some_and(|&d| ident(d))) {
                let start = i;
                i += 1;
                while i < chars.len() && ident(chars[i]) {
                    i += 1;
                }
                out.push((n + 1, chars[start..i].iter().collect()));
            } else if c == ':' && chars.get(i + 1) == Some(&':') {
                out.push((n + 1, "::".to_string()));
                i += 2;
            } else {
                if !c.is_whitespace() {
                    out.push((n + 1, c.to_string()));
                }
                i += 1;
            }
        }
    }
    out
}

/// The first names of a path's continuation at `tokens[at..]` (just past
/// the `::` after the root): one name, or the first of each item of a
/// `{ ... }` group, however nested and however many lines it spans.
fn first_names(tokens: &[(usize, String)], at: usize) -> Vec<(usize, String)> {
    let Some((line, first)) = tokens.get(at) else {
        return Vec::new();
    };
    if first == "*" {
        return vec![(*line, GLOB.to_string())];
    }
    if first != "{" {
        return vec![(*line, first.clone())];
    }
    let mut names = Vec::new();
    let mut depth = 0;
    let mut item_start = true;
    for (line, token) in &tokens[at..] {
        match token.as_str() {
            "{" => {
                depth += 1;
                item_start = depth == 1;
                continue;
            }
            "}" => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            "," if depth == 1 => {
                item_start = true;
                continue;
            }
            "*" if depth == 1 && item_start => names.push((*line, GLOB.to_string())),
            name if depth == 1 && item_start && name != "self" => names.push((*line, name.to_string())),
            _ => {}
        }
        item_start = false;
    }
    names
}

/// The crate-root names a file refers to, with their lines: what follows
/// `crate::` or `$crate::`, or as many `super::`s as reach the root from
/// the module the code is in (`depth`: the file's module path's length,
/// plus the inline `mod` blocks around the code). `crate` anywhere else
/// is `ALIAS`.
fn named(depth: usize, text: &str) -> Vec<(usize, String)> {
    let tokens = tokens(&code_of(text));
    let is = |i: usize, s: &str| tokens.get(i).is_some_and(|(_, t)| t == s);
    let mut names = Vec::new();
    // Brace depths at which inline modules opened.
    let mut inline: Vec<usize> = Vec::new();
    let mut braces = 0;
    for i in 0..tokens.len() {
        let (line, token) = (&tokens[i].0, tokens[i].1.as_str());
        match token {
            "{" => {
                if i >= 2 && is(i - 2, "mod") {
                    inline.push(braces);
                }
                braces += 1;
            }
            "}" => {
                braces -= 1;
                if inline.last() == Some(&braces) {
                    inline.pop();
                }
            }
            "crate" | "$crate" => {
                if is(i + 1, "::") {
                    names.extend(first_names(&tokens, i + 2));
                } else if !(i >= 2 && is(i - 1, "(") && (is(i - 2, "pub") || is(i - 2, "in"))) {
                    // Not `pub(crate)` or `pub(in crate)`.
                    names.push((*line, ALIAS.to_string()));
                }
            }
            "super" if i == 0 || !is(i - 1, "::") => {
                let mut k = 1;
                while is(i + 2 * k - 1, "::") && is(i + 2 * k, "super") {
                    k += 1;
                }
                if is(i + 2 * k - 1, "::") && k >= depth + inline.len() {
                    names.extend(first_names(&tokens, i + 2 * k));
                }
            }
            _ => {}
        }
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
        if let Some(path) = module_path(file.strip_prefix(&src).unwrap()) {
            assert!(
                order.contains(&path[0].as_str()),
                "{} is in no layer: add it to LAYERS",
                path[0]
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
        let Some(path) = module_path(relative) else { continue };
        let module = path[0].as_str();
        let allowed = LAYERS
            .iter()
            .find(|(m, _)| *m == module)
            .map_or(&[][..], |(_, allowed)| *allowed);
        let text = std::fs::read_to_string(file).unwrap();
        for (line, dep) in named(path.len(), &text) {
            if dep != module && !allowed.contains(&dep.as_str()) {
                wrong.push(format!("src/{}:{line}: {module} uses {dep}", relative.display()));
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
    let names = |depth: usize, text: &str| -> Vec<String> { named(depth, text).into_iter().map(|(_, n)| n).collect() };
    assert_eq!(names(2, "use crate::conn::shard::Shard;"), ["conn"]);
    assert_eq!(
        names(2, "    let x = crate::pubsub::Hub::new(crate::ws::X);"),
        ["pubsub", "ws"]
    );
    assert_eq!(names(2, "// crate::conn in a comment"), Vec::<String>::new());
    assert_eq!(
        names(2, "/* crate::conn /* nested */ crate::ws */"),
        Vec::<String>::new()
    );
    assert_eq!(names(2, "let notcrate::x = 1;"), Vec::<String>::new());
    assert_eq!(names(2, "pub(crate) fn f() {}"), Vec::<String>::new());
    // A group, nested or over several lines: the first name of each item.
    assert_eq!(names(2, "use crate::{conn, ws::Opcode};"), ["conn", "ws"]);
    assert_eq!(
        names(2, "use crate::{\n    ws::{a, b},\n    conn::shard::Shard,\n};"),
        ["ws", "conn"]
    );
    // A `//` or a quote inside a literal is not a comment's start.
    assert_eq!(names(2, "f(\"http://x\", crate::conn::X);"), ["conn"]);
    assert_eq!(names(2, "f(r#\"\"//\"#, '\"', crate::conn::X);"), ["conn"]);
    assert_eq!(names(2, "f(\"crate::conn\");"), Vec::<String>::new());
    assert_eq!(names(2, "fn f<'a>(x: &'a str) -> crate::ws::X {}"), ["ws"]);
    // Macros.
    assert_eq!(names(2, "$crate::server::x!()"), ["server"]);
    // `super` reaches the root from a top-level file or mod.rs at once,
    // from deeper files (or inline modules) with more.
    assert_eq!(names(1, "use super::server::Shutdown;"), ["server"]);
    assert_eq!(names(2, "use super::server::Shutdown;"), Vec::<String>::new());
    assert_eq!(names(2, "use super::super::{conn, ws};"), ["conn", "ws"]);
    assert_eq!(
        names(1, "mod tests { use super::*; use super::super::conn; }"),
        ["conn"]
    );
    assert_eq!(names(1, "mod a { }\nuse super::conn;"), ["conn"]);
    // What could reach around the check.
    assert_eq!(names(2, "use crate as root;"), [ALIAS]);
    assert_eq!(names(2, "use crate::*;"), [GLOB]);
    assert_eq!(names(1, "use super::*;"), [GLOB]);
    assert_eq!(names(2, "use crate::Shard;"), ["Shard"]);
    let path = |p: &str| module_path(Path::new(p)).map(|v| v.join("::"));
    assert_eq!(path("conn/shard/tests.rs").as_deref(), Some("conn::shard::tests"));
    assert_eq!(path("pubsub/mod.rs").as_deref(), Some("pubsub"));
    assert_eq!(path("tls.rs").as_deref(), Some("tls"));
    assert_eq!(path("lib.rs"), None);
}
