//! Circuit breakers: a provider that keeps failing (connect errors, timeouts, 5xx) is marked
//! down for a cool-off, so `auto` skips it instead of paying its timeout on every request.
//! After the cool-off one request is let through as a probe: success closes the circuit,
//! failure opens it again.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Consecutive failures that open the circuit.
const FAILURES_TO_OPEN: u32 = 3;
/// How long an open circuit stays open before a probe.
const COOL_OFF: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// The cool-off is over and one probe is in flight.
    Probing,
}

/// One provider's circuit.
#[derive(Debug)]
pub struct Circuit {
    state: Mutex<State>,
    cool_off: Duration,
}

impl Default for Circuit {
    fn default() -> Self {
        Self::with_cool_off(COOL_OFF)
    }
}

/// Whether a request may go to the provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Allowed,
    /// Known down; retry after this long.
    Down(Duration),
}

impl Circuit {
    pub fn with_cool_off(cool_off: Duration) -> Self {
        Self {
            state: Mutex::new(State::Closed { failures: 0 }),
            cool_off,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Asks to send a request; after the cool-off exactly one caller gets through as the probe.
    pub fn admit(&self) -> Admission {
        let mut state = self.lock();
        match *state {
            State::Closed { .. } => Admission::Allowed,
            State::Open { until } => {
                let now = Instant::now();
                if now >= until {
                    *state = State::Probing;
                    Admission::Allowed
                } else {
                    Admission::Down(until - now)
                }
            }
            State::Probing => Admission::Down(Duration::from_secs(1)),
        }
    }

    /// Records a request that reached the provider and was answered.
    pub fn succeeded(&self) {
        *self.lock() = State::Closed { failures: 0 };
    }

    /// Records a failure that suggests the provider is down.
    pub fn failed(&self) {
        let mut state = self.lock();
        let open = State::Open {
            until: Instant::now() + self.cool_off,
        };
        *state = match *state {
            State::Closed { failures } if failures + 1 < FAILURES_TO_OPEN => State::Closed {
                failures: failures + 1,
            },
            _ => open,
        };
    }

    /// Whether the provider is known down (open, not yet due for its probe or past it).
    pub fn is_open(&self) -> bool {
        matches!(*self.lock(), State::Open { .. })
    }

    /// `up`, `down`, or `probing`, for status reports.
    pub fn describe(&self) -> &'static str {
        match *self.lock() {
            State::Closed { .. } => "up",
            State::Open { .. } => "down",
            State::Probing => "probing",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_repeated_failures_and_lets_one_probe_through_after_the_cool_off() {
        let circuit = Circuit::with_cool_off(Duration::from_millis(30));
        for _ in 0..FAILURES_TO_OPEN - 1 {
            circuit.failed();
            assert_eq!(circuit.admit(), Admission::Allowed);
        }
        circuit.failed();
        assert!(matches!(circuit.admit(), Admission::Down(_)));
        assert!(circuit.is_open());
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(circuit.admit(), Admission::Allowed, "the probe");
        assert!(!circuit.is_open(), "probing");
        assert!(
            matches!(circuit.admit(), Admission::Down(_)),
            "only one probe at a time"
        );
        circuit.failed();
        assert!(
            matches!(circuit.admit(), Admission::Down(_)),
            "a failed probe reopens"
        );
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(circuit.admit(), Admission::Allowed);
        circuit.succeeded();
        assert_eq!(circuit.admit(), Admission::Allowed);
        assert_eq!(circuit.describe(), "up");
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let circuit = Circuit::default();
        circuit.failed();
        circuit.failed();
        circuit.succeeded();
        circuit.failed();
        circuit.failed();
        assert_eq!(circuit.admit(), Admission::Allowed);
    }
}
