//! The PostgreSQL backend of [`Storage`](crate::store::Storage), shared by any number of routers (SPEC §11).

/// Handle to a PostgreSQL database.
#[derive(Debug, Clone)]
pub struct PgStore {}

/// Opens the PostgreSQL database at `url` as the router's store.
pub async fn open(url: &str) -> anyhow::Result<crate::store::Store> {
    anyhow::bail!("PostgreSQL ({}) is not available yet", redact(url))
}

/// `url` without its password, for logs and errors.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{}@{}", &url[..scheme + 3], user, &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}
