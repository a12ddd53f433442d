//! The bytes on the wire of a stand-in: reading a request's head and its stream flag, and writing answers (a chat
//! completion, the events of a stream and its end).

/// A request head larger than this closes the connection.
pub(super) const MAX_HEAD_BYTES: usize = 64 * 1024;

/// A request body larger than this closes the connection.
pub(super) const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Target size of a non-streaming answer's body.
pub const ANSWER_BYTES: usize = 1024;

pub fn response(status: u16, content_type: &str, body: &[u8]) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        _ => "Error",
    };
    let mut out =
        format!("HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n", body.len())
            .into_bytes();
    out.extend_from_slice(body);
    out
}

/// A chat completion of about [`ANSWER_BYTES`] bytes.
pub fn completion_body(model: &str) -> Vec<u8> {
    let answer = |content: &str| {
        serde_json::json!({
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 200, "total_tokens": PROMPT_TOKENS + 200},
        })
        .to_string()
    };
    let bare = answer("").len();
    answer(&"lorem ipsum ".repeat(ANSWER_BYTES.saturating_sub(bare) / 12)).into_bytes()
}

/// Prompt tokens every answer reports in its `usage`.
pub const PROMPT_TOKENS: u64 = 256;

/// One event of a stream, without its `data: ` prefix: a chat completion chunk that says when it was written. When
/// the request asked for usage (`stream_options.include_usage`), it carries `"usage":null`, as OpenAI's do.
pub fn chunk_json(model: &str, index: usize, sent_ns: u64, usage: bool) -> String {
    let usage = if usage { ",\"usage\":null" } else { "" };
    format!(
        "{{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":{model:?},\
         \"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"token {index} \"}},\"finish_reason\":null}}]{usage},\
         \"sent_ns\":{sent_ns}}}"
    )
}

/// The last event of a stream that asked for usage, as OpenAI writes it: no choices, the usage of the whole answer
/// (`completion_tokens`: one per event).
pub fn usage_json(model: &str, completion_tokens: usize, sent_ns: u64) -> String {
    let total = PROMPT_TOKENS + completion_tokens as u64;
    format!(
        "{{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":{model:?},\
         \"choices\":[],\"usage\":{{\"prompt_tokens\":{PROMPT_TOKENS},\"completion_tokens\":{completion_tokens},\
         \"total_tokens\":{total}}},\"sent_ns\":{sent_ns}}}"
    )
}

/// Appends `payload` as one chunk of a chunked body.
fn push_chunk(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(format!("{:x}\r\n", payload.len()).as_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
}

/// Appends one server-sent event `data: {chunk}\n\n` as one chunk of a chunked body (with `"usage":null` when
/// `usage`).
pub fn push_event(out: &mut Vec<u8>, model: &str, index: usize, sent_ns: u64, usage: bool) {
    let event = format!("data: {}\n\n", chunk_json(model, index, sent_ns, usage));
    push_chunk(out, event.as_bytes());
}

/// Appends the usage-only event of a stream that asked for usage, as one chunk of a chunked body.
pub fn push_usage(out: &mut Vec<u8>, model: &str, completion_tokens: usize, sent_ns: u64) {
    let event = format!("data: {}\n\n", usage_json(model, completion_tokens, sent_ns));
    push_chunk(out, event.as_bytes());
}

/// The end of a stream: `data: [DONE]\n\n`, then the chunked body's last chunk.
pub fn push_done(out: &mut Vec<u8>) {
    push_chunk(out, b"data: [DONE]\n\n");
    out.extend_from_slice(b"0\r\n\r\n");
}

/// The head of a streamed answer.
pub const STREAM_HEAD: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n";
/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    Completion,
    /// A stream; `usage`: with `stream_options.include_usage`.
    Stream {
        usage: bool,
    },
    Models,
    NotFound,
}

/// A parsed request head: what it asks for, and the length of its head and body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHead {
    pub post_completions: bool,
    pub get_models: bool,
    pub head_len: usize,
    pub body_len: usize,
}

/// Parses a request's head from the start of `buf`: `Ok(None)` while incomplete, `Err` for what this server does
/// not take (no `Content-Length` on a body, a chunked body, an oversized head).
pub fn parse_request_head(buf: &[u8]) -> Result<Option<RequestHead>, &'static str> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() > MAX_HEAD_BYTES { Err("head too large") } else { Ok(None) };
    };
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| "head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap_or_default().split(' ');
    let (method, target) = (request_line.next().unwrap_or_default(), request_line.next().unwrap_or_default());
    let path = target.split('?').next().unwrap_or_default();
    let mut body_len = 0;
    for line in lines {
        let (name, value) = line.split_once(':').ok_or("malformed header")?;
        if name.eq_ignore_ascii_case("content-length") {
            body_len = value.trim().parse().map_err(|_| "bad Content-Length")?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("chunked request bodies are not taken");
        }
    }
    if body_len > MAX_BODY_BYTES {
        return Err("body too large");
    }
    Ok(Some(RequestHead {
        post_completions: method == "POST" && path == "/v1/chat/completions",
        get_models: method == "GET" && path == "/v1/models",
        head_len: end + 4,
        body_len,
    }))
}

/// Whether a JSON request body asks for a stream: `"stream"` followed by `true`, spaces allowed.
pub fn wants_stream(body: &[u8]) -> bool {
    flag_is_true(body, b"\"stream\"")
}

/// Whether a JSON request body asks for usage in its stream: `"include_usage"` followed by `true` (the router adds
/// `"stream_options":{"include_usage":true}` to every stream it counts).
pub fn wants_usage(body: &[u8]) -> bool {
    flag_is_true(body, b"\"include_usage\"")
}

/// Whether the first `key` (quoted) of `body` is followed by `: true`, spaces allowed.
fn flag_is_true(body: &[u8], key: &[u8]) -> bool {
    let Some(at) = body.windows(key.len()).position(|w| w == key) else { return false };
    let rest = &body[at + key.len()..];
    let mut rest = rest.iter().skip_while(|b| b.is_ascii_whitespace());
    if rest.next() != Some(&b':') {
        return false;
    }
    let rest: Vec<u8> = rest.skip_while(|b| b.is_ascii_whitespace()).take(4).copied().collect();
    rest == b"true"
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse::{Parsed, Step, chunk_step, parse_event};

    #[test]
    fn reads_request_heads_and_the_stream_flag() {
        let head = b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: h\r\ncontent-length: 12\r\n\r\n{\"a\":1}";
        let parsed = parse_request_head(head).expect("valid").expect("complete");
        assert!(parsed.post_completions && !parsed.get_models);
        assert_eq!((parsed.head_len, parsed.body_len), (head.len() - 7, 12));
        assert_eq!(parse_request_head(b"GET /v1/models HTTP/1.1\r\n"), Ok(None));
        assert!(parse_request_head(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").is_err());
        assert!(parse_request_head(b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n").is_err());
        assert!(wants_stream(br#"{"model":"m","stream":true}"#));
        assert!(wants_stream(b"{\"stream\" :\n true}"));
        assert!(!wants_stream(br#"{"model":"m","stream":false}"#));
        assert!(!wants_stream(br#"{"model":"m","content":"stream"}"#));
        assert!(!wants_stream(br#"{"model":"m"}"#));
        assert!(wants_usage(br#"{"stream_options":{"include_usage":true},"model":"m","stream":true}"#));
        assert!(wants_usage(br#"{"stream_options": {"include_usage" : true}}"#));
        assert!(!wants_usage(br#"{"stream_options":{"include_usage":false},"stream":true}"#));
        assert!(!wants_usage(br#"{"model":"m","stream":true}"#));
    }

    #[test]
    fn each_event_is_one_chunk_of_one_event_that_says_when_it_was_sent() {
        let mut wire = Vec::new();
        push_event(&mut wire, "org/model", 7, 123_456_789, false);
        let Some(Step::Data { start, len, next }) = chunk_step(&wire).expect("valid") else { panic!("one chunk") };
        assert_eq!(next, wire.len(), "exactly one chunk");
        let event = &wire[start..start + len];
        assert!(event.starts_with(b"data: {") && event.ends_with(b"}\n\n"));
        assert_eq!(event.windows(2).filter(|w| w == b"\n\n").count(), 1, "exactly one event");
        let json: serde_json::Value = serde_json::from_slice(&event[6..len - 2]).expect("JSON");
        assert_eq!(json["object"], "chat.completion.chunk");
        assert_eq!(json["model"], "org/model");
        assert_eq!(json["choices"][0]["delta"]["content"], "token 7 ");
        assert_eq!(parse_event(&event[..len - 2]), Parsed::Data(Some(123_456_789)));

        let mut end = Vec::new();
        push_done(&mut end);
        let Some(Step::Data { start, len, next }) = chunk_step(&end).expect("valid") else { panic!("[DONE]") };
        assert_eq!(parse_event(&end[start..start + len - 2]), Parsed::Done);
        assert_eq!(chunk_step(&end[next..]).expect("valid"), Some(Step::End { next: 5 }));
    }

    /// Asked for usage, every event carries `"usage":null` (the router removes it, leaving the event a client that
    /// did not ask reads), and the last one is OpenAI's usage-only chunk.
    #[test]
    fn a_stream_asked_for_usage_reads_as_openai_writes_it() {
        let asked = chunk_json("m", 3, 42, true);
        let json: serde_json::Value = serde_json::from_str(&asked).expect("JSON");
        assert!(json["usage"].is_null() && json.as_object().expect("object").contains_key("usage"));
        assert_eq!(asked.replace(",\"usage\":null", ""), chunk_json("m", 3, 42, false));
        let mut wire = Vec::new();
        push_usage(&mut wire, "m", 100, 43);
        let Some(Step::Data { start, len, .. }) = chunk_step(&wire).expect("valid") else { panic!("one chunk") };
        let event = &wire[start..start + len];
        let json: serde_json::Value = serde_json::from_slice(&event[6..len - 2]).expect("JSON");
        assert_eq!(json["choices"], serde_json::json!([]));
        assert_eq!(
            json["usage"],
            serde_json::json!({"prompt_tokens": 256, "completion_tokens": 100, "total_tokens": 356})
        );
        assert_eq!(parse_event(&event[..len - 2]), Parsed::Data(Some(43)));
    }

    #[test]
    fn a_completion_is_json_of_about_a_kibibyte() {
        let body = completion_body("meta-llama/Llama-3.1-8B-Instruct");
        assert!((ANSWER_BYTES - 16..=ANSWER_BYTES).contains(&body.len()), "{}", body.len());
        let json: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(json["choices"][0]["message"]["role"], "assistant");
    }
}
