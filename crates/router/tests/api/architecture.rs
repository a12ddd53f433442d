//! The layers of `docs/architecture.md`, held to the code: every `crate::…` reference in a module's source points to
//! a module of a lower rank, and no module uses a crate its row forbids.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// One row of the table: rank, and the crates the module must not use.
struct Layer {
    rank: u32,
    forbidden: Vec<String>,
}

fn table(doc: &str) -> HashMap<String, Layer> {
    let mut layers = HashMap::new();
    for line in doc.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // `| rank | `module` | what | must not use |`
        let [_, rank, module, _, forbidden, _] = cells.as_slice() else { continue };
        let Ok(rank) = rank.parse::<u32>() else { continue };
        let module = module.trim_matches('`').to_owned();
        let forbidden = forbidden.split(',').map(|c| c.trim().to_owned()).filter(|c| !c.is_empty()).collect();
        layers.insert(module, Layer { rank, forbidden });
    }
    layers
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without its unit tests and comments.
fn code(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap_or_default();
    text.lines().filter(|line| !line.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n")
}

/// The top-level modules named by `crate::NAME` in `code`.
fn references(code: &str) -> Vec<String> {
    code.match_indices("crate::")
        .filter(|(at, _)| !code[..*at].ends_with(|c: char| c.is_alphanumeric() || c == '_'))
        .map(|(at, _)| {
            code[at + "crate::".len()..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>()
        })
        .collect()
}

#[test]
fn imports_point_down() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("../../docs/architecture.md")).expect("docs/architecture.md");
    let layers = table(&doc);
    assert!(layers.len() >= 21, "the table of docs/architecture.md was not found: {} rows", layers.len());
    let src = root.join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut problems = Vec::new();
    for file in &files {
        let relative = file.strip_prefix(&src).expect("under src");
        let first = relative.components().next().expect("a component").as_os_str().to_string_lossy().into_owned();
        let module = first.trim_end_matches(".rs").to_owned();
        if module == "lib" || module == "main" {
            continue;
        }
        let Some(layer) = layers.get(&module) else {
            problems.push(format!("{}: module `{module}` is not in docs/architecture.md", relative.display()));
            continue;
        };
        let code = code(&std::fs::read_to_string(file).expect("read"));
        for target in references(&code) {
            if target == module {
                continue;
            }
            match layers.get(&target) {
                Some(other) if other.rank < layer.rank => {}
                Some(other) => problems.push(format!(
                    "{}: `{module}` (rank {}) refers to `{target}` (rank {}), which is not below it",
                    relative.display(),
                    layer.rank,
                    other.rank
                )),
                None => problems.push(format!("{}: refers to unknown module `{target}`", relative.display())),
            }
        }
        for forbidden in &layer.forbidden {
            if code.contains(&format!("{forbidden}::")) {
                problems.push(format!("{}: `{module}` must not use {forbidden}", relative.display()));
            }
        }
    }
    assert!(problems.is_empty(), "imports that break the layers of docs/architecture.md:\n{}", problems.join("\n"));
}

#[test]
fn the_check_sees_an_upward_import() {
    let layers = table("| 1 | `model` | x | axum |\n| 2 | `store` | y | |");
    assert_eq!(layers["model"].rank, 1);
    assert_eq!(layers["model"].forbidden, vec!["axum".to_owned()]);
    assert!(layers["store"].forbidden.is_empty());
    let code = code("use crate::store::Store;\n// crate::app in a comment\nfn f() { my_crate::x(); }");
    assert_eq!(references(&code), vec!["store".to_owned()]);
}
