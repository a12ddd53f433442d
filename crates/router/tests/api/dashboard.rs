//! The dashboard's files (`crates/router/assets`): each is served under `/dashboard/<name>` with its content type,
//! the Content-Security-Policy and the other security headers, byte for byte as on disk; every module a script
//! imports is one of them; any other name is 404.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use reqwest::Method;

use crate::helpers::*;

fn assets_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets")
}

/// The files of the dashboard, by name.
fn asset_names() -> BTreeSet<String> {
    std::fs::read_dir(assets_dir())
        .expect("read assets")
        .map(|entry| entry.expect("entry").file_name().into_string().expect("UTF-8 name"))
        .collect()
}

fn content_type_of(name: &str) -> &'static str {
    match Path::new(name).extension().and_then(|ext| ext.to_str()) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        other => panic!("{name}: no content type known for {other:?}"),
    }
}

/// The relative modules a script imports: `import … from './x.js';` and `import './x.js';`, one statement on one
/// line or several.
fn imported_modules(script: &str) -> Vec<String> {
    let mut modules = Vec::new();
    let mut statement: Option<String> = None;
    for line in script.lines() {
        if line.starts_with("import ") {
            statement = Some(String::new());
        }
        let Some(text) = statement.as_mut() else { continue };
        text.push_str(line);
        if line.trim_end().ends_with(';') {
            if let Some(start) = text.find("'./") {
                let name = &text[start + 3..];
                modules.push(name[..name.find('\'').expect("closing quote")].to_owned());
            }
            statement = None;
        }
    }
    modules
}

#[tokio::test]
async fn every_file_is_served_with_its_type_and_the_security_headers() {
    let app = TestApp::spawn().await;
    let names = asset_names();
    assert!(names.contains("index.html") && names.contains("app.js") && names.contains("style.css"), "{names:?}");
    assert!(names.len() > 3, "the script is split into modules: {names:?}");
    let mut paths: Vec<(String, String)> =
        names.iter().map(|name| (format!("/dashboard/{name}"), name.clone())).collect();
    paths.push(("/dashboard".to_owned(), "index.html".to_owned()));
    for (path, name) in paths {
        let answer = app.request(Method::GET, &path).send().await.expect("send");
        assert_eq!(answer.status(), 200, "{path}");
        let header = |key: &str| answer.headers().get(key).and_then(|v| v.to_str().ok()).map(str::to_owned);
        assert_eq!(header("content-type").as_deref(), Some(content_type_of(&name)), "{path}");
        let csp = header("content-security-policy").unwrap_or_default();
        assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'"), "{path}: {csp}");
        assert_eq!(header("x-content-type-options").as_deref(), Some("nosniff"), "{path}");
        assert_eq!(header("referrer-policy").as_deref(), Some("no-referrer"), "{path}");
        assert_eq!(header("cache-control").as_deref(), Some("no-cache"), "{path}");
        let on_disk = std::fs::read(assets_dir().join(&name)).expect("read asset");
        assert!(answer.bytes().await.expect("body") == on_disk, "{path} is not the current {name}");
    }
}

#[tokio::test]
async fn app_js_imports_every_module_and_any_other_name_is_not_found() {
    let names = asset_names();
    let page = std::fs::read_to_string(assets_dir().join("index.html")).expect("index.html");
    assert!(page.contains(r#"<script type="module" src="/dashboard/app.js"></script>"#));
    let entry = std::fs::read_to_string(assets_dir().join("app.js")).expect("app.js");
    let mut listed: BTreeSet<String> = imported_modules(&entry).into_iter().collect();
    listed.insert("app.js".to_owned());
    let scripts: BTreeSet<String> = names.iter().filter(|name| name.ends_with(".js")).cloned().collect();
    // app.js imports every module itself, so the browser asks for them all at once.
    assert_eq!(listed, scripts, "app.js imports exactly the modules of the dashboard");
    for script in &scripts {
        let code = std::fs::read_to_string(assets_dir().join(script)).expect("module");
        for module in imported_modules(&code) {
            assert!(names.contains(&module), "{script} imports ./{module}, which is not a dashboard file");
        }
    }

    let app = TestApp::spawn().await;
    for path in ["/dashboard/missing.js", "/dashboard/App.js", "/dashboard/js/app.js", "/dashboard/app.js.map"] {
        let answer = app.request(Method::GET, path).send().await.expect("send");
        assert_eq!(answer.status(), 404, "{path}");
    }
}
