//! What every fake provider shares: binding a local port and serving its routes there, with
//! `TCP_NODELAY` as real servers set it, until the fake is dropped; its script and request
//! log; and the small pieces of answer-making that every provider does alike.

use std::convert::Infallible;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};

use axum::body::{Body, Bytes};
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

/// `127.0.0.1:0`: a free local port, where `start()` puts a fake.
pub fn any_local_port() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

/// A fake's bound and running server, before the fake wraps it.
pub struct Bound<S> {
    /// `http://127.0.0.1:PORT` (no trailing slash).
    base_url: String,
    /// The bound address (with the real port when asked for port 0).
    addr: SocketAddr,
    /// The state the routes share with the fake.
    shared: Arc<S>,
    /// Stops the server when dropped.
    server: Serving,
}

impl<S> Bound<S> {
    /// The parts a fake keeps: base URL, address, shared state, server.
    pub fn into_parts(self) -> (String, SocketAddr, Arc<S>, Serving) {
        (self.base_url, self.addr, self.shared, self.server)
    }
}

/// Binds `addr`, gives `routes` the state `shared`, and serves them on the current tokio
/// runtime.
///
/// # Errors
/// If `addr` cannot be bound or its local address cannot be read.
pub async fn bind<S>(addr: SocketAddr, shared: S, routes: Router<Arc<S>>) -> io::Result<Bound<S>>
where
    S: Send + Sync + 'static,
{
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let shared = Arc::new(shared);
    let app = routes.with_state(Arc::clone(&shared));
    let server = Serving::start(listener, app);
    Ok(Bound {
        base_url: format!("http://{addr}"),
        addr,
        shared,
        server,
    })
}

/// A fake's HTTP server; dropping it stops the server.
pub struct Serving {
    task: JoinHandle<()>,
}

impl Serving {
    /// Serves `app` on `listener` on the current tokio runtime.
    pub fn start(listener: TcpListener, app: Router) -> Self {
        let task = tokio::spawn(async move {
            let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                let _ = tcp.set_nodelay(true);
            });
            // Only fails if accepting fails fatally; nothing useful to do then.
            let _ = axum::serve(listener, app).await;
        });
        Self { task }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A fake's script and log: the behaviour a test sets, and every request the fake received.
pub struct Script<B, R> {
    behavior: Mutex<B>,
    requests: Mutex<Vec<R>>,
}

impl<B: Default, R> Default for Script<B, R> {
    fn default() -> Self {
        Self {
            behavior: Mutex::new(B::default()),
            requests: Mutex::new(Vec::new()),
        }
    }
}

impl<B: Clone, R: Clone> Script<B, R> {
    /// The behaviour for the request at hand.
    pub fn behavior(&self) -> B {
        self.behavior
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the behaviour for subsequent requests.
    pub fn set_behavior(&self, b: B) {
        *self.behavior.lock().unwrap_or_else(PoisonError::into_inner) = b;
    }

    /// Logs a received request.
    pub fn record(&self, r: R) {
        self.requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(r);
    }

    /// Every logged request, in order.
    pub fn requests(&self) -> Vec<R> {
        self.requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Where a streaming handler writes its body, frame by frame.
pub type Frames = mpsc::Sender<Result<Bytes, Infallible>>;

/// A response body fed through the returned sender; the body ends when the sender is dropped.
pub fn streamed_body() -> (Frames, Body) {
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(16);
    (tx, Body::from_stream(ReceiverStream::new(rx)))
}

/// Splits text into word pieces that keep their leading whitespace.
pub fn pieces(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for ch in text.chars() {
        if ch.is_whitespace() && !cur.trim().is_empty() {
            out.push(std::mem::take(&mut cur));
        }
        cur.push(ch);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// `n` as a token count (saturating).
pub fn to_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// FNV-1a of `text`, its start varied by `seed`.
pub fn fnv1a(text: &str, seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for byte in text.bytes() {
        h = (h ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Deterministic, L2-normalised pseudo-embedding of `text`, component `i` drawn from the top
/// 16 bits of `hash(text, i)`.
pub fn embedding(text: &str, dims: usize, hash: fn(&str, u64) -> u64) -> Vec<f32> {
    let raw: Vec<f32> = (0..to_u64(dims))
        .map(|i| f32::from(u16::try_from(hash(text, i) >> 48).unwrap_or(0)) / 32767.5 - 1.0)
        .collect();
    let norm = raw.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    raw.into_iter().map(|x| x / norm).collect()
}
