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
        let url = with_database(server, &name)?;
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

/// `server` with its database name replaced by `name`, query string kept.
fn with_database(server: &str, name: &str) -> anyhow::Result<String> {
    let (base, query) = server.split_once('?').map_or((server, None), |(base, query)| (base, Some(query)));
    let authority_at = base.find("://").context("not a postgres:// URL")? + 3;
    let path_at = base[authority_at..].find('/').map_or(base.len(), |i| authority_at + i);
    let mut url = format!("{}/{name}", &base[..path_at]);
    if let Some(query) = query {
        url.push('?');
        url.push_str(query);
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_name_replaces_the_servers() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/postgres", "b1").expect("url"),
            "postgres://postgres@127.0.0.1:5432/b1"
        );
        assert_eq!(with_database("postgres://u:p@h:1", "b2").expect("url"), "postgres://u:p@h:1/b2");
        assert_eq!(
            with_database("postgres://u@h/db?sslmode=disable", "b3").expect("url"),
            "postgres://u@h/b3?sslmode=disable"
        );
        assert!(with_database("h/db", "b4").is_err());
    }
}
