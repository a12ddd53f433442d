//! The prefix of a request (SPEC §13): the text its runtime sees first, read from the body the router already holds,
//! reduced to the key that decides which node is most likely to hold it in its KV cache.
//!
//! For chat, the messages in order: each message's role and text (the text parts of a multi-part content; other
//! parts as their JSON); for completions, the prompt (a string, or the JSON of a token array or a list of prompts).
//! Only the first `prefix_bytes` count. The key is a hash of the prefix's *head*: its first [`HEAD_BYTES`], or all of
//! it when shorter. Requests that begin alike for that long (the same system prompt, the same documents) share a
//! key, whatever question follows; the runtime's cache reuses the head and whatever else they share beyond it.
//!
//! The hash is xxHash3 with a fixed seed, so every router, whatever its version or platform, reads the same key
//! from the same body: the several routers of one database choose alike without talking (SPEC §13).

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;
use xxhash_rust::xxh3::Xxh3;

/// The head of the prefix that makes its key: about 64 tokens. Longer than the greeting or boilerplate line that
/// unrelated prompts may share; short enough that a conversation's turns share it (its system prompt and first
/// message do not change from turn to turn), and that every system prompt or document worth caching is longer.
/// Prompts that share a longer head but go on differently share a key too; the load bound spreads them when they are
/// many.
pub const HEAD_BYTES: usize = 256;

/// What the router reads of an inference body to find its prefix, as the body's JSON: a body whose fields are not
/// what a runtime expects has no prefix, and is forwarded all the same (the runtime answers it).
#[derive(Deserialize, Default)]
pub struct PromptPeek<'a> {
    #[serde(borrow, default)]
    pub messages: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub prompt: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow, default)]
    role: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
}

/// One part of a multi-part message content.
#[derive(Deserialize)]
struct Part<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
}

/// The key of a request's prefix, or `None` when the body has no text to key (embeddings, an empty prompt).
pub fn key(peek: &PromptPeek<'_>, prefix_bytes: usize) -> Option<u64> {
    let mut head = Head::new(HEAD_BYTES.min(prefix_bytes));
    if let Some(messages) = peek.messages {
        let messages: Vec<Message<'_>> = serde_json::from_str(messages.get()).ok()?;
        for message in messages {
            if head.full() {
                break;
            }
            head.push(message.role.as_deref().unwrap_or("").as_bytes());
            head.push(b"\x1f");
            if let Some(content) = message.content {
                push_content(&mut head, content);
            }
            head.push(b"\x1e");
        }
    } else if let Some(prompt) = peek.prompt {
        push_text_or_json(&mut head, prompt);
    }
    head.finish()
}

fn push_content(head: &mut Head, content: &RawValue) {
    let text = content.get();
    if text.starts_with('[')
        && let Ok(parts) = serde_json::from_str::<Vec<&RawValue>>(text)
    {
        for part in parts {
            match serde_json::from_str::<Part<'_>>(part.get()) {
                Ok(Part { kind: Some(kind), text: Some(text) }) if kind == "text" => head.push(text.as_bytes()),
                _ => head.push(part.get().as_bytes()),
            }
            if head.full() {
                return;
            }
        }
        return;
    }
    push_text_or_json(head, content);
}

/// A JSON string as its text; anything else as its JSON.
fn push_text_or_json(head: &mut Head, value: &RawValue) {
    match serde_json::from_str::<Cow<'_, str>>(value.get()) {
        Ok(text) => head.push(text.as_bytes()),
        Err(_) => head.push(value.get().as_bytes()),
    }
}

/// The first `limit` bytes of a prefix, hashed as they come.
struct Head {
    hasher: Xxh3,
    taken: usize,
    limit: usize,
    /// Bytes of text, not of separators: a body whose messages are all empty has no prefix.
    text: usize,
}

impl Head {
    fn new(limit: usize) -> Self {
        Head { hasher: Xxh3::new(), taken: 0, limit, text: 0 }
    }

    fn full(&self) -> bool {
        self.taken >= self.limit
    }

    fn push(&mut self, bytes: &[u8]) {
        let room = self.limit - self.taken.min(self.limit);
        let bytes = &bytes[..bytes.len().min(room)];
        self.hasher.update(bytes);
        self.taken += bytes.len();
        if !matches!(bytes, b"\x1e" | b"\x1f") {
            self.text += bytes.len();
        }
    }

    fn finish(self) -> Option<u64> {
        (self.text > 0).then(|| self.hasher.digest())
    }
}

/// The key of an `x-session-id`: a session's requests follow each other (SPEC §13).
pub fn session_key(session: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(session, SESSION_SEED)
}

/// Keeps a session's keys apart from prefixes' keys.
const SESSION_SEED: u64 = 0x5e55_1011;

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(body: &str) -> Option<u64> {
        let peek: PromptPeek<'_> = serde_json::from_str(body).expect("peek");
        key(&peek, 65536)
    }

    fn chat(system: &str, question: &str) -> String {
        serde_json::json!({"model": "m", "messages": [
            {"role": "system", "content": system}, {"role": "user", "content": question}
        ]})
        .to_string()
    }

    #[test]
    fn a_shared_long_system_prompt_is_one_key_whatever_the_question() {
        let system = "You answer questions about the attached manual. ".repeat(8);
        let a = key_of(&chat(&system, "How do I reset it?"));
        let b = key_of(&chat(&system, "What does error 7 mean?"));
        assert!(a.is_some());
        assert_eq!(a, b);
        let other = key_of(&chat(&"You summarise legal contracts in plain words. ".repeat(8), "How do I reset it?"));
        assert_ne!(a, other);
    }

    #[test]
    fn short_prompts_are_keyed_whole_so_different_questions_spread() {
        assert_ne!(key_of(&chat("Be brief.", "What is 2+2?")), key_of(&chat("Be brief.", "Name a colour.")));
    }

    #[test]
    fn a_conversation_keeps_its_key_from_turn_to_turn() {
        let turn = |messages: &[(&str, &str)]| {
            let messages: Vec<_> =
                messages.iter().map(|(role, text)| serde_json::json!({"role": role, "content": text})).collect();
            key_of(&serde_json::json!({"messages": messages}).to_string())
        };
        let first = (
            "user",
            "Plan a three-day trip to Lisbon for two people who like museums, food and long walks. We arrive on a \
             Friday morning by train from Porto, stay near the river, and would like one day outside the city. We \
             do not rent a car.",
        );
        let system = ("system", "You are a travel agent. Be concise; give prices in euros.");
        let one = turn(&[system, first]);
        let answer = ("assistant", "Day 1: Alfama and the castle; Day 2: Belém; Day 3: Sintra.");
        let two = turn(&[system, first, answer, ("user", "Swap day 3 for something by the sea.")]);
        assert!(one.is_some());
        assert_eq!(one, two, "the second turn begins with the first");
        let short = turn(&[("user", "Hi!")]);
        let short_two = turn(&[("user", "Hi!"), ("assistant", "Hello! How can I help?"), ("user", "A joke.")]);
        assert_ne!(short, short_two, "a beginning shorter than the head is keyed whole: x-session-id keeps such turns");
    }

    #[test]
    fn roles_count_and_text_parts_read_as_text() {
        let as_user = r#"{"messages": [{"role": "user", "content": "hello there"}]}"#;
        let as_system = r#"{"messages": [{"role": "system", "content": "hello there"}]}"#;
        assert_ne!(key_of(as_user), key_of(as_system));
        let parts = r#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}]}"#;
        assert_eq!(key_of(parts), key_of(as_user));
        let image =
            r#"{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}"#;
        assert!(key_of(image).is_some(), "other parts count as their JSON");
    }

    #[test]
    fn escapes_are_read_as_the_text_they_stand_for() {
        let escaped = r#"{"prompt": "caf\u00e9 \"menu\""}"#;
        let plain = "{\"prompt\": \"café \\\"menu\\\"\"}";
        assert_eq!(key_of(escaped), key_of(plain));
    }

    #[test]
    fn completions_key_their_prompt_and_bodies_without_text_have_none() {
        let long = "Document: ".to_owned() + &"lorem ipsum ".repeat(200);
        let a = key_of(&serde_json::json!({"prompt": format!("{long} Q1")}).to_string());
        let b = key_of(&serde_json::json!({"prompt": format!("{long} Q2")}).to_string());
        assert!(a.is_some());
        assert_eq!(a, b);
        assert!(key_of(r#"{"prompt": [1, 2, 3]}"#).is_some(), "token arrays count as their JSON");
        assert_eq!(key_of(r#"{"input": "embed me"}"#), None);
        assert_eq!(key_of(r#"{"prompt": ""}"#), None);
        assert_eq!(key_of(r#"{"messages": [{"role": "user", "content": ""}]}"#), Some(key_of_empty_user()));
    }

    fn key_of_empty_user() -> u64 {
        // A role is text too: an empty message of a user still has a prefix, "user".
        let peek: PromptPeek<'_> = serde_json::from_str(r#"{"messages": [{"role": "user"}]}"#).expect("peek");
        key(&peek, 65536).expect("a role is text")
    }

    #[test]
    fn fields_a_runtime_would_refuse_give_no_prefix() {
        assert_eq!(key_of(r#"{"messages": "hello"}"#), None);
        assert_eq!(key_of(r#"{"messages": [{"role": 7, "content": "x"}]}"#), None);
    }

    #[test]
    fn only_the_first_prefix_bytes_count() {
        let a = key_of(&chat("ab", "cdef"));
        let (body_a, body_b) = (chat("ab", "cdef"), chat("ab", "cdXX"));
        let peek_a: PromptPeek<'_> = serde_json::from_str(&body_a).expect("peek");
        let peek_b: PromptPeek<'_> = serde_json::from_str(&body_b).expect("peek");
        assert_eq!(key(&peek_a, 8), key(&peek_b, 8), "the bytes past the limit do not count");
        assert_ne!(key(&peek_a, 65536), key(&peek_b, 65536));
        assert_eq!(key(&peek_a, 65536), a);
    }
}
