//! The layering the design asks for, checked on the source itself (`cargo test -p peft --test
//! architecture`):
//! - no import cycle between the library's top-level modules (`crate::X` paths, `use` groups
//!   and the crate root's re-exports resolved to the module that defines them);
//! - the PEFT wrapper and the trainer name no method: `peft_model/` and `train/` mention no
//!   tuner (`lora`, `ia3`, ...) outside comments, string literals included.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The source without comments; string and char literals blanked too when `strings` is false.
fn strip(s: &str, keep_strings: bool) -> String {
    let b: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == '/' && b.get(i + 1) == Some(&'/') {
            while i < b.len() && b[i] != '\n' {
                i += 1;
            }
        } else if b[i] == '/' && b.get(i + 1) == Some(&'*') {
            i += 2;
            while i + 1 < b.len() && !(b[i] == '*' && b[i + 1] == '/') {
                i += 1;
            }
            i += 2;
        } else if b[i] == '"' {
            out.push('"');
            i += 1;
            while i < b.len() && b[i] != '"' {
                if b[i] == '\\' {
                    if keep_strings {
                        out.push(b[i]);
                    }
                    i += 1;
                }
                if keep_strings {
                    out.push(b[i]);
                } else if b[i] == '\n' {
                    out.push('\n');
                }
                i += 1;
            }
            out.push('"');
            i += 1;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// The top-level module a file belongs to (`tuners/lora/mod.rs` → `tuners`).
fn top_module(path: &Path) -> String {
    let rel = path.strip_prefix(src()).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// What the crate root re-exports: name → defining top-level module.
fn root_reexports() -> BTreeMap<String, String> {
    let lib = strip(
        &std::fs::read_to_string(src().join("lib.rs")).unwrap(),
        false,
    );
    let mut out = BTreeMap::new();
    for stmt in lib.split(';') {
        let stmt = stmt.trim();
        let Some(rest) = stmt.strip_prefix("pub use ") else {
            continue;
        };
        let module = rest.split("::").next().unwrap().trim().to_string();
        let names = match (rest.find('{'), rest.rfind('}')) {
            (Some(a), Some(b)) => rest[a + 1..b].to_string(),
            _ => rest.rsplit("::").next().unwrap().to_string(),
        };
        for n in names.split(',') {
            let n = n.trim();
            let n = n.rsplit("::").next().unwrap_or(n);
            let n = n.split(" as ").last().unwrap().trim();
            if !n.is_empty() {
                out.insert(n.to_string(), module.clone());
            }
        }
    }
    // Macros exported at the crate root.
    out.insert("impl_modules".into(), "layers".into());
    out
}

/// The first path segments of `crate::...` references in `code`.
fn crate_refs(code: &str) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    for (pos, _) in code.match_indices("crate::") {
        let before = code[..pos].chars().last();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        let line = code[..pos].matches('\n').count() + 1;
        let rest = &code[pos + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // A use group: the first segment of each top-level item.
            let mut depth = 0;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.push((first_segment(&item), line));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
            out.push((first_segment(&item), line));
        } else {
            out.push((first_segment(rest), line));
        }
    }
    out.retain(|(s, _)| !s.is_empty());
    out
}

fn first_segment(s: &str) -> String {
    s.trim()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

#[test]
fn no_import_cycle_between_top_level_modules() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let modules: BTreeSet<String> = files.iter().map(|f| top_module(f)).collect();
    let reexports = root_reexports();
    // edge → where it comes from (file:line), for the message.
    let mut edges: BTreeMap<(String, String), String> = BTreeMap::new();
    for f in &files {
        let from = top_module(f);
        if from == "lib" {
            continue;
        }
        let code = strip(&std::fs::read_to_string(f).unwrap(), false);
        for (seg, line) in crate_refs(&code) {
            let to = if modules.contains(&seg) {
                seg
            } else if let Some(m) = reexports.get(&seg) {
                m.clone()
            } else {
                panic!(
                    "{}:{line}: `crate::{seg}` is neither a module nor a root re-export",
                    f.display()
                )
            };
            if to != from {
                let at = format!("{}:{line}", f.strip_prefix(src()).unwrap().display());
                edges.entry((from.clone(), to)).or_insert(at);
            }
        }
    }
    // Depth-first search for a cycle.
    let graph: BTreeMap<&str, Vec<&str>> = modules
        .iter()
        .map(|m| {
            let next = edges
                .keys()
                .filter(|(a, _)| a == m)
                .map(|(_, b)| b.as_str())
                .collect();
            (m.as_str(), next)
        })
        .collect();
    fn visit<'a>(
        m: &'a str,
        graph: &BTreeMap<&'a str, Vec<&'a str>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<&'a str>> {
        if let Some(i) = path.iter().position(|p| *p == m) {
            let mut cycle = path[i..].to_vec();
            cycle.push(m);
            return Some(cycle);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m);
        for next in graph.get(m).into_iter().flatten() {
            if let Some(c) = visit(next, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m);
        None
    }
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        if let Some(cycle) = visit(m, &graph, &mut Vec::new(), &mut done) {
            let why: Vec<String> = cycle
                .windows(2)
                .map(|w| {
                    let at = &edges[&(w[0].to_string(), w[1].to_string())];
                    format!("{} -> {} ({at})", w[0], w[1])
                })
                .collect();
            panic!("import cycle: {}", why.join(", "));
        }
    }
    // The layering the design describes holds, not just acyclicity.
    for (from, to) in [
        ("layers", "models"),
        ("layers", "tuners"),
        ("models", "tuners"),
        ("tuners", "peft_model"),
        ("generation", "peft_model"),
        ("io", "layers"),
    ] {
        assert!(
            !edges.contains_key(&(from.to_string(), to.to_string())),
            "{from} must not depend on {to} ({})",
            edges[&(from.to_string(), to.to_string())]
        );
    }
}

/// Where `name` occurs as (the start of) a word: not preceded by a lowercase letter or digit, so
/// `use_dora`, `LoraConfig` and `AdaLoRA` count and `several` or `adorable` do not.
fn mentions(code: &str, name: &str) -> Vec<usize> {
    let lower = code.to_lowercase();
    lower
        .match_indices(name)
        .filter(|(i, _)| {
            !code[..*i]
                .chars()
                .last()
                .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        })
        .map(|(i, _)| code[..i].matches('\n').count() + 1)
        .collect()
}

#[test]
fn wrapper_and_trainer_name_no_method() {
    let names = [
        "lora", "adalora", "dora", "pissa", "olora", "ia3", "loha", "lokr", "vera", "lycoris",
    ];
    let mut files = Vec::new();
    rust_files(&src().join("peft_model"), &mut files);
    rust_files(&src().join("train"), &mut files);
    assert!(files.len() > 5, "found {files:?}");
    let mut found = Vec::new();
    for f in &files {
        let code = strip(&std::fs::read_to_string(f).unwrap(), true);
        for n in names {
            for line in mentions(&code, n) {
                found.push(format!(
                    "{}:{line}: `{n}`",
                    f.strip_prefix(src()).unwrap().display()
                ));
            }
        }
    }
    assert!(
        found.is_empty(),
        "method names outside tuners/:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_checks_see_what_they_look_for() {
    // The scanners themselves: a cycle-making reference and a method name are found.
    let code = strip(
        "use crate::{io::Weights, tuners::lora::X}; // crate::train\n",
        false,
    );
    let refs: Vec<String> = crate_refs(&code).into_iter().map(|(s, _)| s).collect();
    assert_eq!(refs, ["io", "tuners"]);
    let code = strip(
        "let s = \"use_dora\"; // lora\nlet several = AdaLoRA;",
        true,
    );
    assert_eq!(mentions(&code, "dora"), [1]);
    assert_eq!(mentions(&code, "adalora"), [2]);
    assert!(mentions(&code, "lora").is_empty());
    assert!(mentions(&code, "vera").is_empty());
}
