//! The node's identity (id and token), kept in `node.json` in the state directory so a restarted agent is the same
//! node. The file is readable by its owner only (mode 0600) and replaced atomically (temporary file, flush, rename),
//! so a crash never leaves half a token behind.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// File name of the identity inside the state directory.
pub const FILE_NAME: &str = "node.json";

/// The id the router gave this node and the secret that proves it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub node_id: Uuid,
    pub node_token: String,
}

impl fmt::Debug for Identity {
    /// Never prints the token.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity").field("node_id", &self.node_id).field("node_token", &"<redacted>").finish()
    }
}

/// The identity file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot {action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: io::Error },
    #[error("{path} is not a valid node identity ({cause}); move it away or delete it to register this machine anew")]
    Corrupt { path: PathBuf, cause: String },
}

/// Where the identity lives.
#[derive(Debug, Clone)]
pub struct IdentityStore {
    dir: PathBuf,
}

impl IdentityStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        IdentityStore { dir: dir.into() }
    }

    /// Path of the identity file.
    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    /// The stored identity, or `None` when this machine has none yet.
    pub fn load(&self) -> Result<Option<Identity>, IdentityError> {
        let path = self.path();
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(IdentityError::Io { action: "read", path, source }),
        };
        let identity: Identity = serde_json::from_str(&text)
            .map_err(|e| IdentityError::Corrupt { path: path.clone(), cause: e.to_string() })?;
        if identity.node_token.trim().is_empty() {
            return Err(IdentityError::Corrupt { path, cause: "the token is empty".into() });
        }
        Ok(Some(identity))
    }

    /// Create the state directory if needed and check a file can be written in it, so a machine whose identity
    /// could not be kept is stopped before it registers (a node whose token is lost needs an administrator).
    pub fn ensure_writable(&self) -> Result<(), IdentityError> {
        self.create_dir()?;
        let probe = self.dir.join(format!(".{FILE_NAME}.{}.probe", std::process::id()));
        let written = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&probe);
        let _ = fs::remove_file(&probe);
        written.map(drop).map_err(|source| IdentityError::Io { action: "write in", path: self.dir.clone(), source })
    }

    fn create_dir(&self) -> Result<(), IdentityError> {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&self.dir).map_err(|source| IdentityError::Io {
            action: "create the state directory",
            path: self.dir.clone(),
            source,
        })
    }

    /// Replace the stored identity atomically; the file is created with mode 0600, its directory with 0700.
    pub fn save(&self, identity: &Identity) -> Result<(), IdentityError> {
        self.create_dir()?;

        let path = self.path();
        let tmp = self.dir.join(format!(".{FILE_NAME}.{}.tmp", std::process::id()));
        let json = serde_json::to_vec_pretty(identity)
            .map_err(|e| IdentityError::Corrupt { path: path.clone(), cause: format!("could not encode: {e}") })?;
        let written = (|| {
            let mut file = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
            // `mode` applies only to a new file; a leftover temporary file keeps its old mode otherwise.
            file.set_permissions(fs::Permissions::from_mode(0o600))?;
            file.write_all(&json)?;
            file.write_all(b"\n")?;
            file.sync_all()?;
            fs::rename(&tmp, &path)?;
            // Make the rename itself durable.
            File::open(&self.dir)?.sync_all()
        })();
        if let Err(source) = written {
            let _ = fs::remove_file(&tmp);
            return Err(IdentityError::Io { action: "write", path, source });
        }
        Ok(())
    }

    /// Forget the identity (the router no longer knows it). Absent already is fine.
    pub fn clear(&self) -> Result<(), IdentityError> {
        let path = self.path();
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(IdentityError::Io { action: "delete", path, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(token: &str) -> Identity {
        Identity { node_id: Uuid::new_v4(), node_token: token.into() }
    }

    #[test]
    fn saved_identity_is_loaded_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = IdentityStore::new(dir.path().join("state"));
        assert!(store.load().expect("load").is_none());
        let first = identity("secret-1");
        store.save(&first).expect("save");
        assert_eq!(store.load().expect("load"), Some(first));
        let second = identity("secret-2");
        store.save(&second).expect("replace");
        assert_eq!(store.load().expect("load"), Some(second));
        let leftovers: Vec<_> = fs::read_dir(dir.path().join("state"))
            .expect("list")
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from(FILE_NAME)], "no temporary file is left behind");
    }

    #[test]
    fn file_is_private_to_its_owner() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = IdentityStore::new(dir.path().join("state"));
        store.save(&identity("secret")).expect("save");
        let file_mode = fs::metadata(store.path()).expect("stat").permissions().mode() & 0o777;
        assert_eq!(file_mode, 0o600);
        let dir_mode = fs::metadata(dir.path().join("state")).expect("stat").permissions().mode() & 0o777;
        assert_eq!(dir_mode, 0o700);
    }

    #[test]
    fn an_unwritable_state_directory_is_found_before_registering() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = IdentityStore::new(dir.path().join("new"));
        store.ensure_writable().expect("a fresh directory is writable");
        assert!(dir.path().join("new").is_dir());
        assert_eq!(fs::read_dir(dir.path().join("new")).expect("list").count(), 0, "the probe is removed");

        // A regular file where the directory should be cannot hold an identity.
        let blocked = dir.path().join("blocked");
        fs::write(&blocked, "").expect("write");
        let err = IdentityStore::new(&blocked).ensure_writable().expect_err("not a directory");
        assert!(err.to_string().contains("blocked"), "{err}");
    }

    #[test]
    fn clear_forgets_and_is_idempotent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = IdentityStore::new(dir.path());
        store.save(&identity("secret")).expect("save");
        store.clear().expect("clear");
        assert!(store.load().expect("load").is_none());
        store.clear().expect("clear again");
    }

    #[test]
    fn a_corrupt_file_is_reported_not_discarded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = IdentityStore::new(dir.path());
        fs::write(store.path(), "{\"node_id\": 12").expect("write");
        let err = store.load().expect_err("corrupt");
        assert!(err.to_string().contains("delete it to register this machine anew"), "{err}");
        assert!(store.path().exists(), "the file is left for the operator");
        fs::write(store.path(), format!(r#"{{"node_id":"{}","node_token":" "}}"#, Uuid::new_v4())).expect("write");
        assert!(matches!(store.load(), Err(IdentityError::Corrupt { .. })));
    }

    #[test]
    fn debug_never_shows_the_token() {
        let text = format!("{:?}", identity("super-secret-token"));
        assert!(!text.contains("super-secret-token"), "{text}");
        assert!(text.contains("redacted"), "{text}");
    }
}
