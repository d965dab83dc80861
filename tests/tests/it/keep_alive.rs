//! Refusals leave a keep-alive connection usable: SDK connection pools reuse sockets, so a
//! 401 or 429 answered before the body was read must not break the next request on the same
//! connection. Spoken over one raw TCP socket, so no client library can hide a broken one by
//! silently reconnecting.

use std::time::Duration;

use claw_tests::gateway::TestGateway;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// One HTTP/1.1 keep-alive connection.
struct Connection {
    stream: BufReader<TcpStream>,
    host: String,
}

/// A response's status, headers (lower-cased names) and body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

impl Connection {
    async fn open(url: &str) -> Self {
        let host = url.trim_start_matches("http://").to_owned();
        let stream = TcpStream::connect(&host).await.expect("connect");
        Self {
            stream: BufReader::new(stream),
            host,
        }
    }

    /// Sends a POST with `body` and reads the whole response; `Err` when the connection broke.
    async fn post(&mut self, path: &str, key: &str, body: &[u8]) -> std::io::Result<Answer> {
        self.post_declaring(path, key, body.len(), body).await
    }

    /// Sends a POST whose head declares `length` bytes of body, then `body` (maybe fewer).
    async fn post_declaring(
        &mut self,
        path: &str,
        key: &str,
        length: usize,
        body: &[u8],
    ) -> std::io::Result<Answer> {
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ncontent-length: {length}\r\n\r\n",
            self.host,
        );
        let stream = self.stream.get_mut();
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body).await?;
        tokio::time::timeout(Duration::from_secs(10), self.read_answer())
            .await
            .map_err(|_| std::io::Error::other("no answer within 10 s"))?
    }

    async fn read_answer(&mut self) -> std::io::Result<Answer> {
        let mut line = String::new();
        if self.stream.read_line(&mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
        let mut headers = Vec::new();
        loop {
            line.clear();
            if self.stream.read_line(&mut line).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let trimmed = line.trim_end();
            if trimmed.is_empty() {
                break;
            }
            if let Some((name, value)) = trimmed.split_once(':') {
                headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
            }
        }
        let length: usize = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .ok_or_else(|| std::io::Error::other("no content-length"))?;
        let mut body = vec![0; length];
        self.stream.read_exact(&mut body).await?;
        Ok(Answer {
            status,
            headers,
            body,
        })
    }
}

/// A 4 KB chat request body.
fn big_request() -> Vec<u8> {
    let filler = "x".repeat(4096);
    serde_json::to_vec(&serde_json::json!({
        "model": "auto",
        "messages": [{"role": "user", "content": filler}]
    }))
    .unwrap()
}

/// Sends `n` requests on one connection; returns each one's status, failing on any broken one.
async fn on_one_connection(gw: &TestGateway, key: &str, n: usize) -> Vec<u16> {
    let mut connection = Connection::open(&gw.url).await;
    let body = big_request();
    let mut statuses = Vec::new();
    for i in 0..n {
        let answer = connection
            .post("/v1/chat/completions", key, &body)
            .await
            .unwrap_or_else(|e| panic!("request {i} on the reused connection failed: {e}"));
        assert_ne!(
            answer.header("connection"),
            Some("close"),
            "request {i}: the gateway gave up the connection"
        );
        assert!(!answer.body.is_empty());
        statuses.push(answer.status);
    }
    statuses
}

#[tokio::test]
async fn thirty_unknown_key_refusals_on_one_connection_break_nothing() {
    let gw = TestGateway::start().await;
    let unknown = format!("sk-nself-{}", "A".repeat(40));
    let statuses = on_one_connection(&gw, &unknown, 30).await;
    assert!(statuses.iter().all(|s| *s == 401), "{statuses:?}");
}

#[tokio::test]
async fn thirty_rate_limit_refusals_on_one_connection_break_nothing() {
    let gw = TestGateway::start().await;
    let (_, key) = gw.create_key("slow-lane", 1, false).await;
    let statuses = on_one_connection(&gw, &key, 31).await;
    assert_eq!(
        statuses[0], 200,
        "the first request is within the key's rpm"
    );
    assert!(statuses[1..].iter().all(|s| *s == 429), "{statuses:?}");
}

#[tokio::test]
async fn a_body_larger_than_the_limit_is_refused_with_connection_close() {
    let gw = TestGateway::start_with(&["--max-body-bytes", "1024"]).await;
    let (_, key) = gw.create_key("big", 60, false).await;
    let mut connection = Connection::open(&gw.url).await;
    // The head alone: the declared size is refused before any of the body is read.
    let answer = connection
        .post_declaring("/v1/chat/completions", &key, 256 * 1024, &[])
        .await
        .expect("an answer");
    assert_eq!(answer.status, 413);
    assert_eq!(
        answer.header("connection"),
        Some("close"),
        "a body the gateway will not read ends the connection, and says so"
    );
}
