//! `llm-router migrate` refusing what it cannot copy from; its copies are tested in `postgres.rs` (and, table by
//! table, in the PostgreSQL backend's own tests).

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_llm-router");

#[tokio::test]
async fn a_missing_sqlite_file_is_a_clear_error_and_creates_nothing() {
    let dir = tempfile::tempdir().expect("dir");
    let missing = dir.path().join("router.db");
    let output = Command::new(BIN)
        .args(["migrate", "--from"])
        .arg(&missing)
        .args(["--to", "postgres://nobody@127.0.0.1:1/none"])
        .output()
        .expect("run");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("is not a file"), "{stderr}");
    assert!(!missing.exists(), "no database was created");
}
