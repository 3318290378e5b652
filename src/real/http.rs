//! The HTTP API (axum): parses and validates requests, forwards them to the
//! driver, and maps the core's replies to status codes and JSON.
//!
//! **Invariants:** a request that fails validation (malformed JSON, a missing
//! or unknown field, an empty, oversized or control-character id, a NotifyUrl
//! off the allowlist, a body over the limit) is answered 4xx with
//! `{"ok":false,"error":"..."}` and never reaches the core, so nothing is
//! stored; `POST /publish` answers only after the core says the record is
//! durable; with a token configured, every mutating route (and the dead-letter
//! listing, which exposes message contents) requires `Authorization: Bearer`
//! with a token whose scope ([`super::auth`]) covers the request (else 401 or
//! 403, before the body is read); a body is read whole within a size and time
//! bound before its handler runs, and the wait for room in the queue to the
//! core is bounded (503 with `Retry-After`).

use super::auth::{Auth, Scope};
use super::callbacks::Allowlist;
use super::driver::{DriverGone, DriverHandle, Request, Stats};
use crate::broker::{BrokerError, Reply};
use crate::types::{CONTENT_LEN_MAX, ClientId, PublishRequest, SubscribeRequest, Topic};
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Extension, Query, Request as HttpRequest, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper::body::Incoming;
use hyper_util::service::TowerToHyperService;
use serde::Deserialize;
use serde_json::json;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;

/// Default request body limit: the largest valid publish is about 66 KiB.
pub const BODY_LEN_MAX_DEFAULT: usize = 256 * 1024;

#[derive(Clone, Debug)]
pub struct HttpConfig {
    /// Tokens required as `Authorization: Bearer <token>` on mutating routes,
    /// each with its scope; none configured: open.
    pub auth: Auth,
    pub body_len_max: usize,
    /// A body must arrive within this once the request head did (slow-loris bodies).
    pub body_read_timeout: std::time::Duration,
    pub allow: Allowlist,
}

#[derive(Clone)]
struct AppState {
    driver: DriverHandle,
    config: Arc<HttpConfig>,
}

/// The routes, ready for [`super::listener::serve`]: `POST /publish` is
/// answered by [`publish_direct`], every other request by the axum router.
#[derive(Clone)]
pub struct Api {
    router: Router,
    /// None: every request goes through the router (see [`Api::routed`]).
    state: Option<AppState>,
}

pub fn router(driver: DriverHandle, config: HttpConfig) -> Api {
    let body_len_max = config.body_len_max;
    let state = AppState {
        driver,
        config: Arc::new(config),
    };
    let protected = Router::new()
        .route("/publish", post(publish))
        .route("/subscribe", post(subscribe))
        .route("/unsubscribe", post(unsubscribe))
        .route("/dead-letters", get(dead_letters))
        .route("/dead-letters/redrive", post(redrive))
        // Layers run last-added first: the token is checked before a byte of
        // the body is read, then the body is read whole, bounded in size and time.
        .route_layer(middleware::from_fn_with_state(state.clone(), read_body_bounded))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    let router = Router::new()
        .route("/ping", get(ping))
        .route("/stats", get(stats))
        .route("/metrics", get(metrics))
        .merge(protected)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_len_max))
        .with_state(state.clone());
    Api {
        router,
        state: Some(state),
    }
}

/// One connection's service: the hot path without the router, the rest through it.
pub struct ConnectionService {
    fallback: TowerToHyperService<Router>,
    state: Option<AppState>,
}

impl Api {
    /// Routes served with every request through `router` (the cluster
    /// instance's routes, which forward publishes and have no direct path).
    pub fn routed(router: Router) -> Api {
        Api { router, state: None }
    }

    pub fn connection_service(&self) -> ConnectionService {
        ConnectionService {
            fallback: TowerToHyperService::new(self.router.clone()),
            state: self.state.clone(),
        }
    }
}

type ServiceFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response, Infallible>> + Send>>;

impl hyper::service::Service<HttpRequest<Incoming>> for ConnectionService {
    type Response = Response;
    type Error = Infallible;
    type Future = ServiceFuture;

    fn call(&self, req: HttpRequest<Incoming>) -> ServiceFuture {
        if let Some(state) = &self.state
            && req.method() == Method::POST
            && req.uri().path() == "/publish"
        {
            let state = state.clone();
            Box::pin(async move { Ok(publish_direct(state, req).await) })
        } else {
            Box::pin(self.fallback.call(req.map(axum::body::Body::new)))
        }
    }
}

/// `POST /publish` without the router's layers, in the order they apply to
/// the other routes: the token (401, before the body is read), the bounded
/// body read (408/413/400), the token's scope (403), then [`publish`]'s
/// parse and the request to the core. The publish is the hot path; the
/// router's boxing, state clones and the body's second wrapping cost as much
/// as the rest of the request.
async fn publish_direct(s: AppState, req: HttpRequest<Incoming>) -> Response {
    let auth = &s.config.auth;
    let scope = if auth.is_open() {
        None
    } else {
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        match auth.scope_of(presented) {
            Some(scope) => Some(scope),
            None => return unauthorized(),
        }
    };
    let bytes = match read_bounded(&s.config, req.into_body()).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    if let Some(scope) = scope
        && !scope.publish
    {
        return forbidden(scope, "publish");
    }
    publish_body(&s, Ok(bytes)).await
}

pub(crate) fn error(status: StatusCode, msg: impl std::fmt::Display) -> Response {
    (status, axum::Json(json!({"ok": false, "error": msg.to_string()}))).into_response()
}

pub(crate) fn ok(mut body: serde_json::Value) -> Response {
    if let Some(map) = body.as_object_mut() {
        map.insert("ok".into(), true.into());
    }
    (StatusCode::OK, axum::Json(body)).into_response()
}

/// The publish answer, written directly: it is the hot path, and building a
/// `serde_json::Value` map per publish costs more than the rest of the reply.
fn published(msg_id: u64, duplicate: bool) -> Response {
    let body = format!("{{\"Duplicate\":{duplicate},\"MsgID\":{msg_id},\"ok\":true}}");
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// 503 either way; an overloaded broker also says when to come back.
fn gone(e: DriverGone) -> Response {
    let mut r = error(StatusCode::SERVICE_UNAVAILABLE, e);
    if e == DriverGone::Busy {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

/// How a refusal of the core maps to HTTP: capacity is 503 (retry later),
/// invalid input 400, an unknown subscription 404.
pub fn rejection_status(e: &BrokerError) -> StatusCode {
    match e {
        BrokerError::QueueFull { .. }
        | BrokerError::DeadLettersFull { .. }
        | BrokerError::TooManyMessages
        | BrokerError::TooManySubscriptions
        | BrokerError::TooManyUnsyncedPublishes => StatusCode::SERVICE_UNAVAILABLE,
        BrokerError::InvalidUrl | BrokerError::ContentTooLong { .. } | BrokerError::AlreadyExpired => {
            StatusCode::BAD_REQUEST
        }
        BrokerError::NotSubscribed => StatusCode::NOT_FOUND,
    }
}

/// A refusal of the core as an answer (503 with `Retry-After` for capacity).
pub(crate) fn rejected(e: BrokerError) -> Response {
    let status = rejection_status(&e);
    let mut r = error(status, &e);
    if status == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

fn unexpected(reply: Reply) -> Response {
    tracing::error!(?reply, "the core answered with an unexpected reply kind");
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "unexpected reply from the broker core",
    )
}

/// The body as bytes, or the JSON error for a body over the limit / unreadable.
#[allow(clippy::result_large_err)] // the error is the response itself, built once per bad request
fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, Response> {
    body.map_err(|r| {
        let status = r.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            error(status, "request body is larger than the limit")
        } else {
            error(status, r.body_text())
        }
    })
}

#[allow(clippy::result_large_err)] // as above
fn parse<T: for<'de> Deserialize<'de>>(body: Result<Bytes, BytesRejection>) -> Result<T, Response> {
    let bytes = body_bytes(body)?;
    serde_json::from_slice(&bytes).map_err(|e| error(StatusCode::BAD_REQUEST, format!("invalid request: {e}")))
}

async fn require_token(State(s): State<AppState>, headers: HeaderMap, mut req: HttpRequest, next: Next) -> Response {
    let scope = if s.config.auth.is_open() {
        Scope::everything("open")
    } else {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        match s.config.auth.scope_of(presented) {
            Some(scope) => scope.clone(),
            None => return unauthorized(),
        }
    };
    req.extensions_mut().insert(Arc::new(scope));
    next.run(req).await
}

/// 401 for a missing or unknown token.
fn unauthorized() -> Response {
    let mut r = error(StatusCode::UNAUTHORIZED, "missing or wrong Authorization: Bearer token");
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

/// 403 naming the token's name (never the token) and what it lacks.
fn forbidden(scope: &Scope, what: impl std::fmt::Display) -> Response {
    error(
        StatusCode::FORBIDDEN,
        format!("the token {:?} may not {what}", scope.name),
    )
}

/// Reads the whole body within `body_read_timeout` and `body_len_max`, so a
/// handler never waits on a slow client while it holds a place in the queue
/// to the core: a body trickled in (slow loris) is cut with 408.
async fn read_body_bounded(State(s): State<AppState>, req: HttpRequest, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    match read_bounded(&s.config, body).await {
        Ok(bytes) => {
            next.run(HttpRequest::from_parts(parts, axum::body::Body::from(bytes)))
                .await
        }
        Err(r) => r,
    }
}

/// The whole body within `body_read_timeout` and `body_len_max`, or the answer refusing it.
#[allow(clippy::result_large_err)] // the error is the response itself, built once per bad request
async fn read_bounded<B>(config: &HttpConfig, body: B) -> Result<Bytes, Response>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let limited = http_body_util::Limited::new(body, config.body_len_max);
    let collected = tokio::time::timeout(config.body_read_timeout, http_body_util::BodyExt::collect(limited)).await;
    match collected {
        Err(_) => {
            let mut r = error(
                StatusCode::REQUEST_TIMEOUT,
                format!("request body not received within {:?}", config.body_read_timeout),
            );
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            Err(r)
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body is larger than the limit",
        )),
        Ok(Err(e)) => Err(error(
            StatusCode::BAD_REQUEST,
            format!("cannot read the request body: {e}"),
        )),
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}

async fn ping() -> Response {
    ok(json!({}))
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "no such route")
}

async fn method_not_allowed() -> Response {
    error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this route")
}

async fn publish(
    State(s): State<AppState>,
    Extension(scope): Extension<Arc<Scope>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if !scope.publish {
        return forbidden(&scope, "publish");
    }
    publish_body(&s, body).await
}

/// A publish whose scope was checked: parse, check, ask the core, answer.
async fn publish_body(s: &AppState, body: Result<Bytes, BytesRejection>) -> Response {
    let p: PublishRequest = match parse(body) {
        Ok(p) => p,
        Err(r) => return r,
    };
    if p.content.len() > CONTENT_LEN_MAX {
        return rejected(BrokerError::ContentTooLong { len: p.content.len() });
    }
    match s.driver.request(Request::Publish(p)).await {
        Ok(Reply::Published { msg_id, duplicate }) => published(msg_id.0, duplicate),
        Ok(Reply::Rejected(e)) => rejected(e),
        Ok(other) => unexpected(other),
        Err(e) => gone(e),
    }
}

async fn subscribe(
    State(s): State<AppState>,
    Extension(scope): Extension<Arc<Scope>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let sub: SubscribeRequest = match parse(body) {
        Ok(p) => p,
        Err(r) => return r,
    };
    if !scope.subscribe.allows(&sub.client_id) {
        return forbidden(
            &scope,
            format_args!("subscribe as ClientID {:?}", sub.client_id.as_str()),
        );
    }
    // By name, then every resolved address: a name that resolves inward (or
    // to the broker itself) is refused here, and again at each delivery.
    let checked = match s.config.allow.check_url(&sub.notify_url) {
        Ok(url) => s.config.allow.resolve(&url).await.map(|_| ()),
        Err(e) => Err(e),
    };
    if let Err(e) = checked {
        return error(StatusCode::BAD_REQUEST, e);
    }
    match s.driver.request(Request::Subscribe(sub)).await {
        Ok(Reply::Subscribed { expire_time }) => ok(json!({"ExpireTime": expire_time.as_nanos()})),
        Ok(Reply::Rejected(e)) => rejected(e),
        Ok(other) => unexpected(other),
        Err(e) => gone(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UnsubscribeBody {
    #[serde(rename = "ClientID")]
    pub(crate) client_id: ClientId,
    #[serde(rename = "Topic")]
    pub(crate) topic: Topic,
}

async fn unsubscribe(
    State(s): State<AppState>,
    Extension(scope): Extension<Arc<Scope>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let u: UnsubscribeBody = match parse(body) {
        Ok(p) => p,
        Err(r) => return r,
    };
    if !scope.subscribe.allows(&u.client_id) {
        return forbidden(&scope, format_args!("unsubscribe ClientID {:?}", u.client_id.as_str()));
    }
    let request = Request::Unsubscribe {
        client: u.client_id,
        topic: u.topic,
    };
    match s.driver.request(request).await {
        Ok(Reply::Unsubscribed) => ok(json!({})),
        Ok(Reply::Rejected(e)) => rejected(e),
        Ok(other) => unexpected(other),
        Err(e) => gone(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ClientBody {
    #[serde(rename = "ClientID")]
    pub(crate) client_id: ClientId,
}

async fn redrive(
    State(s): State<AppState>,
    Extension(scope): Extension<Arc<Scope>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let c: ClientBody = match parse(body) {
        Ok(p) => p,
        Err(r) => return r,
    };
    if !scope.dead_letters.allows(&c.client_id) {
        return forbidden(
            &scope,
            format_args!("redrive the dead letters of ClientID {:?}", c.client_id.as_str()),
        );
    }
    match s.driver.request(Request::Redrive { client: c.client_id }).await {
        Ok(Reply::Redriven { count }) => ok(json!({"Redriven": count})),
        Ok(Reply::Rejected(e)) => rejected(e),
        Ok(other) => unexpected(other),
        Err(e) => gone(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientQuery {
    client: ClientId,
}

async fn dead_letters(
    State(s): State<AppState>,
    Extension(scope): Extension<Arc<Scope>>,
    q: Result<Query<ClientQuery>, QueryRejection>,
) -> Response {
    let client = match q {
        Ok(Query(q)) => q.client,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("expected ?client=ID: {}", e.body_text()),
            );
        }
    };
    if !scope.dead_letters.allows(&client) {
        return forbidden(
            &scope,
            format_args!("read the dead letters of ClientID {:?}", client.as_str()),
        );
    }
    match s.driver.dead_letters(client.clone()).await {
        Ok(messages) => ok(json!({"ClientID": client, "Count": messages.len(), "Messages": messages})),
        Err(e) => gone(e),
    }
}

async fn stats(State(s): State<AppState>) -> Response {
    match s.driver.stats().await {
        Ok(st) => ok(stats_json(&st)),
        Err(e) => gone(e),
    }
}

pub fn stats_json(st: &Stats) -> serde_json::Value {
    let b = &st.broker;
    let io = &st.io;
    let subscribers: serde_json::Map<String, serde_json::Value> = b
        .subscribers
        .iter()
        .map(|(c, s)| {
            (
                c.to_string(),
                json!({"pending": s.pending, "in_flight": s.in_flight, "dead_letters": s.dead_letters}),
            )
        })
        .collect();
    let per_fsync = if io.fsyncs == 0 {
        0.0
    } else {
        io.records_written as f64 / io.fsyncs as f64
    };
    json!({
        "messages_live": b.messages_live,
        "subscriptions": b.subscriptions,
        "log_records": b.log_records,
        "log_bytes": b.log_bytes,
        "dedup_settled": b.dedup_settled,
        "subscribers": subscribers,
        "io": {
            "fsyncs": io.fsyncs,
            "fsync_seconds_total": io.fsync_nanos_total as f64 / 1e9,
            "records_written": io.records_written,
            "records_per_fsync_avg": per_fsync,
            "records_per_fsync_max": io.records_per_fsync_max,
            "bytes_written": io.bytes_written,
            "compactions": io.compactions,
            "fsync_time": histogram_json(&io.fsync_time),
        },
        "publishes": {
            "acked": io.publishes_acked,
            "duplicates": io.publishes_duplicate,
            "rejected_requests": io.requests_rejected,
            "time_in_broker": histogram_json(&io.publish_time),
        },
        "callbacks": {
            "delivered": io.callbacks_delivered,
            "failed": io.callbacks_failed,
            "timed_out": io.callbacks_timed_out,
        },
        "process": {
            "cpu_user_seconds": st.cpu.map(|c| c.user.as_secs_f64()),
            "cpu_system_seconds": st.cpu.map(|c| c.system.as_secs_f64()),
        },
    })
}

/// A [`Log2Histogram`] in `/stats`: counts per power of two of µs, and the
/// bucket bounds that hold the median and the 99th percentile.
fn histogram_json(h: &super::driver::Log2Histogram) -> serde_json::Value {
    json!({
        "us_log2_buckets": h.buckets.to_vec(),
        "p50_us_at_most": h.quantile_upper_us(0.5),
        "p99_us_at_most": h.quantile_upper_us(0.99),
        "max_us": h.max_nanos / 1000,
    })
}

async fn metrics(State(s): State<AppState>) -> Response {
    match s.driver.stats().await {
        Ok(st) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
            metrics_text(&st),
        )
            .into_response(),
        Err(e) => gone(e),
    }
}

/// Prometheus text exposition format.
pub fn metrics_text(st: &Stats) -> String {
    let b = &st.broker;
    let io = &st.io;
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, f64)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    metric(
        "sagamq_messages_live",
        "gauge",
        "Stored messages not yet settled for every subscriber.",
        &[("", b.messages_live as f64)],
    );
    metric(
        "sagamq_subscriptions",
        "gauge",
        "Live subscriptions.",
        &[("", b.subscriptions as f64)],
    );
    metric(
        "sagamq_log_records",
        "gauge",
        "Records in the log file.",
        &[("", b.log_records as f64)],
    );
    metric(
        "sagamq_log_bytes",
        "gauge",
        "Size of the log file in bytes.",
        &[("", b.log_bytes as f64)],
    );
    metric(
        "sagamq_dedup_settled",
        "gauge",
        "Dedup keys of settled messages remembered.",
        &[("", b.dedup_settled as f64)],
    );
    metric(
        "sagamq_fsyncs_total",
        "counter",
        "fdatasync calls on the log.",
        &[("", io.fsyncs as f64)],
    );
    metric(
        "sagamq_fsync_seconds_total",
        "counter",
        "Time spent in fdatasync.",
        &[("", io.fsync_nanos_total as f64 / 1e9)],
    );
    metric(
        "sagamq_log_records_written_total",
        "counter",
        "Records written to the log (records/fsyncs is the group-commit factor).",
        &[("", io.records_written as f64)],
    );
    metric(
        "sagamq_log_bytes_written_total",
        "counter",
        "Bytes written to the log.",
        &[("", io.bytes_written as f64)],
    );
    metric(
        "sagamq_compactions_total",
        "counter",
        "Log rewrites (compaction).",
        &[("", io.compactions as f64)],
    );
    metric(
        "sagamq_publishes_total",
        "counter",
        "Publishes answered OK, by whether (GlobalID, SubID) was new.",
        &[
            ("{result=\"stored\"}", io.publishes_acked as f64),
            ("{result=\"duplicate\"}", io.publishes_duplicate as f64),
        ],
    );
    metric(
        "sagamq_requests_rejected_total",
        "counter",
        "Requests the core refused (capacity, validation).",
        &[("", io.requests_rejected as f64)],
    );
    metric(
        "sagamq_callbacks_total",
        "counter",
        "Callback attempts by outcome.",
        &[
            ("{result=\"delivered\"}", io.callbacks_delivered as f64),
            ("{result=\"failed\"}", io.callbacks_failed as f64),
            ("{result=\"timed_out\"}", io.callbacks_timed_out as f64),
        ],
    );
    if let Some(cpu) = st.cpu {
        metric(
            "sagamq_process_cpu_seconds_total",
            "counter",
            "CPU time of the broker process (getrusage RUSAGE_SELF), by mode.",
            &[
                ("{mode=\"user\"}", cpu.user.as_secs_f64()),
                ("{mode=\"system\"}", cpu.system.as_secs_f64()),
            ],
        );
    }
    let per = |f: fn(&crate::broker::SubscriberStats) -> usize| -> Vec<(String, f64)> {
        b.subscribers
            .iter()
            .map(|(c, s)| (format!("{{client=\"{}\"}}", escape_label(c.as_str())), f(s) as f64))
            .collect()
    };
    for (name, help, samples) in [
        (
            "sagamq_subscriber_pending",
            "Messages queued for a subscriber.",
            per(|s| s.pending),
        ),
        (
            "sagamq_subscriber_in_flight",
            "Callbacks in flight to a subscriber.",
            per(|s| s.in_flight),
        ),
        (
            "sagamq_subscriber_dead_letters",
            "Dead letters of a subscriber.",
            per(|s| s.dead_letters),
        ),
    ] {
        let borrowed: Vec<(&str, f64)> = samples.iter().map(|(l, v)| (l.as_str(), *v)).collect();
        metric(name, "gauge", help, &borrowed);
    }
    out
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::SubscriberStats;

    /// A core that stopped draining its queue: a publish is answered 503 with
    /// Retry-After within the bounded wait, instead of holding its body.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_command_queue_answers_503_with_retry_after() {
        let (driver, _queue) = DriverHandle::stuck(1);
        let filler = driver.clone();
        // Takes the one place in the queue and never gets an answer.
        let _stuck = tokio::spawn(async move { filler.stats().await });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let app = router(
            driver,
            HttpConfig {
                auth: Auth::default(),
                body_len_max: BODY_LEN_MAX_DEFAULT,
                body_read_timeout: std::time::Duration::from_secs(5),
                allow: Allowlist::loopback(),
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stop_rx) = tokio::sync::oneshot::channel();
        let server = tokio::spawn(super::super::listener::serve(
            listener,
            app,
            Default::default(),
            stop_rx,
            std::time::Duration::from_secs(1),
        ));
        let c = super::super::client::BrokerClient::new(format!("http://{addr}"), None);
        let body = br#"{"GlobalID":"g","SubID":"1","SenderID":"s","CreateTime":0,"Topic":"t","Content":"x"}"#;
        let t0 = std::time::Instant::now();
        let http = super::super::callbacks::client_builder().build().unwrap();
        let resp = http
            .post(format!("http://{addr}/publish"))
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        let waited = t0.elapsed();
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
        let v: serde_json::Value = resp.json().await.unwrap();
        assert!(v["error"].as_str().unwrap().contains("overloaded"), "{v}");
        assert!(
            waited >= super::super::driver::COMMAND_QUEUE_WAIT_MAX && waited < std::time::Duration::from_secs(2),
            "answered after {waited:?}"
        );
        // Reads wait the same bounded time.
        let (status, _) = c.get_json("/stats").await.unwrap();
        assert_eq!(status, 503);
        let _ = stop.send(());
        server.await.unwrap();
    }

    #[test]
    fn metrics_text_has_help_type_and_escaped_labels() {
        let mut st = Stats::default();
        st.io.fsyncs = 3;
        st.broker.subscribers.insert(
            ClientId::lit("a\"b"),
            SubscriberStats {
                pending: 2,
                in_flight: 1,
                dead_letters: 0,
            },
        );
        let t = metrics_text(&st);
        assert!(t.contains("# TYPE sagamq_fsyncs_total counter\nsagamq_fsyncs_total 3\n"));
        assert!(t.contains("sagamq_subscriber_pending{client=\"a\\\"b\"} 2\n"));
    }

    #[test]
    fn publish_answer_is_the_json_clients_expect() {
        let r = published(7, true);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
        let body = r.into_body();
        let bytes = block_on(axum::body::to_bytes(body, 1024)).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v, json!({"ok": true, "MsgID": 7, "Duplicate": true}));
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn capacity_rejections_are_503_and_input_rejections_400() {
        assert_eq!(
            rejection_status(&BrokerError::TooManyUnsyncedPublishes),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(rejection_status(&BrokerError::AlreadyExpired), StatusCode::BAD_REQUEST);
        assert_eq!(rejection_status(&BrokerError::NotSubscribed), StatusCode::NOT_FOUND);
    }
}
