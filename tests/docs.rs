//! What docs/CONFIGURATION.md shows is true: its option tables and
//! `sluice --help` name the same flags, under the same headings, in the
//! same order, and its sample files start as written.

mod common;

use std::process::Command;

/// (heading, flags in order) of the option sections of `--help`.
fn help_sections() -> Vec<(String, Vec<String>)> {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let mut sections: Vec<(String, Vec<String>)> = Vec::new();
    for line in text.lines() {
        if !line.starts_with(' ') && line.ends_with(':') {
            sections.push((line.trim_end_matches(':').to_string(), Vec::new()));
        } else if let Some(flag) = line.trim_start().strip_prefix("--") {
            let name = flag.split([' ', '=']).next().unwrap();
            if let Some((_, flags)) = sections.last_mut() {
                flags.push(format!("--{name}"));
            }
        }
    }
    // clap's own section (help, version) and the text after the flags.
    sections.retain(|(heading, flags)| heading != "Options" && !flags.is_empty());
    sections
}

/// (heading, flags in order) of docs/CONFIGURATION.md: the `--flags` in
/// the first column of each table, by `##` heading.
fn doc_sections() -> Vec<(String, Vec<String>)> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/CONFIGURATION.md");
    let text = std::fs::read_to_string(path).unwrap();
    let mut sections: Vec<(String, Vec<String>)> = Vec::new();
    for line in text.lines() {
        if let Some(heading) = line.strip_prefix("## ") {
            sections.push((heading.to_string(), Vec::new()));
        } else if let Some(row) = line.strip_prefix('|') {
            let first = row.split('|').next().unwrap();
            let flags = first
                .split('`')
                .skip(1)
                .step_by(2)
                .filter(|name| name.starts_with("--"))
                .map(String::from);
            if let Some((_, list)) = sections.last_mut() {
                list.extend(flags);
            }
        }
    }
    sections.retain(|(_, flags)| !flags.is_empty());
    sections
}

#[test]
fn the_option_tables_and_help_agree() {
    let help = help_sections();
    let doc = doc_sections();
    let headings = |s: &[(String, Vec<String>)]| s.iter().map(|(h, _)| h.clone()).collect::<Vec<_>>();
    assert_eq!(
        headings(&doc),
        headings(&help),
        "sections of docs/CONFIGURATION.md and --help"
    );
    for ((heading, in_doc), (_, in_help)) in doc.iter().zip(&help) {
        assert_eq!(
            in_doc, in_help,
            "flags under {heading:?}: docs/CONFIGURATION.md, then --help"
        );
    }
    // Every flag the parser knows is in a section.
    let all: usize = help.iter().map(|(_, f)| f.len()).sum();
    assert!(all >= 55, "{help:?}");
}

/// The ```toml blocks of docs/CONFIGURATION.md start a server, as written
/// but for the listeners (moved to free ports) and the JWT secret file
/// (one the test writes where the block names one).
#[test]
fn the_sample_files_start() {
    let doc = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/CONFIGURATION.md");
    let text = std::fs::read_to_string(doc).unwrap();
    let blocks: Vec<&str> = text
        .split("```toml\n")
        .skip(1)
        .map(|rest| rest.split_once("```").unwrap().0)
        .collect();
    assert!(blocks.len() >= 2, "{blocks:?}");
    let dir = std::env::temp_dir().join(format!("sluice-docs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = dir.join("jwt.secret");
    std::fs::write(&secret, [b'k'; 48]).unwrap();
    for (i, block) in blocks.iter().enumerate() {
        let file: String = block
            .lines()
            .map(|line| match line.split_once('=') {
                Some((key, _)) if key.trim() == "jwt_secret_file" => format!("jwt_secret_file = {:?}", secret),
                _ => line.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        let path = dir.join(format!("sample-{i}.toml"));
        std::fs::write(&path, &file).unwrap();
        let mut server = common::Server::start("epoll", &["--config", path.to_str().unwrap()]);
        for route in file.lines().filter_map(|l| l.strip_prefix("path = ")) {
            let route = route.split('"').nth(1).unwrap();
            // The routes are logged just after the address the server waits for.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while !server.log().contains(&format!("route {route} ")) {
                assert!(std::time::Instant::now() < deadline, "{route}: {}", server.log());
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        assert!(server.terminate().success(), "block {i}:\n{file}");
    }
    let _ = std::fs::remove_dir_all(dir);
}
