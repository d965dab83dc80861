//! The outbox: how a request's facts become durable fast. Recording appends the events to a
//! local file and fsyncs it (group-committed on a dedicated thread: one `write` and one
//! `fdatasync` for every record waiting), which costs a fraction of a ledger commit; a drainer
//! then appends them to the ledger in batches, in order, retrying until the ledger takes them.
//! The gateway counts an event in a local fsync'ed outbox that is guaranteed to reach the
//! ledger as durable. On open, whatever a crash left in the file is appended first (the
//! ledger ignores `event_id`s it already has).
//!
//! The files are reused, not grown, so that an `fdatasync` overwrites blocks a file already
//! has (cheaper than growing it): two preallocated segments take turns. Records go to one
//! until it holds a few MiB; then, once everything in the other has reached the ledger, the
//! other starts over from its top under the next generation number. Layout of a segment: a
//! fixed-size header line with its generation, then one line per event,
//! `<generation>\t<envelope JSON>\n`; reading stops at the first line that is incomplete, not
//! JSON, or of another generation (the rest of an earlier use of the file).
//!
//! Two histograms say where a slow record spent its time: `claw_outbox_queue_seconds` (from
//! hand-off until the outbox thread takes it up, i.e. waiting behind the sync before it) and
//! `claw_outbox_sync_seconds` (each group's `write` + `fdatasync`). A disk that stalls shows in
//! both: one long sync, and every record that arrived during it queued.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use crate::event::Envelope;
use crate::log::{Appender, LedgerError};

/// How many records may wait for the outbox thread before callers feel backpressure.
const QUEUE_DEPTH: usize = 4096;
/// Records durable in the file but not yet in the ledger that the drainer holds in memory.
/// This is how long an outage of the ledger (Kafka down, restarting, frozen) the gateway
/// rides out without making anyone wait: about 65 s at 1000 requests/s, at roughly 1 KB a
/// record. Past it, recording waits for the ledger (backpressure; nothing is lost).
const DRAIN_QUEUE: usize = 65_536;
/// Bytes preallocated per segment; one grows past this only if the ledger falls far behind.
const PREALLOCATE: u64 = 8 << 20;
/// Switch segments once the current one holds this much (and the other is all drained).
const SWITCH_AFTER: u64 = 4 << 20;
/// After events arrive, how long the drainer lets more gather before appending them.
const DRAIN_GATHER: Duration = Duration::from_millis(2);
/// The most records appended to the ledger at once.
const DRAIN_BATCH: usize = 1024;
/// Header: `claw-outbox v1 gen=` + 20 digits + `\n`.
const HEADER_PREFIX: &str = "claw-outbox v1 gen=";
const HEADER_LEN: u64 = 40;

/// Records, in order, as the outbox thread accepted them: `(sequence, events)`.
type Accepted = (u64, Vec<Envelope>);

enum Job {
    Record {
        events: Vec<Envelope>,
        lines: Vec<u8>,
        done: oneshot::Sender<Result<(), LedgerError>>,
        handed_off: Instant,
    },
    /// Answers with the sequence number of the last record accepted so far.
    Barrier(oneshot::Sender<u64>),
}

/// The write side of the outbox; cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    jobs: mpsc::Sender<Job>,
    /// Sequence number of the last record that has reached the ledger.
    drained: watch::Receiver<u64>,
    /// Records durable in the file but not yet in the ledger.
    backlog: watch::Receiver<usize>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox").finish_non_exhaustive()
    }
}

impl Outbox {
    /// Opens the outbox file at `path` (creating it), appends whatever it still holds to
    /// `log`, and starts the outbox thread and the drainer.
    pub async fn open(dir: &Path, log: Arc<dyn Appender>) -> Result<Self, LedgerError> {
        let paths = [dir.join("outbox.0"), dir.join("outbox.1")];
        let (files, leftover, generation) =
            tokio::task::spawn_blocking(move || open_segments(&paths))
                .await
                .map_err(|e| LedgerError::Write(e.to_string()))??;
        if !leftover.is_empty() {
            tracing::info!(
                events = leftover.len(),
                "appending what the outbox held to the ledger"
            );
            log.append(leftover).await?;
        }
        // Both segments start empty: the idle one under the next generation, the current
        // one under the one after.
        let files = tokio::task::spawn_blocking(move || {
            write_header(&files[1], generation + 1)?;
            write_header(&files[0], generation + 2)?;
            Ok::<_, std::io::Error>(files)
        })
        .await
        .map_err(|e| LedgerError::Write(e.to_string()))?
        .map_err(|e| LedgerError::Write(format!("outbox: {e}")))?;

        let (jobs, rx) = mpsc::channel(QUEUE_DEPTH);
        let (to_drain, drain_rx) = mpsc::channel::<Accepted>(DRAIN_QUEUE);
        let (drained_tx, drained) = watch::channel(0);
        let (backlog_tx, backlog) = watch::channel(0);
        let [first, second] = files;
        let writer = FileWriter {
            segments: [(first, 0), (second, 0)],
            current: 0,
            generation: generation + 2,
            end: HEADER_LEN,
            seq: 0,
            drained: drained.clone(),
        };
        std::thread::Builder::new()
            .name("claw-outbox".into())
            .spawn(move || writer.run(rx, &to_drain))
            .map_err(LedgerError::Thread)?;
        tokio::spawn(drain(log, drain_rx, drained_tx, backlog_tx));
        Ok(Self {
            jobs,
            drained,
            backlog,
        })
    }

    /// Records `events`: returns once they are durable in the outbox file (and so certain to
    /// reach the ledger, in order).
    pub async fn record(&self, events: Vec<Envelope>) -> Result<(), LedgerError> {
        // Encoded here, on the caller's task; the outbox thread only prefixes the generation.
        let lines = encode(&events)?;
        let (done, wait) = oneshot::channel();
        self.jobs
            .send(Job::Record {
                events,
                lines,
                done,
                handed_off: Instant::now(),
            })
            .await
            .map_err(|_| LedgerError::Closed)?;
        wait.await.map_err(|_| LedgerError::Closed)?
    }

    /// Waits until everything recorded before this call is in the ledger.
    pub async fn flush(&self, deadline: Duration) -> Result<(), LedgerError> {
        let (done, wait) = oneshot::channel();
        self.jobs
            .send(Job::Barrier(done))
            .await
            .map_err(|_| LedgerError::Closed)?;
        let last = wait.await.map_err(|_| LedgerError::Closed)?;
        let mut drained = self.drained.clone();
        let reached = tokio::time::timeout(deadline, drained.wait_for(|d| *d >= last))
            .await
            .map(|r| r.is_ok());
        match reached {
            Ok(true) => Ok(()),
            Ok(false) => Err(LedgerError::Closed),
            Err(_) => Err(LedgerError::Write(format!(
                "the outbox did not reach the ledger within {deadline:?}"
            ))),
        }
    }

    /// How many records are durable in the outbox but not yet in the ledger.
    pub fn backlog(&self) -> usize {
        *self.backlog.borrow()
    }
}

/// The events as outbox lines without their generation prefix: `\t<json>\n` each.
fn encode(events: &[Envelope]) -> Result<Vec<u8>, LedgerError> {
    let mut lines = Vec::with_capacity(events.len() * 768);
    for event in events {
        lines.push(b'\t');
        serde_json::to_writer(&mut lines, event).map_err(LedgerError::Encode)?;
        lines.push(b'\n');
    }
    Ok(lines)
}

/// Opens (creating and preallocating) both segments; returns them with the events they still
/// hold, oldest generation first, and the newest generation seen.
fn open_segments(
    paths: &[std::path::PathBuf; 2],
) -> Result<([File; 2], Vec<Envelope>, u64), LedgerError> {
    let mut found = Vec::new();
    let mut files = Vec::new();
    for path in paths {
        let io = |e: std::io::Error| LedgerError::Write(format!("outbox {}: {e}", path.display()));
        let file = open_segment(path).map_err(io)?;
        found.push(read_generation(&file).map_err(io)?);
        files.push(file);
    }
    found.sort_by_key(|(_, generation)| *generation);
    let newest = found.last().map_or(0, |(_, g)| *g);
    let events = found.into_iter().flat_map(|(events, _)| events).collect();
    let files: [File; 2] = files
        .try_into()
        .map_err(|_| LedgerError::Write("outbox: two segments expected".into()))?;
    Ok((files, events, newest))
}

fn open_segment(path: &Path) -> std::io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    let len = file.metadata()?.len();
    if len < PREALLOCATE {
        // Real zeros, not a sparse or fallocated range: overwriting blocks that are already
        // written needs no file-system metadata change at fsync time.
        let zeros = vec![0u8; 1 << 20];
        let mut at = len;
        while at < PREALLOCATE {
            file.write_all_at(&zeros, at)?;
            at += zeros.len() as u64;
        }
        file.sync_all()?;
    }
    Ok(file)
}

/// The events of the file's current generation, in order, and that generation (0 for a
/// fresh file).
fn read_generation(file: &File) -> std::io::Result<(Vec<Envelope>, u64)> {
    let mut reader = BufReader::new(file);
    reader.seek(SeekFrom::Start(0))?;
    let mut header = String::new();
    reader.read_line(&mut header)?;
    let Some(generation) = header
        .strip_prefix(HEADER_PREFIX)
        .and_then(|g| g.trim_end().parse::<u64>().ok())
    else {
        return Ok((Vec::new(), 0));
    };
    let tag = generation.to_string();
    let mut events = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        let read = reader.read_until(b'\n', &mut line)?;
        if read == 0 || line.last() != Some(&b'\n') {
            break;
        }
        let text = &line[..line.len() - 1];
        let Some(tab) = text.iter().position(|b| *b == b'\t') else {
            break;
        };
        if &text[..tab] != tag.as_bytes() {
            break;
        }
        match serde_json::from_slice::<Envelope>(&text[tab + 1..]) {
            Ok(event) => events.push(event),
            Err(_) => break,
        }
    }
    Ok((events, generation))
}

/// Writes and syncs the header of a new (empty) generation.
fn write_header(file: &File, generation: u64) -> std::io::Result<()> {
    let header = format!("{HEADER_PREFIX}{generation:020}\n");
    debug_assert_eq!(header.len() as u64, HEADER_LEN);
    file.write_all_at(header.as_bytes(), 0)?;
    file.sync_data()
}

/// The outbox thread: appends records to the current segment, syncs, answers, hands them to
/// the drainer, and switches segments when the current one is full and the other drained.
struct FileWriter {
    /// Each segment with the sequence number of the last record written to it.
    segments: [(File, u64); 2],
    current: usize,
    generation: u64,
    /// Where the next record goes in the current segment.
    end: u64,
    /// Sequence number of the last record accepted.
    seq: u64,
    /// Sequence number the drainer has appended up to.
    drained: watch::Receiver<u64>,
}

impl FileWriter {
    fn run(mut self, mut rx: mpsc::Receiver<Job>, to_drain: &mpsc::Sender<Accepted>) {
        let mut round = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            round.push(first);
            while let Ok(job) = rx.try_recv() {
                round.push(job);
            }
            self.maybe_switch();
            let tag = self.generation.to_string();
            let mut buf = Vec::new();
            let mut records = Vec::new();
            let taken_up = Instant::now();
            let queued = metrics::histogram!("claw_outbox_queue_seconds");
            for job in round.drain(..) {
                match job {
                    Job::Record {
                        events,
                        lines,
                        done,
                        handed_off,
                    } => {
                        queued.record(taken_up.duration_since(handed_off).as_secs_f64());
                        for line in lines.split_inclusive(|b| *b == b'\n') {
                            buf.extend_from_slice(tag.as_bytes());
                            buf.extend_from_slice(line);
                        }
                        records.push((events, done));
                    }
                    Job::Barrier(done) => {
                        let _ = done.send(self.seq + records.len() as u64);
                    }
                }
            }
            if records.is_empty() {
                continue;
            }
            let file = &self.segments[self.current].0;
            let started = Instant::now();
            let written = file
                .write_all_at(&buf, self.end)
                .and_then(|()| file.sync_data());
            metrics::histogram!("claw_outbox_sync_seconds").record(started.elapsed().as_secs_f64());
            match written {
                Ok(()) => {
                    self.end += buf.len() as u64;
                    for (events, done) in records {
                        self.seq += 1;
                        self.segments[self.current].1 = self.seq;
                        // The drainer's queue is bounded (`DRAIN_QUEUE`): when the ledger
                        // falls that far behind, recording waits here instead of holding
                        // unbounded memory.
                        let handed = to_drain.blocking_send((self.seq, events)).is_ok();
                        let _ = done.send(if handed {
                            Ok(())
                        } else {
                            Err(LedgerError::Closed)
                        });
                    }
                }
                Err(err) => {
                    tracing::error!(error = %err, "could not write the outbox");
                    for (_, done) in records {
                        let _ = done.send(Err(LedgerError::Write(format!("outbox: {err}"))));
                    }
                }
            }
        }
    }

    /// Moves to the other segment when the current one is full and everything in the other
    /// has reached the ledger.
    fn maybe_switch(&mut self) {
        let other = 1 - self.current;
        if self.end < SWITCH_AFTER || self.segments[other].1 > *self.drained.borrow() {
            return;
        }
        match write_header(&self.segments[other].0, self.generation + 1) {
            Ok(()) => {
                self.generation += 1;
                self.current = other;
                self.end = HEADER_LEN;
            }
            Err(err) => tracing::warn!(error = %err, "could not switch outbox segments"),
        }
    }
}

/// Appends accepted records to the ledger in order, retrying with backoff while it fails.
async fn drain(
    log: Arc<dyn Appender>,
    mut rx: mpsc::Receiver<Accepted>,
    drained: watch::Sender<u64>,
    backlog: watch::Sender<usize>,
) {
    loop {
        let Some(first) = rx.recv().await else {
            return;
        };
        tokio::time::sleep(DRAIN_GATHER).await;
        let mut batch: Vec<Accepted> = vec![first];
        while batch.len() < DRAIN_BATCH {
            match rx.try_recv() {
                Ok(record) => batch.push(record),
                Err(_) => break,
            }
        }
        let last = batch.last().map_or(0, |(seq, _)| *seq);
        let in_batch = batch.len();
        backlog.send_replace(batch.len() + rx.len());
        let events: Vec<Envelope> = batch.drain(..).flat_map(|(_, events)| events).collect();
        let mut delay = Duration::from_millis(50);
        // `append` takes the events; the copy is what a retry needs.
        while let Err(err) = log.append(events.clone()).await {
            // While the ledger is away, the backlog keeps growing: report it as it is.
            backlog.send_replace(in_batch + rx.len());
            tracing::error!(error = %err, events = events.len(), backlog = in_batch + rx.len(), "outbox could not append to the ledger; retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
        drained.send_replace(last);
        backlog.send_replace(rx.len());
    }
}
