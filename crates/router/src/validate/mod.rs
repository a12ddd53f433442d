//! Checks on what comes from the network (SPEC §2.1 steps 1–2, §2.2, §9), turning wire types into validated values.
//!
//! Shape errors name the offending field (400 `invalid_request`); a missing or unusable GPU list is its own
//! answer (403 `gpu_required`), checked after the shape so a malformed body never reads as "no GPU". Every string
//! a stranger can send goes through [`text`], so no control character reaches the database, a log line or a
//! terminal; the address rules of SPEC §9 keep the reachability probe away from addresses that can never be a node.
//!
//! `node.rs` checks registrations and heartbeats; this file holds the rules every string and number obeys.
//!
//! Field names are formatted only when a check fails: the heartbeat path allocates nothing here for a valid body.

mod deployment;
mod node;

pub use deployment::{MAX_REPLICAS, deployment, replica_reports};
pub use node::{heartbeat, registration};

use crate::model::tenant::{Limits, MAX_LIMIT, MAX_WEIGHT};
use std::fmt;

/// Why a value from the network was refused. `crate::error` answers it: 400 `invalid_request` or 403
/// `gpu_required`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// A field's shape or value; the message names the field.
    #[error("{0}")]
    Field(String),
    /// No usable GPU in a registration (SPEC §2.1 step 2).
    #[error("{0}")]
    GpuRequired(String),
}

/// The result of a check.
pub type Checked<T> = Result<T, Invalid>;

fn bad_request(message: impl Into<String>) -> Invalid {
    Invalid::Field(message.into())
}

/// Longest accepted machine name, in characters.
pub const MAX_NAME_CHARS: usize = 255;
/// Longest accepted free-text item (model id, tag, runtime name, version), in characters.
pub const MAX_ITEM_CHARS: usize = 512;
/// Most entries accepted in any list.
pub const MAX_LIST_LEN: usize = 1024;
/// Most GPUs in one group of a registration; GPU indexes in heartbeats stay below it.
pub const MAX_GPU_COUNT: i64 = 1024;
/// Largest memory figure accepted, in bytes (1 PiB: no GPU comes near it, and it stays exact in JSON and SQLite).
pub const MAX_MEMORY_BYTES: u64 = 1 << 50;
/// Largest `active_requests` figure a heartbeat may carry (and `load.running`, `load.waiting`).
pub const MAX_ACTIVE_REQUESTS: u64 = llm_router_protocol::MAX_REQUEST_COUNT as u64;
/// Longest accepted GPU uuid, in characters (the driver's are 40).
pub const MAX_UUID_CHARS: usize = 96;
/// Most clock throttle reasons one GPU may report.
pub const MAX_THROTTLE_REASONS: usize = 16;
/// Longest accepted throttle reason name, in characters.
pub const MAX_THROTTLE_REASON_CHARS: usize = 64;
/// Largest error count (ECC) accepted: 2^53, so it stays exact in JSON everywhere, browsers included.
pub const MAX_ERROR_COUNT: u64 = 1 << 53;
/// Largest power draw accepted, in watts (no GPU comes near it).
pub const MAX_POWER_WATTS: f64 = 100_000.0;
/// Shortest accepted password, for new users and the first administrator.
pub const MIN_PASSWORD_CHARS: usize = 12;
/// Longest accepted password, in bytes (hashing cost grows with it).
pub const MAX_PASSWORD_BYTES: usize = 1024;

/// Which control characters a string may hold: none, or line breaks and tabs (multi-line notes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Text {
    /// Names, ids, tags, versions: no control character at all.
    Line,
    /// Free text typed in a text area: `\n` and `\t` are allowed, every other control character is not.
    Lines,
}

/// Refuses control characters (U+0000–U+001F, U+007F) in a string from the network with 400 naming `field`.
pub fn text(field: impl fmt::Display, value: &str, kind: Text) -> Checked<()> {
    match first_control(value, kind) {
        None => Ok(()),
        Some((position, c)) => {
            let allowed = if kind == Text::Lines { " other than line breaks and tabs" } else { "" };
            Err(bad_request(format!(
                "`{field}` contains the control character U+{:04X} at character {}; control characters{allowed} are \
                 not accepted.",
                u32::from(c),
                position + 1
            )))
        }
    }
}

/// The first control character `kind` does not allow, with its character position.
fn first_control(value: &str, kind: Text) -> Option<(usize, char)> {
    // UTF-8 continuation bytes are all >= 0x80, so a byte scan finds exactly the ASCII control characters.
    if !value.bytes().any(|b| b < 0x20 || b == 0x7f) {
        return None;
    }
    value.chars().enumerate().find(|(_, c)| c.is_ascii_control() && !(kind == Text::Lines && matches!(c, '\n' | '\t')))
}

/// A username: 1 to 64 letters, digits, `.`, `_`, `-` or `@`.
pub fn username(username: &str) -> Result<(), Invalid> {
    let valid = !username.is_empty()
        && username.len() <= 64
        && username.chars().all(|c| c.is_ascii_alphanumeric() || "._-@".contains(c));
    if !valid {
        return Err(Invalid::Field(
            "`username` must be 1 to 64 characters of letters, digits, `.`, `_`, `-` or `@`.".to_owned(),
        ));
    }
    Ok(())
}

/// Why `password` may not become a user's password, as the end of a sentence; `None` when it may.
pub fn password_problem(password: &str) -> Option<String> {
    let chars = password.chars().count();
    if chars < MIN_PASSWORD_CHARS {
        return Some(format!("must be at least {MIN_PASSWORD_CHARS} characters long (it has {chars})"));
    }
    if password.len() > MAX_PASSWORD_BYTES {
        return Some(format!("must be at most {MAX_PASSWORD_BYTES} bytes long"));
    }
    first_control(password, Text::Line)
        .map(|(_, c)| format!("must not contain control characters (it contains U+{:04X})", u32::from(c)))
}

/// A name an administrator gives (an API key's, a join token's): trimmed, 1 to 128 characters, one line.
pub fn name(value: &str) -> Checked<String> {
    let name = value.trim();
    if name.is_empty() || name.chars().count() > MAX_LABEL_CHARS {
        return Err(bad_request(format!("`name` must be 1 to {MAX_LABEL_CHARS} characters and not blank.")));
    }
    text("name", name, Text::Line)?;
    Ok(name.to_owned())
}

/// Longest name an administrator gives to a key or token, in characters.
pub const MAX_LABEL_CHARS: usize = 128;

/// Validates the fields an administrator edits; `None` means "not given". `kind` says whether line breaks are
/// allowed (notes) or not (names).
pub fn optional_text(field: &str, value: Option<String>, max_chars: usize, kind: Text) -> Checked<Option<String>> {
    match value {
        Some(text) if text.chars().count() > max_chars => {
            Err(bad_request(format!("`{field}` must be at most {max_chars} characters.")))
        }
        Some(text) if text.trim().is_empty() => Ok(None),
        Some(value) => {
            text(field, &value, kind)?;
            Ok(Some(value))
        }
        None => Ok(None),
    }
}

/// A list of non-blank, printable strings, each at most [`MAX_ITEM_CHARS`], at most [`MAX_LIST_LEN`] entries.
pub fn list(field: &str, values: Option<Vec<String>>) -> Checked<Vec<String>> {
    let values = values.unwrap_or_default();
    if values.len() > MAX_LIST_LEN {
        return Err(bad_request(format!("`{field}` has more than {MAX_LIST_LEN} entries.")));
    }
    values.into_iter().enumerate().map(|(i, value)| item(format_args!("{field}[{i}]"), value)).collect()
}

/// True when `value` would pass as an entry of a list (model id, tag, runtime name): what the reachability probe
/// keeps of a runtime's model list.
pub fn is_list_item(value: &str) -> bool {
    !value.trim().is_empty() && value.chars().count() <= MAX_ITEM_CHARS && first_control(value, Text::Line).is_none()
}

fn item(field: impl fmt::Display, value: String) -> Checked<String> {
    if value.trim().is_empty() {
        return Err(bad_request(format!("`{field}` must not be blank.")));
    }
    if value.chars().count() > MAX_ITEM_CHARS {
        return Err(bad_request(format!("`{field}` must be at most {MAX_ITEM_CHARS} characters.")));
    }
    text(field, &value, Text::Line)?;
    Ok(value)
}

/// A GPU uuid: not blank, at most [`MAX_UUID_CHARS`] characters, one printable line.
fn gpu_uuid(field: impl fmt::Display, value: &str) -> Checked<()> {
    if value.trim().is_empty() {
        return Err(bad_request(format!("`{field}` must not be blank.")));
    }
    if value.chars().count() > MAX_UUID_CHARS {
        return Err(bad_request(format!("`{field}` must be at most {MAX_UUID_CHARS} characters.")));
    }
    text(field, value, Text::Line)
}

fn percent(field: impl fmt::Display, value: Option<f64>) -> Checked<()> {
    match value {
        Some(v) if !v.is_finite() || !(0.0..=100.0).contains(&v) => {
            Err(bad_request(format!("`{field}` must be a percentage between 0 and 100, not {v}.")))
        }
        _ => Ok(()),
    }
}

fn memory(field: impl fmt::Display, value: Option<u64>) -> Checked<()> {
    match value {
        Some(bytes) if bytes > MAX_MEMORY_BYTES => {
            Err(bad_request(format!("`{field}` must be at most {MAX_MEMORY_BYTES} bytes (1 PiB), not {bytes}.")))
        }
        _ => Ok(()),
    }
}

/// Each limit set is a whole number from 1 to [`MAX_LIMIT`] (SPEC §14).
pub fn limits(limits: &Limits) -> Result<(), Invalid> {
    for (name, value) in limits.named() {
        if let Some(value) = value
            && !(1..=MAX_LIMIT).contains(&value)
        {
            return Err(Invalid::Field(format!(
                "`limits.{name}` must be from 1 to {MAX_LIMIT} (leave it out for no limit); got {value}."
            )));
        }
    }
    Ok(())
}

/// A key's weight in the queue's fair share: from 1 to [`MAX_WEIGHT`].
pub fn weight(weight: Option<u32>) -> Result<Option<u32>, Invalid> {
    match weight {
        Some(w) if !(1..=MAX_WEIGHT).contains(&w) => {
            Err(Invalid::Field(format!("`weight` must be from 1 to {MAX_WEIGHT}; got {w}.")))
        }
        other => Ok(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_need_twelve_printable_characters() {
        assert!(password_problem("12345678").expect("short").contains("at least 12"));
        assert!(password_problem("ünïcödé-pässwörd").is_none());
        assert!(password_problem("twelve-chars").is_none());
        assert!(password_problem("eleven-char").is_some());
        assert!(password_problem("twelve\u{0}chars").expect("NUL").contains("U+0000"));
        assert!(password_problem(&"x".repeat(MAX_PASSWORD_BYTES + 1)).is_some());
    }

    #[test]
    fn list_items_as_the_probe_keeps_them() {
        assert!(is_list_item("meta-llama/Llama-3.1-8B"));
        assert!(!is_list_item(" "));
        assert!(!is_list_item(&"m".repeat(MAX_ITEM_CHARS + 1)));
        assert!(!is_list_item("m\u{1b}"));
    }
}
