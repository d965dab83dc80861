//! Following a ledger through its reader: a [`Feed`] that reads every partition from a
//! starting frontier and, at the end, waits for the log to grow. It serves the embedded
//! projector (woken by the single writer's commits) and anyone who reads from a fixed place
//! (replays, `events --follow`), on any backend.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

use crate::log::{Feed, LedgerError, LedgerReader, Recorded};
use crate::position::Frontier;

/// A [`Feed`] over a [`LedgerReader`], from a known frontier.
pub struct ReaderFeed {
    reader: Arc<dyn LedgerReader>,
    /// The next offset to read, per partition.
    next: Frontier,
    /// Changes when the log may have grown (`None`: look again every `poll`).
    wake: Option<watch::Receiver<Frontier>>,
    /// How often to look for new events without a wake-up (or as a safety net beside one).
    poll: Duration,
}

impl ReaderFeed {
    pub fn new(reader: Arc<dyn LedgerReader>, from: Frontier) -> Self {
        Self {
            reader,
            next: from,
            wake: None,
            poll: Duration::from_millis(250),
        }
    }

    /// Woken by `wake` (e.g. the appender's `appended`) instead of only polling.
    #[must_use]
    pub fn woken_by(mut self, wake: watch::Receiver<Frontier>) -> Self {
        self.wake = Some(wake);
        self
    }

    /// Where the feed has read up to.
    pub fn position(&self) -> &Frontier {
        &self.next
    }

    /// Reads what is there now, up to `max`, without waiting.
    pub async fn read_ready(&mut self, max: usize) -> Result<Vec<Recorded>, LedgerError> {
        let ends = self.reader.ends().await?;
        let mut batch = Vec::new();
        for (partition, end) in ends.iter() {
            let from = self.next.next(partition);
            if from >= end || batch.len() >= max {
                continue;
            }
            let limit = usize::try_from(end - from)
                .unwrap_or(usize::MAX)
                .min(max - batch.len());
            let page = self.reader.read(partition, from, limit).await?;
            if let Some(last) = page.last() {
                self.next.pass(last.position());
            }
            batch.extend(page);
        }
        Ok(batch)
    }

    /// Waits until the log may have grown past where the feed is.
    async fn changed(&mut self) {
        match &mut self.wake {
            Some(wake) => {
                let next = &self.next;
                let _ =
                    tokio::time::timeout(self.poll, wake.wait_for(|ends| next.behind(ends) > 0))
                        .await;
            }
            None => tokio::time::sleep(self.poll).await,
        }
    }
}

#[async_trait]
impl Feed for ReaderFeed {
    async fn next_batch(&mut self, max: usize) -> Result<Vec<Recorded>, LedgerError> {
        loop {
            let batch = self.read_ready(max).await?;
            if !batch.is_empty() {
                return Ok(batch);
            }
            self.changed().await;
        }
    }

    async fn ready_batch(&mut self, max: usize) -> Result<Vec<Recorded>, LedgerError> {
        self.read_ready(max).await
    }
}
