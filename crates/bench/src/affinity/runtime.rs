//! A stand-in runtime with a prefix cache, as vLLM's automatic prefix caching or llama.cpp's slot cache behave
//! seen from outside: what it already computed, it does not compute again.
//!
//! The prompt is the text of the chat messages in order (`role\ncontent\n` each), four bytes to a token, cut into
//! blocks of [`BLOCK_TOKENS`]; a block is named by a hash of itself and every block before it, so a block is reused
//! only after the same prefix. Each stand-in keeps the blocks it computed in a least-recently-used cache of
//! `cache_tokens`. A request waits for one of `slots` slots, counts the leading blocks the cache holds, computes the
//! rest at `prefill_tokens_per_sec` (a timer, not the CPU), stores its blocks, streams `chunks` events
//! `chunk_gap` apart (the first one is the time to first token), and gives the slot back.
//!
//! Every stand-in counts the requests it answered and the prompt tokens it was sent and found cached; its queue
//! (requests waiting for a slot) and cache use are read for the heartbeat's `load`.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use llm_router_protocol::RuntimeLoad;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::standin::{STREAM_HEAD, Servers, monotonic_ns, push_done, push_event, read_request, response};

/// Tokens in one cached block (vLLM's default block size).
pub const BLOCK_TOKENS: u64 = 16;

/// Bytes of prompt text to a token.
pub const BYTES_PER_TOKEN: usize = 4;

const BLOCK_BYTES: usize = BLOCK_TOKENS as usize * BYTES_PER_TOKEN;

/// How every stand-in computes and answers.
#[derive(Debug, Clone)]
pub struct Model {
    pub name: String,
    /// Requests computed at once; the others wait.
    pub slots: usize,
    /// Prompt tokens one slot computes per second.
    pub prefill_tokens_per_sec: f64,
    /// Tokens the prefix cache holds.
    pub cache_tokens: u64,
    /// Events streamed after the prompt is computed.
    pub chunks: usize,
    pub chunk_gap: Duration,
}

/// What one stand-in did since its last reset.
#[derive(Debug, Default)]
pub struct Counters {
    pub answered: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub cached_tokens: AtomicU64,
    pub waiting: AtomicU64,
    pub running: AtomicU64,
}

/// One stand-in's state: its slots, its cache and its counters.
struct Node {
    slots: Semaphore,
    cache: Mutex<BlockCache>,
    counters: Counters,
}

/// A set of running stand-ins, on a thread of their own; dropping it stops them.
pub struct CachedRuntimes {
    servers: Servers,
    nodes: Vec<Arc<Node>>,
    model: Arc<Model>,
}

impl CachedRuntimes {
    /// Binds `count` stand-ins on 127.0.0.1 and starts serving.
    pub fn start(count: usize, model: Model) -> anyhow::Result<CachedRuntimes> {
        let model = Arc::new(model);
        let capacity = model.cache_tokens / BLOCK_TOKENS;
        let nodes: Vec<Arc<Node>> = (0..count)
            .map(|_| {
                Arc::new(Node {
                    slots: Semaphore::new(model.slots),
                    cache: Mutex::new(BlockCache::new(capacity)),
                    counters: Counters::default(),
                })
            })
            .collect();
        let servers =
            Servers::start(count, "cached-runtimes", |i, listener| accept(listener, nodes[i].clone(), model.clone()))?;
        Ok(CachedRuntimes { servers, nodes, model })
    }

    pub fn addrs(&self) -> &[SocketAddr] {
        self.servers.addrs()
    }

    /// Stand-in `i`'s counters.
    pub fn counters(&self, i: usize) -> &Counters {
        &self.nodes[i].counters
    }

    /// What stand-in `i` would report in a heartbeat now, as vLLM's `/metrics` would.
    pub fn load(&self, i: usize) -> RuntimeLoad {
        let node = &self.nodes[i];
        let used = node.cache.lock().map_or(0, |cache| cache.len()) as f64;
        let capacity = (self.model.cache_tokens / BLOCK_TOKENS).max(1) as f64;
        RuntimeLoad {
            running: Some(node.counters.running.load(Ordering::Relaxed) as u32),
            waiting: Some(node.counters.waiting.load(Ordering::Relaxed) as u32),
            kv_cache_usage: Some((used / capacity).min(1.0)),
        }
    }

    /// Empties every cache and zeroes the counters (nothing may be in flight).
    pub fn reset(&self) {
        for node in &self.nodes {
            if let Ok(mut cache) = node.cache.lock() {
                cache.clear();
            }
            let counters = &node.counters;
            for counter in [&counters.answered, &counters.prompt_tokens, &counters.cached_tokens] {
                counter.store(0, Ordering::Relaxed);
            }
        }
    }
}

/// A least-recently-used set of block hashes, at most `capacity` of them.
#[derive(Debug)]
pub struct BlockCache {
    capacity: u64,
    /// Block → when it was last used.
    used: HashMap<u64, u64>,
    /// When → block, oldest first.
    order: BTreeMap<u64, u64>,
    clock: u64,
}

impl BlockCache {
    pub fn new(capacity: u64) -> Self {
        BlockCache { capacity, used: HashMap::new(), order: BTreeMap::new(), clock: 0 }
    }

    pub fn len(&self) -> usize {
        self.used.len()
    }

    fn clear(&mut self) {
        self.used.clear();
        self.order.clear();
    }

    /// How many of `blocks`, from the first, the cache holds; those are marked used.
    pub fn leading_hits(&mut self, blocks: &[u64]) -> usize {
        let hits = blocks.iter().take_while(|block| self.used.contains_key(block)).count();
        for &block in &blocks[..hits] {
            self.touch(block);
        }
        hits
    }

    /// Stores `blocks` (or marks them used), evicting the least recently used beyond the capacity.
    pub fn store(&mut self, blocks: &[u64]) {
        for &block in blocks {
            self.touch(block);
        }
        while self.used.len() as u64 > self.capacity {
            let Some((_, oldest)) = self.order.pop_first() else { break };
            self.used.remove(&oldest);
        }
    }

    fn touch(&mut self, block: u64) {
        self.clock += 1;
        if let Some(at) = self.used.insert(block, self.clock) {
            self.order.remove(&at);
        }
        self.order.insert(self.clock, block);
    }
}

/// The prompt of a chat completion body as the stand-in sees it: each message's role and content, in order.
pub fn prompt_text(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Message {
        role: String,
        content: String,
    }
    #[derive(serde::Deserialize)]
    struct Body {
        messages: Vec<Message>,
    }
    let body: Body = serde_json::from_slice(body).ok()?;
    let mut text = String::new();
    for message in body.messages {
        text.push_str(&message.role);
        text.push('\n');
        text.push_str(&message.content);
        text.push('\n');
    }
    Some(text)
}

/// The prompt's tokens, and the names of its full blocks: each a hash of the block and the name of the one before.
pub fn blocks(prompt: &str) -> (u64, Vec<u64>) {
    let tokens = prompt.len().div_ceil(BYTES_PER_TOKEN) as u64;
    let mut previous = 0u64;
    let names = prompt
        .as_bytes()
        .chunks_exact(BLOCK_BYTES)
        .map(|block| {
            previous = xxh3_64_with_seed(block, previous);
            previous
        })
        .collect();
    (tokens, names)
}

async fn accept(listener: TcpListener, node: Arc<Node>, model: Arc<Model>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        if stream.set_nodelay(true).is_err() {
            continue;
        }
        let (node, model) = (node.clone(), model.clone());
        tokio::spawn(async move { serve(stream, &node, &model).await });
    }
}

/// Serves one keep-alive connection until the peer closes it or breaks the protocol.
async fn serve(mut stream: TcpStream, node: &Node, model: &Model) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut filled = 0;
    loop {
        let Some(head) = read_request(&mut stream, &mut buf, &mut filled).await else { return };
        let total = head.head_len + head.body_len;
        let prompt = head.post_completions.then(|| prompt_text(&buf[head.head_len..total])).flatten();
        buf.copy_within(total..filled, 0);
        filled -= total;
        let written = match prompt {
            Some(prompt) => answer(&mut stream, node, model, &prompt).await,
            None if head.get_models => {
                let list = serde_json::json!({"object": "list", "data": [{"id": model.name, "object": "model"}]});
                stream.write_all(&response(200, "application/json", list.to_string().as_bytes())).await
            }
            None => stream.write_all(&response(404, "application/json", b"{\"error\":\"not found\"}")).await,
        };
        if written.is_err() {
            return;
        }
    }
}

/// One request: a slot, the prefill of what is not cached, then the stream.
async fn answer(stream: &mut TcpStream, node: &Node, model: &Model, prompt: &str) -> std::io::Result<()> {
    let (tokens, names) = blocks(prompt);
    let counters = &node.counters;
    counters.waiting.fetch_add(1, Ordering::Relaxed);
    let slot = node.slots.acquire().await;
    counters.waiting.fetch_sub(1, Ordering::Relaxed);
    let Ok(_slot) = slot else { return Err(std::io::ErrorKind::Other.into()) };
    counters.running.fetch_add(1, Ordering::Relaxed);
    struct Running<'a>(&'a AtomicU64);
    impl Drop for Running<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::Relaxed);
        }
    }
    let running = Running(&counters.running);
    let hits = node.cache.lock().map_or(0, |mut cache| cache.leading_hits(&names));
    let cached = hits as u64 * BLOCK_TOKENS;
    let computed = tokens.saturating_sub(cached);
    tokio::time::sleep(Duration::from_secs_f64(computed as f64 / model.prefill_tokens_per_sec)).await;
    if let Ok(mut cache) = node.cache.lock() {
        cache.store(&names);
    }
    counters.prompt_tokens.fetch_add(tokens, Ordering::Relaxed);
    counters.cached_tokens.fetch_add(cached, Ordering::Relaxed);
    let mut out = Vec::with_capacity(1024);
    out.extend_from_slice(STREAM_HEAD);
    for index in 0..model.chunks {
        if index > 0 {
            tokio::time::sleep(model.chunk_gap).await;
        }
        push_event(&mut out, &model.name, index, monotonic_ns(), false);
        stream.write_all(&out).await?;
        out.clear();
    }
    // Counted before the last bytes go out: a client that has read the whole answer finds it counted.
    counters.answered.fetch_add(1, Ordering::Relaxed);
    drop(running);
    push_done(&mut out);
    stream.write_all(&out).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::encode_request;
    use crate::sse::StreamClient;

    #[test]
    fn a_block_is_reused_only_after_the_same_prefix() {
        let shared = "s".repeat(BLOCK_BYTES * 3);
        let (tokens, a) = blocks(&format!("{shared}{}", "a".repeat(BLOCK_BYTES + 5)));
        assert_eq!(tokens, (BLOCK_BYTES as u64 * 4 + 5).div_ceil(4));
        assert_eq!(a.len(), 4, "only full blocks are named");
        let (_, b) = blocks(&format!("{shared}{}", "b".repeat(BLOCK_BYTES)));
        assert_eq!(a[..3], b[..3]);
        assert_ne!(a[3], b[3]);
        // The same block after another prefix is another block.
        let (_, c) = blocks(&format!("{}{}", "x".repeat(BLOCK_BYTES), "a".repeat(BLOCK_BYTES)));
        let (_, d) = blocks(&format!("{}{}", "y".repeat(BLOCK_BYTES), "a".repeat(BLOCK_BYTES)));
        assert_ne!(c[1], d[1]);
    }

    #[test]
    fn the_cache_counts_leading_hits_and_evicts_the_least_recently_used() {
        let mut cache = BlockCache::new(4);
        cache.store(&[1, 2, 3]);
        assert_eq!(cache.leading_hits(&[1, 2, 9, 3]), 2, "stops at the first miss");
        cache.store(&[4, 5]);
        // 3 was used least recently (1 and 2 were read after it was stored).
        assert_eq!(cache.len(), 4);
        assert_eq!(cache.leading_hits(&[3]), 0);
        assert_eq!(cache.leading_hits(&[1, 2, 4, 5]), 4);
    }

    #[test]
    fn the_prompt_is_every_message_in_order() {
        let body =
            br#"{"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}]}"#;
        assert_eq!(prompt_text(body).as_deref(), Some("system\nbe brief\nuser\nhi\n"));
        assert_eq!(prompt_text(br#"{"model":"m"}"#), None);
    }

    /// The second request with the same long prefix computes only its own question: it comes back sooner, and the
    /// counters say which tokens were cached.
    #[tokio::test]
    async fn a_repeated_prefix_is_computed_once() {
        let model = Model {
            name: "m".to_owned(),
            slots: 1,
            prefill_tokens_per_sec: 20_000.0,
            cache_tokens: 4096,
            chunks: 2,
            chunk_gap: Duration::from_millis(1),
        };
        let runtimes = CachedRuntimes::start(1, model).expect("start");
        let addr = runtimes.addrs()[0];
        let system = "policy ".repeat(800);
        let ask = |question: &str| {
            let body = serde_json::json!({"model": "m", "stream": true, "messages": [
                {"role": "system", "content": system}, {"role": "user", "content": question}]});
            encode_request("POST", "/v1/chat/completions", "h", &[], body.to_string().as_bytes())
        };
        let mut client = StreamClient::new(addr);
        let mut first_token = Vec::new();
        for question in ["first question", "second question"] {
            let sent = monotonic_ns();
            let exchange = client.send(&ask(question), true).await.expect("answer");
            assert!(exchange.done && exchange.events.len() == 2);
            first_token.push(exchange.events[0].recv_ns - sent);
        }
        let counters = runtimes.counters(0);
        let prompt = |question: &str| format!("system\n{system}\nuser\n{question}\n");
        let (first, second) = (blocks(&prompt("first question")).0, blocks(&prompt("second question")).0);
        assert_eq!(counters.prompt_tokens.load(Ordering::Relaxed), first + second);
        // The second request found every full block the two prompts share, and nothing of its own question.
        let shared = format!("system\n{system}\nuser\n").len();
        assert_eq!(counters.cached_tokens.load(Ordering::Relaxed), (shared / BLOCK_BYTES) as u64 * BLOCK_TOKENS);
        // Computing the first prompt's 1,407 tokens at 20,000 a second takes 70 ms at least.
        assert!(first_token[0] >= 70_000_000, "{first_token:?}");
        assert_eq!(counters.answered.load(Ordering::Relaxed), 2);
        let load = runtimes.load(0);
        assert_eq!((load.running, load.waiting), (Some(0), Some(0)));
        assert!(load.kv_cache_usage.is_some_and(|used| used > 0.3));
        runtimes.reset();
        assert_eq!(runtimes.load(0).kv_cache_usage, Some(0.0));
    }
}
