//! A tier's capacity: at most `limit` requests in flight upstream, and a bounded FIFO of
//! requests waiting for a slot.
//!
//! Capacity is a reason to spill, never by itself a reason to refuse. A plan takes a slot
//! without waiting when one is free ([`Capacity::try_take`]); when every tier that could serve
//! is merely full, the request joins the queue ([`Capacity::wait`]) and is served in arrival
//! order (tokio's semaphore hands released permits to its waiters first, so a newcomer's
//! `try_take` cannot overtake them). Only a full queue, a wait longer than the timeout, or a
//! client that hung up ends the wait; the refusal says how long a retry should wait, from the
//! observed time a slot is held.

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use claw_ledger::Tier;
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Until a slot has been held once, a retry is expected after this long.
const FIRST_GUESS: Duration = Duration::from_secs(1);

/// How long a request may wait, and how many may.
#[derive(Debug, Clone, Copy)]
pub struct QueuePolicy {
    /// `CLAW_QUEUE_TIMEOUT_MS`.
    pub timeout: Duration,
    /// `CLAW_MAX_QUEUE`.
    pub max_waiting: usize,
}

/// One tier's in-flight limit and its queue.
#[derive(Debug)]
pub struct Capacity {
    /// The tier, for metric labels and messages.
    tier: Tier,
    /// One permit per request allowed upstream at once.
    slots: Arc<Semaphore>,
    /// The number of permits (`OLLAMA_MAX_INFLIGHT`).
    limit: usize,
    policy: QueuePolicy,
    /// Requests in [`Capacity::wait`] right now.
    waiting: AtomicUsize,
    /// Moving average of how long a slot is held, in microseconds (0: never held yet).
    hold_micros: AtomicU64,
}

/// A slot in flight; freed (and its hold time learned) when dropped.
#[derive(Debug)]
pub struct Slot {
    capacity: Arc<Capacity>,
    taken: Instant,
    _permit: OwnedSemaphorePermit,
}

/// Why a queued request was not given a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueRefusal {
    /// `CLAW_MAX_QUEUE` requests were already waiting.
    Full { retry_after: Duration },
    /// No slot came free within `CLAW_QUEUE_TIMEOUT_MS`.
    TimedOut {
        waited: Duration,
        retry_after: Duration,
    },
    /// The client hung up while waiting; it frees its place and nothing goes upstream.
    ClientGone,
}

/// A tier's load, as status reports show it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Load {
    pub in_flight: usize,
    pub capacity: usize,
    pub queued: usize,
    pub max_queue: usize,
}

/// Decrements the waiting count however the wait ends (including a dropped future).
struct InLine<'a> {
    capacity: &'a Capacity,
}

impl Drop for InLine<'_> {
    fn drop(&mut self) {
        let now = self.capacity.waiting.fetch_sub(1, Ordering::AcqRel) - 1;
        self.capacity.publish_waiting(now);
    }
}

impl Capacity {
    pub fn new(tier: Tier, limit: usize, policy: QueuePolicy) -> Arc<Self> {
        let capacity = Arc::new(Self {
            tier,
            slots: Arc::new(Semaphore::new(limit)),
            limit,
            policy,
            waiting: AtomicUsize::new(0),
            hold_micros: AtomicU64::new(0),
        });
        capacity.publish_waiting(0);
        capacity
    }

    pub fn tier(&self) -> Tier {
        self.tier
    }

    /// A slot if one is free now (never waits, never overtakes a queued request).
    pub fn try_take(self: &Arc<Self>) -> Option<Slot> {
        let permit = self.slots.clone().try_acquire_owned().ok()?;
        Some(self.slot(permit))
    }

    /// Waits in line for a slot, up to the queue timeout, unless the queue is full or
    /// `client_gone` completes first.
    pub async fn wait(
        self: &Arc<Self>,
        client_gone: impl Future<Output = ()>,
    ) -> Result<Slot, QueueRefusal> {
        let joined = self
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.policy.max_waiting).then_some(n + 1)
            });
        let Ok(before) = joined else {
            self.refused("full");
            return Err(QueueRefusal::Full {
                retry_after: self.expected_wait(self.policy.max_waiting),
            });
        };
        self.publish_waiting(before + 1);
        let _in_line = InLine { capacity: self };
        let since = Instant::now();
        let acquire = tokio::time::timeout(self.policy.timeout, self.slots.clone().acquire_owned());
        let outcome = tokio::select! {
            biased;
            () = client_gone => {
                self.refused("client_gone");
                Err(QueueRefusal::ClientGone)
            }
            acquired = acquire => {
                // The semaphore is never closed, so anything but a permit is the timeout.
                if let Ok(Ok(permit)) = acquired {
                    Ok(self.slot(permit))
                } else {
                    self.refused("timeout");
                    Err(QueueRefusal::TimedOut {
                        waited: since.elapsed(),
                        retry_after: self.expected_wait(self.waiting.load(Ordering::Acquire)),
                    })
                }
            }
        };
        metrics::histogram!("claw_tier_queue_wait_seconds", "tier" => self.tier.as_str())
            .record(since.elapsed().as_secs_f64());
        outcome
    }

    /// Requests in flight, the limit, and the queue.
    pub fn load(&self) -> Load {
        Load {
            in_flight: self.limit.saturating_sub(self.slots.available_permits()),
            capacity: self.limit,
            queued: self.waiting.load(Ordering::Acquire),
            max_queue: self.policy.max_waiting,
        }
    }

    /// How long until `ahead` queued requests and one more have been served, from the average
    /// time a slot is held; whole seconds, at least one.
    pub fn expected_wait(&self, ahead: usize) -> Duration {
        let hold = match self.hold_micros.load(Ordering::Acquire) {
            0 => FIRST_GUESS,
            micros => Duration::from_micros(micros),
        };
        let rounds = u32::try_from((ahead + 1).div_ceil(self.limit.max(1))).unwrap_or(u32::MAX);
        let secs = hold.saturating_mul(rounds).as_secs_f64().ceil();
        Duration::from_secs_f64(secs.max(1.0))
    }

    fn slot(self: &Arc<Self>, permit: OwnedSemaphorePermit) -> Slot {
        Slot {
            capacity: self.clone(),
            taken: Instant::now(),
            _permit: permit,
        }
    }

    fn publish_waiting(&self, waiting: usize) {
        #[allow(clippy::cast_precision_loss)] // a queue length
        metrics::gauge!("claw_tier_queue_waiting", "tier" => self.tier.as_str())
            .set(waiting as f64);
    }

    fn refused(&self, reason: &'static str) {
        metrics::counter!("claw_tier_queue_refused_total", "tier" => self.tier.as_str(), "reason" => reason)
            .increment(1);
    }

    /// Folds one hold time into the average (weight 1/8 for the newest).
    fn learn_hold(&self, held: Duration) {
        let micros = u64::try_from(held.as_micros()).unwrap_or(u64::MAX).max(1);
        let _ = self
            .hold_micros
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |old| {
                Some(if old == 0 {
                    micros
                } else {
                    old - old / 8 + micros / 8
                })
            });
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.capacity.learn_hold(self.taken.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capacity(limit: usize, max_waiting: usize, timeout_ms: u64) -> Arc<Capacity> {
        Capacity::new(
            Tier::Local,
            limit,
            QueuePolicy {
                timeout: Duration::from_millis(timeout_ms),
                max_waiting,
            },
        )
    }

    #[tokio::test]
    async fn queued_requests_are_served_in_arrival_order_and_newcomers_do_not_overtake() {
        let cap = capacity(1, 8, 5_000);
        let held = cap.try_take().unwrap();
        assert!(cap.try_take().is_none());
        let (order_tx, mut order_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut waiters = Vec::new();
        for i in 0..3 {
            let (line, order_tx) = (cap.clone(), order_tx.clone());
            waiters.push(tokio::spawn(async move {
                let slot = line.wait(std::future::pending()).await.unwrap();
                order_tx.send(i).unwrap();
                drop(slot);
            }));
            // Let each waiter join the line before the next.
            while cap.load().queued < i + 1 {
                tokio::task::yield_now().await;
            }
        }
        drop(held);
        assert!(
            cap.try_take().is_none(),
            "a freed slot goes to the line, not to a newcomer"
        );
        for w in waiters {
            w.await.unwrap();
        }
        let order: Vec<usize> = std::iter::from_fn(|| order_rx.try_recv().ok()).collect();
        assert_eq!(order, vec![0, 1, 2]);
        assert_eq!(cap.load().queued, 0);
        assert_eq!(cap.load().in_flight, 0);
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once_and_a_long_wait_times_out() {
        let cap = capacity(1, 1, 50);
        let _held = cap.try_take().unwrap();
        let queued = {
            let cap = cap.clone();
            tokio::spawn(async move { cap.wait(std::future::pending()).await })
        };
        while cap.load().queued < 1 {
            tokio::task::yield_now().await;
        }
        let started = Instant::now();
        let refusal = cap.wait(std::future::pending()).await.unwrap_err();
        assert!(matches!(refusal, QueueRefusal::Full { .. }), "{refusal:?}");
        assert!(started.elapsed() < Duration::from_millis(40));
        match queued.await.unwrap().unwrap_err() {
            QueueRefusal::TimedOut {
                waited,
                retry_after,
            } => {
                assert!(waited >= Duration::from_millis(50), "{waited:?}");
                assert!(retry_after >= Duration::from_secs(1));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(cap.load().queued, 0);
    }

    #[tokio::test]
    async fn a_client_that_hangs_up_leaves_the_line() {
        let cap = capacity(1, 4, 5_000);
        let _held = cap.try_take().unwrap();
        let refusal = cap.wait(async {}).await.unwrap_err();
        assert_eq!(refusal, QueueRefusal::ClientGone);
        assert_eq!(cap.load().queued, 0);
    }

    #[test]
    fn the_expected_wait_grows_with_the_line_and_is_never_under_a_second() {
        let cap = capacity(2, 8, 1_000);
        assert_eq!(cap.expected_wait(0), Duration::from_secs(1));
        cap.learn_hold(Duration::from_secs(3));
        assert_eq!(cap.expected_wait(0), Duration::from_secs(3));
        assert_eq!(cap.expected_wait(3), Duration::from_secs(6));
        cap.learn_hold(Duration::from_millis(10));
        assert!(cap.expected_wait(0) >= Duration::from_secs(1));
    }
}
