//! What every fake provider shares: serving its routes on a local listener, with
//! `TCP_NODELAY` as real servers set it, until the fake is dropped.

use axum::Router;
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
