//! The layering of `src/`: every dependency between its top-level modules
//! points one way, down this list, as docs/ARCHITECTURE.md's table says.
//! A module may name (`crate::<module>`, `$crate::<module>`, or through
//! enough `super::`s to reach the crate's root) only the modules it lists;
//! a lower one naming a higher one fails this test, with the file and line.
//! What could reach around the check fails it too: `crate` other than at
//! the head of a path (`use crate as x`), a glob of the crate's root, and
//! a name at the root that is no module (a re-export in `lib.rs`).
//!
//! The files are read as Rust tokens (proc-macro2's lexer): comments and
//! literals are not code, a `use` group may span lines, and inline
//! `mod x { ... }` blocks count as a level for `super`.

use std::path::Path;

/// Top-level modules, lowest first, and the modules each may use.
const LAYERS: &[(&str, &[&str])] = &[
    ("ws", &[]),
    ("tls", &[]),
    ("topic", &[]),
    ("stats", &[]),
    ("upstream", &[]),
    ("sys", &["tls"]),
    ("auth", &["ws", "topic"]),
    ("config", &["ws", "tls", "topic", "upstream", "auth"]),
    ("proto", &["ws", "topic"]),
    ("pubsub", &["ws", "topic", "stats", "sys", "config", "proto"]),
    ("cluster", &["ws", "topic", "stats", "config", "pubsub"]),
    (
        "conn",
        &[
            "ws", "tls", "topic", "stats", "upstream", "sys", "auth", "config", "proto", "pubsub",
        ],
    ),
    (
        "admin",
        &["ws", "topic", "stats", "auth", "config", "proto", "pubsub", "conn"],
    ),
    (
        "server",
        &[
            "ws", "tls", "topic", "stats", "upstream", "sys", "auth", "config", "proto", "pubsub", "cluster", "conn",
            "admin",
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

/// Tokens of `text` with their lines (comments and literals are not
/// tokens): identifiers, `::`, other punctuation, and each group's
/// delimiters as tokens of their own.
fn tokens(text: &str) -> Vec<(usize, String)> {
    use proc_macro2::{Delimiter, Spacing, TokenStream, TokenTree};
    fn walk(stream: TokenStream, out: &mut Vec<(usize, String)>) {
        // The last token was the first `:` of a `::`.
        let mut half_path = false;
        for tree in stream {
            let line = tree.span().start().line;
            let was_half = std::mem::take(&mut half_path);
            match tree {
                TokenTree::Group(group) => {
                    let (open, close) = match group.delimiter() {
                        Delimiter::Brace => ("{", "}"),
                        Delimiter::Parenthesis => ("(", ")"),
                        Delimiter::Bracket => ("[", "]"),
                        Delimiter::None => ("", ""),
                    };
                    out.push((line, open.to_string()));
                    walk(group.stream(), out);
                    out.push((group.span_close().start().line, close.to_string()));
                }
                TokenTree::Ident(ident) => out.push((line, ident.to_string())),
                TokenTree::Punct(punct) if punct.as_char() == ':' && was_half => {
                    out.last_mut().unwrap().1 = "::".to_string();
                }
                TokenTree::Punct(punct) => {
                    half_path = punct.as_char() == ':' && punct.spacing() == Spacing::Joint;
                    out.push((line, punct.as_char().to_string()));
                }
                TokenTree::Literal(_) => {}
            }
        }
    }
    let stream: TokenStream = text.parse().expect("src/ lexes as Rust");
    let mut out = Vec::new();
    walk(stream, &mut out);
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
    let tokens = tokens(text);
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
            // `$crate` is `$` then `crate`.
            "crate" => {
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
