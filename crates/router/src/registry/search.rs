//! What lists sort a node by and what a search looks through, kept ready in the node's slot ([`SearchKeys`]), so a
//! pass over the fleet compares names as bytes and searches without allocating.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::model::node::Node;

/// A node's sort name and search text.
#[derive(Debug)]
pub(super) struct SearchKeys {
    pub(super) sort_name: NameKey,
    pub(super) text: Box<str>,
}

impl SearchKeys {
    /// Made with the node, and again wherever its names, address, tags or models change.
    pub(super) fn of(node: &Node) -> Self {
        SearchKeys { sort_name: sort_name(node), text: search_text(node) }
    }
}

/// A name as it sorts: in lower case, with its runs of digits as numbers, so that plain byte order is the natural
/// order (`gpu-2` before `gpu-10`). Shared with the node's slot, which keeps it ready (see [`sort_name`]): a pass over
/// the fleet copies no name, and compares names as bytes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct NameKey(Arc<str>);

impl Serialize for NameKey {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for NameKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(|name| NameKey(name.into()))
    }
}

/// The name a node is sorted by: its display name, or its machine name, in lower case, each run of digits written
/// as its count of significant digits, then those digits. A count below 9 is one character, `0` to `8`; from 9 on
/// it is `9` and one more character (`0` + count, at most 79), so a longer number sorts after a shorter one, and
/// numbers of one length by their digits. The counts are ASCII digits, as the digits they stand for, so a number
/// sorts against other characters as its first digit did. Leading zeros do not count: `node-007` sorts with
/// `node-7`, and the node id decides between them.
fn sort_name(node: &Node) -> NameKey {
    let name = node.display_name.as_deref().unwrap_or(&node.machine_name);
    // The common, ASCII name is lowered as the key is built; only other names take Unicode's rules first.
    let lowered;
    let name = if name.is_ascii() {
        name
    } else {
        lowered = name.to_lowercase();
        &lowered
    };
    let bytes = name.as_bytes();
    let mut key = String::with_capacity(name.len() + 4);
    let mut at = 0;
    while at < bytes.len() {
        let digit = bytes[at].is_ascii_digit();
        let end = bytes[at..].iter().position(|b| b.is_ascii_digit() != digit).map_or(bytes.len(), |n| at + n);
        if digit {
            let digits = name[at..end].trim_start_matches('0');
            let count = digits.len().min(79) as u8;
            if count >= 9 {
                key.push('9');
            }
            key.push(char::from(b'0' + count));
            key.push_str(digits);
        } else {
            push_lower(&mut key, &name[at..end]);
        }
        at = end;
    }
    NameKey(key.into())
}

/// Appends `text` in lower case: ASCII in place, other text by Unicode's rules.
fn push_lower(out: &mut String, text: &str) {
    if text.is_ascii() {
        let start = out.len();
        out.push_str(text);
        out[start..].make_ascii_lowercase();
    } else {
        out.push_str(&text.to_lowercase());
    }
}

/// What a search looks through for a node, in lower case, one field a line: machine and display name, address,
/// tags, ready and loaded models. Kept ready in the node's slot, so a search over the fleet is a substring search per
/// node and allocates nothing.
fn search_text(node: &Node) -> Box<str> {
    let fields = [node.machine_name.as_str(), node.display_name.as_deref().unwrap_or(""), node.ip_address.as_str()];
    let lists = [&node.tags, &node.ready_models, &node.loaded_models].into_iter().flatten().map(String::as_str);
    let fields = || fields.into_iter().chain(lists.clone());
    // Exactly the size of ASCII text: one allocation, kept as it is.
    let mut text = String::with_capacity(fields().map(|field| field.len() + 1).sum());
    for field in fields() {
        push_lower(&mut text, field);
        text.push('\n');
    }
    text.into_boxed_str()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(name: &str) -> Node {
        Node { machine_name: name.to_owned(), ..Node::example() }
    }

    #[test]
    fn names_sort_with_digits_as_numbers() {
        let mut names = vec![
            "gpu-10",
            "GPU-2",
            "gpu-1",
            "gpu-02b",
            "a",
            "gpu-",
            "gpu-100",
            "gpu-a",
            "gpu-9",
            "x12345678901",
            "x9999999999",
            "x0",
            "x",
            "gpu-1-2",
            "gpu-1-10",
        ];
        names.sort_by_key(|name| sort_name(&named(name)));
        let expected = [
            "a",
            "gpu-",
            "gpu-1",
            "gpu-1-2",
            "gpu-1-10",
            "GPU-2",
            "gpu-02b",
            "gpu-9",
            "gpu-10",
            "gpu-100",
            "gpu-a",
            "x",
            "x0",
            "x9999999999",
            "x12345678901",
        ];
        assert_eq!(names, expected);
        assert_eq!(sort_name(&named("node-007")), sort_name(&named("node-7")));
        let display = Node { display_name: Some("Über 3".to_owned()), ..named("z") };
        assert_eq!(&*sort_name(&display).0, "über 13");
    }

    #[test]
    fn a_search_looks_through_names_address_tags_and_models_in_lower_case() {
        let node = Node {
            machine_name: "GPU-H100-07".to_owned(),
            display_name: Some("Rechenknoten Über".to_owned()),
            loaded_models: vec!["Qwen/Qwen2.5-72B".to_owned()],
            tags: vec!["Rack-B".to_owned()],
            ..Node::example()
        };
        let text = search_text(&node);
        for word in ["h100-07", "über", "rack-b", "qwen2.5", "10.0.0.1"] {
            assert!(text.contains(word), "{word} in {text:?}");
        }
        assert!(!text.contains("a100"));
    }
}
