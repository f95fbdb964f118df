//! Tests of the source tree's shape that review kept finding broken: no import circle between
//! source files, and no launcher kind compared outside `src/launcher/` (STYLE.md, "Seams").

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Every `.rs` file under `src/`, by its path relative to `src/`, with its text up to its
/// unit tests (`#[cfg(test)] mod tests`): what tests import is not the architecture.
fn sources() -> BTreeMap<String, String> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, root, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                let text = std::fs::read_to_string(&path).unwrap();
                let code = match text.find("#[cfg(test)]\nmod tests") {
                    Some(i) => text[..i].to_string(),
                    None => text,
                };
                let code: Vec<&str> = code
                    .lines()
                    .filter(|l| !l.trim_start().starts_with("//"))
                    .collect();
                out.insert(rel, code.join("\n"));
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = BTreeMap::new();
    walk(&root, &root, &mut out);
    out
}

/// The module path of a file: `actors/job/restart.rs` is `[actors, job, restart]`.
fn module_of(file: &str) -> Vec<String> {
    let mut parts: Vec<String> = file
        .trim_end_matches(".rs")
        .split('/')
        .map(str::to_string)
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts
}

/// The deepest file that defines a prefix of `path` (what `use` of that path reads).
fn file_of(path: &[String], files: &BTreeMap<String, String>) -> Option<String> {
    let mut best = files.contains_key("lib.rs").then(|| "lib.rs".to_string());
    for i in 1..=path.len() {
        let stem = path[..i].join("/");
        let found = [format!("{stem}.rs"), format!("{stem}/mod.rs")]
            .into_iter()
            .find(|f| files.contains_key(f));
        match found {
            Some(f) => best = Some(f),
            None => break,
        }
    }
    best
}

/// `a::{b, c::{d, e}}` as `[a::b, a::c::d, a::c::e]`.
fn expand(tree: &str) -> Vec<String> {
    let Some(open) = tree.find('{') else {
        return vec![tree.split(" as ").next().unwrap_or("").trim().to_string()];
    };
    // A `use ` inside a string may run into anything: an unclosed group ends at the text's end.
    let close = tree.rfind('}').filter(|&c| c > open).unwrap_or(tree.len());
    let (prefix, inner) = (&tree[..open], &tree[open + 1..close]);
    let (mut items, mut depth, mut item) = (Vec::new(), 0, String::new());
    for c in inner.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            _ => {}
        }
        if c == ',' && depth == 0 {
            items.push(std::mem::take(&mut item));
        } else {
            item.push(c);
        }
    }
    items.push(item);
    items
        .iter()
        .filter(|i| !i.trim().is_empty())
        .flat_map(|i| expand(i).into_iter().map(|p| format!("{prefix}{p}")))
        .collect()
}

/// The paths a file names: every `use` tree and every inline `crate::` path.
fn paths_in(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("use ") {
        let before = rest[..i].chars().last();
        rest = &rest[i + 4..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let Some(end) = rest.find(';') else { break };
        let tree: String = rest[..end].split_whitespace().collect();
        out.extend(expand(&tree));
    }
    let bytes = code.as_bytes();
    for (i, _) in code.match_indices("crate::") {
        if i > 0 && (bytes[i - 1].is_ascii_alphanumeric() || b"_:".contains(&bytes[i - 1])) {
            continue;
        }
        let path: String = code[i..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        out.push(path.trim_end_matches(':').to_string());
    }
    out
}

/// Import edges between files. A file's use of a module that contains it (its parent's items,
/// which the parent declares) is not an edge between peers and is left out.
fn edges(files: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let mut edges = BTreeMap::new();
    for (file, code) in files {
        let me = module_of(file);
        let mut targets = BTreeSet::new();
        for path in paths_in(code) {
            let mut segs: Vec<String> = path.split("::").map(str::to_string).collect();
            let base = match segs.first().map(String::as_str) {
                Some("crate") => {
                    segs.remove(0);
                    Vec::new()
                }
                Some("super") => {
                    let mut base = me.clone();
                    while segs.first().is_some_and(|s| s == "super") {
                        segs.remove(0);
                        base.pop();
                    }
                    base
                }
                Some("self") => {
                    segs.remove(0);
                    me.clone()
                }
                // A path from one of the file's own submodules (`use job::Step`).
                _ => me.clone(),
            };
            let full: Vec<String> = base.into_iter().chain(segs).collect();
            let Some(target) = file_of(&full, files) else {
                continue;
            };
            let contains_me = me.starts_with(&module_of(&target));
            if target != *file && !contains_me {
                targets.insert(target);
            }
        }
        edges.insert(file.clone(), targets);
    }
    edges
}

/// A cycle through `edges`, if any, as the files along it.
fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    // Depth-first search; a file met again while still on the path closes a cycle.
    fn visit(
        file: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|f| f == file) {
            let mut cycle = path[i..].to_vec();
            cycle.push(file.to_string());
            return Some(cycle);
        }
        if done.contains(file) {
            return None;
        }
        path.push(file.to_string());
        for next in edges.get(file).into_iter().flatten() {
            if let Some(cycle) = visit(next, edges, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(file.to_string());
        None
    }
    let mut done = BTreeSet::new();
    edges
        .keys()
        .find_map(|f| visit(f, edges, &mut Vec::new(), &mut done))
}

#[test]
fn no_import_cycle_between_source_files() {
    let files = sources();
    let edges = edges(&files);
    // The reader must see the edges it is meant to judge, or the test could not fail.
    assert!(edges["actors/job.rs"].contains("actors/worker.rs"));
    assert!(edges["launcher/standby.rs"].contains("launcher/process.rs"));
    assert!(edges["spec/mod.rs"].contains("launcher/kind.rs"));
    if let Some(cycle) = find_cycle(&edges) {
        panic!("import cycle: {}", cycle.join(" -> "));
    }
}

#[test]
fn the_cycle_finder_finds_a_cycle() {
    let files: BTreeMap<String, String> = [
        ("lib.rs", "pub mod a;\npub mod b;"),
        ("a.rs", "use crate::b::{X, y::Z};"),
        ("b.rs", "pub mod y;\nfn f() { crate::a::g() }"),
        ("b/y.rs", "use super::X;"),
    ]
    .into_iter()
    .map(|(f, c)| (f.to_string(), c.to_string()))
    .collect();
    let edges = edges(&files);
    assert_eq!(
        edges["a.rs"],
        BTreeSet::from(["b.rs".to_string(), "b/y.rs".to_string()])
    );
    assert!(edges["b/y.rs"].is_empty(), "a child's use of its parent");
    assert_eq!(
        find_cycle(&edges),
        Some(vec!["a.rs".into(), "b.rs".into(), "a.rs".into()])
    );
}

#[test]
fn no_launcher_kind_compared_outside_the_launchers() {
    let leaks: Vec<String> = sources()
        .into_iter()
        // This file spells the patterns it looks for; unit tests set kinds as their input.
        .filter(|(file, _)| {
            !file.starts_with("launcher/")
                && !file.ends_with("tests.rs")
                && file != "architecture.rs"
        })
        .flat_map(|(file, code)| {
            code.lines()
                .filter(|l| {
                    l.contains("LauncherKind::")
                        || l.contains(".launcher ==")
                        || l.contains(".launcher !=")
                        || l.contains("match spec.launcher")
                        || l.contains("&spec.slurm")
                        || l.contains("&spec.docker")
                })
                .map(|l| format!("{file}: {}", l.trim()))
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(leaks.is_empty(), "launcher kind checks: {leaks:#?}");
}
