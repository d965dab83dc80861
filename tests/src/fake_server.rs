//! What every fake provider shares: serving its routes on a local listener, with
//! `TCP_NODELAY` as real servers set it, until the fake is dropped.

use axum::Router;
use std::sync::{Mutex, PoisonError};

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

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
