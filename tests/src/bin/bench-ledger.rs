//! `bench-ledger`: the distributed ledger's own numbers, on the real Kafka and PostgreSQL named
//! by `CLAW_KAFKA_BROKERS` and `CLAW_DATABASE_URL` (`scripts/services.sh`), each run on a
//! fresh topic and database, with the projector service running in this process:
//!
//! - `throughput`: how many events per second go from append (as the outbox drains: batches
//!   of up to 1024) to committed in the PostgreSQL projection, end to end.
//! - `lag`: at a steady open-loop rate of single-event appends (one request each), how long
//!   from the append until the projection (as a gateway sees it: the fold's `NOTIFY`) covers
//!   the event; percentiles.
//! - `audit`: how long `audit` takes over a ledger of `--events` events (the replay of every
//!   partition into a scratch projection and the comparison), after the projector folded them,
//!   and its CPU time; then its floor: reading the same events back without folding.
//!
//! ```text
//! bench-ledger throughput [--events 200000]
//! bench-ledger lag [--rate 2000] [--duration 20]
//! bench-ledger audit [--events 1000000]
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use claw_ledger::kafka::KafkaLedger;
use claw_ledger::{
    Appender, Endpoint, Envelope, Event, Frontier, KeyCreated, Position, Provider, RequestServed,
    Tier,
};
use claw_projector::{watch::follow_postgres, ProjectorHandle, ReadModels};
use claw_tests::backends::Distributed;
use serde_json::json;

type Error = Box<dyn std::error::Error + Send + Sync>;

#[derive(Parser, Debug)]
#[command(about = "Measures the Kafka ledger and PostgreSQL projection end to end")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// Events per second from append to the projection's commit.
    Throughput {
        #[arg(long, default_value_t = 200_000)]
        events: usize,
    },
    /// Projection lag percentiles at a steady rate of single-event appends.
    Lag {
        /// Appends per second (open loop).
        #[arg(long, default_value_t = 2000.0)]
        rate: f64,
        /// Seconds of measured load.
        #[arg(long, default_value_t = 20.0)]
        duration: f64,
    },
    /// How long an audit of `--events` events takes.
    Audit {
        #[arg(long, default_value_t = 1_000_000)]
        events: usize,
    },
}

/// The append batch the outbox's drainer uses at most.
const DRAIN_BATCH: usize = 1024;
/// Distinct keys the generated requests belong to.
const KEYS: usize = 1000;

fn key_created(i: usize) -> Envelope {
    Envelope::new(
        format!("bench-key-{i}"),
        "bench",
        Event::KeyCreated(KeyCreated {
            name: format!("bench {i}"),
            key_prefix: "sk-nself-xxx".into(),
            key_hash: format!("sha256:{i:064x}"),
            rpm_limit: 1_000_000,
            admin_allowed: false,
        }),
    )
}

fn request(i: usize) -> Envelope {
    let key = format!("bench-key-{}", i % KEYS);
    Envelope::new(
        &key,
        "bench",
        Event::RequestServed(RequestServed {
            request_id: uuid::Uuid::now_v7().to_string(),
            endpoint: Endpoint::ChatCompletions,
            model_requested: "auto".into(),
            model_served: "llama3.2".into(),
            provider: Provider::Ollama,
            tier: Tier::Local,
            stream: false,
            status: 200,
            prompt_tokens: 12,
            completion_tokens: 30,
            total_tokens: 42,
            tokens_estimated: false,
            cost_usd: rust_decimal::Decimal::ZERO,
            latency_ms: 5,
            ttft_ms: None,
            session_id: None,
            admin_mode: false,
        }),
    )
}

/// A fresh topic and database, the ledger on it, the projector service folding it (in this
/// process), and the projection as a gateway follows it.
struct Bench {
    ledger: Arc<KafkaLedger>,
    store: ReadModels,
    projection: ProjectorHandle,
    backends: Distributed,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Bench {
    async fn start() -> Result<Self, Error> {
        let backends = Distributed::fresh().await;
        let config = backends.projector_config();
        let ledger = Arc::new(KafkaLedger::open(config.kafka.clone()).await?);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let stopped = async {
                let _ = stopped.await;
            };
            if let Err(err) = claw_projector::service::run(config, stopped).await {
                eprintln!("projector failed: {err}");
            }
        });
        let store = ReadModels::open_postgres(&backends.database_url).await?;
        let projection =
            follow_postgres(store.clone(), &backends.database_url, &backends.topic).await?;
        Ok(Self {
            ledger,
            store,
            projection,
            backends,
            _stop: stop,
        })
    }

    async fn wait_covered(&self, target: &Frontier, deadline: Duration) -> Result<(), Error> {
        self.projection.wait_for(target, deadline).await?;
        Ok(())
    }

    /// Creates the keys, then appends `n` generated requests in drain-sized batches, several
    /// in flight; returns the frontier they reach.
    async fn fill(&self, n: usize) -> Result<Frontier, Error> {
        let mut reached = Frontier::new();
        let keys: Vec<Envelope> = (0..KEYS).map(key_created).collect();
        for p in self.ledger.append(keys).await? {
            reached.pass(p);
        }
        let mut pending = futures::stream::FuturesUnordered::new();
        let mut next = 0;
        loop {
            while next < n && pending.len() < 8 {
                let batch: Vec<Envelope> = (next..n.min(next + DRAIN_BATCH)).map(request).collect();
                next += batch.len();
                let ledger = self.ledger.clone();
                pending.push(async move { ledger.append(batch).await });
            }
            let Some(done) = futures::StreamExt::next(&mut pending).await else {
                break;
            };
            for p in done? {
                reached.pass(p);
            }
        }
        Ok(reached)
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

#[allow(clippy::cast_precision_loss)]
async fn throughput(events: usize) -> Result<serde_json::Value, Error> {
    let bench = Bench::start().await?;
    let started = Instant::now();
    let reached = bench.fill(events).await?;
    let appended = started.elapsed();
    bench
        .wait_covered(&reached, Duration::from_mins(10))
        .await?;
    let projected = started.elapsed();
    let totals = bench
        .store
        .usage(&claw_projector::UsageFilter::default())
        .await?
        .totals;
    Ok(json!({
        "mode": "throughput",
        "events": events,
        "appended_s": appended.as_secs_f64(),
        "append_events_per_s": events as f64 / appended.as_secs_f64(),
        "projected_s": projected.as_secs_f64(),
        "end_to_end_events_per_s": events as f64 / projected.as_secs_f64(),
        "projected_requests": totals.requests,
        "topic": bench.backends.topic,
    }))
}

#[allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]
async fn lag(rate: f64, duration: f64) -> Result<serde_json::Value, Error> {
    let bench = Arc::new(Bench::start().await?);
    let total = (rate * duration) as usize;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Position, Instant)>();
    // Each append's position and when it was made, then when the projection covered it.
    let watcher = {
        let mut applied = bench.projection.applied_watch();
        tokio::spawn(async move {
            let mut waiting: Vec<(Position, Instant)> = Vec::new();
            let mut lags = Vec::with_capacity(total);
            while lags.len() < total {
                tokio::select! {
                    got = rx.recv() => match got {
                        Some(item) => waiting.push(item),
                        None if waiting.is_empty() => break,
                        None => {}
                    },
                    changed = applied.changed() => if changed.is_err() { break },
                }
                let now = Instant::now();
                let frontier = applied.borrow().clone();
                waiting.retain(|(p, at)| {
                    if frontier.includes(*p) {
                        lags.push(now - *at);
                        false
                    } else {
                        true
                    }
                });
            }
            lags
        })
    };
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        let due = started + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        let (bench, tx) = (bench.clone(), tx.clone());
        tasks.push(tokio::spawn(async move {
            let at = Instant::now();
            let positions = bench.ledger.append(vec![request(i)]).await?;
            for p in positions {
                let _ = tx.send((p, at));
            }
            Ok::<_, claw_ledger::LedgerError>(())
        }));
    }
    drop(tx);
    let mut failed = 0;
    for t in tasks {
        if !matches!(t.await, Ok(Ok(()))) {
            failed += 1;
        }
    }
    let mut lags = tokio::time::timeout(Duration::from_mins(1), watcher).await??;
    lags.sort_unstable();
    Ok(json!({
        "mode": "lag",
        "rate": rate,
        "duration_s": duration,
        "appends": total,
        "failed": failed,
        "measured": lags.len(),
        "lag_ms": {"p50": percentile(&lags, 0.50), "p90": percentile(&lags, 0.90),
                   "p99": percentile(&lags, 0.99), "max": percentile(&lags, 1.0)},
    }))
}

#[allow(clippy::cast_precision_loss)]
async fn audit(events: usize) -> Result<serde_json::Value, Error> {
    let bench = Bench::start().await?;
    let started = Instant::now();
    let reached = bench.fill(events).await?;
    let appended = started.elapsed();
    bench
        .wait_covered(&reached, Duration::from_mins(30))
        .await?;
    let projected = started.elapsed();
    let reader: Arc<dyn claw_ledger::LedgerReader> = bench.ledger.clone();
    let cpu = cpu_seconds();
    let audit_started = Instant::now();
    let report =
        claw_projector::audit::audit(reader.clone(), &bench.store, &bench.backends.topic).await?;
    let audited = audit_started.elapsed();
    let audit_cpu = cpu_seconds() - cpu;
    // The floor: reading the same events back, every partition in pages, without folding.
    let cpu = cpu_seconds();
    let read_started = Instant::now();
    let mut read = 0;
    for (partition, end) in report.until.iter() {
        let mut from = 0;
        while from < end {
            let page = reader.read(partition, from, 4096).await?;
            let Some(last) = page.last() else { break };
            from = last.offset + 1;
            read += page.len();
        }
    }
    let read_s = read_started.elapsed();
    let read_cpu = cpu_seconds() - cpu;
    Ok(json!({
        "mode": "audit",
        "events": events,
        "appended_s": appended.as_secs_f64(),
        "projected_s": projected.as_secs_f64(),
        "audit_s": audited.as_secs_f64(),
        "audit_cpu_s": audit_cpu,
        "audited_events": report.events,
        "drift": report.drift,
        "floor_read_s": read_s.as_secs_f64(),
        "floor_read_cpu_s": read_cpu,
        "floor_read_events": read,
    }))
}

/// CPU seconds this process has used (every thread: librdkafka's, the writer's, tokio's).
#[allow(clippy::cast_precision_loss)]
fn cpu_seconds() -> f64 {
    claw_tests::process::process_ticks(std::process::id()).unwrap_or(0) as f64 / 100.0
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let cli = Cli::parse();
    let report = match cli.mode {
        Mode::Throughput { events } => throughput(events).await?,
        Mode::Lag { rate, duration } => lag(rate, duration).await?,
        Mode::Audit { events } => audit(events).await?,
    };
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
