//! Reading a runtime's `usage` out of an answer on its way to the client (SPEC §14), without holding the answer
//! back: a JSON answer's chunks are kept (shared, not copied) and read once it has ended; an event stream is read
//! line by line as it passes.
//!
//! When the router asked the runtime for usage on the client's behalf (`stream_options.include_usage`), the stream is
//! passed on event by event instead of chunk by chunk, and the usage-only event the client did not ask for is left
//! out, with the `"usage":null` the runtime may have put in every other event: the client reads what it would have
//! read without the router.

use hyper::body::Bytes;
use serde::Deserialize;

use crate::model::usage::Tokens;

/// Most bytes of a JSON answer kept whole for reading its `usage`; beyond, only the last [`TAIL_BYTES`] are (a
/// runtime writes `usage` after the choices or the embeddings).
const KEEP_BYTES: usize = 4 * 1024 * 1024;
const TAIL_BYTES: usize = 64 * 1024;

/// Longest line of an event stream read for usage; a longer one is passed on unread.
const MAX_LINE: usize = 1024 * 1024;

/// OpenAI's `usage` object, as much of it as is counted.
#[derive(Deserialize)]
struct UsageJson {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    total_tokens: Option<u64>,
}

impl UsageJson {
    fn tokens(&self) -> Option<Tokens> {
        let prompt = self.prompt_tokens.or(self.total_tokens)?;
        let completion = self.completion_tokens.unwrap_or_else(|| self.total_tokens.unwrap_or(prompt) - prompt);
        Some(Tokens { prompt, completion })
    }
}

/// The `usage` of `text`: the value of its last `"usage"` key that is an object with token counts.
pub fn usage_in(text: &[u8]) -> Option<Tokens> {
    const KEY: &[u8] = b"\"usage\"";
    let mut end = text.len();
    while let Some(at) = text[..end].windows(KEY.len()).rposition(|w| w == KEY) {
        end = at;
        if at > 0 && text[at - 1] == b'\\' {
            continue;
        }
        let rest = &text[at + KEY.len()..];
        let Some(colon) = rest.iter().position(|b| !b.is_ascii_whitespace()) else { continue };
        if rest[colon] != b':' {
            continue;
        }
        let mut values = serde_json::Deserializer::from_slice(&rest[colon + 1..]).into_iter::<Option<UsageJson>>();
        if let Some(Ok(Some(usage))) = values.next()
            && let Some(tokens) = usage.tokens()
        {
            return Some(tokens);
        }
    }
    None
}

/// A JSON answer kept as it passes.
#[derive(Default)]
pub struct JsonScan {
    chunks: Vec<Bytes>,
    kept: usize,
    /// The last bytes, once the answer is over [`KEEP_BYTES`].
    tail: Option<Vec<u8>>,
}

impl JsonScan {
    pub fn feed(&mut self, chunk: &Bytes) {
        if let Some(tail) = &mut self.tail {
            tail.extend_from_slice(chunk);
            if tail.len() > 2 * TAIL_BYTES {
                tail.drain(..tail.len() - TAIL_BYTES);
            }
            return;
        }
        self.kept += chunk.len();
        self.chunks.push(chunk.clone());
        if self.kept > KEEP_BYTES {
            let mut tail = Vec::with_capacity(2 * TAIL_BYTES);
            for chunk in self.chunks.drain(..) {
                tail.extend_from_slice(&chunk);
                if tail.len() > 2 * TAIL_BYTES {
                    tail.drain(..tail.len() - TAIL_BYTES);
                }
            }
            self.tail = Some(tail);
        }
    }

    /// The answer's usage, once it has ended.
    pub fn tokens(&self) -> Option<Tokens> {
        match (&self.tail, self.chunks.as_slice()) {
            (Some(tail), _) => usage_in(tail),
            (None, [one]) => usage_in(one),
            (None, chunks) => usage_in(&chunks.concat()),
        }
    }
}

/// An event stream read line by line as it passes; when `strip`, also passed on event by event without what the
/// router added.
pub struct StreamScan {
    strip: bool,
    line: Vec<u8>,
    /// Too long to read: the rest of this line is passed over.
    skipping: bool,
    /// With `strip`: the current event's bytes, released at its end unless it is left out.
    event: Vec<u8>,
    drop_event: bool,
    /// Part of the current event was passed on already (it grew past [`MAX_LINE`]): it cannot be left out.
    released: bool,
    tokens: Option<Tokens>,
    /// The stream's end marker (`data: [DONE]`) passed: the client has the whole answer.
    done: bool,
}

/// An event of a stream: its usage, and whether it carries nothing else (no choices).
#[derive(Deserialize)]
struct Chunk {
    usage: Option<UsageJson>,
    #[serde(default)]
    choices: Option<Vec<serde::de::IgnoredAny>>,
}

impl StreamScan {
    pub fn new(strip: bool) -> StreamScan {
        StreamScan {
            strip,
            line: Vec::new(),
            skipping: false,
            event: Vec::new(),
            drop_event: false,
            released: false,
            tokens: None,
            done: false,
        }
    }

    pub fn tokens(&self) -> Option<Tokens> {
        self.tokens
    }

    /// Whether the stream's end marker (`data: [DONE]`) was read.
    pub fn done(&self) -> bool {
        self.done
    }

    /// Whether this stream is passed on event by event, without what the router added.
    pub fn strips(&self) -> bool {
        self.strip
    }

    /// Reads `chunk`; with `strip`, what the client is to receive of it so far is appended to `out`.
    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        let mut rest = chunk;
        while let Some(newline) = rest.iter().position(|&b| b == b'\n') {
            let (head, tail) = rest.split_at(newline + 1);
            self.take(head);
            self.end_line(out);
            rest = tail;
        }
        self.take(rest);
        // An event without end (a runtime that never sends the blank line) is passed on as it grows, not held.
        if self.strip && self.event.len() > MAX_LINE {
            out.append(&mut self.event);
            self.released = true;
        }
    }

    /// What is still held at the end of the stream, for the client.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if !self.line.is_empty() {
            self.end_line(out);
        }
        if self.strip && (!self.drop_event || self.released) {
            out.append(&mut self.event);
        }
    }

    fn take(&mut self, bytes: &[u8]) {
        if self.skipping {
            if self.strip {
                self.event.extend_from_slice(bytes);
            }
            return;
        }
        self.line.extend_from_slice(bytes);
        if self.line.len() > MAX_LINE {
            self.skipping = true;
            if self.strip {
                self.event.append(&mut self.line);
            }
            self.line.clear();
        }
    }

    fn end_line(&mut self, out: &mut Vec<u8>) {
        if std::mem::take(&mut self.skipping) {
            return;
        }
        let mut line = std::mem::take(&mut self.line);
        let text = line.strip_suffix(b"\n").unwrap_or(&line);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        let blank = text.is_empty();
        if let Some(data) = text.strip_prefix(b"data:") {
            let data = data.trim_ascii();
            self.done |= data == b"[DONE]";
            if data.windows(7).any(|w| w == b"\"usage\"")
                && let Ok(chunk) = serde_json::from_slice::<Chunk>(data)
            {
                if let Some(tokens) = chunk.usage.as_ref().and_then(UsageJson::tokens) {
                    self.tokens = Some(tokens);
                    if self.strip && chunk.choices.as_ref().is_none_or(Vec::is_empty) {
                        self.drop_event = true;
                    }
                } else if self.strip {
                    line = without_null_usage(&line);
                }
            }
        }
        if self.strip {
            self.event.extend_from_slice(&line);
            if blank {
                let released = std::mem::take(&mut self.released);
                if !std::mem::take(&mut self.drop_event) || released {
                    out.append(&mut self.event);
                }
                self.event.clear();
            }
        }
        line.clear();
        self.line = line;
    }
}

/// `line` without a `"usage":null` member (the runtime's, in every event, once asked for usage).
fn without_null_usage(line: &[u8]) -> Vec<u8> {
    for member in [&b",\"usage\":null"[..], b"\"usage\":null,", b", \"usage\": null", b"\"usage\": null, "] {
        if let Some(at) = line.windows(member.len()).position(|w| w == member) {
            let mut out = line[..at].to_vec();
            out.extend_from_slice(&line[at + member.len()..]);
            return out;
        }
    }
    line.to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_read_from_a_json_answer_whatever_precedes_it() {
        let answer = br#"{"choices":[{"message":{"content":"the word \"usage\": {} here"}}],"usage":{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17}}"#;
        assert_eq!(usage_in(answer), Some(Tokens { prompt: 12, completion: 5 }));
        let embedding = br#"{"data":[],"usage": {"prompt_tokens": 8, "total_tokens": 8}}"#;
        assert_eq!(usage_in(embedding), Some(Tokens { prompt: 8, completion: 0 }));
        assert_eq!(usage_in(br#"{"choices":[],"usage":null}"#), None);
        assert_eq!(usage_in(br#"{"choices":[]}"#), None);
        assert_eq!(usage_in(br#"{"usage":{"prompt_tokens":"#), None, "cut off");
    }

    #[test]
    fn a_json_answer_in_chunks_and_a_long_one_keep_their_usage() {
        let answer = br#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}"#;
        let mut scan = JsonScan::default();
        for piece in answer.chunks(5) {
            scan.feed(&Bytes::copy_from_slice(piece));
        }
        assert_eq!(scan.tokens(), Some(Tokens { prompt: 3, completion: 4 }));
        let mut long = JsonScan::default();
        long.feed(&Bytes::from(format!("{{\"data\":\"{}\"", "x".repeat(KEEP_BYTES + 10))));
        long.feed(&Bytes::from_static(br#","usage":{"prompt_tokens":9,"total_tokens":9}}"#));
        assert!(long.tail.is_some());
        assert_eq!(long.tokens(), Some(Tokens { prompt: 9, completion: 0 }));
    }

    const ASKED: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n\
                         data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2}}\n\n\
                         data: [DONE]\n\n";

    #[test]
    fn a_stream_is_read_as_it_passes_in_any_cut() {
        for cut in [1, 3, 17, ASKED.len()] {
            let mut scan = StreamScan::new(false);
            let mut out = Vec::new();
            let (events, marker) = ASKED.split_at(ASKED.find("data: [DONE]").expect("marker"));
            for piece in events.as_bytes().chunks(cut) {
                scan.feed(piece, &mut out);
            }
            assert!(!scan.done(), "no end marker yet (cut {cut})");
            for piece in marker.as_bytes().chunks(cut) {
                scan.feed(piece, &mut out);
            }
            assert!(scan.done(), "the end marker was read: the client has the whole answer");
            scan.finish(&mut out);
            assert!(out.is_empty(), "unstripped streams pass chunk by chunk, not through the scan");
            assert_eq!(scan.tokens(), Some(Tokens { prompt: 7, completion: 2 }), "cut {cut}");
        }
    }

    #[test]
    fn what_the_router_asked_for_is_left_out_of_the_stream() {
        let unasked = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: [DONE]\n\n";
        for cut in [1, 2, 9, ASKED.len()] {
            let mut scan = StreamScan::new(true);
            let mut out = Vec::new();
            for piece in ASKED.as_bytes().chunks(cut) {
                scan.feed(piece, &mut out);
            }
            scan.finish(&mut out);
            assert_eq!(String::from_utf8(out).expect("text"), unasked, "cut {cut}");
            assert_eq!(scan.tokens(), Some(Tokens { prompt: 7, completion: 2 }));
        }
    }

    #[test]
    fn an_event_without_end_is_passed_on_as_it_grows() {
        let mut scan = StreamScan::new(true);
        let mut out = Vec::new();
        let piece = vec![b'x'; 64 * 1024];
        scan.feed(b"data: ", &mut out);
        for _ in 0..20 {
            scan.feed(&piece, &mut out);
        }
        assert!(out.len() > MAX_LINE / 2, "held back: {} bytes out", out.len());
        assert!(scan.event.len() <= MAX_LINE);
        scan.finish(&mut out);
        assert_eq!(out.len(), 6 + 20 * piece.len(), "every byte passed on, once");
    }

    #[test]
    fn a_stream_without_usage_counts_none_and_passes_whole() {
        let plain = "data: {\"choices\":[{\"delta\":{}}]}\r\n\r\n: comment\n\ndata: [DONE]\n\n";
        let mut scan = StreamScan::new(true);
        let mut out = Vec::new();
        scan.feed(plain.as_bytes(), &mut out);
        scan.finish(&mut out);
        assert_eq!(out, plain.as_bytes());
        assert_eq!(scan.tokens(), None);
    }
}
