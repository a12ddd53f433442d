//! A minimal HTTP/1.1 client: one keep-alive TCP connection, one request in flight, no pipelining.
//!
//! The load generator shares the machine's cores with the router, so every cycle it spends is one the router does
//! not get. Requests are serialized once, up front, and written with one call; an answer is read by parsing only its
//! status line and the headers that say where the body ends (`Content-Length`, `Transfer-Encoding: chunked`,
//! `Connection: close`).

use std::fmt;
use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A head larger than this is treated as a broken answer rather than buffered without end.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Serializes one request. `Content-Length` is sent whenever there is a body or the method normally carries one.
pub fn encode_request(method: &str, path: &str, host: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(128 + body.len() + headers.iter().map(|(n, v)| n.len() + v.len() + 4).sum::<usize>());
    out.extend_from_slice(format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n").as_bytes());
    for (name, value) in headers {
        out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    if !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH") {
        out.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

/// How the body of an answer is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    Length(usize),
    Chunked,
    /// No length given: the body runs until the server closes the connection.
    UntilClose,
}

/// The parts of an answer's head the client needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    /// Bytes of the head, final empty line included.
    pub len: usize,
    pub body: BodyKind,
    /// The server will close the connection after this answer.
    pub close: bool,
}

/// An answer that is not HTTP/1.x as this client understands it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError(pub String);

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ParseError {}

fn parse_error(message: impl Into<String>) -> ParseError {
    ParseError(message.into())
}

/// Parses an answer's head from the start of `buf`. `Ok(None)`: the head is not complete yet.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, ParseError> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > MAX_HEAD_BYTES {
            return Err(parse_error(format!("no end of head in the first {MAX_HEAD_BYTES} bytes")));
        }
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| parse_error("head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let (version, rest) = status_line.split_once(' ').ok_or_else(|| parse_error("malformed status line"))?;
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        other => return Err(parse_error(format!("unsupported protocol `{other}`"))),
    };
    let code = rest.get(..3).filter(|c| c.bytes().all(|b| b.is_ascii_digit()));
    let status: u16 = code
        .and_then(|c| c.parse().ok())
        .filter(|_| rest.len() == 3 || rest.as_bytes()[3] == b' ')
        .ok_or_else(|| parse_error(format!("malformed status code in `{status_line}`")))?;

    let mut length = None;
    let mut chunked = false;
    let mut close = http10;
    for line in lines {
        let (name, value) = line.split_once(':').ok_or_else(|| parse_error(format!("malformed header `{line}`")))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n: usize = value.parse().map_err(|_| parse_error(format!("bad Content-Length `{value}`")))?;
            if length.is_some_and(|previous| previous != n) {
                return Err(parse_error("conflicting Content-Length headers"));
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.split(',').any(|coding| coding.trim().eq_ignore_ascii_case("chunked"));
        } else if name.eq_ignore_ascii_case("connection") {
            for option in value.split(',').map(str::trim) {
                if option.eq_ignore_ascii_case("close") {
                    close = true;
                } else if option.eq_ignore_ascii_case("keep-alive") {
                    close = false;
                }
            }
        }
    }
    let body = if (100..200).contains(&status) || status == 204 || status == 304 {
        BodyKind::Length(0)
    } else if chunked {
        BodyKind::Chunked
    } else if let Some(n) = length {
        BodyKind::Length(n)
    } else {
        BodyKind::UntilClose
    };
    let close = close || body == BodyKind::UntilClose;
    Ok(Some(Head { status, len: end + 4, body, close }))
}

/// Decodes a complete chunked body from the start of `buf` into `out`. Returns the bytes consumed, or `Ok(None)`
/// when more input is needed (`out` is then left cleared).
pub fn decode_chunked(buf: &[u8], out: &mut Vec<u8>) -> Result<Option<usize>, ParseError> {
    out.clear();
    let mut pos = 0;
    loop {
        let Some(line_end) = find_crlf(&buf[pos..]) else {
            out.clear();
            return Ok(None);
        };
        let line =
            std::str::from_utf8(&buf[pos..pos + line_end]).map_err(|_| parse_error("chunk size is not UTF-8"))?;
        let size_text = line.split(';').next().unwrap_or_default().trim();
        let size =
            usize::from_str_radix(size_text, 16).map_err(|_| parse_error(format!("bad chunk size `{size_text}`")))?;
        pos += line_end + 2;
        if size == 0 {
            // Trailers, if any, end with an empty line.
            loop {
                let Some(trailer_end) = find_crlf(&buf[pos..]) else {
                    out.clear();
                    return Ok(None);
                };
                pos += trailer_end + 2;
                if trailer_end == 0 {
                    return Ok(Some(pos));
                }
            }
        }
        if buf.len() < pos + size + 2 {
            out.clear();
            return Ok(None);
        }
        out.extend_from_slice(&buf[pos..pos + size]);
        if &buf[pos + size..pos + size + 2] != b"\r\n" {
            return Err(parse_error("chunk not followed by CRLF"));
        }
        pos += size + 2;
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// Why a request got no answer.
#[derive(Debug)]
pub enum ClientError {
    Io(io::Error),
    /// The server closed the connection before the answer was complete.
    Closed,
    Protocol(ParseError),
}

impl ClientError {
    /// A short label to count errors by.
    pub fn label(&self) -> String {
        match self {
            ClientError::Io(err) => format!("I/O {:?}", err.kind()),
            ClientError::Closed => "connection closed".to_owned(),
            ClientError::Protocol(_) => "malformed answer".to_owned(),
        }
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Io(err) => write!(f, "I/O error: {err}"),
            ClientError::Closed => f.write_str("the server closed the connection before answering"),
            ClientError::Protocol(err) => write!(f, "malformed answer: {err}"),
        }
    }
}

impl std::error::Error for ClientError {}

impl From<io::Error> for ClientError {
    fn from(err: io::Error) -> Self {
        ClientError::Io(err)
    }
}

impl From<ParseError> for ClientError {
    fn from(err: ParseError) -> Self {
        ClientError::Protocol(err)
    }
}

/// Status of an answer; its body stays readable through [`Client::body`] until the next request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
}

/// One keep-alive connection to a server, reopened on the next request after an error or a `Connection: close`.
pub struct Client {
    addr: SocketAddr,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
    filled: usize,
    body: Vec<u8>,
    /// The latest answer's head, kept only when asked ([`Client::keeping_heads`]): copying it costs the load
    /// generator.
    head: Option<Vec<u8>>,
}

impl Client {
    /// A client that connects on its first request.
    pub fn new(addr: SocketAddr) -> Self {
        Client { addr, stream: None, buf: vec![0; 4096], filled: 0, body: Vec::new(), head: None }
    }

    /// Keeps each answer's head, for [`Client::header`].
    pub fn keeping_heads(mut self) -> Self {
        self.head = Some(Vec::new());
        self
    }

    /// A header of the latest answer (the first of that name, any case), when heads are kept.
    pub fn header(&self, name: &str) -> Option<&str> {
        let head = std::str::from_utf8(self.head.as_deref()?).ok()?;
        head.split("\r\n").skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim().eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }

    /// A client with its connection already open.
    pub async fn connect(addr: SocketAddr) -> io::Result<Self> {
        let mut client = Client::new(addr);
        client.stream = Some(open(addr).await?);
        Ok(client)
    }

    /// The body of the latest answer.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// Sends one serialized request and reads its answer.
    pub async fn send(&mut self, request: &[u8]) -> Result<Answer, ClientError> {
        let result = self.exchange(request).await;
        match &result {
            Ok((_, false)) => {}
            _ => {
                self.stream = None;
                self.filled = 0;
            }
        }
        result.map(|(answer, _)| answer)
    }

    async fn exchange(&mut self, request: &[u8]) -> Result<(Answer, bool), ClientError> {
        let stream = match &mut self.stream {
            Some(stream) => stream,
            None => self.stream.insert(open(self.addr).await?),
        };
        stream.write_all(request).await?;
        let head = loop {
            if let Some(head) = parse_head(&self.buf[..self.filled])? {
                break head;
            }
            fill(stream, &mut self.buf, &mut self.filled).await?;
        };
        if let Some(kept) = &mut self.head {
            kept.clear();
            kept.extend_from_slice(&self.buf[..head.len]);
        }
        let consumed = match head.body {
            BodyKind::Length(n) => {
                let total = head.len + n;
                if self.buf.len() < total {
                    self.buf.resize(total, 0);
                }
                while self.filled < total {
                    fill(stream, &mut self.buf, &mut self.filled).await?;
                }
                self.body.clear();
                self.body.extend_from_slice(&self.buf[head.len..total]);
                total
            }
            BodyKind::Chunked => loop {
                if let Some(n) = decode_chunked(&self.buf[head.len..self.filled], &mut self.body)? {
                    break head.len + n;
                }
                fill(stream, &mut self.buf, &mut self.filled).await?;
            },
            BodyKind::UntilClose => {
                loop {
                    match fill(stream, &mut self.buf, &mut self.filled).await {
                        Ok(()) => {}
                        Err(ClientError::Closed) => break,
                        Err(err) => return Err(err),
                    }
                }
                self.body.clear();
                self.body.extend_from_slice(&self.buf[head.len..self.filled]);
                self.filled
            }
        };
        // Nothing should follow without pipelining, but keep whatever did for the next answer.
        self.buf.copy_within(consumed..self.filled, 0);
        self.filled -= consumed;
        Ok((Answer { status: head.status }, head.close))
    }
}

async fn open(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Reads more bytes into `buf[filled..]`, growing it when full. End of stream is [`ClientError::Closed`].
async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>, filled: &mut usize) -> Result<(), ClientError> {
    if *filled == buf.len() {
        buf.resize(buf.len() * 2, 0);
    }
    match stream.read(&mut buf[*filled..]).await? {
        0 => Err(ClientError::Closed),
        n => {
            *filled += n;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Head {
        parse_head(text.as_bytes()).expect("parses").expect("complete")
    }

    #[test]
    fn parses_status_and_content_length_in_any_case() {
        let parsed = head("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nCONTENT-LENGTH:  42\r\n\r\n{\"a\"");
        assert_eq!(parsed, Head { status: 200, len: 72, body: BodyKind::Length(42), close: false });
        let parsed = head("HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        assert_eq!(parsed.status, 401);
        assert!(parsed.close);
    }

    #[test]
    fn an_incomplete_head_asks_for_more() {
        assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"), Ok(None));
        assert_eq!(parse_head(b""), Ok(None));
    }

    #[test]
    fn rejects_what_is_not_http() {
        assert!(parse_head(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 2x0 OK\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 2000 OK\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n").is_err());
        assert!(parse_head(&vec![b'x'; MAX_HEAD_BYTES + 1]).is_err());
    }

    #[test]
    fn chooses_how_the_body_ends() {
        assert_eq!(head("HTTP/1.1 204 No Content\r\n\r\n").body, BodyKind::Length(0));
        assert_eq!(head("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n").body, BodyKind::Chunked);
        let until_close = head("HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(until_close.body, BodyKind::UntilClose);
        assert!(until_close.close);
        // HTTP/1.0 closes unless it says keep-alive.
        assert!(head("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n").close);
        assert!(!head("HTTP/1.0 200 OK\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n").close);
    }

    #[test]
    fn decodes_chunked_bodies_with_extensions_and_trailers() {
        let mut out = Vec::new();
        let wire = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT";
        assert_eq!(decode_chunked(wire, &mut out), Ok(Some(wire.len() - 4)));
        assert_eq!(out, b"Wikipedia");
        assert_eq!(decode_chunked(b"3\r\nabc\r\n0\r\n\r\n", &mut out), Ok(Some(13)));
        assert_eq!(out, b"abc");
    }

    #[test]
    fn an_incomplete_chunked_body_asks_for_more() {
        let mut out = Vec::new();
        assert_eq!(decode_chunked(b"4\r\nWi", &mut out), Ok(None));
        assert!(out.is_empty());
        assert_eq!(decode_chunked(b"4\r\nWiki\r\n0\r\n", &mut out), Ok(None));
        assert!(decode_chunked(b"zz\r\n", &mut out).is_err());
        assert!(decode_chunked(b"2\r\nabXX0\r\n\r\n", &mut out).is_err());
    }

    #[test]
    fn encodes_a_request_with_length_and_headers() {
        let wire = encode_request("POST", "/v0/health", "127.0.0.1:9", &[("X-Node-Token", "t")], b"{}");
        assert_eq!(
            String::from_utf8(wire).expect("utf-8"),
            "POST /v0/health HTTP/1.1\r\nHost: 127.0.0.1:9\r\nX-Node-Token: t\r\nContent-Length: 2\r\n\r\n{}"
        );
        let wire = encode_request("POST", "/v0/nodes/x/approve", "h", &[], b"");
        assert!(String::from_utf8(wire).expect("utf-8").ends_with("Content-Length: 0\r\n\r\n"));
        let wire = encode_request("GET", "/healthz", "h", &[], b"");
        assert_eq!(wire, b"GET /healthz HTTP/1.1\r\nHost: h\r\n\r\n");
    }

    async fn read_request(stream: &mut TcpStream) {
        let mut buf = [0; 1024];
        let mut seen = Vec::new();
        while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await.expect("read");
            assert!(n > 0, "client closed early");
            seen.extend_from_slice(&buf[..n]);
        }
    }

    /// The client against a scripted server: keep-alive answers, a chunked one, and a close.
    #[tokio::test]
    async fn client_reads_answers_and_reconnects_after_close() {
        use tokio::net::TcpListener;

        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (mut first, _) = listener.accept().await.expect("accept");
            read_request(&mut first).await;
            // Written in two pieces to exercise the partial-read path.
            first.write_all(b"HTTP/1.1 200 OK\r\nContent-Le").await.expect("write");
            first.flush().await.expect("flush");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            first.write_all(b"ngth: 5\r\n\r\nhello").await.expect("write");
            read_request(&mut first).await;
            first
                .write_all(b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n2\r\nno\r\n0\r\n\r\n")
                .await
                .expect("write");
            drop(first);
            let (mut second, _) = listener.accept().await.expect("accept again");
            read_request(&mut second).await;
            second.write_all(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok").await.expect("write");
        });
        let mut client = Client::new(addr).keeping_heads();
        let get = encode_request("GET", "/", "h", &[], b"");
        assert_eq!(client.send(&get).await.expect("first").status, 200);
        assert_eq!(client.body(), b"hello");
        assert_eq!(client.header("content-length"), Some("5"));
        assert_eq!(client.header("x-missing"), None);
        assert_eq!(client.send(&get).await.expect("second").status, 404);
        assert_eq!(client.body(), b"no");
        assert_eq!(client.send(&get).await.expect("third, on a new connection").status, 201);
        assert_eq!(client.body(), b"ok");
        server.await.expect("server");
    }
}
