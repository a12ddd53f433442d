//! Getting a replica's model file: a `file://` source is used where it lies; an `http(s)://` source is downloaded
//! into the model cache as `<cache>/<sha256>` (resumable, sha256 checked, disk space checked first).
//!
//! A download goes to `<sha256>.part` and is renamed to its final name only once its hash matched, so a file under
//! its final name is a verified one: a cache hit. A cut-off download resumes with `Range: bytes=N-` (the bytes
//! already there are hashed first); a server that answers 200 instead of 206 sends the whole file again. Two
//! replicas of the same file share one download: the second waits for the first and then finds the file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use reqwest::StatusCode;
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, RANGE};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Why a model could not be had; the message is the replica's `reason`.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0}")]
    Source(String),
    #[error("sha256 mismatch: expected {expected}, got {got}")]
    Mismatch { expected: String, got: String },
    #[error("not enough disk space in {dir}: need {need} bytes, {free} free")]
    NoSpace { dir: String, need: u64, free: u64 },
    #[error("download of {url} failed: {cause}")]
    Download { url: String, cause: String },
    #[error("{what} {path}: {cause}")]
    Io { what: &'static str, path: String, cause: std::io::Error },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> FetchError {
    let path = path.display().to_string();
    move |cause| FetchError::Io { what, path, cause }
}

/// Bytes of a download so far and its size once known, read by the replica's reports.
#[derive(Debug, Default)]
pub struct Progress {
    done: AtomicU64,
    /// `u64::MAX` while unknown.
    total: AtomicU64,
}

impl Progress {
    pub fn new() -> Self {
        Progress { done: AtomicU64::new(0), total: AtomicU64::new(u64::MAX) }
    }

    /// (bytes done, total when known).
    pub fn get(&self) -> (u64, Option<u64>) {
        let total = self.total.load(Ordering::Relaxed);
        (self.done.load(Ordering::Relaxed), (total != u64::MAX).then_some(total))
    }

    fn set(&self, done: u64, total: Option<u64>) {
        self.done.store(done, Ordering::Relaxed);
        self.total.store(total.unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}

/// A model file ready for a runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    pub path: PathBuf,
    pub size: u64,
    /// How long the download took; 0 for a cache hit or a file on the node.
    pub download_ms: u64,
}

/// The model cache, shared by every replica of the agent.
pub struct Fetcher {
    http: reqwest::Client,
    cache_dir: PathBuf,
    /// Files checked against a sha256, by (path, size, modification time): a restart does not hash them again.
    verified: Mutex<HashMap<(PathBuf, u64, SystemTime), String>>,
    /// One per sha256 being downloaded.
    downloads: Mutex<HashMap<String, Arc<Shared>>>,
}

/// A download several replicas wait for: one downloads while holding `turn`, the others then find the file.
struct Shared {
    turn: tokio::sync::Mutex<()>,
    progress: Arc<Progress>,
}

impl Fetcher {
    pub fn new(http: reqwest::Client, cache_dir: PathBuf) -> Self {
        Fetcher { http, cache_dir, verified: Mutex::default(), downloads: Mutex::default() }
    }

    /// Whether `source` must be downloaded (an `http(s)://` URL whose file is not in the cache yet).
    pub fn needs_download(&self, source: &str, sha256: Option<&str>) -> bool {
        is_url(source) && sha256.is_none_or(|sha| !self.cache_dir.join(sha.to_ascii_lowercase()).is_file())
    }

    /// The model file of `source`; `progress` follows a download.
    pub async fn fetch(
        &self,
        source: &str,
        sha256: Option<&str>,
        on_progress: impl FnOnce(Arc<Progress>),
    ) -> Result<Fetched, FetchError> {
        let sha256 = match sha256 {
            Some(sha) if is_sha256(sha) => Some(sha.to_ascii_lowercase()),
            Some(sha) => return Err(FetchError::Source(format!("`{sha}` is not a sha256 (64 hex digits)"))),
            None => None,
        };
        if let Some(rest) = source.strip_prefix("file://") {
            let path = PathBuf::from(rest);
            return self.local(&path, sha256.as_deref()).await;
        }
        if !is_url(source) {
            return Err(FetchError::Source(format!("source `{source}` is neither file:///path nor an http(s):// URL")));
        }
        let Some(sha256) = sha256 else {
            return Err(FetchError::Source(format!("source `{source}` is a URL but the deployment gives no sha256")));
        };
        let entry = {
            let mut downloads = self.downloads.lock().unwrap_or_else(|e| e.into_inner());
            downloads
                .entry(sha256.clone())
                .or_insert_with(|| {
                    Arc::new(Shared { turn: tokio::sync::Mutex::new(()), progress: Arc::new(Progress::new()) })
                })
                .clone()
        };
        on_progress(entry.progress.clone());
        let _turn = entry.turn.lock().await;
        let result = download(&self.http, source, &sha256, &self.cache_dir, &entry.progress).await;
        if result.is_ok() {
            self.downloads.lock().unwrap_or_else(|e| e.into_inner()).remove(&sha256);
        }
        result
    }

    /// A file on the node: it must be a regular file, and match `sha256` when one is given.
    async fn local(&self, path: &Path, sha256: Option<&str>) -> Result<Fetched, FetchError> {
        let meta = tokio::fs::metadata(path).await.map_err(io("cannot read the model file", path))?;
        if !meta.is_file() {
            return Err(FetchError::Source(format!("{} is not a regular file", path.display())));
        }
        let fetched = Fetched { path: path.to_owned(), size: meta.len(), download_ms: 0 };
        let Some(expected) = sha256 else { return Ok(fetched) };
        let key = (path.to_owned(), meta.len(), meta.modified().unwrap_or(SystemTime::UNIX_EPOCH));
        if self.verified.lock().unwrap_or_else(|e| e.into_inner()).get(&key).is_some_and(|sha| sha == expected) {
            return Ok(fetched);
        }
        let mut hasher = Sha256::new();
        hash_file(path, &mut hasher).await?;
        let got = hex::encode(hasher.finalize());
        if got != expected {
            return Err(FetchError::Mismatch { expected: expected.to_owned(), got });
        }
        self.verified.lock().unwrap_or_else(|e| e.into_inner()).insert(key, got);
        Ok(fetched)
    }
}

fn is_url(source: &str) -> bool {
    source.starts_with("http://") || source.starts_with("https://")
}

fn is_sha256(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Feed the whole of `path` to `hasher`; returns its length.
async fn hash_file(path: &Path, hasher: &mut Sha256) -> Result<u64, FetchError> {
    let mut file = tokio::fs::File::open(path).await.map_err(io("cannot read", path))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf).await.map_err(io("cannot read", path))?;
        if n == 0 {
            return Ok(total);
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
}

/// Bytes a download still needs on disk: the file's size less what is already there (and kept, or freed).
pub fn space_needed(total: u64, already_there: u64) -> u64 {
    total.saturating_sub(already_there)
}

/// Refuse a download that would not fit in `free` bytes.
pub fn check_space(dir: &Path, need: u64, free: u64) -> Result<(), FetchError> {
    if need > free {
        return Err(FetchError::NoSpace { dir: dir.display().to_string(), need, free });
    }
    Ok(())
}

/// Bytes free for an unprivileged user in the file system of `dir`.
fn free_space(dir: &Path) -> Result<u64, FetchError> {
    let stats = rustix::fs::statvfs(dir).map_err(|e| FetchError::Io {
        what: "cannot read the free space of",
        path: dir.display().to_string(),
        cause: e.into(),
    })?;
    Ok(stats.f_bavail.saturating_mul(stats.f_frsize))
}

/// Download `url` into `<cache_dir>/<sha256>`, resuming `<sha256>.part`; the file's path once verified.
pub async fn download(
    http: &reqwest::Client,
    url: &str,
    sha256: &str,
    cache_dir: &Path,
    progress: &Progress,
) -> Result<Fetched, FetchError> {
    let final_path = cache_dir.join(sha256);
    if let Ok(meta) = tokio::fs::metadata(&final_path).await
        && meta.is_file()
    {
        progress.set(meta.len(), Some(meta.len()));
        return Ok(Fetched { path: final_path, size: meta.len(), download_ms: 0 });
    }
    let started = Instant::now();
    tokio::fs::create_dir_all(cache_dir).await.map_err(io("cannot create the model cache", cache_dir))?;
    let part = cache_dir.join(format!("{sha256}.part"));
    let mut have = tokio::fs::metadata(&part).await.map(|m| m.len()).unwrap_or(0);

    let failed = |cause: String| FetchError::Download { url: url.to_owned(), cause };
    let mut request = http.get(url);
    if have > 0 {
        request = request.header(RANGE, format!("bytes={have}-"));
    }
    let mut response = request.send().await.map_err(|e| failed(crate::runtime::error_chain(&e)))?;
    let status = response.status();
    let length = response.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let resumed = match status {
        StatusCode::PARTIAL_CONTENT => {
            let start = response
                .headers()
                .get(CONTENT_RANGE)
                .and_then(|v| v.to_str().ok()?.strip_prefix("bytes ")?.split('-').next()?.parse::<u64>().ok());
            if start != Some(have) {
                return Err(failed(format!("asked for bytes from {have}, the server sent a range from {start:?}")));
            }
            true
        }
        StatusCode::OK => false,
        StatusCode::RANGE_NOT_SATISFIABLE => {
            // The partial file is as long as the file or longer: it is no use.
            let _ = tokio::fs::remove_file(&part).await;
            return Err(failed("the server refused to resume (416); starting over".into()));
        }
        other => return Err(failed(format!("HTTP {other}"))),
    };
    let total = length.map(|l| if resumed { have + l } else { l });
    if let Some(total) = total {
        check_space(cache_dir, space_needed(total, have), free_space(cache_dir)?)?;
    }

    let mut hasher = Sha256::new();
    let mut file = if resumed {
        hash_file(&part, &mut hasher).await?;
        tokio::fs::OpenOptions::new().append(true).open(&part).await.map_err(io("cannot write", &part))?
    } else {
        have = 0;
        tokio::fs::File::create(&part).await.map_err(io("cannot write", &part))?
    };
    progress.set(have, total);
    let received = loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if let Err(e) = file.write_all(&chunk).await {
                    break Err(io("cannot write", &part)(e));
                }
                hasher.update(&chunk);
                have += chunk.len() as u64;
                progress.set(have, total);
            }
            Ok(None) => break Ok(()),
            Err(e) => break Err(failed(crate::runtime::error_chain(&e))),
        }
    };
    // Written out before anything else looks at the partial file (tokio writes in the background), even when the
    // download was cut: the next try resumes from its length.
    file.flush().await.map_err(io("cannot write", &part))?;
    received?;
    file.sync_all().await.map_err(io("cannot write", &part))?;
    drop(file);
    if let Some(total) = total
        && have != total
    {
        return Err(failed(format!("the connection ended after {have} of {total} bytes")));
    }
    let got = hex::encode(hasher.finalize());
    if got != sha256 {
        let _ = tokio::fs::remove_file(&part).await;
        progress.set(0, total);
        return Err(FetchError::Mismatch { expected: sha256.to_owned(), got });
    }
    tokio::fs::rename(&part, &final_path).await.map_err(io("cannot rename", &part))?;
    Ok(Fetched {
        path: final_path,
        size: have,
        download_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    /// A file server for one body: it honours `Range: bytes=N-` with 206 and, while `cut_first` is set, closes the
    /// first answer halfway through. It records each request's Range header.
    struct FileServer {
        url: String,
        ranges: Arc<Mutex<Vec<Option<String>>>>,
    }

    async fn serve(body: Vec<u8>, cut_first: bool) -> FileServer {
        serve_with(body, cut_first, true).await
    }

    /// With `ranges` false, the server answers every request with the whole file (200), as some do.
    async fn serve_with(body: Vec<u8>, cut_first: bool, honour_ranges: bool) -> FileServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/model.gguf", listener.local_addr().expect("addr"));
        let ranges = Arc::new(Mutex::new(Vec::new()));
        let seen = ranges.clone();
        let served = Arc::new(AtomicUsize::new(0));
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else { return };
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let range = head
                    .lines()
                    .find_map(|l| l.strip_prefix("range: bytes="))
                    .map(|r| r.trim().trim_end_matches('-').to_owned());
                seen.lock().expect("lock").push(range.clone());
                let start: usize = range.as_deref().filter(|_| honour_ranges).and_then(|r| r.parse().ok()).unwrap_or(0);
                let rest = &body[start..];
                let status = if start > 0 {
                    format!("206 Partial Content\r\ncontent-range: bytes {start}-{}/{}", body.len() - 1, body.len())
                } else {
                    "200 OK".to_owned()
                };
                let answer =
                    format!("HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", rest.len());
                let _ = stream.write_all(answer.as_bytes()).await;
                let first = served.fetch_add(1, Ordering::SeqCst) == 0;
                let send = if cut_first && first { &rest[..rest.len() / 2] } else { rest };
                let _ = stream.write_all(send).await;
                let _ = stream.shutdown().await;
            }
        });
        FileServer { url, ranges }
    }

    fn http() -> reqwest::Client {
        crate::client::install_tls_provider();
        reqwest::Client::new()
    }

    fn body() -> Vec<u8> {
        (0..300_000u32).map(|i| (i % 251) as u8).collect()
    }

    fn sha(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    #[tokio::test]
    async fn a_download_lands_in_the_cache_under_its_sha256() {
        let body = body();
        let server = serve(body.clone(), false).await;
        let cache = tempfile::tempdir().expect("dir");
        let fetcher = Fetcher::new(http(), cache.path().to_owned());
        let sum = sha(&body);
        assert!(fetcher.needs_download(&server.url, Some(&sum)));
        let mut seen = None;
        let got = fetcher.fetch(&server.url, Some(&sum), |p| seen = Some(p)).await.expect("downloaded");
        assert_eq!(got.path, cache.path().join(&sum));
        assert_eq!(got.size, body.len() as u64);
        assert_eq!(std::fs::read(&got.path).expect("file"), body);
        assert!(!cache.path().join(format!("{sum}.part")).exists());
        assert_eq!(seen.expect("progress").get(), (body.len() as u64, Some(body.len() as u64)));

        // Again: a cache hit, nothing asked of the server.
        assert!(!fetcher.needs_download(&server.url, Some(&sum)));
        let again = fetcher.fetch(&server.url, Some(&sum.to_ascii_uppercase()), |_| {}).await.expect("hit");
        assert_eq!(again.download_ms, 0);
        assert_eq!(server.ranges.lock().expect("lock").len(), 1);
    }

    #[tokio::test]
    async fn a_cut_download_resumes_where_it_stopped() {
        let body = body();
        let server = serve(body.clone(), true).await;
        let cache = tempfile::tempdir().expect("dir");
        let sum = sha(&body);
        let http = http();
        let progress = Progress::new();
        let err = download(&http, &server.url, &sum, cache.path(), &progress).await.expect_err("cut off");
        assert!(matches!(err, FetchError::Download { .. }), "{err}");
        let part = cache.path().join(format!("{sum}.part"));
        let kept = std::fs::metadata(&part).expect("partial kept").len();
        assert!(kept > 0 && kept < body.len() as u64, "{kept}");

        let got = download(&http, &server.url, &sum, cache.path(), &progress).await.expect("resumed");
        assert_eq!(std::fs::read(&got.path).expect("file"), body);
        assert_eq!(*server.ranges.lock().expect("lock"), [None, Some(kept.to_string())]);
        assert!(!part.exists());
    }

    #[tokio::test]
    async fn a_server_without_ranges_sends_the_file_anew() {
        let body = body();
        let server = serve_with(body.clone(), true, false).await;
        let cache = tempfile::tempdir().expect("dir");
        let sum = sha(&body);
        let http = http();
        let progress = Progress::new();
        download(&http, &server.url, &sum, cache.path(), &progress).await.expect_err("cut off");
        let got = download(&http, &server.url, &sum, cache.path(), &progress).await.expect("whole file again");
        assert_eq!(std::fs::read(&got.path).expect("file"), body);
        assert_eq!(server.ranges.lock().expect("lock").len(), 2);
    }

    #[tokio::test]
    async fn replicas_of_one_file_share_its_download() {
        let body = body();
        let server = serve(body.clone(), false).await;
        let cache = tempfile::tempdir().expect("dir");
        let fetcher = Fetcher::new(http(), cache.path().to_owned());
        let sum = sha(&body);
        let (a, b) = tokio::join!(
            fetcher.fetch(&server.url, Some(&sum), |_| {}),
            fetcher.fetch(&server.url, Some(&sum), |_| {})
        );
        assert_eq!(a.expect("first").path, b.expect("second").path);
        assert_eq!(server.ranges.lock().expect("lock").len(), 1, "one download for both");
    }

    #[tokio::test]
    async fn a_wrong_sha256_fails_and_drops_the_partial_file() {
        let body = body();
        let server = serve(body.clone(), false).await;
        let cache = tempfile::tempdir().expect("dir");
        let wrong = "0".repeat(64);
        let err = download(&http(), &server.url, &wrong, cache.path(), &Progress::new()).await.expect_err("mismatch");
        assert_eq!(err.to_string(), format!("sha256 mismatch: expected {wrong}, got {}", sha(&body)));
        assert_eq!(std::fs::read_dir(cache.path()).expect("dir").count(), 0, "nothing left in the cache");
    }

    #[test]
    fn disk_space_is_checked_against_what_is_still_missing() {
        assert_eq!(space_needed(1000, 400), 600);
        assert_eq!(space_needed(1000, 1200), 0);
        assert!(check_space(Path::new("/c"), 600, 600).is_ok());
        let err = check_space(Path::new("/c"), 601, 600).expect_err("too big");
        assert_eq!(err.to_string(), "not enough disk space in /c: need 601 bytes, 600 free");
        assert!(free_space(Path::new("/")).expect("statvfs") > 0);
    }

    #[tokio::test]
    async fn a_file_on_the_node_is_checked_once() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("m.gguf");
        std::fs::write(&file, b"weights").expect("write");
        let fetcher = Fetcher::new(http(), dir.path().join("cache"));
        let source = format!("file://{}", file.display());
        let got = fetcher.fetch(&source, Some(&sha(b"weights")), |_| {}).await.expect("verified");
        assert_eq!((got.path.as_path(), got.size, got.download_ms), (file.as_path(), 7, 0));
        assert_eq!(fetcher.verified.lock().expect("lock").len(), 1);
        let err = fetcher.fetch(&source, Some(&sha(b"other")), |_| {}).await.expect_err("mismatch");
        assert!(err.to_string().starts_with("sha256 mismatch"), "{err}");
        fetcher.fetch(&source, None, |_| {}).await.expect("no sum to check");

        let err = fetcher.fetch(&format!("file://{}", dir.path().display()), None, |_| {}).await.expect_err("dir");
        assert!(err.to_string().contains("not a regular file"), "{err}");
        let err = fetcher.fetch("file:///nonexistent/m.gguf", None, |_| {}).await.expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/m.gguf"), "{err}");
        let err = fetcher.fetch("https://h/m.gguf", None, |_| {}).await.expect_err("no sha");
        assert!(err.to_string().contains("sha256"), "{err}");
        let err = fetcher.fetch("s3://b/m.gguf", None, |_| {}).await.expect_err("scheme");
        assert!(err.to_string().contains("neither"), "{err}");
    }
}
