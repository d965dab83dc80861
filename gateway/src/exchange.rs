//! Running a routed request: try the plan's attempts in order (falling through only before
//! anything reached the client, queueing for a full tier when nothing after it serves), then either collect the whole answer or relay it as OpenAI
//! SSE chunks, and account for it. The work runs in its own task, so a client that hangs up
//! cannot cancel the accounting.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use claw_ledger::{FallbackReason, Outbox, Provider};
use futures::future::BoxFuture;
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};

use crate::accounting::{settle_tokens, Outcome, RequestRecord};
use crate::capacity::{Capacity, QueueRefusal, Slot};
use crate::error::ApiError;
use crate::nself::sessions::Turn;
use crate::openai::encode::{self, ChunkBody, CompletionIds, TokenUsage};
use crate::pricing::PriceTable;
use crate::providers::{
    ChatEvent, ChatParams, ChatRequest, ChatStream, EmbedInput, Embeddings, FinishReason, Message,
    ProviderError, ToolCall, Usage,
};
use crate::router::{Attempt, Skip, TierPlan};

/// Frames queued for a streaming client at most (backpressure beyond).
const STREAM_BUFFER: usize = 64;
/// The status recorded when the client went away before the answer was complete.
pub const CLIENT_CLOSED: u16 = 499;

/// What an exchange needs from the gateway.
#[derive(Clone)]
pub struct ExchangeDeps {
    /// Where each request's facts go (durable before its response ends).
    pub outbox: Outbox,
    /// Longest wait for the next upstream chunk.
    pub idle_timeout: Duration,
    /// What paid models cost.
    pub prices: Arc<PriceTable>,
}

/// The attempt that succeeded, with what it produced and the capacity slot it holds.
struct Won<T> {
    attempt: Attempt,
    value: T,
    _slot: Option<Slot>,
}

/// Calls one admitted attempt and tells its circuit how it went.
async fn call_attempt<T, F, Fut>(
    attempt: &Attempt,
    slot: Option<Slot>,
    call: &mut F,
) -> Result<Won<T>, ProviderError>
where
    F: FnMut(Attempt) -> Fut,
    Fut: Future<Output = Result<T, ProviderError>>,
{
    let result = call(attempt.clone()).await;
    match &result {
        Err(err) if err.signals_down() => attempt.backend.circuit.failed(),
        _ => attempt.backend.circuit.succeeded(),
    }
    result.map(|value| Won {
        attempt: attempt.clone(),
        value,
        _slot: slot,
    })
}

/// The client's error for a queue that gave no slot.
fn queue_refused(attempt: &Attempt, refusal: QueueRefusal) -> (ApiError, String) {
    let provider = attempt.provider().as_str();
    let (message, retry_after) = match refusal {
        QueueRefusal::ClientGone => {
            return (
                ApiError::client_closed(),
                "the client left while queued".into(),
            )
        }
        QueueRefusal::Full { retry_after } => (
            format!("{provider} is at capacity and its queue is full (CLAW_MAX_QUEUE)"),
            retry_after,
        ),
        QueueRefusal::TimedOut {
            waited,
            retry_after,
        } => (
            format!(
                "{provider} stayed at capacity for the {} ms the request waited (CLAW_QUEUE_TIMEOUT_MS)",
                waited.as_millis()
            ),
            retry_after,
        ),
    };
    (
        ApiError::no_tier_available(
            format!("No tier could serve the request: {message}."),
            retry_after.as_secs(),
        ),
        message,
    )
}

/// Tries `plan` in order with `call`, recording fall-throughs. A full tier is skipped; when
/// nothing after it serves, the request queues for it (until `client_gone`, the queue's timeout,
/// or a full queue). Returns the first success, or the error to give the client (the last
/// attempted provider comes with it for accounting).
async fn run_plan<T, F, Fut>(
    plan: &TierPlan,
    record: &mut RequestRecord,
    client_gone: impl Future<Output = ()>,
    mut call: F,
) -> Result<Won<T>, (ApiError, Option<Attempt>)>
where
    F: FnMut(Attempt) -> Fut,
    Fut: Future<Output = Result<T, ProviderError>>,
{
    let mut failures: Vec<String> = Vec::new();
    let mut last: Option<(Attempt, ProviderError)> = None;
    // The first tier skipped for being full: queued for if nothing after it serves.
    let mut full: Option<(&Attempt, Arc<Capacity>)> = None;
    // The soonest a known-down provider will be probed again.
    let mut next_probe: Option<Duration> = None;
    let mut settled = false;
    for (i, attempt) in plan.attempts.iter().enumerate() {
        let provider = attempt.provider();
        // Past the plan's end, the request goes back to queue for the full tier.
        let next_tier = plan
            .attempts
            .get(i + 1)
            .or(full.as_ref().map(|(a, _)| *a))
            .map(Attempt::tier);
        let slot = match attempt.admit(plan.forced) {
            Ok(slot) => slot,
            Err(Skip::Full(capacity)) => {
                let detail = format!("{} is at capacity", provider.as_str());
                // A spill to a later tier is a fall-through; a full last tier is only one if
                // its queue refuses the request too.
                if !plan.forced && i + 1 < plan.attempts.len() {
                    record.fall_through(
                        provider,
                        next_tier,
                        FallbackReason::Capacity,
                        detail.clone(),
                    );
                }
                full = full.or(Some((attempt, capacity)));
                failures.push(detail);
                continue;
            }
            Err(Skip::Down(retry)) => {
                let detail = format!(
                    "{} is marked down after repeated failures; next probe in {} s",
                    provider.as_str(),
                    retry.as_secs().max(1)
                );
                next_probe = Some(next_probe.map_or(retry, |p| p.min(retry)));
                record.fall_through(
                    provider,
                    next_tier,
                    FallbackReason::Unavailable,
                    detail.clone(),
                );
                failures.push(detail);
                continue;
            }
        };
        match call_attempt(attempt, slot, &mut call).await {
            Ok(won) => return Ok(won),
            Err(err) => {
                failures.push(err.to_string());
                let falls_through = err.falls_through();
                if !plan.forced && falls_through {
                    record.fall_through(
                        provider,
                        next_tier,
                        err.fallback_reason(),
                        err.to_string(),
                    );
                }
                last = Some((attempt.clone(), err));
                if plan.forced || !falls_through {
                    settled = true;
                    break;
                }
            }
        }
    }
    if let (Some((queued, capacity)), false) = (full, settled) {
        let provider = queued.provider();
        match capacity.wait(client_gone).await {
            Ok(slot) => match call_attempt(queued, Some(slot), &mut call).await {
                Ok(won) => return Ok(won),
                Err(err) => {
                    failures.push(err.to_string());
                    if !plan.forced && err.falls_through() {
                        record.fall_through(provider, None, err.fallback_reason(), err.to_string());
                    }
                    last = Some((queued.clone(), err));
                }
            },
            Err(refusal) => {
                let (error, detail) = queue_refused(queued, refusal);
                if !plan.forced && refusal != QueueRefusal::ClientGone {
                    record.fall_through(provider, None, FallbackReason::Capacity, detail);
                }
                return Err((error, Some(queued.clone())));
            }
        }
    }
    Err(plan_failed(plan, last, &failures, next_probe))
}

/// The error for a plan that no attempt served, with the last attempted provider.
fn plan_failed(
    plan: &TierPlan,
    last: Option<(Attempt, ProviderError)>,
    failures: &[String],
    next_probe: Option<Duration>,
) -> (ApiError, Option<Attempt>) {
    let attempted = last
        .as_ref()
        .map(|(a, _)| a.clone())
        .or_else(|| plan.attempts.first().cloned());
    let error = match last {
        Some((_, ProviderError::ModelNotFound { model, .. })) if plan.forced => {
            ApiError::model_not_found(&model)
        }
        Some((
            _,
            ProviderError::RateLimited {
                message,
                retry_after_secs,
                ..
            },
        )) if plan.forced => ApiError::rate_limited(message, retry_after_secs.unwrap_or(1)),
        Some((_, err)) if plan.forced || !err.falls_through() => {
            ApiError::upstream(err.to_string())
        }
        _ => ApiError::no_tier_available(
            format!("No tier could serve the request: {}.", failures.join("; ")),
            next_probe.map_or(1, |p| p.as_secs().max(1)),
        ),
    };
    (error, attempted)
}

/// Accounts for a request that no attempt served, and returns its error.
async fn account_failure(
    deps: &ExchangeDeps,
    record: &mut RequestRecord,
    error: ApiError,
    attempted: Option<Attempt>,
) -> ApiError {
    let (provider, model_served) = attempted.map_or((Provider::Ollama, String::new()), |a| {
        (a.provider(), a.model)
    });
    let outcome = Outcome {
        provider,
        model_served,
        status: error.status.as_u16(),
        tokens: TokenUsage::default(),
        tokens_estimated: false,
        ttft_ms: None,
        cost_usd: rust_decimal::Decimal::ZERO,
    };
    // The client gets the upstream error either way; a ledger failure is logged by commit.
    let _ = record.commit(&deps.outbox, &outcome).await;
    error
}

/// A chat request ready to run.
pub struct ChatJob {
    pub deps: ExchangeDeps,
    pub record: RequestRecord,
    pub plan: TierPlan,
    pub messages: Vec<Message>,
    pub params: ChatParams,
    pub include_usage: bool,
    /// The session turn to record once the answer is complete.
    pub session: Option<Turn>,
}

/// A whole answer, ready to send.
pub struct WholeReply {
    pub provider: Provider,
    pub body: serde_json::Value,
}

/// A stream that has started: frames to relay (`data:` payloads, ending with `[DONE]`).
pub struct StreamReply {
    pub provider: Provider,
    pub frames: mpsc::Receiver<String>,
}

/// Everything an answer accumulates.
#[derive(Default)]
struct Answer {
    text: String,
    /// Function calls, by their stream index.
    tool_calls: Vec<ToolCall>,
    finish: Option<FinishReason>,
    usage: Usage,
    ttft_ms: Option<u64>,
}

impl Answer {
    fn first_token(&mut self, started: Instant) {
        if self.ttft_ms.is_none() {
            self.ttft_ms = Some(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX));
        }
    }

    fn absorb(&mut self, event: &ChatEvent, started: Instant) {
        match event {
            ChatEvent::Delta(text) => {
                self.first_token(started);
                self.text.push_str(text);
            }
            ChatEvent::ToolCall(delta) => {
                self.first_token(started);
                delta.apply_to(&mut self.tool_calls);
            }
            ChatEvent::Finish(reason) => self.finish = Some(*reason),
            ChatEvent::Usage(u) => {
                self.usage.prompt_tokens = u.prompt_tokens.or(self.usage.prompt_tokens);
                self.usage.completion_tokens = u.completion_tokens.or(self.usage.completion_tokens);
            }
        }
    }

    /// Why the answer ended: an answer with function calls that ended normally ended for
    /// them, whatever the provider called it (Gemini and Ollama say "stop").
    fn finish_reason(&self) -> FinishReason {
        match self.finish.unwrap_or(FinishReason::Stop) {
            FinishReason::Stop if !self.tool_calls.is_empty() => FinishReason::ToolCalls,
            reason => reason,
        }
    }

    /// Characters the model produced, for token estimates: text, and each call's name and
    /// arguments.
    fn completion_chars(&self) -> usize {
        let calls: usize = self
            .tool_calls
            .iter()
            .map(|c| c.name.chars().count() + c.arguments.chars().count())
            .sum();
        self.text.chars().count() + calls
    }
}

/// The next upstream event, within the idle timeout.
async fn next_event(
    stream: &mut ChatStream,
    idle: Duration,
) -> Option<Result<ChatEvent, ProviderError>> {
    tokio::time::timeout(idle, stream.next())
        .await
        .unwrap_or_else(|_| {
            Some(Err(ProviderError::Timeout(format!(
                "no upstream data for {idle:?}"
            ))))
        })
}

/// Starts `attempt`'s chat. With `parallel_tool_calls: false`, calls after the first are
/// dropped here for the providers that cannot be told (Gemini, Ollama).
async fn open_chat(
    attempt: &Attempt,
    messages: &[Message],
    params: &ChatParams,
) -> Result<ChatStream, ProviderError> {
    let request = ChatRequest {
        model: attempt.model.clone(),
        messages: messages.to_vec(),
        params: params.clone(),
    };
    let stream = attempt.backend.provider.chat(&request).await?;
    if params.parallel_tool_calls != Some(false) {
        return Ok(stream);
    }
    Ok(Box::pin(stream.filter(|event| {
        let later_call = matches!(event, Ok(ChatEvent::ToolCall(d)) if d.index > 0);
        futures::future::ready(!later_call)
    })))
}

/// Runs `work` in its own task, so a client that hangs up cannot cancel its accounting, and
/// returns where its answer will arrive. `work` sees the answer's sender to tell whether the
/// client is still waiting.
fn detach<T, W>(work: W) -> oneshot::Receiver<Result<T, ApiError>>
where
    T: Send + 'static,
    W: for<'a> FnOnce(
            &'a mut oneshot::Sender<Result<T, ApiError>>,
        ) -> BoxFuture<'a, Result<T, ApiError>>
        + Send
        + 'static,
{
    let (mut tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let answer = work(&mut tx).await;
        let _ = tx.send(answer);
    });
    rx
}

/// The outcome of a request the attempt served.
impl ExchangeDeps {
    /// The outcome of a request the attempt served, priced.
    fn outcome(
        &self,
        attempt: &Attempt,
        status: u16,
        tokens: TokenUsage,
        tokens_estimated: bool,
        ttft_ms: Option<u64>,
    ) -> Outcome {
        let provider = attempt.provider();
        Outcome {
            provider,
            model_served: attempt.model.clone(),
            status,
            tokens,
            tokens_estimated,
            ttft_ms,
            cost_usd: self.prices.cost(provider, &attempt.model, tokens),
        }
    }
}

/// 200, or 499 when the client stopped waiting before the answer was ready.
fn status_for<T>(client: &oneshot::Sender<T>) -> u16 {
    if client.is_closed() {
        CLIENT_CLOSED
    } else {
        200
    }
}

fn completion_ids(request_id: &str, model: &str) -> CompletionIds {
    CompletionIds {
        id: format!("chatcmpl-{request_id}"),
        created: chrono::Utc::now().timestamp(),
        model: model.to_owned(),
    }
}

impl ChatJob {
    /// Runs the request to completion in its own task and answers with the whole completion.
    pub fn spawn_whole(self) -> oneshot::Receiver<Result<WholeReply, ApiError>> {
        detach(move |client| Box::pin(self.whole(client)))
    }

    async fn whole(
        self,
        client: &mut oneshot::Sender<Result<WholeReply, ApiError>>,
    ) -> Result<WholeReply, ApiError> {
        let ChatJob {
            deps,
            mut record,
            plan,
            messages,
            params,
            session,
            ..
        } = self;
        let (idle, started) = (deps.idle_timeout, record.started);
        let (messages, params) = (&messages, &params);
        // Nothing reaches the client before the answer is complete, so any failure falls through.
        let won = run_plan(&plan, &mut record, client.closed(), |attempt| async move {
            let mut stream = open_chat(&attempt, messages, params).await?;
            let mut answer = Answer::default();
            while let Some(event) = next_event(&mut stream, idle).await {
                answer.absorb(&event?, started);
            }
            Ok(answer)
        })
        .await;
        let won = match won {
            Ok(won) => won,
            Err((error, attempted)) => {
                return Err(account_failure(&deps, &mut record, error, attempted).await)
            }
        };
        let answer = won.value;
        let (tokens, tokens_estimated) = settle_tokens(
            answer.usage,
            crate::accounting::prompt_chars(messages),
            answer.completion_chars(),
        );
        let provider = won.attempt.provider();
        let outcome = deps.outcome(
            &won.attempt,
            status_for(client),
            tokens,
            tokens_estimated,
            None,
        );
        record
            .commit(&deps.outbox, &outcome)
            .await
            .map_err(|_| ApiError::ledger_unavailable())?;
        if let Some(turn) = session {
            // Served and accounted either way; a failed append is logged by the store.
            let _ = turn.record(&answer.text).await;
        }
        let ids = completion_ids(&record.request_id, &won.attempt.model);
        let body = encode::completion(
            &ids,
            &answer.text,
            &answer.tool_calls,
            answer.finish_reason(),
            tokens,
        );
        Ok(WholeReply { provider, body })
    }

    /// Starts the request in its own task; answers once the first upstream event arrived (or
    /// with the error if no tier could start), then relays the rest as frames.
    pub fn spawn_stream(self) -> oneshot::Receiver<Result<StreamReply, ApiError>> {
        let (tx, rx) = oneshot::channel();
        tokio::spawn(self.stream(tx));
        rx
    }

    async fn stream(self, mut start: oneshot::Sender<Result<StreamReply, ApiError>>) {
        let ChatJob {
            deps,
            mut record,
            plan,
            messages,
            params,
            include_usage,
            session,
        } = self;
        let (idle, started) = (deps.idle_timeout, record.started);
        let (messages_ref, params_ref) = (&messages, &params);
        // The attempt succeeds once the upstream produced its first event: until then nothing
        // has reached the client and the next tier may still take over.
        let won = run_plan(&plan, &mut record, start.closed(), |attempt| async move {
            let mut stream = open_chat(&attempt, messages_ref, params_ref).await?;
            match next_event(&mut stream, idle).await {
                Some(Ok(first)) => Ok((first, stream)),
                Some(Err(err)) => Err(err),
                None => Err(ProviderError::Protocol {
                    provider: "upstream",
                    message: "empty stream".into(),
                }),
            }
        })
        .await;
        let won = match won {
            Ok(won) => won,
            Err((error, attempted)) => {
                let error = account_failure(&deps, &mut record, error, attempted).await;
                let _ = start.send(Err(error));
                return;
            }
        };
        let (first, upstream) = won.value;
        let provider = won.attempt.provider();
        let ids = completion_ids(&record.request_id, &won.attempt.model);
        let (frames, rx) = mpsc::channel(STREAM_BUFFER);
        let mut client_open = start
            .send(Ok(StreamReply {
                provider,
                frames: rx,
            }))
            .is_ok();
        let send = |body: ChunkBody<'_>| encode::chunk(&ids, &body, include_usage);
        client_open = client_open && frames.send(send(ChunkBody::Role)).await.is_ok();

        let (answer, failure) = if client_open {
            relay(&frames, &send, first, upstream, idle, started).await
        } else {
            (Answer::default(), None)
        };
        client_open = client_open && !frames.is_closed();

        let (tokens, tokens_estimated) = settle_tokens(
            answer.usage,
            crate::accounting::prompt_chars(&messages),
            answer.completion_chars(),
        );
        let status = match (&failure, client_open) {
            (_, false) => CLIENT_CLOSED,
            (Some(_), true) => 502,
            (None, true) => 200,
        };
        if status == 200 {
            let _ = frames
                .send(send(ChunkBody::Finish(answer.finish_reason())))
                .await;
            if include_usage {
                let _ = frames.send(send(ChunkBody::Usage(tokens))).await;
            }
        }
        let outcome = deps.outcome(
            &won.attempt,
            status,
            tokens,
            tokens_estimated,
            answer.ttft_ms,
        );
        let durable = record.commit(&deps.outbox, &outcome).await.is_ok();
        if let Some(err) = failure {
            let _ = frames
                .send(ApiError::upstream(format!("the upstream stream broke: {err}")).to_json())
                .await;
        } else if !durable {
            let _ = frames.send(ApiError::ledger_unavailable().to_json()).await;
        } else if status == 200 {
            // Before `[DONE]`: a client's next turn must find this one.
            if let Some(turn) = session {
                let _ = turn.record(&answer.text).await;
            }
            let _ = frames.send("[DONE]".to_owned()).await;
        }
    }
}

/// Relays upstream events to the client as chunks until the upstream ends, fails, or the
/// client goes away (then the upstream is dropped, which stops generation).
async fn relay(
    frames: &mpsc::Sender<String>,
    chunk: &impl Fn(ChunkBody<'_>) -> String,
    first: ChatEvent,
    mut upstream: ChatStream,
    idle: Duration,
    started: Instant,
) -> (Answer, Option<ProviderError>) {
    let mut answer = Answer::default();
    let mut pending = Some(first);
    loop {
        let event = if let Some(event) = pending.take() {
            event
        } else {
            let next = tokio::select! {
                biased;
                () = frames.closed() => return (answer, None),
                next = next_event(&mut upstream, idle) => next,
            };
            match next {
                None => return (answer, None),
                Some(Ok(event)) => event,
                Some(Err(err)) => return (answer, Some(err)),
            }
        };
        answer.absorb(&event, started);
        let frame = match &event {
            ChatEvent::Delta(text) => chunk(ChunkBody::Text(text)),
            ChatEvent::ToolCall(delta) => chunk(ChunkBody::ToolCall(delta)),
            ChatEvent::Finish(_) | ChatEvent::Usage(_) => continue,
        };
        if frames.send(frame).await.is_err() {
            return (answer, None);
        }
    }
}

/// An embeddings request ready to run.
pub struct EmbedJob {
    pub deps: ExchangeDeps,
    pub record: RequestRecord,
    pub plan: TierPlan,
    pub inputs: EmbedInput,
}

/// Embeddings and who made them.
pub struct EmbedReply {
    pub provider: Provider,
    pub model: String,
    pub embeddings: Embeddings,
    pub prompt_tokens: u64,
}

impl EmbedJob {
    /// Runs the request in its own task.
    pub fn spawn(self) -> oneshot::Receiver<Result<EmbedReply, ApiError>> {
        detach(move |client| Box::pin(self.run(client)))
    }

    async fn run(
        self,
        client: &mut oneshot::Sender<Result<EmbedReply, ApiError>>,
    ) -> Result<EmbedReply, ApiError> {
        let EmbedJob {
            deps,
            mut record,
            plan,
            inputs,
        } = self;
        let inputs_ref = &inputs;
        let won = run_plan(&plan, &mut record, client.closed(), |attempt| async move {
            let provider = &attempt.backend.provider;
            match inputs_ref {
                EmbedInput::Texts(texts) => provider.embed(&attempt.model, texts).await,
                EmbedInput::Tokens(tokens) => provider.embed_tokens(&attempt.model, tokens).await,
            }
        })
        .await;
        let won = match won {
            Ok(won) => won,
            Err((error, attempted)) => {
                return Err(account_failure(&deps, &mut record, error, attempted).await)
            }
        };
        // Token arrays are their own count; texts are estimated when the provider says nothing.
        let (reported, chars) = match &inputs {
            EmbedInput::Texts(texts) => (
                won.value.prompt_tokens,
                texts.iter().map(|i| i.chars().count()).sum(),
            ),
            EmbedInput::Tokens(tokens) => (
                won.value
                    .prompt_tokens
                    .or(u64::try_from(tokens.iter().map(Vec::len).sum::<usize>()).ok()),
                0,
            ),
        };
        let (tokens, tokens_estimated) = settle_tokens(
            Usage {
                prompt_tokens: reported,
                completion_tokens: Some(0),
            },
            chars,
            0,
        );
        let provider = won.attempt.provider();
        let outcome = deps.outcome(
            &won.attempt,
            status_for(client),
            tokens,
            tokens_estimated,
            None,
        );
        record
            .commit(&deps.outbox, &outcome)
            .await
            .map_err(|_| ApiError::ledger_unavailable())?;
        Ok(EmbedReply {
            provider,
            model: won.attempt.model,
            embeddings: won.value,
            prompt_tokens: tokens.prompt_tokens,
        })
    }
}
