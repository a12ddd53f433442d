//! `llm-router migrate --from <sqlite file> --to postgres://…` (SPEC §11).

use std::path::Path;

/// Copies everything from the SQLite database at `from` into the PostgreSQL database at `to`.
pub async fn run(from: &Path, to: &str) -> anyhow::Result<()> {
    anyhow::bail!("migrating {} to {to} is not available yet", from.display())
}
