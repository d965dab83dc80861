//! Console sessions: the signed `claw_session` cookie a sign-in with the admin credential
//! gives, the CSRF token bound to it, sign-outs, and the limit on failed sign-ins.
//!
//! A session is stateless: its cookie carries an id and an expiry, signed with a key derived
//! from the admin credential, so every gateway sharing the credential accepts it and changing
//! the credential ends every session. A sign-out is remembered here and in the read models
//! (so every gateway refuses the session) until the session would have expired.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The session cookie's name.
pub const COOKIE: &str = "claw_session";
/// How long a session lasts after sign-in.
pub const LIFETIME: Duration = Duration::from_hours(12);
/// Failed sign-ins allowed from one address in a burst; one more is allowed every
/// [`FAILURE_REFILL`].
const FAILURE_BURST: u32 = 5;
const FAILURE_REFILL: Duration = Duration::from_secs(12);

type HmacSha256 = Hmac<Sha256>;

/// A signed-in console session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    id: String,
    /// Unix seconds.
    expires: i64,
}

impl Session {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Unix seconds.
    pub fn expires(&self) -> i64 {
        self.expires
    }
}

/// Why a sign-in was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum SignInRefusal {
    /// Not the admin credential.
    Wrong,
    /// Too many failures from this address: every attempt is refused for this many seconds.
    Limited(u64),
}

/// Issues and checks console sessions.
pub struct Sessions {
    admin_token: String,
    /// Signs cookies and derives CSRF tokens; derived from the admin credential.
    key: [u8; 32],
    /// Sessions signed out here, with their expiry (forgotten once expired).
    signed_out: Mutex<HashMap<String, i64>>,
    failures: DefaultKeyedRateLimiter<IpAddr>,
    /// Addresses refused outright until the given instant.
    blocked: Mutex<HashMap<IpAddr, Instant>>,
}

impl Sessions {
    pub fn new(admin_token: &str) -> Self {
        let key = Sha256::new()
            .chain_update(b"claw console session v1\0")
            .chain_update(admin_token.as_bytes())
            .finalize()
            .into();
        let burst = NonZeroU32::new(FAILURE_BURST).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(FAILURE_REFILL)
            .unwrap_or_else(|| Quota::per_minute(burst))
            .allow_burst(burst);
        Self {
            admin_token: admin_token.to_owned(),
            key,
            signed_out: Mutex::new(HashMap::new()),
            failures: DefaultKeyedRateLimiter::keyed(quota),
            blocked: Mutex::new(HashMap::new()),
        }
    }

    /// Checks a sign-in attempt from `peer`. While `peer` is over the failure limit every
    /// attempt is refused without looking at the credential, so guessing gains nothing.
    pub fn sign_in(&self, peer: IpAddr, presented: &str) -> Result<Session, SignInRefusal> {
        let now = Instant::now();
        {
            let mut blocked = lock(&self.blocked);
            blocked.retain(|_, until| *until > now);
            if let Some(until) = blocked.get(&peer) {
                return Err(SignInRefusal::Limited(whole_secs(*until - now)));
            }
        }
        if bool::from(presented.as_bytes().ct_eq(self.admin_token.as_bytes())) {
            return Ok(Session {
                id: hex::encode(rand::random::<[u8; 16]>()),
                expires: chrono::Utc::now().timestamp() + secs(LIFETIME),
            });
        }
        self.failures.retain_recent();
        match self.failures.check_key(&peer) {
            Ok(()) => Err(SignInRefusal::Wrong),
            Err(not_until) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                lock(&self.blocked).insert(peer, now + wait);
                Err(SignInRefusal::Limited(whole_secs(wait)))
            }
        }
    }

    /// The cookie value for `session`: `id.expires.signature`.
    pub fn cookie_value(&self, session: &Session) -> String {
        let payload = format!("{}.{}", session.id, session.expires);
        let signature = hex::encode(self.mac(b"session", payload.as_bytes()));
        format!("{payload}.{signature}")
    }

    /// The session a cookie value stands for, when it is genuine, unexpired and not signed
    /// out here (the caller asks the read models about other gateways).
    pub fn verify(&self, cookie: &str) -> Option<Session> {
        let (payload, signature) = cookie.rsplit_once('.')?;
        let signature = hex::decode(signature).ok()?;
        let expected = self.mac(b"session", payload.as_bytes());
        if !bool::from(signature.as_slice().ct_eq(expected.as_slice())) {
            return None;
        }
        let (id, expires) = payload.split_once('.')?;
        let expires: i64 = expires.parse().ok()?;
        let now = chrono::Utc::now().timestamp();
        if expires <= now || lock(&self.signed_out).contains_key(id) {
            return None;
        }
        Some(Session {
            id: id.to_owned(),
            expires,
        })
    }

    /// Remembers that `session` was signed out (the caller records it in the read models).
    pub fn sign_out(&self, session: &Session) {
        let now = chrono::Utc::now().timestamp();
        let mut signed_out = lock(&self.signed_out);
        signed_out.retain(|_, expires| *expires > now);
        signed_out.insert(session.id.clone(), session.expires);
    }

    /// The CSRF token of `session`: pages carry it, and every change must present it.
    pub fn csrf_token(&self, session: &Session) -> String {
        hex::encode(self.mac(b"csrf", session.id.as_bytes()))
    }

    /// Whether `presented` is `session`'s CSRF token (compared in constant time).
    pub fn csrf_matches(&self, session: &Session, presented: &str) -> bool {
        bool::from(
            presented
                .as_bytes()
                .ct_eq(self.csrf_token(session).as_bytes()),
        )
    }

    fn mac(&self, purpose: &[u8], message: &[u8]) -> Vec<u8> {
        let mut mac = <HmacSha256 as KeyInit>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
        mac.update(purpose);
        mac.update(b"\0");
        mac.update(message);
        mac.finalize().into_bytes().to_vec()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// Whole seconds, rounded up, at least 1 (what a person is told to wait).
fn whole_secs(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn a_signed_cookie_round_trips_and_a_tampered_one_does_not() {
        let sessions = Sessions::new("the-admin-secret");
        let session = sessions.sign_in(PEER, "the-admin-secret").unwrap();
        let cookie = sessions.cookie_value(&session);
        assert_eq!(sessions.verify(&cookie), Some(session.clone()));
        // Another credential's gateways do not accept it.
        assert_eq!(Sessions::new("another-secret").verify(&cookie), None);
        // A longer expiry with the old signature is refused.
        let (_, rest) = cookie.split_once('.').unwrap();
        let (_, signature) = rest.split_once('.').unwrap();
        let forged = format!("{}.{}.{signature}", session.id, session.expires + 3600);
        assert_eq!(sessions.verify(&forged), None);
        for junk in ["", "a.b", "a.b.c", "..", &cookie[..cookie.len() - 1]] {
            assert_eq!(sessions.verify(junk), None, "{junk}");
        }
    }

    #[test]
    fn an_expired_or_signed_out_session_is_refused() {
        let sessions = Sessions::new("s");
        let expired = Session {
            id: "00".into(),
            expires: chrono::Utc::now().timestamp() - 1,
        };
        assert_eq!(sessions.verify(&sessions.cookie_value(&expired)), None);
        let session = sessions.sign_in(PEER, "s").unwrap();
        let cookie = sessions.cookie_value(&session);
        sessions.sign_out(&session);
        assert_eq!(sessions.verify(&cookie), None);
    }

    #[test]
    fn csrf_tokens_are_per_session() {
        let sessions = Sessions::new("s");
        let a = sessions.sign_in(PEER, "s").unwrap();
        let b = sessions.sign_in(PEER, "s").unwrap();
        assert!(sessions.csrf_matches(&a, &sessions.csrf_token(&a)));
        assert!(!sessions.csrf_matches(&a, &sessions.csrf_token(&b)));
        assert!(!sessions.csrf_matches(&a, ""));
    }

    #[test]
    fn failed_sign_ins_are_limited_per_address() {
        let sessions = Sessions::new("right");
        for _ in 0..FAILURE_BURST {
            assert_eq!(sessions.sign_in(PEER, "wrong"), Err(SignInRefusal::Wrong));
        }
        let Err(SignInRefusal::Limited(wait)) = sessions.sign_in(PEER, "wrong") else {
            panic!("the sixth failure in a row is not limited");
        };
        assert!((1..=FAILURE_REFILL.as_secs()).contains(&wait), "{wait}");
        // While limited, even the right credential is refused; other addresses are not.
        assert!(matches!(
            sessions.sign_in(PEER, "right"),
            Err(SignInRefusal::Limited(_))
        ));
        let other = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 7));
        assert!(sessions.sign_in(other, "right").is_ok());
    }
}
