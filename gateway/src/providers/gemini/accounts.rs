//! The free accounts: each an API key with two guards, the gateway's own GCRA budget of
//! `GEMINI_ACCOUNT_RPM` requests a minute (so the pool rotates before Google refuses), and a
//! cooldown Google's 429 sets. Accounts are picked round-robin among those with budget left
//! and not cooling down. Keys never leave this module except as sensitive header values.

use std::fmt::Write as _;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock, Reference};
use governor::middleware::StateInformationMiddleware;
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use reqwest::header::HeaderValue;

use super::whole_secs;

/// One account's request budget: a GCRA limiter that also reports what is left.
type Budget<C> = RateLimiter<NotKeyed, InMemoryState, C, StateInformationMiddleware>;

/// One free Gemini account.
struct Account<C: Clock> {
    /// The API key, kept to blank it out of Google's messages; never logged or displayed.
    key: String,
    /// The key as the `x-goog-api-key` header value, marked sensitive so HTTP debug output
    /// hides it.
    header: HeaderValue,
    /// The gateway's own request budget for this account (burst = rpm), so the pool rotates
    /// before Google says 429.
    budget: Budget<C>,
    /// When the account may be used again.
    state: Mutex<AccountState<C::Instant>>,
}

/// What is known about when an account frees up.
#[derive(Debug, Clone, Copy)]
struct AccountState<I> {
    /// Google answered 429: not tried before this instant.
    cooling_until: Option<I>,
    /// The own budget ran dry: it refills by this instant (exact after a refused budget
    /// check, an upper bound after the call that spent the last request).
    budget_until: Option<I>,
}

impl<C: Clock> Account<C> {
    fn state(&self) -> std::sync::MutexGuard<'_, AccountState<C::Instant>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The accounts, picked round-robin.
pub(super) struct AccountPool<C: Clock = DefaultClock> {
    accounts: Vec<Account<C>>,
    /// Where the next round-robin scan starts.
    next: AtomicUsize,
    /// The time source shared with every budget (a fake one in tests).
    clock: C,
    /// One budget cell: after the last cell is spent the budget refills within this.
    interval: Duration,
}

/// How an account stands right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Standing {
    Ready,
    CoolingDown(Duration),
    OutOfBudget(Duration),
}

impl<C: Clock + Clone> AccountPool<C> {
    pub(super) fn new(keys: Vec<String>, rpm: u32, clock: C) -> Self {
        let quota = Quota::per_minute(NonZeroU32::new(rpm).unwrap_or(NonZeroU32::MIN));
        let mut seen = std::collections::HashSet::new();
        let accounts = keys
            .into_iter()
            .map(|k| k.trim().to_owned())
            .filter(|k| !k.is_empty() && seen.insert(k.clone()))
            .enumerate()
            .filter_map(|(n, key)| {
                let Ok(mut header) = HeaderValue::from_str(&key) else {
                    tracing::warn!(
                        account = n + 1,
                        "ignoring a Gemini key that is not a valid header value"
                    );
                    return None;
                };
                header.set_sensitive(true);
                Some((key, header))
            })
            .map(|(key, header)| Account {
                key,
                header,
                budget: RateLimiter::direct_with_clock(quota, clock.clone())
                    .with_middleware::<StateInformationMiddleware>(),
                state: Mutex::new(AccountState {
                    cooling_until: None,
                    budget_until: None,
                }),
            })
            .collect();
        Self {
            accounts,
            next: AtomicUsize::new(0),
            clock,
            interval: quota.replenish_interval(),
        }
    }
}

impl<C: Clock> AccountPool<C> {
    pub(super) fn len(&self) -> usize {
        self.accounts.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.accounts.is_empty()
    }

    /// Account `index`'s `x-goog-api-key` value.
    pub(super) fn key_header(&self, index: usize) -> HeaderValue {
        self.accounts[index].header.clone()
    }

    #[cfg(test)]
    pub(super) fn key(&self, index: usize) -> &str {
        &self.accounts[index].key
    }

    /// Takes one request from the next account (round-robin) that is not cooling down and has
    /// budget left, and returns its index; or, when there is none, how long until the first
    /// one frees up.
    pub(super) fn acquire(&self) -> Result<usize, Duration> {
        let n = self.accounts.len();
        let start = self.next.load(Ordering::Relaxed);
        let now = self.clock.now();
        let mut earliest: Option<Duration> = None;
        let mut wait = |d: Duration| earliest = Some(earliest.map_or(d, |e| e.min(d)));
        for offset in 0..n {
            let index = (start + offset) % n;
            let account = &self.accounts[index];
            let mut state = account.state();
            if let Some(until) = state.cooling_until.filter(|u| *u > now) {
                wait(until.duration_since(now).into());
                continue;
            }
            state.cooling_until = None;
            match account.budget.check() {
                Ok(left) => {
                    state.budget_until = (left.remaining_burst_capacity() == 0)
                        .then(|| now + Nanos::from(self.interval));
                    self.next.store((index + 1) % n, Ordering::Relaxed);
                    return Ok(index);
                }
                Err(not_until) => {
                    state.budget_until = Some(not_until.earliest_possible());
                    wait(not_until.wait_time_from(now));
                }
            }
        }
        Err(earliest.unwrap_or(Duration::ZERO))
    }

    /// Keeps account `index` out of rotation for `delay`.
    pub(super) fn cool_down(&self, index: usize, delay: Duration) {
        let until = self.clock.now() + Nanos::from(delay);
        let mut state = self.accounts[index].state();
        state.cooling_until = Some(state.cooling_until.map_or(until, |u| u.max(until)));
    }

    pub(super) fn standings(&self) -> Vec<Standing> {
        let now = self.clock.now();
        let left = |until: Option<C::Instant>| {
            until
                .filter(|u| *u > now)
                .map(|u| Duration::from(u.duration_since(now)))
        };
        self.accounts
            .iter()
            .map(|a| {
                let state = *a.state();
                match (left(state.cooling_until), left(state.budget_until)) {
                    (Some(c), b) => Standing::CoolingDown(b.map_or(c, |b| b.max(c))),
                    (None, Some(b)) => Standing::OutOfBudget(b),
                    (None, None) => Standing::Ready,
                }
            })
            .collect()
    }

    pub(super) fn earliest_reset(&self) -> Option<Duration> {
        let standings = self.standings();
        if standings.contains(&Standing::Ready) {
            return None;
        }
        standings
            .into_iter()
            .filter_map(|s| match s {
                Standing::Ready => None,
                Standing::CoolingDown(d) | Standing::OutOfBudget(d) => Some(d),
            })
            .min()
    }

    pub(super) fn summary(&self) -> String {
        let standings = self.standings();
        if standings.is_empty() {
            return "no accounts".to_owned();
        }
        let count = |f: fn(&Standing) -> bool| standings.iter().filter(|s| f(s)).count();
        let ready = count(|s| matches!(s, Standing::Ready));
        let cooling = count(|s| matches!(s, Standing::CoolingDown(_)));
        let spent = count(|s| matches!(s, Standing::OutOfBudget(_)));
        let n = standings.len();
        let mut text = format!(
            "{n} account{}: {ready} ready",
            if n == 1 { "" } else { "s" }
        );
        if cooling > 0 {
            let _ = write!(text, ", {cooling} cooling down");
        }
        if spent > 0 {
            let _ = write!(text, ", {spent} out of budget");
        }
        let next = standings
            .iter()
            .filter_map(|s| match s {
                Standing::Ready => None,
                Standing::CoolingDown(d) | Standing::OutOfBudget(d) => Some(*d),
            })
            .min();
        if let Some(next) = next {
            let _ = write!(text, " (resets in {} s)", whole_secs(next));
        }
        text
    }

    /// `text` with every account key blanked out (Google's messages should not echo keys,
    /// but an error message is no place to find out).
    pub(super) fn redact(&self, text: &str) -> String {
        self.accounts
            .iter()
            .filter(|a| a.key.len() >= 8)
            .fold(text.to_owned(), |t, a| t.replace(&a.key, "[redacted]"))
    }
}

impl<C: Clock> AccountPool<C> {
    /// The first account not cooling down (budget untouched: listing models is not
    /// generation), else the first account; `None` without accounts.
    pub(super) fn first_available(&self) -> Option<usize> {
        let standings = self.standings();
        standings
            .iter()
            .position(|s| !matches!(s, Standing::CoolingDown(_)))
            .or((!standings.is_empty()).then_some(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn pool(keys: &[&str], rpm: u32) -> (AccountPool<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        let keys = keys.iter().map(|k| (*k).to_owned()).collect();
        (AccountPool::new(keys, rpm, clock.clone()), clock)
    }

    #[test]
    fn accounts_are_picked_round_robin() {
        let (pool, _) = pool(&["key-aaaaaaaa", "key-bbbbbbbb", "key-cccccccc"], 60);
        let picks: Vec<usize> = (0..6).map(|_| pool.acquire().unwrap()).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(pool.summary(), "3 accounts: 3 ready");
        assert_eq!(pool.earliest_reset(), None);
    }

    #[test]
    fn blank_and_repeated_keys_are_ignored() {
        let (pool, _) = pool(&["a-key", " ", "b-key", "a-key ", "", "bad\nkey"], 60);
        assert_eq!(pool.len(), 2);
        assert_eq!((pool.key(0), pool.key(1)), ("a-key", "b-key"));
        let (empty, _) = self::pool(&[], 60);
        assert_eq!(empty.acquire(), Err(Duration::ZERO));
        assert_eq!(empty.summary(), "no accounts");
        assert_eq!(empty.first_available(), None);
    }

    #[test]
    fn a_spent_budget_rotates_then_refuses_until_it_refills() {
        let (pool, clock) = pool(&["key-aaaaaaaa", "key-bbbbbbbb"], 1);
        assert_eq!(pool.acquire(), Ok(0));
        assert_eq!(pool.acquire(), Ok(1));
        assert_eq!(pool.acquire(), Err(Duration::from_mins(1)));
        assert_eq!(pool.earliest_reset(), Some(Duration::from_mins(1)));
        assert_eq!(
            pool.summary(),
            "2 accounts: 0 ready, 2 out of budget (resets in 60 s)"
        );
        clock.advance(Duration::from_secs(45));
        assert_eq!(pool.acquire(), Err(Duration::from_secs(15)));
        clock.advance(Duration::from_secs(15));
        assert_eq!(pool.earliest_reset(), None);
        assert_eq!(pool.acquire(), Ok(0));
    }

    #[test]
    fn a_cooling_account_is_skipped_until_its_delay_passes() {
        let (pool, clock) = pool(&["key-aaaaaaaa", "key-bbbbbbbb"], 60);
        pool.cool_down(0, Duration::from_secs(30));
        assert_eq!(pool.acquire(), Ok(1));
        assert_eq!(pool.acquire(), Ok(1));
        assert_eq!(
            pool.summary(),
            "2 accounts: 1 ready, 1 cooling down (resets in 30 s)"
        );
        assert_eq!(pool.first_available(), Some(1));
        pool.cool_down(1, Duration::from_millis(1500));
        assert_eq!(pool.acquire(), Err(Duration::from_millis(1500)));
        assert_eq!(pool.earliest_reset(), Some(Duration::from_millis(1500)));
        assert_eq!(pool.first_available(), Some(0));
        clock.advance(Duration::from_secs(2));
        assert_eq!(pool.acquire(), Ok(1));
        clock.advance(Duration::from_secs(28));
        assert_eq!(pool.acquire(), Ok(0));
    }

    #[test]
    fn a_shorter_cooldown_never_shortens_a_longer_one() {
        let (pool, _) = pool(&["key-aaaaaaaa"], 60);
        pool.cool_down(0, Duration::from_secs(30));
        pool.cool_down(0, Duration::from_secs(1));
        assert_eq!(pool.acquire(), Err(Duration::from_secs(30)));
        assert_eq!(
            pool.summary(),
            "1 account: 0 ready, 1 cooling down (resets in 30 s)"
        );
    }

    #[test]
    fn keys_never_show() {
        let (pool, _) = pool(&["AIzaSySecretKey0001", "AIzaSySecretKey0002"], 1);
        pool.acquire().unwrap();
        pool.cool_down(1, Duration::from_secs(5));
        let summary = pool.summary();
        assert!(!summary.contains("AIza"), "{summary}");
        assert_eq!(
            pool.redact("Invalid API key: AIzaSySecretKey0002."),
            "Invalid API key: [redacted]."
        );
    }
}
