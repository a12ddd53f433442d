//! A fresh PostgreSQL database for one bench run, on a server the caller runs (`scripts/postgres.sh`).

use anyhow::Context;
use sqlx::Connection;
use sqlx::postgres::PgConnection;

/// A database made for this run; [`Database::remove`] removes it.
pub struct Database {
    /// The server's URL, as given.
    server: String,
    name: String,
    /// The URL of the new database, for `--database-url`.
    pub url: String,
}

impl Database {
    /// Creates a database with a fresh name on the server at `server`.
    pub async fn create(server: &str) -> anyhow::Result<Database> {
        let name = format!("bench_{}", uuid::Uuid::new_v4().simple());
        let url = llm_router::store::postgres::with_database(server, &name)?;
        let mut conn = PgConnection::connect(server).await.with_context(|| format!("connecting to {server}"))?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .with_context(|| format!("creating database {name}"))?;
        conn.close().await?;
        Ok(Database { server: server.to_owned(), name, url })
    }

    /// Removes the database (its routers must have stopped).
    pub async fn remove(self) -> anyhow::Result<()> {
        let mut conn = PgConnection::connect(&self.server).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)))
            .execute(&mut conn)
            .await
            .with_context(|| format!("dropping database {}", self.name))?;
        conn.close().await?;
        Ok(())
    }
}
