//! The registration reachability check (SPEC §2.1 step 4, §9): can the router reach the node's runtime?
//!
//! Whoever registers chooses the address and writes the answer, so the probe bounds what it reads: at most
//! [`MAX_BODY_BYTES`] of body (a larger declared length is refused before reading, a larger streamed body as soon as
//! it passes the limit), no redirects, no proxies, one timeout for the whole exchange, and at most the list limits of
//! a registration in model ids: the first [`MAX_LIST_LEN`] valid ids are kept, the others are dropped and logged.

use std::borrow::Cow;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{SeqAccess, Visitor};

use crate::validate::{self, MAX_LIST_LEN};

/// Most bytes of a `/v1/models` answer the router reads.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// Probes `GET http://{addr}/v1/models` with a bounded timeout.
#[derive(Debug, Clone)]
pub struct Prober {
    client: reqwest::Client,
}

impl Prober {
    pub fn new(timeout: Duration) -> anyhow::Result<Prober> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            // One probe per registration: a pool of idle connections to nodes would only hold open files.
            .pool_max_idle_per_host(0)
            .build()?;
        Ok(Prober { client })
    }

    /// The models the runtime lists (at most [`MAX_LIST_LEN`] valid ids), or why it could not be reached (a sentence
    /// naming the URL and the cause).
    pub async fn models(&self, addr: SocketAddr) -> Result<Vec<String>, String> {
        let url = format!("http://{addr}/v1/models");
        let mut response = self.client.get(&url).send().await.map_err(|err| {
            format!("The router could not reach the node's runtime at {url}: {}.", cause(&err, "the request failed"))
        })?;
        let status = response.status();
        if status.is_redirection() {
            return Err(format!(
                "The node's runtime at {url} answered HTTP {status}, a redirect, which the router does not follow; \
                 it must answer 2xx itself."
            ));
        }
        if !status.is_success() {
            return Err(format!("The node's runtime at {url} answered HTTP {status}; it must answer 2xx."));
        }
        let too_large = |what: String| {
            format!(
                "The node's runtime at {url} {what}; the router reads at most 1 MiB ({MAX_BODY_BYTES} bytes) of \
                 `/v1/models`."
            )
        };
        if let Some(declared) = response.content_length().filter(|len| *len > MAX_BODY_BYTES as u64) {
            return Err(too_large(format!("announced a model list of {declared} bytes")));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|err| {
            format!("The node's runtime at {url} did not finish its answer: {}.", cause(&err, "reading it failed"))
        })? {
            if body.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(too_large("sent a model list of more than 1 MiB".to_owned()));
            }
            body.extend_from_slice(&chunk);
        }
        let listed = parse_models(&body);
        if listed.dropped > 0 {
            tracing::warn!(
                url,
                kept = listed.kept.len(),
                dropped = listed.dropped,
                "the runtime listed more than {MAX_LIST_LEN} model ids, or ids a registration may not carry (blank, \
                 over 512 characters, control characters); kept the first valid ones"
            );
        }
        Ok(listed.kept)
    }
}

fn cause(err: &reqwest::Error, otherwise: &str) -> String {
    if err.is_timeout() {
        "it did not answer in time".to_owned()
    } else if err.is_connect() {
        "the connection failed (is the runtime running and the port open to the router?)".to_owned()
    } else {
        format!("{otherwise}: {err}")
    }
}

/// What the probe keeps of a model list.
#[derive(Debug, Default, PartialEq, Eq)]
struct Listed {
    /// The first valid ids, at most [`MAX_LIST_LEN`].
    kept: Vec<String>,
    /// Ids left out: invalid, or beyond the limit.
    dropped: usize,
}

/// The ids of an OpenAI-compatible `{"data": [{"id": …}, …]}` answer. A 2xx answer that is not a model list still
/// proves reachability; it just names no model.
fn parse_models(body: &[u8]) -> Listed {
    serde_json::from_slice::<Answer>(body).map(|answer| answer.data).unwrap_or_default()
}

#[derive(Deserialize)]
struct Answer {
    #[serde(default)]
    data: Listed,
}

#[derive(Deserialize)]
struct Entry<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
}

/// Deserialized entry by entry, so a long list never becomes a long vector: ids past the limit are counted, not kept.
impl<'de> Deserialize<'de> for Listed {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> Visitor<'de> for Entries {
            type Value = Listed;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of models")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Listed, A::Error> {
                let mut listed = Listed::default();
                while let Some(entry) = seq.next_element::<Entry<'de>>()? {
                    if listed.kept.len() < MAX_LIST_LEN && validate::is_list_item(&entry.id) {
                        listed.kept.push(entry.id.into_owned());
                    } else {
                        listed.dropped += 1;
                    }
                }
                Ok(listed)
            }
        }
        deserializer.deserialize_seq(Entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(ids: &[String]) -> Vec<u8> {
        let data: Vec<_> = ids.iter().map(|id| serde_json::json!({"id": id, "object": "model"})).collect();
        serde_json::to_vec(&serde_json::json!({"object": "list", "data": data})).expect("json")
    }

    #[test]
    fn keeps_the_first_valid_ids_up_to_the_list_limit() {
        let mut ids: Vec<String> = vec![" ".into(), "m\u{1b}[2J".into(), "x".repeat(513)];
        ids.extend((0..2000).map(|i| format!("model-{i}")));
        let listed = parse_models(&listing(&ids));
        assert_eq!(listed.kept.len(), MAX_LIST_LEN);
        assert_eq!(listed.kept[0], "model-0");
        assert_eq!(listed.kept[MAX_LIST_LEN - 1], format!("model-{}", MAX_LIST_LEN - 1));
        assert_eq!(listed.dropped, 3 + 2000 - MAX_LIST_LEN);
    }

    #[test]
    fn escaped_ids_are_kept_decoded_and_other_answers_name_no_model() {
        let listed = parse_models(br#"{"data": [{"id": "org\/m\u00fc"}], "object": "list"}"#);
        assert_eq!(listed, Listed { kept: vec!["org/mü".into()], dropped: 0 });
        assert_eq!(parse_models(b"<html>"), Listed::default());
        assert_eq!(parse_models(b"{}"), Listed::default());
        assert_eq!(parse_models(br#"{"data": [{"name": "no id"}]}"#), Listed::default());
    }
}
