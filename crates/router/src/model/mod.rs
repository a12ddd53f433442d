//! The router's domain types, plain data: nodes, their lists, figures and events, validated inputs, roles and
//! principals, token hashes. This is the floor of the crate: it imports nothing of the router but the clock, and
//! knows neither HTTP (axum) nor SQL (sqlx), so every layer above can use it.

pub mod audit;
pub mod auth;
pub mod deployment;
pub mod enrollment;
pub mod figures;
pub mod fleet_event;
pub mod health;
pub mod input;
pub mod node;
pub mod tenant;
pub mod usage;

use std::borrow::Cow;

/// Most characters of a client's own input an answer repeats back to it (a model name in an error message, say).
pub const ECHO_CHARS: usize = 100;

/// `text` as an answer may repeat it: its first [`ECHO_CHARS`] characters, and `…` when it was longer. A client that
/// sends a megabyte where a name belongs gets a short answer, not its megabyte back.
pub fn echo(text: &str) -> Cow<'_, str> {
    cut(text, ECHO_CHARS)
}

/// `text` cut to at most `max_chars` characters, `…` marking a cut.
pub fn cut(text: &str, max_chars: usize) -> Cow<'_, str> {
    match text.char_indices().nth(max_chars) {
        None => Cow::Borrowed(text),
        Some((at, _)) => Cow::Owned(format!("{}…", &text[..at])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echoed_input_is_cut_short_on_a_character_boundary() {
        assert_eq!(echo("llama-3-8b"), "llama-3-8b");
        let long = "é".repeat(1_000_000);
        let echoed = echo(&long);
        assert_eq!(echoed.chars().count(), ECHO_CHARS + 1);
        assert!(echoed.ends_with('…'));
        assert_eq!(cut("abcdef", 3), "abc…");
        assert_eq!(cut("abc", 3), "abc");
    }
}
