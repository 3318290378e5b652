//! Outgoing callbacks: POST the message JSON to the subscriber's `NotifyUrl`
//! with an HMAC-SHA256 signature, and report the outcome to the driver.
//!
//! **Invariant:** every dispatched callback produces exactly one
//! [`CallbackResult`] for its [`DeliveryId`]; only addresses that pass the
//! [`Allowlist`] are contacted: the URL is checked again here (a log written
//! under an older allowlist may hold other URLs), its name resolved, and the
//! connection made to an address that passed, never to a second lookup;
//! redirects are never followed, because a redirect could lead past the
//! allowlist; every callback is signed with a timestamp (see [`sign`]).

use super::http_pool::{HttpPool, Post, PostError};
use crate::broker::{Callback, CallbackResult, DeliveryId};
use crate::types::{ClientId, Message, URL_LEN_MAX};
use axum::body::Bytes;
use axum::http::{HeaderName, HeaderValue, header};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc};

/// The header carrying `t=<unix seconds>,v1=<hex HMAC-SHA256 of "{t}.{body}">`
/// (Stripe's scheme): the timestamp is signed with the body, so a captured
/// callback cannot be replayed once it is older than the verifier's tolerance.
pub const SIGNATURE_HEADER: &str = "X-SagaMQ-Signature";
/// The header carrying the attempt number (1 for the first).
pub const ATTEMPT_HEADER: &str = "X-SagaMQ-Attempt";
/// How far a signature's timestamp may be from the verifier's clock, either
/// way (Stripe's default). Every attempt is signed afresh, so a retry is never
/// older than this when it is sent.
pub const SIGNATURE_TOLERANCE_DEFAULT: Duration = Duration::from_secs(300);
/// Longest accepted signature header (a few `v1=` entries during a key rotation).
const SIGNATURE_HEADER_LEN_MAX: usize = 1024;

/// Capacity of the channel that carries callback results back to the driver.
pub const CALLBACK_RESULTS_MAX: usize = 4096;
/// Callbacks in flight across all subscribers; a safety net above the core's
/// per-subscriber window.
pub const CALLBACKS_INFLIGHT_TOTAL_MAX: usize = 4096;

/// Per-subscriber windows kept while idle; past it, idle ones are forgotten.
pub const SUBSCRIBER_WINDOWS_MAX: usize = 10_000;

fn hmac_hex(key: &[u8], t: u64, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(64);
    for b in tag.iter() {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    out
}

/// `t=<unix_secs>,v1=<hex>` of `body` under `key`: what [`SIGNATURE_HEADER`] carries.
pub fn sign(key: &[u8], unix_secs: u64, body: &[u8]) -> String {
    format!("t={unix_secs},v1={}", hmac_hex(key, unix_secs, body))
}

/// Why [`verify`] refused a callback.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SignatureError {
    /// No header, or not `t=<unix seconds>,v1=<hex>`.
    Malformed(String),
    /// No `v1` matches: another key, or the body or timestamp was changed.
    Mismatch,
    /// The timestamp is further than the tolerance from now (a replay, or a clock far off).
    OutsideTolerance {
        signed_at: u64,
        now: u64,
        tolerance_secs: u64,
    },
}

impl fmt::Display for SignatureError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SignatureError::Malformed(why) => write!(f, "malformed {SIGNATURE_HEADER}: {why}"),
            SignatureError::Mismatch => write!(f, "{SIGNATURE_HEADER} does not match the body and timestamp"),
            SignatureError::OutsideTolerance {
                signed_at,
                now,
                tolerance_secs,
            } => write!(
                f,
                "{SIGNATURE_HEADER} was made at t={signed_at}, {}s from now (t={now}); the tolerance is {tolerance_secs}s",
                signed_at.abs_diff(*now)
            ),
        }
    }
}

impl std::error::Error for SignatureError {}

/// Checks a [`SIGNATURE_HEADER`] value as a subscriber does: the HMAC of
/// `"{t}.{body}"` under `key` (in constant time; any one of several `v1`
/// entries may match, for key rotation) and `t` within `tolerance` of
/// `now_unix_secs`. The signature is checked first, so a forged timestamp
/// never gets a tolerance verdict.
pub fn verify(
    key: &[u8],
    body: &[u8],
    header: &str,
    now_unix_secs: u64,
    tolerance: Duration,
) -> Result<(), SignatureError> {
    if header.len() > SIGNATURE_HEADER_LEN_MAX {
        return Err(SignatureError::Malformed("too long".into()));
    }
    let mut t = None;
    let mut v1 = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => {
                let secs = v
                    .parse::<u64>()
                    .map_err(|_| SignatureError::Malformed(format!("t={v:?} is not unix seconds")))?;
                if t.replace(secs).is_some() {
                    return Err(SignatureError::Malformed("two t= entries".into()));
                }
            }
            Some(("v1", v)) => v1.push(v),
            // Other schemes (a future v2) are ignored, as in Stripe's.
            Some(_) => {}
            None => return Err(SignatureError::Malformed(format!("{part:?} is not key=value"))),
        }
    }
    let t = t.ok_or_else(|| SignatureError::Malformed("no t= timestamp".into()))?;
    if v1.is_empty() {
        return Err(SignatureError::Malformed("no v1= signature".into()));
    }
    let expected = hmac_hex(key, t, body);
    if !v1
        .iter()
        .fold(false, |ok, v| ok | constant_time_eq(expected.as_bytes(), v.as_bytes()))
    {
        return Err(SignatureError::Mismatch);
    }
    if t.abs_diff(now_unix_secs) > tolerance.as_secs() {
        return Err(SignatureError::OutsideTolerance {
            signed_at: t,
            now: now_unix_secs,
            tolerance_secs: tolerance.as_secs(),
        });
    }
    Ok(())
}

/// [`verify`] against the system clock with [`SIGNATURE_TOLERANCE_DEFAULT`].
pub fn verify_now(key: &[u8], body: &[u8], header: &str) -> Result<(), SignatureError> {
    verify(key, body, header, unix_secs_now(), SIGNATURE_TOLERANCE_DEFAULT)
}

/// Unix seconds from the system clock (what signatures are stamped with).
pub fn unix_secs_now() -> u64 {
    super::clock::unix_nanos_now() / 1_000_000_000
}

/// Equality whose running time does not depend on where the inputs differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Which callback targets the broker may contact, judged twice: the URL's
/// host by name, then every address it resolves to.
///
/// **Rules:** a public address is allowed when the host matched a name entry
/// (`*`, `*.domain`, a host name) or an address entry holds it; a loopback,
/// private, link-local, unspecified, shared (CGNAT), multicast or reserved
/// address only when an address entry holds it (`loopback` holds the loopback
/// ranges), never because of a name; the broker's own listening address
/// (its port on a loopback or its bound address) never. The dispatcher
/// connects to an address that passed, not to a second lookup of the name,
/// so a name that changes its answer (DNS rebinding) cannot lead inward.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allowlist {
    entries: Vec<AllowEntry>,
    /// The broker's own listening address.
    own: Option<SocketAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum AllowEntry {
    /// `*`: any host name (public addresses only).
    Any,
    /// `loopback`: the name `localhost` and the loopback ranges.
    Loopback,
    /// `*.example.com`: any subdomain of it (public addresses only).
    Suffix(String),
    /// An exact host name, lowercase (public addresses only).
    Host(String),
    /// An address or a CIDR block: these addresses, whatever their kind.
    Net(IpNet),
}

/// An address block: `10.0.0.0/8`, `fd00::/8`, or one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    pub fn parse(s: &str) -> Option<IpNet> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.trim_start_matches('[').trim_end_matches(']').parse().ok()?;
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= bits)?,
            None => bits,
        };
        Some(IpNet { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// An IPv4-mapped IPv6 address (`::ffff:127.0.0.1`) is the IPv4 address it
/// carries: it reaches the same host.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The kind of an address that must be allowed by address, or `None` for a
/// public one.
pub fn special_address(ip: IpAddr) -> Option<&'static str> {
    match canonical(ip) {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            if v4.is_loopback() {
                Some("loopback")
            } else if v4.is_private() {
                Some("private")
            } else if v4.is_link_local() {
                Some("link-local")
            } else if v4.is_unspecified() || o[0] == 0 {
                Some("unspecified")
            } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
                Some("shared (CGNAT)")
            } else if v4.is_multicast() || v4.is_broadcast() || o[0] >= 240 {
                Some("multicast or reserved")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if v6.is_unique_local() {
                Some("private")
            } else if v6.is_unicast_link_local() || (v6.segments()[0] & 0xffc0) == 0xfec0 {
                Some("link-local")
            } else if v6.is_multicast() {
                Some("multicast or reserved")
            } else {
                None
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UrlError(pub String);

impl fmt::Display for UrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Default for Allowlist {
    fn default() -> Self {
        Allowlist::loopback()
    }
}

/// Longest a callback target's name resolution may take at subscribe time.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Addresses considered per resolution (a bound on what a name can return).
const RESOLVED_ADDRESSES_MAX: usize = 32;

impl Allowlist {
    pub fn loopback() -> Allowlist {
        Allowlist {
            entries: vec![AllowEntry::Loopback],
            own: None,
        }
    }

    /// The broker listens here: never a callback target.
    pub fn with_own_address(mut self, addr: SocketAddr) -> Allowlist {
        self.own = Some(addr);
        self
    }

    /// Parses `--callback-allow` values: `loopback`, `*`, `*.domain`, a host
    /// name, an IP address or a CIDR block. An empty list means loopback only.
    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<Allowlist, String> {
        let mut entries = Vec::new();
        for item in items {
            for raw in item.as_ref().split(',') {
                let s = raw.trim().to_ascii_lowercase();
                let entry = if s.is_empty() {
                    continue;
                } else if s == "*" {
                    AllowEntry::Any
                } else if s == "loopback" {
                    AllowEntry::Loopback
                } else if let Some(rest) = s.strip_prefix("*.") {
                    if rest.is_empty() || rest.contains('*') {
                        return Err(format!("bad --callback-allow entry {raw:?}"));
                    }
                    AllowEntry::Suffix(format!(".{rest}"))
                } else if let Some(net) = IpNet::parse(&s) {
                    AllowEntry::Net(net)
                } else if s.contains(['*', '/', ':', '@', '[', ']']) {
                    return Err(format!(
                        "bad --callback-allow entry {raw:?}: expected loopback, *, *.domain, a host name, an IP address or a CIDR block (10.0.0.0/8)"
                    ));
                } else {
                    AllowEntry::Host(s)
                };
                entries.push(entry);
            }
        }
        if entries.is_empty() {
            entries.push(AllowEntry::Loopback);
        }
        Ok(Allowlist { entries, own: None })
    }

    /// The checks that need no lookup: an `http://` or `https://` URL without credentials
    /// whose host is allowed by name, or could be by address (an IP host is
    /// judged here in full). Resolve with [`Allowlist::resolve`] before use.
    pub fn check_url(&self, url: &str) -> Result<reqwest::Url, UrlError> {
        if url.is_empty() || url.len() > URL_LEN_MAX {
            return Err(UrlError(format!(
                "NotifyUrl must be 1 to {URL_LEN_MAX} bytes, got {}",
                url.len()
            )));
        }
        let parsed = reqwest::Url::parse(url).map_err(|e| UrlError(format!("NotifyUrl is not a valid URL: {e}")))?;
        match parsed.scheme() {
            "http" | "https" => {}
            other => return Err(UrlError(format!("NotifyUrl scheme {other:?} is not http or https"))),
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(UrlError("NotifyUrl must not carry credentials".into()));
        }
        let port = parsed.port_or_known_default().unwrap_or(80);
        match parsed.host() {
            None => Err(UrlError("NotifyUrl has no host".into())),
            Some(url::Host::Ipv4(ip)) => self
                .check_addr(&parsed, SocketAddr::new(ip.into(), port))
                .map(|()| parsed),
            Some(url::Host::Ipv6(ip)) => self
                .check_addr(&parsed, SocketAddr::new(ip.into(), port))
                .map(|()| parsed),
            Some(url::Host::Domain(name)) => {
                let name = name.to_ascii_lowercase();
                if self.name_allowed(&name) || self.has_address_entries() {
                    Ok(parsed)
                } else {
                    Err(UrlError(format!(
                        "NotifyUrl host {name} is not on the callback allowlist (--callback-allow)"
                    )))
                }
            }
        }
    }

    fn has_address_entries(&self) -> bool {
        self.entries.iter().any(|e| matches!(e, AllowEntry::Net(_)))
    }

    fn name_allowed(&self, name: &str) -> bool {
        self.entries.iter().any(|e| match e {
            AllowEntry::Any => true,
            AllowEntry::Loopback => name == "localhost",
            AllowEntry::Suffix(suffix) => name.ends_with(suffix.as_str()),
            AllowEntry::Host(h) => name == h,
            AllowEntry::Net(_) => false,
        })
    }

    fn is_own(&self, addr: SocketAddr) -> bool {
        let Some(own) = self.own else { return false };
        if addr.port() != own.port() {
            return false;
        }
        let ip = canonical(addr.ip());
        let own_ip = canonical(own.ip());
        // Bound to every interface: any local-looking address may be it.
        ip == own_ip
            || ip.is_loopback()
            || ip.is_unspecified()
            || (own_ip.is_unspecified() && special_address(ip).is_some())
    }

    /// May the broker connect to `addr` for the callback URL `url`?
    pub fn check_addr(&self, url: &reqwest::Url, addr: SocketAddr) -> Result<(), UrlError> {
        let ip = canonical(addr.ip());
        if self.is_own(addr) {
            return Err(UrlError(format!(
                "NotifyUrl {} reaches {addr}, the broker's own listening address",
                url.host_str().unwrap_or("")
            )));
        }
        let by_address = self.entries.iter().any(|e| match e {
            AllowEntry::Net(net) => net.contains(ip),
            AllowEntry::Loopback => ip.is_loopback(),
            _ => false,
        });
        if by_address {
            return Ok(());
        }
        let host = url.host_str().unwrap_or("");
        match special_address(ip) {
            Some(kind) => {
                let what = if url
                    .host_str()
                    .is_some_and(|h| h.trim_start_matches('[').trim_end_matches(']') == ip.to_string())
                {
                    format!("NotifyUrl address {ip}")
                } else {
                    format!("NotifyUrl host {host} resolves to {ip}, which")
                };
                Err(UrlError(format!(
                    "{what} is a {kind} address, off the callback allowlist unless an address entry allows it \
                     (--callback-allow {ip} or its CIDR block)"
                )))
            }
            None => {
                let name_ok = match url.host() {
                    Some(url::Host::Domain(name)) => self.name_allowed(&name.to_ascii_lowercase()),
                    // `*` also allows public IP hosts.
                    _ => self.entries.contains(&AllowEntry::Any),
                };
                if name_ok {
                    Ok(())
                } else {
                    Err(UrlError(format!(
                        "NotifyUrl host {host} ({ip}) is not on the callback allowlist (--callback-allow)"
                    )))
                }
            }
        }
    }

    /// Resolves the URL's host (bounded by [`RESOLVE_TIMEOUT`]) and answers
    /// the addresses that passed [`Allowlist::check_addr`], in resolver order;
    /// an error names what was refused when none passed.
    pub async fn resolve(&self, url: &reqwest::Url) -> Result<Vec<SocketAddr>, UrlError> {
        let port = url.port_or_known_default().unwrap_or(80);
        let candidates: Vec<SocketAddr> = match url.host() {
            None => return Err(UrlError("NotifyUrl has no host".into())),
            Some(url::Host::Ipv4(ip)) => vec![SocketAddr::new(ip.into(), port)],
            Some(url::Host::Ipv6(ip)) => vec![SocketAddr::new(ip.into(), port)],
            Some(url::Host::Domain(name)) => {
                let lookup = tokio::net::lookup_host((name, port));
                match tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await {
                    Err(_) => {
                        return Err(UrlError(format!(
                            "NotifyUrl host {name}: no DNS answer within {RESOLVE_TIMEOUT:?}"
                        )));
                    }
                    Ok(Err(e)) => return Err(UrlError(format!("NotifyUrl host {name} does not resolve: {e}"))),
                    Ok(Ok(addrs)) => addrs.take(RESOLVED_ADDRESSES_MAX).collect(),
                }
            }
        };
        let mut passed = Vec::new();
        let mut refused = None;
        for a in candidates {
            match self.check_addr(url, a) {
                Ok(()) => passed.push(a),
                Err(e) => refused = refused.or(Some(e)),
            }
        }
        match (passed.is_empty(), refused) {
            (false, _) => Ok(passed),
            (true, Some(e)) => Err(e),
            (true, None) => Err(UrlError(format!(
                "NotifyUrl host {} resolves to no address",
                url.host_str().unwrap_or("")
            ))),
        }
    }
}

#[derive(Clone, Debug)]
pub struct CallbackConfig {
    /// No answer within this counts as `TimedOut`.
    pub timeout: Duration,
    /// Signs every callback body; `None` sends callbacks unsigned (only
    /// tests: `serve` always has a key, given or generated).
    pub signing_key: Option<Vec<u8>>,
    pub allow: Allowlist,
    /// Callbacks in flight per subscriber (the core's window, enforced here too).
    pub inflight_per_subscriber_max: usize,
    /// CA certificates trusted for `https` callbacks besides the bundled
    /// Mozilla roots (a private CA of the subscribers).
    pub extra_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
}

/// TLS for `https` callbacks: rustls (ring), the bundled Mozilla roots plus
/// `extra_roots`, HTTP/1.1.
pub fn tls_config(extra_roots: &[rustls::pki_types::CertificateDer<'static>]) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for (i, c) in extra_roots.iter().enumerate() {
        roots
            .add(c.clone())
            .map_err(|e| format!("CA certificate {} is not usable: {e}", i + 1))?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// A reqwest client builder with [`tls_config`] and no extra roots. Every
/// client of this crate starts here: reqwest is built without a default
/// crypto provider (ring is chosen explicitly), so a bare `Client::new()`
/// would panic.
pub fn client_builder() -> reqwest::ClientBuilder {
    install_default_crypto_provider();
    let tls = tls_config(&[]).expect("the bundled roots and the ring provider are valid");
    reqwest::Client::builder().tls_backend_preconfigured(tls)
}

/// Makes ring the process's default rustls provider unless one is set, so
/// that a bare `reqwest::Client::new()` elsewhere in a process using this
/// crate works too (reqwest is built without a provider of its own).
pub fn install_default_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Reads PEM CA certificates (`--callback-ca FILE`).
pub fn load_ca_file(path: &std::path::Path) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

/// The name lookup of `https` callbacks (whose connection must keep the name
/// for TLS): answers only the addresses that pass the allowlist, so reqwest
/// connects to nothing else. (Plain `http` connects by IP instead, see `post`.)
struct CheckedResolver {
    allow: Allowlist,
}

impl reqwest::dns::Resolve for CheckedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow = self.allow.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let url = reqwest::Url::parse(&format!("https://{host}/"))?;
            let addrs = allow.resolve(&url).await?;
            // Port 0: the connector puts the URL's port in.
            let addrs: Vec<SocketAddr> = addrs.into_iter().map(|a| SocketAddr::new(a.ip(), 0)).collect();
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

impl std::error::Error for UrlError {}

/// Per subscriber: its delivery window and its last URL, checked once.
struct Window {
    slots: Arc<Semaphore>,
    url: String,
    /// The allowlist's verdict on `url` and what a request to it needs
    /// (parsing a URL per callback is not free).
    checked: Result<Arc<Target>, UrlError>,
}

/// A callback URL that passed [`Allowlist::check_url`], with the parts each
/// request needs computed once.
struct Target {
    url: reqwest::Url,
    /// `https`: through reqwest (TLS needs the name); `http`: through [`HttpPool`].
    https: bool,
    path_and_query: String,
    /// The `Host` header: the URL's host (and port when it gives one).
    host: HeaderValue,
}

impl Target {
    fn of(url: reqwest::Url) -> Result<Target, UrlError> {
        let host = match url.port() {
            Some(p) => format!("{}:{p}", url.host_str().unwrap_or("")),
            None => url.host_str().unwrap_or("").to_string(),
        };
        let host = HeaderValue::from_str(&host)
            .map_err(|_| UrlError(format!("NotifyUrl host {host:?} is not a valid Host header")))?;
        let mut path_and_query = url.path().to_string();
        if let Some(q) = url.query() {
            path_and_query.push('?');
            path_and_query.push_str(q);
        }
        Ok(Target {
            https: url.scheme() == "https",
            url,
            path_and_query,
            host,
        })
    }
}

/// The clients callbacks go out with, and their signing key.
struct Clients {
    /// `http` callbacks: hyper, keep-alive connections pooled per address.
    plain: HttpPool,
    /// `https` callbacks: reqwest with rustls and [`CheckedResolver`].
    tls: reqwest::Client,
    signing_key: Option<Vec<u8>>,
}

static SIGNATURE_HEADER_NAME: HeaderName = HeaderName::from_static("x-sagamq-signature");
static ATTEMPT_HEADER_NAME: HeaderName = HeaderName::from_static("x-sagamq-attempt");
const USER_AGENT: &str = concat!("sagamq/", env!("CARGO_PKG_VERSION"));

/// Spawns one task per callback and collects their results on a channel.
pub struct Dispatcher {
    clients: Arc<Clients>,
    /// Shared with every callback task (a clone per callback would copy its entries).
    allow: Arc<Allowlist>,
    per_subscriber: BTreeMap<ClientId, Window>,
    inflight_per_subscriber_max: usize,
    total: Arc<Semaphore>,
    results: mpsc::Sender<(DeliveryId, CallbackResult)>,
}

impl Dispatcher {
    pub fn new(config: CallbackConfig) -> Result<(Dispatcher, mpsc::Receiver<(DeliveryId, CallbackResult)>), String> {
        let tls = tls_config(&config.extra_roots)?;
        let idle_per_host = config.inflight_per_subscriber_max.max(1) * 4;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .dns_resolver(Arc::new(CheckedResolver {
                allow: config.allow.clone(),
            }))
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(idle_per_host)
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(USER_AGENT)
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        let (tx, rx) = mpsc::channel(CALLBACK_RESULTS_MAX);
        Ok((
            Dispatcher {
                clients: Arc::new(Clients {
                    plain: HttpPool::new(idle_per_host, config.timeout),
                    tls: http,
                    signing_key: config.signing_key,
                }),
                allow: Arc::new(config.allow),
                per_subscriber: BTreeMap::new(),
                inflight_per_subscriber_max: config.inflight_per_subscriber_max.max(1),
                total: Arc::new(Semaphore::new(CALLBACKS_INFLIGHT_TOTAL_MAX)),
                results: tx,
            },
            rx,
        ))
    }

    pub fn dispatch(&mut self, cb: Callback) {
        let (window, target) = self.window(&cb.client, &cb.url);
        let clients = self.clients.clone();
        let total = self.total.clone();
        let results = self.results.clone();
        let allow = self.allow.clone();
        tokio::spawn(async move {
            let delivery = cb.delivery;
            let result = match target {
                Err(e) => {
                    tracing::warn!(client = %cb.client, msg = %cb.message.msg_id, "callback refused: {e}");
                    CallbackResult::Failed
                }
                Ok(target) => match (window.acquire_owned().await, total.acquire_owned().await) {
                    (Ok(_w), Ok(_t)) => match allow.resolve(&target.url).await {
                        Ok(addrs) => post(&clients, &target, addrs[0], cb).await,
                        Err(e) => {
                            tracing::warn!(client = %cb.client, msg = %cb.message.msg_id, "callback refused: {e}");
                            CallbackResult::Failed
                        }
                    },
                    _ => CallbackResult::Failed,
                },
            };
            // The driver is gone only at shutdown; the delivery is then retried after restart.
            let _ = results.send((delivery, result)).await;
        });
    }

    fn check(&self, url: &str) -> Result<Arc<Target>, UrlError> {
        self.allow.check_url(url).and_then(Target::of).map(Arc::new)
    }

    fn window(&mut self, client: &ClientId, url: &str) -> (Arc<Semaphore>, Result<Arc<Target>, UrlError>) {
        if let Some(w) = self.per_subscriber.get(client) {
            if w.url == url {
                return (w.slots.clone(), w.checked.clone());
            }
            // The subscriber renewed with another URL.
            let checked = self.check(url);
            let w = self.per_subscriber.get_mut(client).expect("present above");
            w.url = url.to_string();
            w.checked = checked;
            return (w.slots.clone(), w.checked.clone());
        }
        if self.per_subscriber.len() >= SUBSCRIBER_WINDOWS_MAX {
            // A window is in use while a callback task holds a clone of it.
            self.per_subscriber.retain(|_, w| Arc::strong_count(&w.slots) > 1);
        }
        let w = Window {
            slots: Arc::new(Semaphore::new(self.inflight_per_subscriber_max)),
            url: url.to_string(),
            checked: self.check(url),
        };
        let out = (w.slots.clone(), w.checked.clone());
        self.per_subscriber.insert(client.clone(), w);
        out
    }
}

/// The callback body: byte for byte what `serde_json::to_vec(message)`
/// writes (the same field order, numbers and escapes; a test holds it to
/// that), without serde_json's byte-by-byte escape scan for the strings
/// that need no escape, which is every id and most contents. That scan was
/// the largest single cost of a callback after the HMAC.
pub(crate) fn message_json(m: &Message) -> Vec<u8> {
    let strings = m.global_id.as_str().len()
        + m.sub_id.as_str().len()
        + m.sender_id.as_str().len()
        + m.topic.as_str().len()
        + m.content.len();
    let mut out = Vec::with_capacity(128 + strings);
    out.extend_from_slice(b"{\"MsgID\":");
    json_number(&mut out, m.msg_id.0);
    out.extend_from_slice(b",\"GlobalID\":");
    json_str(&mut out, m.global_id.as_str());
    out.extend_from_slice(b",\"SubID\":");
    json_str(&mut out, m.sub_id.as_str());
    out.extend_from_slice(b",\"SenderID\":");
    json_str(&mut out, m.sender_id.as_str());
    out.extend_from_slice(b",\"CreateTime\":");
    json_number(&mut out, m.create_time);
    out.extend_from_slice(b",\"Topic\":");
    json_str(&mut out, m.topic.as_str());
    out.extend_from_slice(b",\"Content\":");
    json_str(&mut out, &m.content);
    out.push(b'}');
    out
}

fn json_number(out: &mut Vec<u8>, n: impl serde::Serialize) {
    // Writing to a Vec cannot fail, and a number always serialises.
    let _ = serde_json::to_writer(&mut *out, &n);
}

/// A JSON string as serde_json writes it: copied between quotes when no
/// byte needs an escape (a control character, `"` or `\\`; serde_json
/// escapes nothing else), else through serde_json. The check has no early
/// exit, so it compiles to a vector loop.
fn json_str(out: &mut Vec<u8>, s: &str) {
    let needs_escape = s
        .bytes()
        .fold(false, |acc, b| acc | (b < 0x20) | (b == b'"') | (b == b'\\'));
    if needs_escape {
        let _ = serde_json::to_writer(&mut *out, s);
    } else {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    }
}

/// POSTs the callback. Plain `http` goes to `addr`, an address that passed
/// the allowlist, never to a fresh lookup of the URL's name (the request keeps
/// the name in `Host`). `https` needs the name for the certificate check, so
/// it connects through [`CheckedResolver`], which answers only addresses that
/// pass.
async fn post(clients: &Clients, target: &Target, addr: SocketAddr, cb: Callback) -> CallbackResult {
    let body = message_json(&cb.message);
    // Stamped per attempt: a retry carries a fresh timestamp.
    let signature = clients
        .signing_key
        .as_deref()
        .map(|key| sign(key, unix_secs_now(), &body));
    if target.https {
        return post_tls(&clients.tls, target, signature, cb, body).await;
    }
    let mut headers = Vec::with_capacity(4);
    headers.push((header::CONTENT_TYPE, HeaderValue::from_static("application/json")));
    headers.push((header::USER_AGENT, HeaderValue::from_static(USER_AGENT)));
    headers.push((ATTEMPT_HEADER_NAME.clone(), HeaderValue::from(cb.attempt)));
    if let Some(s) = signature {
        match HeaderValue::try_from(s) {
            Ok(v) => headers.push((SIGNATURE_HEADER_NAME.clone(), v)),
            Err(_) => return CallbackResult::Failed,
        }
    }
    let request = Post {
        path_and_query: &target.path_and_query,
        host: &target.host,
        headers: &headers,
        body: Bytes::from(body),
    };
    match clients.plain.post(addr, request).await {
        Ok(status) if status.is_success() => CallbackResult::Delivered,
        Ok(status) => {
            tracing::debug!(client = %cb.client, msg = %cb.message.msg_id, attempt = cb.attempt, %status, "callback refused by subscriber");
            CallbackResult::Failed
        }
        Err(PostError::TimedOut) => {
            tracing::debug!(client = %cb.client, msg = %cb.message.msg_id, attempt = cb.attempt, "callback timed out");
            CallbackResult::TimedOut
        }
        Err(PostError::Failed(e)) => {
            tracing::debug!(client = %cb.client, msg = %cb.message.msg_id, attempt = cb.attempt, "callback failed: {e}");
            CallbackResult::Failed
        }
    }
}

/// An `https` callback through reqwest.
async fn post_tls(
    http: &reqwest::Client,
    target: &Target,
    signature: Option<String>,
    cb: Callback,
    body: Vec<u8>,
) -> CallbackResult {
    let mut req = http
        .post(target.url.clone())
        .header(reqwest::header::HOST, target.host.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(ATTEMPT_HEADER, cb.attempt.to_string());
    if let Some(s) = signature {
        req = req.header(SIGNATURE_HEADER, s);
    }
    match req.body(body).send().await {
        Ok(resp) if resp.status().is_success() => {
            // Drain the body so the connection goes back to the pool.
            let _ = resp.bytes().await;
            CallbackResult::Delivered
        }
        Ok(resp) => {
            tracing::debug!(client = %cb.client, msg = %cb.message.msg_id, attempt = cb.attempt, status = %resp.status(), "callback refused by subscriber");
            let _ = resp.bytes().await;
            CallbackResult::Failed
        }
        Err(e) if e.is_timeout() => {
            tracing::debug!(client = %cb.client, msg = %cb.message.msg_id, attempt = cb.attempt, "callback timed out");
            CallbackResult::TimedOut
        }
        Err(e) => {
            tracing::debug!(client = %cb.client, msg = %cb.message.msg_id, attempt = cb.attempt, "callback failed: {e}");
            CallbackResult::Failed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #[test]
        fn the_callback_body_is_serde_jsons_message_json(
            msg_id in proptest::prelude::any::<u64>(),
            create_time in proptest::prelude::any::<i64>(),
            ids in proptest::collection::vec("[ -~]{1,12}|[\"\\\\/a-z\u{a0}-\u{d7ff}\u{10000}-\u{10ffff}]{1,6}", 4),
            content in "\\PC{0,40}|[\\x00-\\x7f]{0,40}|.{0,8}",
        ) {
            let m = Message {
                msg_id: crate::types::MsgId(msg_id),
                global_id: crate::types::GlobalId::lit(&ids[0]),
                sub_id: crate::types::SubId::lit(&ids[1]),
                sender_id: crate::types::SenderId::lit(&ids[2]),
                create_time,
                topic: crate::types::Topic::lit(&ids[3]),
                content,
            };
            proptest::prop_assert_eq!(message_json(&m), serde_json::to_vec(&m).unwrap());
        }
    }

    const TOL: Duration = SIGNATURE_TOLERANCE_DEFAULT;

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        // RFC 4231 test case 2, with the signed payload split as "{t}.{body}".
        let s = sign(b"Jefe", 1, b"what do ya want for nothing?");
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"1.what do ya want for nothing?");
        let hex: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(s, format!("t=1,v1={hex}"));
        let body = b"{\"MsgID\":1}";
        let now = 1_700_000_000;
        let h = sign(b"key", now, body);
        assert_eq!(verify(b"key", body, &h, now, TOL), Ok(()));
        assert_eq!(verify(b"key", body, &h, now + 300, TOL), Ok(()), "at the tolerance");
        assert_eq!(
            verify(b"key", b"{\"MsgID\":2}", &h, now, TOL),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(verify(b"other", body, &h, now, TOL), Err(SignatureError::Mismatch));
        // The timestamp is signed: moving it to look fresh breaks the signature.
        let moved = h.replace(&format!("t={now}"), &format!("t={}", now + 1000));
        assert_eq!(
            verify(b"key", body, &moved, now + 1000, TOL),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn a_replay_outside_the_tolerance_is_refused_either_way() {
        let body = b"payload";
        let t = 1_700_000_000;
        let h = sign(b"k", t, body);
        assert!(matches!(
            verify(b"k", body, &h, t + 301, TOL),
            Err(SignatureError::OutsideTolerance { signed_at, .. }) if signed_at == t
        ));
        assert!(matches!(
            verify(b"k", body, &h, t - 301, TOL),
            Err(SignatureError::OutsideTolerance { .. })
        ));
        assert_eq!(verify(b"k", body, &h, t + 30, Duration::from_secs(60)), Ok(()));
        assert!(verify(b"k", body, &h, t + 61, Duration::from_secs(60)).is_err());
    }

    #[test]
    fn malformed_headers_and_key_rotation() {
        let body = b"b";
        let t = 100;
        for bad in [
            "",
            "sha256=abcd",
            "t=1",
            "v1=ab",
            "t=x,v1=ab",
            "t=1,t=1,v1=ab",
            "nonsense",
            &"v".repeat(2000),
        ] {
            assert!(
                matches!(verify(b"k", body, bad, t, TOL), Err(SignatureError::Malformed(_))),
                "{bad:?}"
            );
        }
        // During a rotation the broker may send two v1 entries; either verifies.
        let new = sign(b"new", t, body);
        let old = sign(b"old", t, body);
        let both = format!("{new},v1={}", old.split_once("v1=").unwrap().1);
        assert_eq!(verify(b"old", body, &both, t, TOL), Ok(()));
        assert_eq!(verify(b"new", body, &both, t, TOL), Ok(()));
        assert_eq!(verify(b"third", body, &both, t, TOL), Err(SignatureError::Mismatch));
    }

    #[test]
    fn default_allowlist_is_loopback_only() {
        let a = Allowlist::default();
        for ok in [
            "http://127.0.0.1:9/x",
            "http://localhost/cb",
            "http://[::1]:80/",
            "http://127.9.9.9/",
        ] {
            assert!(a.check_url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://10.0.0.1/",
            "http://169.254.169.254/latest/meta-data",
            "http://example.com/",
            "http://localhost.evil.com/",
            "ftp://127.0.0.1/",
            "http://user:pw@127.0.0.1/",
            "not a url",
            "",
        ] {
            assert!(a.check_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn allowlist_entries() {
        let a = Allowlist::parse(&["*.svc.local, 10.1.2.3", "orders"]).unwrap();
        assert!(a.check_url("http://stock.svc.local:8080/cb").is_ok());
        // With an address entry in the list, any name may still resolve into
        // it: the name passes, and its public addresses are refused.
        assert!(a.check_url("http://svc.local/").is_ok());
        let public: SocketAddr = "93.184.216.34:80".parse().unwrap();
        assert!(a.check_addr(&url("http://svc.local/"), public).is_err());
        assert!(a.check_addr(&url("http://stock.svc.local/"), public).is_ok());
        assert!(
            a.check_addr(&url("http://svc.local/"), "10.1.2.3:80".parse().unwrap())
                .is_ok()
        );
        assert!(
            Allowlist::parse(&["orders"])
                .unwrap()
                .check_url("http://svc.local/")
                .is_err()
        );
        assert!(a.check_url("http://10.1.2.3/").is_ok());
        assert!(a.check_url("http://orders/").is_ok());
        assert!(
            a.check_url("http://127.0.0.1/").is_err(),
            "explicit list replaces loopback"
        );
        assert!(
            Allowlist::parse(&["*"])
                .unwrap()
                .check_url("http://anything.example/")
                .is_ok()
        );
        assert!(Allowlist::parse(&["http://x/"]).is_err());
        assert_eq!(Allowlist::parse::<&str>(&[]).unwrap(), Allowlist::loopback());
    }

    fn url(u: &str) -> reqwest::Url {
        reqwest::Url::parse(u).unwrap()
    }

    #[test]
    fn cidr_blocks_and_mapped_addresses() {
        let n = IpNet::parse("10.0.0.0/8").unwrap();
        assert!(n.contains("10.200.1.1".parse().unwrap()));
        assert!(!n.contains("11.0.0.1".parse().unwrap()));
        assert!(
            n.contains("::ffff:10.1.2.3".parse().unwrap()),
            "IPv4-mapped is the same host"
        );
        let v6 = IpNet::parse("fd00::/8").unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("fe80::1".parse().unwrap()));
        assert!(IpNet::parse("0.0.0.0/0").unwrap().contains("8.8.8.8".parse().unwrap()));
        for bad in ["10.0.0.0/33", "::/129", "10.0.0/8", "x/8"] {
            assert_eq!(IpNet::parse(bad), None, "{bad}");
        }
        assert!(Allowlist::parse(&["10.0.0.0/33"]).is_err());
    }

    #[test]
    fn inward_addresses_need_an_address_entry_even_under_a_star() {
        let any = Allowlist::parse(&["*"]).unwrap();
        for inward in [
            "http://127.0.0.1/",
            "http://10.1.1.1/",
            "http://192.168.0.1/",
            "http://169.254.169.254/latest/meta-data",
            "http://0.0.0.0/",
            "http://100.64.0.1/",
            "http://[::1]/",
            "http://[fd00::1]/",
            "http://[fe80::1]/",
            "http://[::ffff:127.0.0.1]/",
        ] {
            let err = any.check_url(inward).unwrap_err();
            assert!(err.0.contains("address"), "{inward}: {err}");
        }
        assert!(any.check_url("http://8.8.8.8/").is_ok(), "public IP under *");
        let with_net = Allowlist::parse(&["*", "10.0.0.0/8"]).unwrap();
        assert!(with_net.check_url("http://10.1.1.1/").is_ok());
        assert!(with_net.check_url("http://192.168.0.1/").is_err());
        // A name allowed by name that resolves inward is refused by address.
        let by_name = Allowlist::parse(&["localhost", "*.svc.example"]).unwrap();
        let u = url("http://localhost:8080/cb");
        assert!(by_name.check_url(u.as_str()).is_ok(), "the name passes");
        let err = by_name.check_addr(&u, "127.0.0.1:8080".parse().unwrap()).unwrap_err();
        assert!(err.0.contains("loopback address"), "{err}");
        let rebinding = url("http://stock.svc.example/cb");
        assert!(by_name.check_addr(&rebinding, "10.0.0.7:80".parse().unwrap()).is_err());
        assert!(
            by_name
                .check_addr(&rebinding, "93.184.216.34:80".parse().unwrap())
                .is_ok()
        );
        // A public address not named is refused.
        assert!(
            by_name
                .check_addr(&url("http://evil.example/"), "93.184.216.34:80".parse().unwrap())
                .is_err()
        );
        let with_addr = Allowlist::parse(&["localhost", "127.0.0.1/32"]).unwrap();
        assert!(with_addr.check_addr(&u, "127.0.0.1:8080".parse().unwrap()).is_ok());
    }

    #[test]
    fn the_brokers_own_address_is_never_a_target() {
        let own: SocketAddr = "127.0.0.1:3333".parse().unwrap();
        let a = Allowlist::parse(&["loopback", "127.0.0.0/8"])
            .unwrap()
            .with_own_address(own);
        assert!(
            a.check_url("http://127.0.0.1:3333/metrics")
                .unwrap_err()
                .0
                .contains("own")
        );
        assert!(
            a.check_url("http://127.0.0.2:3333/publish").is_err(),
            "any loopback, same port"
        );
        assert!(a.check_url("http://[::1]:3333/").is_err());
        assert!(
            a.check_url("http://127.0.0.1:3334/cb").is_ok(),
            "another port is another service"
        );
        let u = url("http://localhost:3333/metrics");
        assert!(a.check_addr(&u, own).is_err());
        // Bound to every interface: its port on any inward address is refused.
        let all = Allowlist::parse(&["10.0.0.0/8"])
            .unwrap()
            .with_own_address("0.0.0.0:3333".parse().unwrap());
        assert!(all.check_url("http://10.0.0.5:3333/").is_err());
        assert!(all.check_url("http://10.0.0.5:8080/").is_ok());
    }

    #[tokio::test]
    async fn resolution_keeps_only_the_addresses_that_pass() {
        let by_name = Allowlist::parse(&["localhost"]).unwrap();
        let u = url("http://localhost:9/cb");
        let err = by_name.resolve(&u).await.unwrap_err();
        assert!(err.0.contains("loopback"), "{err}");
        let with_addr = Allowlist::parse(&["localhost", "127.0.0.0/8"]).unwrap();
        let addrs = with_addr.resolve(&u).await.unwrap();
        assert!(!addrs.is_empty());
        assert!(addrs.iter().all(|a| a.ip().is_loopback() && a.port() == 9), "{addrs:?}");
        let unknown = url("http://no-such-host.invalid/cb");
        assert!(Allowlist::parse(&["*"]).unwrap().resolve(&unknown).await.is_err());
    }
}
