//! A client that reads an answer as it arrives: one keep-alive connection, one request in flight, and for an event
//! stream the instant each event was read.
//!
//! Every read is stamped on [`monotonic_ns`] the moment it returns; an event is stamped with the read that
//! completed it, and numbered by that read, so two events that came in one read (one of them held back somewhere)
//! can be told apart from events that came one by one. The body is decoded as it comes: `Content-Length`, chunked,
//! or until the server closes; events are split on the blank line that ends them (`data: …\n\n`).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::http::{BodyKind, ClientError, ParseError, parse_head};
use crate::standin::monotonic_ns;

/// One event of a stream as the client saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    /// When the stand-in wrote it (its `"sent_ns"`); `None` for an event that does not say.
    pub sent_ns: Option<u64>,
    /// When the read that completed it returned.
    pub recv_ns: u64,
    /// Which read of the answer completed it (0 = the read that completed the head, or an earlier one).
    pub read: u32,
}

/// A complete answer.
#[derive(Debug, Clone, Default)]
pub struct Exchange {
    pub status: u16,
    /// When the body ended.
    pub end_ns: u64,
    /// Bytes of body, after chunked decoding.
    pub body_len: usize,
    /// The events of an event stream (only when asked for); `data: [DONE]` is not one of them.
    pub events: Vec<Event>,
    /// The stream ended with `data: [DONE]`.
    pub done: bool,
}

/// One keep-alive connection, reopened on the next request after an error or a `Connection: close`.
pub struct StreamClient {
    addr: SocketAddr,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
    filled: usize,
    /// Decoded body bytes not yet split into events.
    pending: Vec<u8>,
}

impl StreamClient {
    /// A client that connects on its first request.
    pub fn new(addr: SocketAddr) -> Self {
        StreamClient { addr, stream: None, buf: vec![0; 16 * 1024], filled: 0, pending: Vec::new() }
    }

    /// Forgets the connection, e.g. after an exchange was abandoned half-way; the next request opens a new one.
    pub fn disconnect(&mut self) {
        self.stream = None;
        self.filled = 0;
    }

    /// Sends one serialized request and reads its answer; with `events`, splits the body into server-sent events.
    pub async fn send(&mut self, request: &[u8], events: bool) -> Result<Exchange, ClientError> {
        let result = self.exchange(request, events).await;
        if !matches!(result, Ok((_, false))) {
            self.stream = None;
            self.filled = 0;
        }
        result.map(|(exchange, _)| exchange)
    }

    /// [`StreamClient::send`], abandoned after `limit`; an error is its label (`timeout` when abandoned), and an
    /// abandoned connection is not used again.
    pub async fn send_within(&mut self, request: &[u8], events: bool, limit: Duration) -> Result<Exchange, String> {
        match tokio::time::timeout(limit, self.send(request, events)).await {
            Ok(sent) => sent.map_err(|err| err.label()),
            Err(_) => {
                self.disconnect();
                Err("timeout".to_owned())
            }
        }
    }

    async fn exchange(&mut self, request: &[u8], split: bool) -> Result<(Exchange, bool), ClientError> {
        let stream = match &mut self.stream {
            Some(stream) => stream,
            None => {
                let stream = TcpStream::connect(self.addr).await?;
                stream.set_nodelay(true)?;
                self.stream.insert(stream)
            }
        };
        stream.write_all(request).await?;
        let mut reads = 0u32;
        let mut read_ns = 0;
        let head = loop {
            if let Some(head) = parse_head(&self.buf[..self.filled])? {
                break head;
            }
            read_ns = fill(stream, &mut self.buf, &mut self.filled).await?;
        };
        let mut exchange = Exchange { status: head.status, ..Exchange::default() };
        let mut pos = head.len;
        self.pending.clear();
        let mut body = Body { pending: &mut self.pending, exchange: &mut exchange, split };
        match head.body {
            BodyKind::Length(n) => {
                let mut left = n;
                loop {
                    let take = left.min(self.filled - pos);
                    body.take(&self.buf[pos..pos + take], read_ns, reads);
                    pos += take;
                    left -= take;
                    if left == 0 {
                        break;
                    }
                    compact(&mut self.buf, &mut self.filled, &mut pos);
                    read_ns = fill(stream, &mut self.buf, &mut self.filled).await?;
                    reads += 1;
                }
            }
            BodyKind::Chunked => loop {
                let mut ended = false;
                while let Some(step) = chunk_step(&self.buf[pos..self.filled])? {
                    match step {
                        Step::Data { start, len, next } => {
                            body.take(&self.buf[pos + start..pos + start + len], read_ns, reads);
                            pos += next;
                        }
                        Step::End { next } => {
                            pos += next;
                            ended = true;
                            break;
                        }
                    }
                }
                if ended {
                    break;
                }
                compact(&mut self.buf, &mut self.filled, &mut pos);
                read_ns = fill(stream, &mut self.buf, &mut self.filled).await?;
                reads += 1;
            },
            BodyKind::UntilClose => loop {
                body.take(&self.buf[pos..self.filled], read_ns, reads);
                pos = self.filled;
                compact(&mut self.buf, &mut self.filled, &mut pos);
                match fill(stream, &mut self.buf, &mut self.filled).await {
                    Ok(ns) => read_ns = ns,
                    Err(ClientError::Closed) => break,
                    Err(err) => return Err(err),
                }
                reads += 1;
            },
        }
        exchange.end_ns = read_ns;
        // Nothing should follow without pipelining, but keep whatever did for the next answer.
        compact(&mut self.buf, &mut self.filled, &mut pos);
        Ok((exchange, head.close))
    }
}

/// Where decoded body bytes go.
struct Body<'a> {
    pending: &'a mut Vec<u8>,
    exchange: &'a mut Exchange,
    split: bool,
}

impl Body<'_> {
    fn take(&mut self, bytes: &[u8], read_ns: u64, read: u32) {
        self.exchange.body_len += bytes.len();
        if !self.split || bytes.is_empty() {
            return;
        }
        self.pending.extend_from_slice(bytes);
        let mut start = 0;
        while let Some(end) = self.pending[start..].windows(2).position(|w| w == b"\n\n") {
            let event = &self.pending[start..start + end];
            start += end + 2;
            match parse_event(event) {
                Parsed::Done => self.exchange.done = true,
                Parsed::Data(sent_ns) => self.exchange.events.push(Event { sent_ns, recv_ns: read_ns, read }),
                Parsed::Other => {}
            }
        }
        self.pending.drain(..start);
    }
}

/// What one server-sent event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// `data: [DONE]`.
    Done,
    /// A data event, with the instant it says it was sent, if it does.
    Data(Option<u64>),
    /// A comment or an event without data.
    Other,
}

/// Reads one event's text (without the blank line that ends it).
pub fn parse_event(event: &[u8]) -> Parsed {
    let mut data = None;
    for line in event.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(value) = line.strip_prefix(b"data:") {
            data = Some(value.strip_prefix(b" ").unwrap_or(value));
        }
    }
    let Some(data) = data else { return Parsed::Other };
    if data == b"[DONE]" {
        return Parsed::Done;
    }
    const KEY: &[u8] = b"\"sent_ns\":";
    let sent = data.windows(KEY.len()).position(|w| w == KEY).and_then(|at| {
        let digits: Vec<u8> = data[at + KEY.len()..].iter().take_while(|b| b.is_ascii_digit()).copied().collect();
        std::str::from_utf8(&digits).ok()?.parse().ok()
    });
    Parsed::Data(sent)
}

/// One step of decoding a chunked body, from the start of the bytes not yet decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// A chunk: its data at `start..start + len`; the next chunk begins at `next`.
    Data { start: usize, len: usize, next: usize },
    /// The last chunk and its trailers: the body ends at `next`.
    End { next: usize },
}

/// Decodes the next chunk of a chunked body at the start of `buf`; `Ok(None)` while it is incomplete.
pub fn chunk_step(buf: &[u8]) -> Result<Option<Step>, ParseError> {
    let Some(line_end) = find_crlf(buf) else { return Ok(None) };
    let line = std::str::from_utf8(&buf[..line_end]).map_err(|_| ParseError("chunk size is not UTF-8".to_owned()))?;
    let size_text = line.split(';').next().unwrap_or_default().trim();
    let size = usize::from_str_radix(size_text, 16).map_err(|_| ParseError(format!("bad chunk size `{size_text}`")))?;
    let start = line_end + 2;
    if size == 0 {
        // Trailers, if any, end with an empty line.
        let mut pos = start;
        loop {
            let Some(end) = find_crlf(&buf[pos..]) else { return Ok(None) };
            pos += end + 2;
            if end == 0 {
                return Ok(Some(Step::End { next: pos }));
            }
        }
    }
    if buf.len() < start + size + 2 {
        return Ok(None);
    }
    if &buf[start + size..start + size + 2] != b"\r\n" {
        return Err(ParseError("chunk not followed by CRLF".to_owned()));
    }
    Ok(Some(Step::Data { start, len: size, next: start + size + 2 }))
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// Drops the bytes before `pos`.
fn compact(buf: &mut [u8], filled: &mut usize, pos: &mut usize) {
    if *pos > 0 {
        buf.copy_within(*pos..*filled, 0);
        *filled -= *pos;
        *pos = 0;
    }
}

/// Reads more bytes, growing the buffer when full, and returns when the read returned. End of stream is
/// [`ClientError::Closed`].
async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>, filled: &mut usize) -> Result<u64, ClientError> {
    if *filled == buf.len() {
        buf.resize(buf.len() * 2, 0);
    }
    let n = stream.read(&mut buf[*filled..]).await?;
    let now = monotonic_ns();
    if n == 0 {
        return Err(ClientError::Closed);
    }
    *filled += n;
    Ok(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(sent_ns: u64) -> String {
        format!("data: {{\"choices\":[],\"sent_ns\":{sent_ns}}}\n\n")
    }

    #[test]
    fn reads_data_done_and_comments() {
        assert_eq!(parse_event(b"data: {\"x\":1,\"sent_ns\":42}"), Parsed::Data(Some(42)));
        assert_eq!(parse_event(b"event: message\r\ndata:{\"x\":1}"), Parsed::Data(None));
        assert_eq!(parse_event(b"data: [DONE]"), Parsed::Done);
        assert_eq!(parse_event(b": keep-alive"), Parsed::Other);
    }

    #[test]
    fn decodes_chunks_one_step_at_a_time() {
        assert_eq!(chunk_step(b"5\r\nhel"), Ok(None));
        assert_eq!(chunk_step(b"5;x=y\r\nhello\r\n0"), Ok(Some(Step::Data { start: 7, len: 5, next: 14 })));
        assert_eq!(chunk_step(b"0\r\n"), Ok(None));
        assert_eq!(chunk_step(b"0\r\n\r\nNEXT"), Ok(Some(Step::End { next: 5 })));
        assert_eq!(chunk_step(b"0\r\nTrailer: 1\r\n\r\n"), Ok(Some(Step::End { next: 17 })));
        assert!(chunk_step(b"5\r\nhelloXX").is_err());
        assert!(chunk_step(b"q\r\n").is_err());
    }

    /// Events split across reads are stamped with the read that completed them; two events in one read, written a
    /// gap apart, count as one held back.
    #[test]
    fn events_are_stamped_by_the_read_that_completes_them() {
        let mut pending = Vec::new();
        let mut exchange = Exchange::default();
        let mut body = Body { pending: &mut pending, exchange: &mut exchange, split: true };
        body.take(format!("{}{}", event(1_000), event(2_000_000)).as_bytes(), 10, 0);
        let third = event(3_000_000);
        let (head, tail) = third.split_at(9);
        body.take(head.as_bytes(), 20, 1);
        body.take(format!("{tail}data: [DO").as_bytes(), 30, 2);
        body.take(b"NE]\n\n", 40, 3);
        let events = &exchange.events;
        assert_eq!(events.len(), 3);
        assert!(exchange.done);
        assert_eq!(events.iter().map(|e| (e.recv_ns, e.read)).collect::<Vec<_>>(), [(10, 0), (10, 0), (30, 2)]);
        assert_eq!(events[2].sent_ns, Some(3_000_000));
        assert_eq!(crate::proxy::coalesced(events, 1_000_000), 1);
        // Written less than half a gap apart, two events in one read are just a burst from the source.
        assert_eq!(crate::proxy::coalesced(events, 10_000_000), 0);
        assert!(pending.is_empty());
    }

    #[test]
    fn without_splitting_only_the_length_counts() {
        let mut pending = Vec::new();
        let mut exchange = Exchange::default();
        let mut body = Body { pending: &mut pending, exchange: &mut exchange, split: false };
        body.take(event(5).as_bytes(), 1, 0);
        assert_eq!((exchange.body_len, exchange.events.len()), (event(5).len(), 0));
    }
}
