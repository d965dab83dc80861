//! Fetching remote images for chat requests, without becoming an SSRF proxy.
//!
//! A chat message may carry `{"type": "image_url", "image_url": {"url": "https://…"}}`.
//! Providers that cannot take a URL (Ollama, Gemini inline data, Anthropic base64) need the
//! bytes inlined, so the gateway downloads them. This module owns that download and its guard
//! rails:
//!
//! - only `http`/`https` URLs without credentials, and at most [`MAX_REDIRECTS`] redirects,
//!   each re-checked the same way;
//! - every host name is resolved by the client's own resolver, which refuses the whole name
//!   if any of its addresses is non-public ([`is_forbidden`]) and hands the connector only the
//!   vetted addresses, so DNS rebinding cannot swap them between check and connect; IP
//!   literals (which never reach a resolver) are checked on the URL itself;
//! - a size cap on both the declared `Content-Length` and the bytes actually streamed;
//! - one deadline for the whole fetch;
//! - PNG, JPEG, GIF and WebP only, by `Content-Type` or, when that is missing or
//!   `application/octet-stream`, by magic bytes.
//!
//! [`FetchLimits::allow_private`] turns the address check off, for tests and operators whose
//! images live on a private network.

use std::error::Error as StdError;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use base64::Engine as _;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, CONTENT_TYPE, LOCATION};
use reqwest::redirect::{Action, Attempt, Policy};
use reqwest::{Client, Response, Url};

/// Most redirects followed for one image.
pub const MAX_REDIRECTS: usize = 3;

/// The image types providers accept.
const SUPPORTED: [&str; 4] = ["image/png", "image/jpeg", "image/gif", "image/webp"];

/// What the fetcher announces itself as.
const USER_AGENT: &str = concat!(
    "nclaw-gateway/",
    env!("CARGO_PKG_VERSION"),
    " (image fetch)"
);

/// Why a redirect to another scheme is refused.
const REDIRECT_SCHEME: &str = "image_url redirected to a URL that is not http or https";

/// Longest content type quoted back in an error.
const MAX_QUOTED_CONTENT_TYPE: usize = 80;

/// Limits for fetching remote images.
#[derive(Debug, Clone)]
pub struct FetchLimits {
    /// Largest image accepted, in bytes (before base64).
    pub max_bytes: usize,
    /// Deadline for the whole fetch: resolving, connecting, redirects and the body.
    pub timeout: Duration,
    /// Skip the non-public address check (tests, private networks).
    pub allow_private: bool,
}

impl Default for FetchLimits {
    /// 20 MiB, 10 s, public addresses only.
    fn default() -> Self {
        Self {
            max_bytes: 20 * 1024 * 1024,
            timeout: Duration::from_secs(10),
            allow_private: false,
        }
    }
}

/// A downloaded image, ready to inline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedImage {
    /// One of `image/png`, `image/jpeg`, `image/gif`, `image/webp`.
    pub media_type: String,
    /// The bytes, standard base64 with padding.
    pub data_base64: String,
}

/// Why an image could not be fetched.
///
/// `Display` is for logs and may carry detail (a resolved address, a transport error);
/// [`ImageFetchError::message`] is the sentence to show the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageFetchError {
    /// Not an `http`/`https` URL, credentials in it, or a redirect to such a URL. Carries the
    /// client-facing reason.
    #[error("bad image URL: {0}")]
    BadUrl(String),
    /// The host is, or resolves to, a non-public address. Carries detail for logs only.
    #[error("refusing to fetch an image from a non-public address: {0}")]
    Forbidden(String),
    /// Larger than the limit, by `Content-Length` or by the bytes streamed.
    #[error("image larger than {limit} bytes")]
    TooLarge { limit: usize },
    /// Not one of the supported image types. Carries the content type the server declared
    /// (empty when it declared none).
    #[error("not a supported image (content type {0:?})")]
    NotAnImage(String),
    /// The whole fetch took longer than the limit.
    #[error("image fetch timed out after {0:?}")]
    Timeout(Duration),
    /// The image server answered with a non-success status.
    #[error("image server answered HTTP {0}")]
    Upstream(u16),
    /// More than [`MAX_REDIRECTS`] redirects.
    #[error("image URL redirected more than {0} times")]
    TooManyRedirects(usize),
    /// The connection failed (DNS, TCP, TLS, a broken body). Carries detail for logs only.
    #[error("image fetch failed: {0}")]
    Connect(String),
}

impl ImageFetchError {
    /// A sentence for the client. It names nothing the client did not send: no resolved
    /// addresses, no transport details.
    pub fn message(&self) -> String {
        match self {
            Self::BadUrl(reason) => format!("{reason}."),
            Self::Forbidden(_) => "image_url points (directly or through a redirect) to a \
                 private, loopback, link-local or otherwise non-public address; only images on \
                 public hosts can be fetched."
                .to_owned(),
            Self::TooLarge { limit } => {
                format!(
                    "The image at image_url is larger than the {} limit.",
                    bytes_text(*limit)
                )
            }
            Self::NotAnImage(content_type) => not_an_image_message(content_type),
            Self::Timeout(after) => {
                format!(
                    "Downloading image_url took longer than {}.",
                    duration_text(*after)
                )
            }
            Self::Upstream(status) => {
                format!("The server hosting image_url answered HTTP {status}.")
            }
            Self::TooManyRedirects(max) => {
                format!("image_url redirected more than {max} times.")
            }
            Self::Connect(_) => {
                "Could not download image_url: the connection to its host failed.".to_owned()
            }
        }
    }
}

fn not_an_image_message(content_type: &str) -> String {
    let got = if content_type.is_empty() {
        "no content type and unrecognised bytes".to_owned()
    } else {
        format!("content type `{content_type}`")
    };
    format!(
        "image_url is not a supported image ({got}); supported types are image/png, \
         image/jpeg, image/gif and image/webp."
    )
}

/// `20 MiB`, `1 KiB` or `1500 bytes`.
fn bytes_text(bytes: usize) -> String {
    const KIB: usize = 1024;
    const MIB: usize = 1024 * 1024;
    if bytes >= MIB && bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else if bytes >= KIB && bytes.is_multiple_of(KIB) {
        format!("{} KiB", bytes / KIB)
    } else {
        format!("{bytes} bytes")
    }
}

/// `10 s` or `250 ms`.
fn duration_text(duration: Duration) -> String {
    if duration.subsec_millis() == 0 && duration.as_secs() > 0 {
        format!("{} s", duration.as_secs())
    } else {
        format!("{} ms", duration.as_millis())
    }
}

/// Downloads images under [`FetchLimits`]. Holds one `reqwest::Client`; cheap to clone.
#[derive(Debug, Clone)]
pub struct ImageFetcher {
    client: Client,
    limits: FetchLimits,
}

impl ImageFetcher {
    pub fn new(limits: FetchLimits) -> Result<Self, reqwest::Error> {
        let allow_private = limits.allow_private;
        let client = Client::builder()
            .dns_resolver(VettingResolver { allow_private })
            .redirect(Policy::custom(move |attempt| {
                vet_redirect(attempt, allow_private)
            }))
            // A proxy would resolve the name itself, past the resolver's check.
            .no_proxy()
            .timeout(limits.timeout)
            .user_agent(USER_AGENT)
            .default_headers(accept_images())
            .build()?;
        Ok(Self { client, limits })
    }

    /// Fetches `url` (http or https only) and returns (media_type, base64 data).
    pub async fn fetch(&self, url: &str) -> Result<FetchedImage, ImageFetchError> {
        let url = parse_url(url, self.limits.allow_private)?;
        let deadline = self.limits.timeout;
        tokio::time::timeout(deadline, self.download(url))
            .await
            .map_err(|_| ImageFetchError::Timeout(deadline))?
    }

    async fn download(&self, url: Url) -> Result<FetchedImage, ImageFetchError> {
        let response = self
            .client
            .get(url)
            .send()
            .await
            .map_err(|error| self.transport_error(&error))?;
        let status = response.status();
        if status.is_redirection() {
            return Err(unfollowed_redirect(&response));
        }
        if !status.is_success() {
            return Err(ImageFetchError::Upstream(status.as_u16()));
        }
        let declared = declared_type(response.headers())?;
        self.check_declared_length(&response)?;
        let body = self.read_capped(response).await?;
        let media_type = match declared {
            Declared::Image(media_type) => media_type,
            Declared::Unknown(content_type) => {
                sniff(&body).ok_or(ImageFetchError::NotAnImage(content_type))?
            }
        };
        if body.is_empty() {
            return Err(ImageFetchError::NotAnImage(media_type.to_owned()));
        }
        Ok(FetchedImage {
            media_type: media_type.to_owned(),
            data_base64: base64::engine::general_purpose::STANDARD.encode(&body),
        })
    }

    fn check_declared_length(&self, response: &Response) -> Result<(), ImageFetchError> {
        let limit = u64::try_from(self.limits.max_bytes).unwrap_or(u64::MAX);
        match response.content_length() {
            Some(length) if length > limit => Err(self.too_large()),
            _ => Ok(()),
        }
    }

    /// Reads the body, stopping as soon as it passes the limit, whatever the headers said.
    async fn read_capped(&self, mut response: Response) -> Result<Vec<u8>, ImageFetchError> {
        let max = self.limits.max_bytes;
        let hint = response
            .content_length()
            .and_then(|length| usize::try_from(length).ok())
            .unwrap_or(0);
        let mut body = Vec::with_capacity(hint.min(max));
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|error| self.transport_error(&error))?
        {
            if body.len().saturating_add(chunk.len()) > max {
                return Err(self.too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    fn too_large(&self) -> ImageFetchError {
        ImageFetchError::TooLarge {
            limit: self.limits.max_bytes,
        }
    }

    /// Our own refusals (from the resolver or the redirect policy) come back wrapped in
    /// reqwest's error; everything else is a timeout or a connection failure.
    fn transport_error(&self, error: &reqwest::Error) -> ImageFetchError {
        if let Some(ours) = find_source::<ImageFetchError>(error) {
            return ours.clone();
        }
        if error.is_timeout() {
            return ImageFetchError::Timeout(self.limits.timeout);
        }
        ImageFetchError::Connect(error_chain(error))
    }
}

/// A redirect the client stopped at: one whose `Location` is not an http(s) URL (the redirect
/// layer does not even hand `file:///…` to the policy), or has no usable `Location`.
fn unfollowed_redirect(response: &Response) -> ImageFetchError {
    let next = response
        .headers()
        .get(LOCATION)
        .and_then(|location| location.to_str().ok())
        .and_then(|location| response.url().join(location).ok());
    match next {
        Some(next) if !matches!(next.scheme(), "http" | "https") => {
            ImageFetchError::BadUrl(REDIRECT_SCHEME.to_owned())
        }
        _ => ImageFetchError::Upstream(response.status().as_u16()),
    }
}

/// `Accept` listing exactly the supported types.
fn accept_images() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        ACCEPT,
        HeaderValue::from_static("image/png, image/jpeg, image/gif, image/webp"),
    );
    headers
}

/// The first error of type `E` in `error`'s source chain.
fn find_source<'a, E: StdError + 'static>(error: &'a (dyn StdError + 'static)) -> Option<&'a E> {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(found) = error.downcast_ref::<E>() {
            return Some(found);
        }
        current = error.source();
    }
    None
}

/// `error: its source: its source…`, for logs.
fn error_chain(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut current = error.source();
    while let Some(source) = current {
        text.push_str(": ");
        text.push_str(&source.to_string());
        current = source.source();
    }
    text
}

// ---------------------------------------------------------------------------------------------
// URLs and redirects
// ---------------------------------------------------------------------------------------------

/// What is wrong with a URL, before any connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UrlProblem {
    Scheme,
    Credentials,
    NoHost,
}

/// Parses and vets the URL the client sent.
fn parse_url(raw: &str, allow_private: bool) -> Result<Url, ImageFetchError> {
    let url = Url::parse(raw.trim())
        .map_err(|_| ImageFetchError::BadUrl("image_url is not a valid URL".to_owned()))?;
    vet_url(&url, allow_private).map_err(|problem| {
        problem.map_bad_url(|problem| match problem {
            UrlProblem::Scheme => "image_url must be an http or https URL",
            UrlProblem::Credentials => "image_url must not contain a user name or password",
            UrlProblem::NoHost => "image_url has no host",
        })
    })?;
    Ok(url)
}

/// The redirect policy: at most [`MAX_REDIRECTS`], each to a URL that passes [`vet_url`].
fn vet_redirect(attempt: Attempt<'_>, allow_private: bool) -> Action {
    // `previous` holds the original URL plus every URL already redirected to.
    if attempt.previous().len() > MAX_REDIRECTS {
        return attempt.error(ImageFetchError::TooManyRedirects(MAX_REDIRECTS));
    }
    match vet_url(attempt.url(), allow_private) {
        Ok(()) => attempt.follow(),
        Err(problem) => {
            let error = problem.map_bad_url(|problem| match problem {
                UrlProblem::Scheme => REDIRECT_SCHEME,
                UrlProblem::Credentials => {
                    "image_url redirected to a URL containing a user name or password"
                }
                UrlProblem::NoHost => "image_url redirected to a URL without a host",
            });
            attempt.error(error)
        }
    }
}

/// Either a URL problem (worded by the caller) or a forbidden IP literal.
enum Vetting {
    Problem(UrlProblem),
    Forbidden(ImageFetchError),
}

impl Vetting {
    fn map_bad_url(self, reason: impl FnOnce(UrlProblem) -> &'static str) -> ImageFetchError {
        match self {
            Self::Problem(problem) => ImageFetchError::BadUrl(reason(problem).to_owned()),
            Self::Forbidden(error) => error,
        }
    }
}

/// Scheme, credentials, and — because IP literals never reach the resolver — the address of
/// an IP-literal host.
fn vet_url(url: &Url, allow_private: bool) -> Result<(), Vetting> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(Vetting::Problem(UrlProblem::Scheme));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(Vetting::Problem(UrlProblem::Credentials));
    }
    let host = url
        .host_str()
        .filter(|host| !host.is_empty())
        .ok_or(Vetting::Problem(UrlProblem::NoHost))?;
    if allow_private {
        return Ok(());
    }
    match ip_literal(host) {
        Some(ip) if is_forbidden(ip) => Err(Vetting::Forbidden(ImageFetchError::Forbidden(
            ip.to_string(),
        ))),
        _ => Ok(()),
    }
}

/// The address of a host written as an IP (`127.0.0.1`, `[::1]`). The URL parser has already
/// normalised other IPv4 spellings (`0x7f.1`, `2130706433`) to dotted quads.
fn ip_literal(host: &str) -> Option<IpAddr> {
    let bare = host
        .strip_prefix('[')
        .and_then(|inner| inner.strip_suffix(']'))
        .unwrap_or(host);
    bare.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// Resolving
// ---------------------------------------------------------------------------------------------

/// The client's resolver: every connection (the first and each redirect's) resolves through
/// it, and it refuses a name if any of its addresses is non-public. The connector then uses
/// exactly the addresses vetted here.
#[derive(Debug, Clone, Copy)]
struct VettingResolver {
    allow_private: bool,
}

impl Resolve for VettingResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_owned();
        let allow_private = self.allow_private;
        Box::pin(async move {
            let addrs = resolve_vetted(&host, allow_private).await?;
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

async fn resolve_vetted(
    host: &str,
    allow_private: bool,
) -> Result<Vec<SocketAddr>, Box<dyn StdError + Send + Sync>> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, 0)).await?.collect();
    if addrs.is_empty() {
        return Err(format!("{host} has no addresses").into());
    }
    if !allow_private {
        if let Some(bad) = addrs.iter().find(|addr| is_forbidden(addr.ip())) {
            let detail = format!("{host} resolves to {}", bad.ip());
            return Err(Box::new(ImageFetchError::Forbidden(detail)));
        }
    }
    Ok(addrs)
}

// ---------------------------------------------------------------------------------------------
// Address classification
// ---------------------------------------------------------------------------------------------

/// IPv4 ranges that are not publicly routable unicast: "this network", private, CGNAT,
/// loopback, link-local (cloud metadata), IETF assignments, documentation, 6to4 relay,
/// benchmarking, multicast, reserved and broadcast.
const FORBIDDEN_V4: [(Ipv4Addr, u32); 15] = [
    (Ipv4Addr::UNSPECIFIED, 8),
    (Ipv4Addr::new(10, 0, 0, 0), 8),
    (Ipv4Addr::new(100, 64, 0, 0), 10),
    (Ipv4Addr::new(127, 0, 0, 0), 8),
    (Ipv4Addr::new(169, 254, 0, 0), 16),
    (Ipv4Addr::new(172, 16, 0, 0), 12),
    (Ipv4Addr::new(192, 0, 0, 0), 24),
    (Ipv4Addr::new(192, 0, 2, 0), 24),
    (Ipv4Addr::new(192, 88, 99, 0), 24),
    (Ipv4Addr::new(192, 168, 0, 0), 16),
    (Ipv4Addr::new(198, 18, 0, 0), 15),
    (Ipv4Addr::new(198, 51, 100, 0), 24),
    (Ipv4Addr::new(203, 0, 113, 0), 24),
    (Ipv4Addr::new(224, 0, 0, 0), 4),
    (Ipv4Addr::new(240, 0, 0, 0), 4),
];

/// Non-public ranges inside global unicast `2000::/3`: IETF protocol assignments (Teredo,
/// benchmarking, ORCHID), documentation (old and new).
const FORBIDDEN_V6_GLOBAL: [(Ipv6Addr, u32); 3] = [
    (Ipv6Addr::new(0x2001, 0, 0, 0, 0, 0, 0, 0), 23),
    (Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0), 32),
    (Ipv6Addr::new(0x3fff, 0, 0, 0, 0, 0, 0, 0), 20),
];

/// Whether the gateway must not connect to `ip`: anything but public unicast. IPv6 forms that
/// embed an IPv4 address (mapped, NAT64, 6to4) are judged by that address.
pub fn is_forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_forbidden_v4(v4),
        IpAddr::V6(v6) => is_forbidden_v6(v6),
    }
}

fn is_forbidden_v4(ip: Ipv4Addr) -> bool {
    FORBIDDEN_V4
        .iter()
        .any(|&(net, len)| in_prefix(u32::from(ip).into(), u32::from(net).into(), len, 32))
}

fn is_forbidden_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = embedded_v4(ip) {
        return is_forbidden_v4(v4);
    }
    let bits = u128::from(ip);
    let global_unicast = in_prefix(
        bits,
        u128::from(Ipv6Addr::new(0x2000, 0, 0, 0, 0, 0, 0, 0)),
        3,
        128,
    );
    // Outside 2000::/3 lie unspecified, loopback, IPv4-compatible and -translated, discard,
    // SRv6, unique-local (fc00::/7), link-local (fe80::/10), site-local and multicast.
    !global_unicast
        || FORBIDDEN_V6_GLOBAL
            .iter()
            .any(|&(net, len)| in_prefix(bits, u128::from(net), len, 128))
}

/// The IPv4 address inside an IPv4-mapped (`::ffff:a.b.c.d`), NAT64 well-known-prefix
/// (`64:ff9b::a.b.c.d`) or 6to4 (`2002:aabb:ccdd::`) address.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let join = |high: u16, low: u16| Ipv4Addr::from((u32::from(high) << 16) | u32::from(low));
    match s {
        [0, 0, 0, 0, 0, 0xffff, high, low] | [0x64, 0xff9b, 0, 0, 0, 0, high, low] => {
            Some(join(high, low))
        }
        [0x2002, high, low, ..] => Some(join(high, low)),
        _ => None,
    }
}

/// Whether the top `len` of `width` bits of `addr` equal those of `net`.
fn in_prefix(addr: u128, net: u128, len: u32, width: u32) -> bool {
    let shift = width - len;
    (addr >> shift) == (net >> shift)
}

// ---------------------------------------------------------------------------------------------
// Content types
// ---------------------------------------------------------------------------------------------

/// What the `Content-Type` header says about the body.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Declared {
    /// A supported image type.
    Image(&'static str),
    /// Missing or `application/octet-stream` (carried as declared, possibly empty): sniff.
    Unknown(String),
}

/// Reads `Content-Type`: a supported image, something to sniff, or a refusal.
fn declared_type(headers: &HeaderMap) -> Result<Declared, ImageFetchError> {
    let Some(value) = headers.get(CONTENT_TYPE) else {
        return Ok(Declared::Unknown(String::new()));
    };
    let raw = String::from_utf8_lossy(value.as_bytes());
    let essence = raw
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let essence = if essence == "image/jpg" {
        "image/jpeg".to_owned()
    } else {
        essence
    };
    if let Some(&supported) = SUPPORTED.iter().find(|&&supported| supported == essence) {
        return Ok(Declared::Image(supported));
    }
    let quoted = quotable(&essence);
    if essence.is_empty() || essence == "application/octet-stream" {
        return Ok(Declared::Unknown(quoted));
    }
    Err(ImageFetchError::NotAnImage(quoted))
}

/// A server-sent string made safe to quote: printable ASCII, bounded length.
fn quotable(text: &str) -> String {
    text.chars()
        .filter(char::is_ascii_graphic)
        .take(MAX_QUOTED_CONTENT_TYPE)
        .collect()
}

/// Recognises the supported formats by their magic bytes.
fn sniff(body: &[u8]) -> Option<&'static str> {
    if body.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("image/png")
    } else if body.starts_with(&[0xff, 0xd8, 0xff]) {
        Some("image/jpeg")
    } else if body.starts_with(b"GIF87a") || body.starts_with(b"GIF89a") {
        Some("image/gif")
    } else if body.len() >= 12 && body.starts_with(b"RIFF") && &body[8..12] == b"WEBP" {
        Some("image/webp")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use std::future::IntoFuture as _;
    use std::str::FromStr as _;

    use axum::body::Body;
    use axum::http::{header, StatusCode};
    use axum::response::{IntoResponse, Response};
    use axum::routing::get;
    use axum::Router;
    use bytes::Bytes;
    use futures::StreamExt as _;

    use super::*;

    const PNG: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01";
    const JPEG: &[u8] = b"\xff\xd8\xff\xe0\0\x10JFIF\0";
    const GIF: &[u8] = b"GIF89a\x01\0\x01\0";
    const WEBP: &[u8] = b"RIFF\x24\0\0\0WEBPVP8 ";

    fn image(content_type: Option<&'static str>, bytes: &'static [u8]) -> Response {
        let mut response = Response::new(Body::from(bytes));
        if let Some(content_type) = content_type {
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        }
        response
    }

    fn redirect(location: String) -> Response {
        (StatusCode::FOUND, [(header::LOCATION, location)]).into_response()
    }

    /// A body of `total` bytes, in 256-byte chunks, without `Content-Length`.
    fn chunked_png(total: usize) -> Response {
        let chunks = (0..total.div_ceil(256)).map(|i| {
            let mut chunk = vec![0_u8; 256];
            if i == 0 {
                chunk[..8].copy_from_slice(&PNG[..8]);
            }
            Ok::<_, std::io::Error>(Bytes::from(chunk))
        });
        let mut response = Response::new(Body::from_stream(futures::stream::iter(chunks)));
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("image/png"));
        response
    }

    /// Headers at once, then a body that never ends.
    fn stalled_body() -> Response {
        let first = futures::stream::once(async { Ok::<_, std::io::Error>(Bytes::from(PNG)) });
        let body = Body::from_stream(first.chain(futures::stream::pending()));
        let mut response = Response::new(body);
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("image/png"));
        response
    }

    /// Serves test images on 127.0.0.1; returns the base URL.
    async fn serve() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let base = format!("http://127.0.0.1:{port}");
        let redirect_base = base.clone();
        let app = Router::new()
            .route("/x.png", get(|| async { image(Some("image/png"), PNG) }))
            .route(
                "/charset.jpg",
                get(|| async { image(Some("Image/JPEG; charset=binary"), JPEG) }),
            )
            .route(
                "/octet.gif",
                get(|| async { image(Some("application/octet-stream"), GIF) }),
            )
            .route("/bare.webp", get(|| async { image(None, WEBP) }))
            .route(
                "/octet.txt",
                get(|| async { image(Some("application/octet-stream"), b"hello") }),
            )
            .route(
                "/page.html",
                get(|| async { image(Some("text/html; charset=utf-8"), b"<html></html>") }),
            )
            .route(
                "/empty.png",
                get(|| async { image(Some("image/png"), b"") }),
            )
            .route(
                "/big.png",
                get(|| async { image(Some("image/png"), &[0_u8; 4096]) }),
            )
            .route("/chunked.png", get(|| async { chunked_png(4096) }))
            .route("/small-chunked.png", get(|| async { chunked_png(512) }))
            .route(
                "/slow.png",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    image(Some("image/png"), PNG)
                }),
            )
            .route("/stalled.png", get(|| async { stalled_body() }))
            .route(
                "/to-png",
                get(move || {
                    let target = format!("{redirect_base}/x.png");
                    async move { redirect(target) }
                }),
            )
            .route(
                "/to-localhost",
                get(move || async move { redirect(format!("http://localhost:{port}/x.png")) }),
            )
            .route(
                "/to-file",
                get(|| async { redirect("file:///etc/passwd".to_owned()) }),
            )
            .route(
                "/to-ftp",
                get(|| async { redirect("ftp://example.com/x.png".to_owned()) }),
            )
            .route(
                "/hop/{n}",
                get(|n: axum::extract::Path<u32>| async move {
                    match n.0 {
                        0 => redirect("/x.png".to_owned()),
                        n => redirect(format!("/hop/{}", n - 1)),
                    }
                }),
            );
        tokio::spawn(axum::serve(listener, app).into_future());
        base
    }

    fn fetcher(max_bytes: usize, timeout: Duration, allow_private: bool) -> ImageFetcher {
        ImageFetcher::new(FetchLimits {
            max_bytes,
            timeout,
            allow_private,
        })
        .unwrap()
    }

    fn private_fetcher() -> ImageFetcher {
        fetcher(1024, Duration::from_secs(5), true)
    }

    fn public_fetcher() -> ImageFetcher {
        fetcher(1024, Duration::from_secs(5), false)
    }

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    #[test]
    fn defaults_are_20_mib_10_s_public_only() {
        let limits = FetchLimits::default();
        assert_eq!(limits.max_bytes, 20 * 1024 * 1024);
        assert_eq!(limits.timeout, Duration::from_secs(10));
        assert!(!limits.allow_private);
    }

    #[tokio::test]
    async fn a_png_comes_back_as_base64_with_its_media_type() {
        let base = serve().await;
        let image = private_fetcher()
            .fetch(&format!("{base}/x.png"))
            .await
            .unwrap();
        assert_eq!(
            image,
            FetchedImage {
                media_type: "image/png".into(),
                data_base64: b64(PNG),
            }
        );
    }

    #[tokio::test]
    async fn content_type_parameters_and_case_are_ignored() {
        let base = serve().await;
        let image = private_fetcher()
            .fetch(&format!("{base}/charset.jpg"))
            .await
            .unwrap();
        assert_eq!(image.media_type, "image/jpeg");
        assert_eq!(image.data_base64, b64(JPEG));
    }

    #[tokio::test]
    async fn octet_stream_and_missing_types_are_sniffed() {
        let base = serve().await;
        let fetcher = private_fetcher();
        let gif = fetcher.fetch(&format!("{base}/octet.gif")).await.unwrap();
        assert_eq!(gif.media_type, "image/gif");
        assert_eq!(gif.data_base64, b64(GIF));
        let webp = fetcher.fetch(&format!("{base}/bare.webp")).await.unwrap();
        assert_eq!(webp.media_type, "image/webp");
        let err = fetcher
            .fetch(&format!("{base}/octet.txt"))
            .await
            .unwrap_err();
        assert_eq!(
            err,
            ImageFetchError::NotAnImage("application/octet-stream".into())
        );
    }

    #[tokio::test]
    async fn html_is_refused() {
        let base = serve().await;
        let err = private_fetcher()
            .fetch(&format!("{base}/page.html"))
            .await
            .unwrap_err();
        assert_eq!(err, ImageFetchError::NotAnImage("text/html".into()));
        assert!(err.message().contains("`text/html`"), "{}", err.message());
    }

    #[tokio::test]
    async fn an_empty_body_is_not_an_image() {
        let base = serve().await;
        let err = private_fetcher()
            .fetch(&format!("{base}/empty.png"))
            .await
            .unwrap_err();
        assert!(matches!(err, ImageFetchError::NotAnImage(_)), "{err:?}");
    }

    #[tokio::test]
    async fn too_large_by_content_length_is_refused() {
        let base = serve().await;
        let err = private_fetcher()
            .fetch(&format!("{base}/big.png"))
            .await
            .unwrap_err();
        assert_eq!(err, ImageFetchError::TooLarge { limit: 1024 });
        assert_eq!(
            err.message(),
            "The image at image_url is larger than the 1 KiB limit."
        );
    }

    #[tokio::test]
    async fn too_large_by_streamed_bytes_is_refused() {
        let base = serve().await;
        let fetcher = private_fetcher();
        let err = fetcher
            .fetch(&format!("{base}/chunked.png"))
            .await
            .unwrap_err();
        assert_eq!(err, ImageFetchError::TooLarge { limit: 1024 });
        let ok = fetcher
            .fetch(&format!("{base}/small-chunked.png"))
            .await
            .unwrap();
        assert_eq!(ok.media_type, "image/png");
    }

    #[tokio::test]
    async fn a_slow_server_times_out() {
        let base = serve().await;
        let fetcher = fetcher(1024, Duration::from_millis(300), true);
        let started = std::time::Instant::now();
        let err = fetcher
            .fetch(&format!("{base}/slow.png"))
            .await
            .unwrap_err();
        assert_eq!(err, ImageFetchError::Timeout(Duration::from_millis(300)));
        assert_eq!(
            err.message(),
            "Downloading image_url took longer than 300 ms."
        );
        let err = fetcher
            .fetch(&format!("{base}/stalled.png"))
            .await
            .unwrap_err();
        assert_eq!(err, ImageFetchError::Timeout(Duration::from_millis(300)));
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[tokio::test]
    async fn an_error_status_is_upstream() {
        let base = serve().await;
        let err = private_fetcher()
            .fetch(&format!("{base}/nope.png"))
            .await
            .unwrap_err();
        assert_eq!(err, ImageFetchError::Upstream(404));
        assert_eq!(
            err.message(),
            "The server hosting image_url answered HTTP 404."
        );
    }

    #[tokio::test]
    async fn a_refused_connection_is_connect() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let err = private_fetcher()
            .fetch(&format!("http://127.0.0.1:{port}/x.png"))
            .await
            .unwrap_err();
        assert!(matches!(err, ImageFetchError::Connect(_)), "{err:?}");
        assert!(!err.message().contains("127.0.0.1"));
    }

    #[tokio::test]
    async fn redirects_are_followed_up_to_three() {
        let base = serve().await;
        let fetcher = private_fetcher();
        for path in ["/to-png", "/to-localhost", "/hop/2"] {
            let image = fetcher.fetch(&format!("{base}{path}")).await.unwrap();
            assert_eq!(image.data_base64, b64(PNG), "{path}");
        }
        let err = fetcher.fetch(&format!("{base}/hop/3")).await.unwrap_err();
        assert_eq!(err, ImageFetchError::TooManyRedirects(3));
        assert_eq!(err.message(), "image_url redirected more than 3 times.");
    }

    #[tokio::test]
    async fn redirects_to_other_schemes_are_refused() {
        let base = serve().await;
        let fetcher = private_fetcher();
        for path in ["/to-file", "/to-ftp"] {
            let err = fetcher.fetch(&format!("{base}{path}")).await.unwrap_err();
            assert_eq!(
                err,
                ImageFetchError::BadUrl(
                    "image_url redirected to a URL that is not http or https".into()
                ),
                "{path}"
            );
        }
    }

    #[tokio::test]
    async fn non_public_hosts_are_forbidden() {
        let base = serve().await;
        let port = base.rsplit(':').next().unwrap();
        let fetcher = public_fetcher();
        let urls = [
            format!("{base}/x.png"),
            format!("http://localhost:{port}/x.png"),
            "http://localhost/".to_owned(),
            "http://[::1]/".to_owned(),
            "http://[::ffff:127.0.0.1]/".to_owned(),
            "http://169.254.169.254/latest/meta-data".to_owned(),
            "http://10.0.0.1/".to_owned(),
            "http://0.0.0.0/".to_owned(),
            "http://0x7f.1/".to_owned(),
            "http://2130706433/".to_owned(),
            "https://[fd00:ec2::254]/".to_owned(),
        ];
        for url in &urls {
            let err = fetcher.fetch(url).await.unwrap_err();
            assert!(
                matches!(err, ImageFetchError::Forbidden(_)),
                "{url}: {err:?}"
            );
            let message = err.message();
            for leak in ["127.0.0.1", "::1", "169.254", "10.0.0.1"] {
                assert!(!message.contains(leak), "{url}: {message}");
            }
        }
    }

    #[tokio::test]
    async fn the_resolver_refuses_names_with_non_public_addresses() {
        let err = resolve_vetted("localhost", false).await.unwrap_err();
        let ours = err.downcast_ref::<ImageFetchError>().unwrap();
        assert!(matches!(ours, ImageFetchError::Forbidden(_)), "{ours:?}");
        let addrs = resolve_vetted("localhost", true).await.unwrap();
        assert!(
            addrs.iter().all(|addr| addr.ip().is_loopback()),
            "{addrs:?}"
        );
    }

    #[test]
    fn a_public_fetcher_refuses_redirects_to_private_literals() {
        // The policy itself, as a pure function of the next URL.
        let next = Url::parse("http://169.254.169.254/latest/meta-data").unwrap();
        assert!(matches!(
            vet_url(&next, false),
            Err(Vetting::Forbidden(ImageFetchError::Forbidden(_)))
        ));
        assert!(vet_url(&next, true).is_ok());
        let public = Url::parse("https://93.184.216.34/x.png").unwrap();
        assert!(vet_url(&public, false).is_ok());
    }

    #[tokio::test]
    async fn only_plain_http_and_https_urls_are_accepted() {
        let fetcher = private_fetcher();
        let cases = [
            (
                "ftp://example.com/x.png",
                "image_url must be an http or https URL",
            ),
            (
                "file:///etc/passwd",
                "image_url must be an http or https URL",
            ),
            (
                "data:image/png;base64,AAAA",
                "image_url must be an http or https URL",
            ),
            (
                "http://user:pw@example.com/",
                "image_url must not contain a user name or password",
            ),
            (
                "https://user@example.com/",
                "image_url must not contain a user name or password",
            ),
            ("not a url", "image_url is not a valid URL"),
            ("", "image_url is not a valid URL"),
        ];
        for (url, reason) in cases {
            let err = fetcher.fetch(url).await.unwrap_err();
            assert_eq!(err, ImageFetchError::BadUrl(reason.into()), "{url}");
            assert_eq!(err.message(), format!("{reason}."));
        }
    }

    #[test]
    fn address_classification() {
        let forbidden = [
            "0.0.0.0",
            "0.1.2.3",
            "10.0.0.1",
            "10.255.255.255",
            "100.64.0.1",
            "100.127.255.255",
            "127.0.0.1",
            "127.255.255.254",
            "169.254.169.254",
            "172.16.0.1",
            "172.31.255.255",
            "192.0.0.8",
            "192.0.2.1",
            "192.88.99.1",
            "192.168.1.1",
            "198.18.0.1",
            "198.19.255.255",
            "198.51.100.7",
            "203.0.113.9",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::127.0.0.1",
            "::ffff:127.0.0.1",
            "::ffff:10.1.2.3",
            "::ffff:169.254.169.254",
            "64:ff9b::10.0.0.1",
            "64:ff9b:1::1",
            "2002:7f00:1::",
            "2002:a9fe:a9fe::1",
            "100::1",
            "2001::1",
            "2001:db8::1",
            "3fff::1",
            "5f00::1",
            "fc00::1",
            "fd00:ec2::254",
            "fe80::1",
            "febf::1",
            "fec0::1",
            "ff02::1",
        ];
        let allowed = [
            "1.1.1.1",
            "8.8.8.8",
            "93.184.216.34",
            "100.63.255.255",
            "100.128.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "192.169.0.1",
            "198.20.0.1",
            "223.255.255.255",
            "2606:4700::1111",
            "2001:4860:4860::8888",
            "2a00:1450:4001::1",
            "::ffff:8.8.8.8",
            "64:ff9b::8.8.8.8",
            "2002:808:808::1",
        ];
        for ip in forbidden {
            assert!(
                is_forbidden(IpAddr::from_str(ip).unwrap()),
                "{ip} should be forbidden"
            );
        }
        for ip in allowed {
            assert!(
                !is_forbidden(IpAddr::from_str(ip).unwrap()),
                "{ip} should be allowed"
            );
        }
    }

    #[test]
    fn sniffing_knows_the_four_formats_only() {
        assert_eq!(sniff(PNG), Some("image/png"));
        assert_eq!(sniff(JPEG), Some("image/jpeg"));
        assert_eq!(sniff(GIF), Some("image/gif"));
        assert_eq!(sniff(b"GIF87a"), Some("image/gif"));
        assert_eq!(sniff(WEBP), Some("image/webp"));
        assert_eq!(sniff(b"RIFF\0\0\0\0WAVE"), None);
        assert_eq!(sniff(b"<svg xmlns="), None);
        assert_eq!(sniff(b""), None);
    }

    #[test]
    fn declared_types() {
        let declared = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static(value));
            declared_type(&headers)
        };
        assert_eq!(declared("image/webp"), Ok(Declared::Image("image/webp")));
        assert_eq!(declared("image/jpg"), Ok(Declared::Image("image/jpeg")));
        assert_eq!(
            declared("IMAGE/PNG ; q=1"),
            Ok(Declared::Image("image/png"))
        );
        assert_eq!(
            declared("application/octet-stream"),
            Ok(Declared::Unknown("application/octet-stream".into()))
        );
        assert_eq!(
            declared("image/svg+xml"),
            Err(ImageFetchError::NotAnImage("image/svg+xml".into()))
        );
        assert_eq!(
            declared_type(&HeaderMap::new()),
            Ok(Declared::Unknown(String::new()))
        );
    }

    #[test]
    fn messages_read_as_sentences() {
        assert_eq!(
            ImageFetchError::TooLarge {
                limit: 20 * 1024 * 1024
            }
            .message(),
            "The image at image_url is larger than the 20 MiB limit."
        );
        assert_eq!(
            ImageFetchError::Timeout(Duration::from_secs(10)).message(),
            "Downloading image_url took longer than 10 s."
        );
        let forbidden = ImageFetchError::Forbidden("localhost resolves to 127.0.0.1".into());
        assert!(!forbidden.message().contains("127.0.0.1"));
        assert!(forbidden.to_string().contains("127.0.0.1"));
        let connect = ImageFetchError::Connect("tcp connect error: 10.1.2.3:80".into());
        assert!(!connect.message().contains("10.1.2.3"));
        assert_eq!(
            ImageFetchError::NotAnImage(String::new()).message(),
            "image_url is not a supported image (no content type and unrecognised bytes); \
             supported types are image/png, image/jpeg, image/gif and image/webp."
        );
    }
}
