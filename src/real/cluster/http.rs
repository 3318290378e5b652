//! The cluster's HTTP API: the same public routes and JSON as a single
//! broker (`/publish`, `/subscribe`, `/unsubscribe`, `/ping`), plus the
//! internal routes instances forward to each other. The dead-letter routes
//! (`GET /dead-letters?client=ID`, `POST /dead-letters/redrive`) fan out to
//! every partition and merge (ordered by `(CreateTime, MsgID)`; counts summed).
//!
//! **Invariants:** any instance accepts any request. A publish goes to the
//! owner of its `GlobalID`'s partition (served here, or forwarded once to
//! the owner's `/internal/publish`); a subscribe or unsubscribe goes to
//! every partition and is answered OK only when every partition answered OK,
//! so once `/subscribe` is answered, a later publish in any partition is
//! entitled to it. Internal routes never forward again (no loops): an
//! instance that does not serve the partition answers 503. A partition with
//! no owner, or an owner that cannot be reached, is 503 with `Retry-After`.
//! Requests are validated (and the token checked) before they are forwarded.

use super::node::{Node, Route};
use super::partition::PartitionGone;
use crate::broker::{BrokerError, Reply};
use crate::cluster::PartitionId;
use crate::real::auth::{Auth, Scope};
use crate::real::callbacks::Allowlist;
use crate::real::driver::Request;
use crate::real::http::{ClientBody, UnsubscribeBody, error, ok, rejected};
use crate::types::{CONTENT_LEN_MAX, ClientId, Message, PublishRequest, SubscribeRequest};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

/// Forwarded requests wait at most this for the owner's answer.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct ClusterHttp {
    pub node: Arc<Node>,
    pub auth: Auth,
    pub allow: Allowlist,
    pub forward: reqwest::Client,
}

pub fn router(state: ClusterHttp, body_len_max: usize) -> Router {
    Router::new()
        .route("/ping", get(ping))
        .route("/cluster", get(cluster))
        .route("/stats", get(stats))
        .route("/publish", post(publish))
        .route("/subscribe", post(|s, h, b| fan_out(s, h, b, Kind::Subscribe)))
        .route("/unsubscribe", post(|s, h, b| fan_out(s, h, b, Kind::Unsubscribe)))
        .route("/dead-letters/redrive", post(|s, h, b| fan_out(s, h, b, Kind::Redrive)))
        .route("/dead-letters", get(dead_letters))
        .route("/internal/dead-letters", get(internal_dead_letters))
        .route("/internal/{kind}", post(internal))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route") })
        .layer(DefaultBodyLimit::max(body_len_max))
        .with_state(Arc::new(state))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Publish,
    Subscribe,
    Unsubscribe,
    Redrive,
}

impl Kind {
    fn path(self) -> &'static str {
        match self {
            Kind::Publish => "publish",
            Kind::Subscribe => "subscribe",
            Kind::Unsubscribe => "unsubscribe",
            Kind::Redrive => "redrive",
        }
    }
}

fn retry_later(msg: impl std::fmt::Display) -> Response {
    let mut r = error(StatusCode::SERVICE_UNAVAILABLE, msg);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

#[allow(clippy::result_large_err)] // the error is the response itself
fn scope_of(s: &ClusterHttp, headers: &HeaderMap) -> Result<Scope, Response> {
    if s.auth.is_open() {
        return Ok(Scope::everything("open"));
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    s.auth.scope_of(presented).cloned().ok_or_else(|| {
        let mut r = error(StatusCode::UNAUTHORIZED, "missing or wrong Authorization: Bearer token");
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        r
    })
}

/// Parses and checks a request body of `kind` (token scope included).
#[allow(clippy::result_large_err)] // the error is the response itself
fn parse(kind: Kind, scope: &Scope, body: &[u8]) -> Result<Request, Response> {
    let bad = |e: serde_json::Error| error(StatusCode::BAD_REQUEST, format!("invalid request: {e}"));
    let forbidden = |what: String| {
        error(
            StatusCode::FORBIDDEN,
            format!("the token {:?} may not {what}", scope.name),
        )
    };
    match kind {
        Kind::Publish => {
            if !scope.publish {
                return Err(forbidden("publish".into()));
            }
            let p: PublishRequest = serde_json::from_slice(body).map_err(bad)?;
            if p.content.len() > CONTENT_LEN_MAX {
                return Err(rejected(BrokerError::ContentTooLong { len: p.content.len() }));
            }
            Ok(Request::Publish(p))
        }
        Kind::Subscribe => {
            let sub: SubscribeRequest = serde_json::from_slice(body).map_err(bad)?;
            if !scope.subscribe.allows(&sub.client_id) {
                return Err(forbidden(format!("subscribe as ClientID {:?}", sub.client_id.as_str())));
            }
            Ok(Request::Subscribe(sub))
        }
        Kind::Unsubscribe => {
            let u: UnsubscribeBody = serde_json::from_slice(body).map_err(bad)?;
            if !scope.subscribe.allows(&u.client_id) {
                return Err(forbidden(format!("unsubscribe ClientID {:?}", u.client_id.as_str())));
            }
            Ok(Request::Unsubscribe {
                client: u.client_id,
                topic: u.topic,
            })
        }
        Kind::Redrive => {
            let c: ClientBody = serde_json::from_slice(body).map_err(bad)?;
            if !scope.dead_letters.allows(&c.client_id) {
                return Err(forbidden(format!(
                    "redrive the dead letters of ClientID {:?}",
                    c.client_id.as_str()
                )));
            }
            Ok(Request::Redrive { client: c.client_id })
        }
    }
}

fn answer(reply: Result<Reply, PartitionGone>, p: PartitionId) -> Response {
    match reply {
        Ok(Reply::Published { msg_id, duplicate }) => {
            let body = format!("{{\"Duplicate\":{duplicate},\"MsgID\":{},\"ok\":true}}", msg_id.0);
            (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
        Ok(Reply::Subscribed { expire_time }) => ok(json!({"ExpireTime": expire_time.as_nanos()})),
        Ok(Reply::Unsubscribed) => ok(json!({})),
        Ok(Reply::Redriven { count }) => ok(json!({"Redriven": count})),
        Ok(Reply::Rejected(e)) => rejected(e),
        Err(PartitionGone::Busy) => retry_later(format!("partition {p} is overloaded; retry later")),
        Err(PartitionGone::Stopped) => retry_later(format!(
            "partition {p} moved to another instance while the request was in flight; retry (a publish \
             that was stored is answered with its original MsgID)"
        )),
    }
}

/// Serves `request` for partition `p` here, or forwards it to the owner.
async fn one(
    s: &ClusterHttp,
    headers: &HeaderMap,
    p: PartitionId,
    kind: Kind,
    request: Request,
    body: &Bytes,
) -> Response {
    match s.node.route(p) {
        Route::Local(h) => answer(h.request(request).await, p),
        Route::Remote { owner, addr } => {
            let url = format!("{addr}/internal/{}?partition={}", kind.path(), p.0);
            let mut req = s
                .forward
                .post(&url)
                .header(header::CONTENT_TYPE, "application/json")
                .body(body.clone());
            if let Some(a) = headers.get(header::AUTHORIZATION) {
                req = req.header(header::AUTHORIZATION, a.clone());
            }
            match req.send().await {
                Ok(resp) => {
                    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
                    let retry = resp.headers().get(header::RETRY_AFTER).cloned();
                    let bytes = resp.bytes().await.unwrap_or_default();
                    let mut r = (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response();
                    if let Some(v) = retry {
                        r.headers_mut().insert(header::RETRY_AFTER, v);
                    }
                    r
                }
                Err(e) => retry_later(format!(
                    "partition {p}: its owner {owner} could not be reached ({e}); it is taken over within the lease \
                     timeout, retry"
                )),
            }
        }
        Route::NoOwner => retry_later(format!("partition {p} has no owner right now; retry")),
    }
}

async fn publish(State(s): State<Arc<ClusterHttp>>, headers: HeaderMap, body: Bytes) -> Response {
    let scope = match scope_of(&s, &headers) {
        Ok(sc) => sc,
        Err(r) => return r,
    };
    let request = match parse(Kind::Publish, &scope, &body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let Request::Publish(p) = &request else {
        unreachable!("parsed as a publish")
    };
    let part = s.node.config.partitions.of(&p.global_id);
    one(&s, &headers, part, Kind::Publish, request, &body).await
}

/// A subscribe or unsubscribe: every partition, in parallel; OK only if all are.
async fn fan_out(State(s): State<Arc<ClusterHttp>>, headers: HeaderMap, body: Bytes, kind: Kind) -> Response {
    let scope = match scope_of(&s, &headers) {
        Ok(sc) => sc,
        Err(r) => return r,
    };
    let request = match parse(kind, &scope, &body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    if let Request::Subscribe(sub) = &request {
        let checked = match s.allow.check_url(&sub.notify_url) {
            Ok(url) => s.allow.resolve(&url).await.map(|_| ()),
            Err(e) => Err(e),
        };
        if let Err(e) = checked {
            return error(StatusCode::BAD_REQUEST, e);
        }
    }
    let mut set = tokio::task::JoinSet::new();
    for p in s.node.config.partitions.all() {
        let (s, headers, request, body) = (s.clone(), headers.clone(), request.clone(), body.clone());
        set.spawn(async move { (p, one(&s, &headers, p, kind, request, &body).await) });
    }
    let mut answers = Vec::new();
    while let Some(r) = set.join_next().await {
        match r {
            Ok(a) => answers.push(a),
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("fan-out task: {e}")),
        }
    }
    answers.sort_by_key(|(p, _)| *p);
    // The first refusal, if any (every partition is idempotent: a retry is safe).
    if let Some(i) = answers.iter().position(|(_, r)| !r.status().is_success()) {
        return answers.swap_remove(i).1;
    }
    if kind == Kind::Redrive {
        // Each partition redrove its own dead letters: the total.
        let mut total = 0u64;
        for (p, r) in answers {
            let bytes = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap_or_default();
            let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
            match v["Redriven"].as_u64() {
                Some(n) => total += n,
                None => return error(StatusCode::BAD_GATEWAY, format!("partition {p}: unexpected answer")),
            }
        }
        return ok(json!({"Redriven": total}));
    }
    answers
        .into_iter()
        .next()
        .map(|(_, r)| r)
        .unwrap_or_else(|| error(StatusCode::INTERNAL_SERVER_ERROR, "no partitions"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientQuery {
    client: ClientId,
    partition: Option<u32>,
}

/// Every partition's dead letters of a client, in `(CreateTime, MsgID)` order.
async fn dead_letters(
    State(s): State<Arc<ClusterHttp>>,
    headers: HeaderMap,
    q: Result<Query<ClientQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = q else {
        return error(StatusCode::BAD_REQUEST, "expected ?client=ID");
    };
    let scope = match scope_of(&s, &headers) {
        Ok(sc) => sc,
        Err(r) => return r,
    };
    if !scope.dead_letters.allows(&q.client) {
        return error(
            StatusCode::FORBIDDEN,
            format!(
                "the token {:?} may not read the dead letters of ClientID {:?}",
                scope.name,
                q.client.as_str()
            ),
        );
    }
    let mut set = tokio::task::JoinSet::new();
    for p in s.node.config.partitions.all() {
        let (s, headers, client) = (s.clone(), headers.clone(), q.client.clone());
        set.spawn(async move { (p, partition_dead_letters(&s, &headers, p, client).await) });
    }
    let mut all: Vec<Message> = Vec::new();
    while let Some(r) = set.join_next().await {
        match r {
            Ok((_, Ok(list))) => all.extend(list),
            Ok((_, Err(resp))) => return resp,
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("fan-out task: {e}")),
        }
    }
    all.sort_by_key(|m| (m.create_time, m.msg_id));
    ok(json!({"ClientID": q.client, "Count": all.len(), "Messages": all}))
}

async fn partition_dead_letters(
    s: &ClusterHttp,
    headers: &HeaderMap,
    p: PartitionId,
    client: ClientId,
) -> Result<Vec<Message>, Response> {
    match s.node.route(p) {
        Route::Local(h) => h.dead_letters(client).await.map_err(|e| answer(Err(e), p)),
        Route::Remote { owner, addr } => {
            let unreachable = |e: String| retry_later(format!("partition {p}: its owner {owner}: {e}; retry"));
            let mut url = reqwest::Url::parse(&format!("{addr}/internal/dead-letters"))
                .map_err(|e| unreachable(format!("bad address {addr:?}: {e}")))?;
            url.query_pairs_mut()
                .append_pair("client", client.as_str())
                .append_pair("partition", &p.0.to_string());
            let mut req = s.forward.get(url);
            if let Some(a) = headers.get(header::AUTHORIZATION) {
                req = req.header(header::AUTHORIZATION, a.clone());
            }
            let resp = req.send().await.map_err(|e| unreachable(e.to_string()))?;
            if !resp.status().is_success() {
                return Err(unreachable(format!("answered {}", resp.status())));
            }
            let v: serde_json::Value = resp.json().await.map_err(|e| unreachable(e.to_string()))?;
            serde_json::from_value(v["Messages"].clone()).map_err(|e| unreachable(e.to_string()))
        }
        Route::NoOwner => Err(retry_later(format!("partition {p} has no owner right now; retry"))),
    }
}

/// One partition's dead letters, for another instance (never forwarded).
async fn internal_dead_letters(
    State(s): State<Arc<ClusterHttp>>,
    headers: HeaderMap,
    q: Result<Query<ClientQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(ClientQuery {
        client,
        partition: Some(p),
    })) = q
    else {
        return error(StatusCode::BAD_REQUEST, "expected ?client=ID&partition=N");
    };
    let scope = match scope_of(&s, &headers) {
        Ok(sc) => sc,
        Err(r) => return r,
    };
    if !scope.dead_letters.allows(&client) {
        return error(StatusCode::FORBIDDEN, "this token may not read these dead letters");
    }
    match s.node.local_handle(PartitionId(p)) {
        Some(h) => match h.dead_letters(client.clone()).await {
            Ok(list) => ok(json!({"ClientID": client, "Count": list.len(), "Messages": list})),
            Err(e) => answer(Err(e), PartitionId(p)),
        },
        None => retry_later(format!(
            "instance {} does not serve partition {p}; retry",
            s.node.config.me
        )),
    }
}

#[derive(Deserialize)]
struct PartitionQuery {
    partition: u32,
}

/// A request another instance forwarded: served here or refused, never forwarded again.
async fn internal(
    State(s): State<Arc<ClusterHttp>>,
    Path(kind): Path<String>,
    q: Result<Query<PartitionQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let kind = match kind.as_str() {
        "publish" => Kind::Publish,
        "subscribe" => Kind::Subscribe,
        "unsubscribe" => Kind::Unsubscribe,
        "redrive" => Kind::Redrive,
        _ => return error(StatusCode::NOT_FOUND, "no such internal route"),
    };
    let Ok(Query(q)) = q else {
        return error(StatusCode::BAD_REQUEST, "expected ?partition=N");
    };
    let p = PartitionId(q.partition);
    if p.0 >= s.node.config.partitions.count() {
        return error(StatusCode::BAD_REQUEST, format!("no partition {}", p.0));
    }
    let scope = match scope_of(&s, &headers) {
        Ok(sc) => sc,
        Err(r) => return r,
    };
    let request = match parse(kind, &scope, &body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    if let Request::Publish(pb) = &request
        && s.node.config.partitions.of(&pb.global_id) != p
    {
        return error(StatusCode::BAD_REQUEST, format!("GlobalID is not in partition {}", p.0));
    }
    match s.node.local_handle(p) {
        Some(h) => answer(h.request(request).await, p),
        None => retry_later(format!(
            "instance {} does not serve partition {p} (any more); retry",
            s.node.config.me
        )),
    }
}

async fn ping(State(s): State<Arc<ClusterHttp>>) -> Response {
    ok(json!({"Instance": s.node.config.me.0}))
}

/// Who owns what, as this instance last saw it.
async fn cluster(State(s): State<Arc<ClusterHttp>>) -> Response {
    let routes: Vec<serde_json::Value> = s
        .node
        .routes()
        .into_iter()
        .map(|(p, r)| match r {
            Some((owner, addr)) => json!({"Partition": p.0, "Owner": owner.0, "Addr": addr}),
            None => json!({"Partition": p.0, "Owner": null, "Addr": null}),
        })
        .collect();
    ok(json!({
        "Instance": s.node.config.me.0,
        "Partitions": s.node.config.partitions.count(),
        "Served": s.node.served().iter().map(|p| p.0).collect::<Vec<_>>(),
        "Routes": routes,
    }))
}

/// The partitions served here and their cores' numbers.
async fn stats(State(s): State<Arc<ClusterHttp>>) -> Response {
    let mut parts = Vec::new();
    for p in s.node.served() {
        if let Some(h) = s.node.local_handle(p)
            && let Ok(st) = h.stats().await
        {
            parts.push(json!({
                "Partition": p.0,
                "Epoch": h.epoch,
                "MessagesLive": st.messages_live,
                "Subscriptions": st.subscriptions,
                "LogRecords": st.log_records,
                "Pending": st.subscribers.values().map(|v| v.pending + v.in_flight).sum::<usize>(),
                "DeadLetters": st.subscribers.values().map(|v| v.dead_letters).sum::<usize>(),
            }));
        }
    }
    ok(json!({"Instance": s.node.config.me.0, "Partitions": parts}))
}
