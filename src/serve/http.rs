//! The HTTP side (axum): routes, the API key check, request checks (body, JSON, prompt length,
//! queue), then either an SSE stream of the scheduler's events or one JSON response. Every error
//! leaves as OpenAI's error object, including the ones tower-http and axum produce themselves
//! (413, 408, 404, 405).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::api::{prepare, ApiError, Endpoint, ResponseMeta};
use super::metrics::Shared;
use super::scheduler::{Control, Event, Request as GenRequest};

/// Everything a handler needs.
pub struct App {
    pub shared: Arc<Shared>,
    pub scheduler: Mutex<Sender<Control>>,
    pub api_key: Option<String>,
    pub queue: usize,
    pub body_limit: usize,
    pub request_timeout: Duration,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_REQUEST);
        let mut r = (status, Json(self.body())).into_response();
        if self.status == 429 || self.status == 503 {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

pub fn router(app: Arc<App>) -> Router {
    use tower_http::limit::RequestBodyLimitLayer;
    use tower_http::timeout::{RequestBodyTimeoutLayer, TimeoutLayer};
    use tower_http::trace::TraceLayer;
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route_layer(middleware::from_fn_with_state(app.clone(), auth));
    Router::new()
        .merge(v1)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(app.body_limit))
        .layer(RequestBodyLimitLayer::new(app.body_limit))
        // a client that sends its body slowly cannot hold a connection for long
        .layer(RequestBodyTimeoutLayer::new(Duration::from_secs(30)))
        // the whole response of a non-streaming request (streams only need their headers in time)
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            app.request_timeout,
        ))
        .layer(middleware::from_fn(json_errors))
        .layer(middleware::from_fn_with_state(app.clone(), count))
        .layer(TraceLayer::new_for_http())
        .with_state(app)
}

/// Counts every response by path and status for `/metrics`.
async fn count(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let path = match req.uri().path() {
        p
        @ ("/v1/chat/completions" | "/v1/completions" | "/v1/models" | "/health" | "/metrics") => {
            p.to_string()
        }
        _ => "other".to_string(),
    };
    let r = next.run(req).await;
    app.shared.record_request(&path, r.status().as_u16());
    r
}

/// Errors made by layers and by axum itself (413, 408, 404, 405, 415) in OpenAI's format.
async fn json_errors(req: Request, next: Next) -> Response {
    let r = next.run(req).await;
    let status = r.status();
    let is_json = r
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !status.is_client_error() && !status.is_server_error() || is_json {
        return r;
    }
    let (kind, message) = match status {
        StatusCode::PAYLOAD_TOO_LARGE => (
            "invalid_request_error",
            "the request body is larger than the server's limit".to_string(),
        ),
        StatusCode::REQUEST_TIMEOUT => (
            "timeout_error",
            "the request took longer than the server's timeout".to_string(),
        ),
        StatusCode::NOT_FOUND => ("invalid_request_error", "no such endpoint".to_string()),
        StatusCode::METHOD_NOT_ALLOWED => (
            "invalid_request_error",
            "this method is not allowed on this endpoint".to_string(),
        ),
        s => (
            if s.is_client_error() {
                "invalid_request_error"
            } else {
                "server_error"
            },
            s.canonical_reason().unwrap_or("error").to_string(),
        ),
    };
    ApiError::with_status(status.as_u16(), kind, message).into_response()
}

/// `Authorization: Bearer KEY` on the `/v1` routes when the server has a key.
async fn auth(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if let Some(key) = &app.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            return ApiError::with_status(
                401,
                "invalid_request_error",
                "missing or incorrect API key (send Authorization: Bearer KEY)",
            )
            .code("invalid_api_key")
            .into_response();
        }
    }
    next.run(req).await
}

/// 200 when the model is loaded and the server takes requests; 503 while loading, after a
/// failed load, or while shutting down (a load balancer then sends traffic elsewhere).
async fn health(State(app): State<Arc<App>>) -> Response {
    let s = &app.shared;
    let (code, status, detail) = if s.shutting_down.load(Ordering::Relaxed) {
        (503, "shutting_down", None)
    } else if let Some(e) = s.load_error.get() {
        (503, "error", Some(e.clone()))
    } else if s.loaded.get().is_none() {
        (503, "loading", None)
    } else {
        (200, "ok", None)
    };
    let mut body = serde_json::json!({
        "status": status,
        "running": s.running.load(Ordering::Relaxed),
        "waiting": s.waiting.load(Ordering::Relaxed),
    });
    if let Some(l) = s.loaded.get() {
        body["slots"] = l.slots.into();
        body["model"] = l.model_name.clone().into();
        body["backend"] = l.backend.clone().into();
    }
    if let Some(d) = detail {
        body["error"] = d.into();
    }
    let code = StatusCode::from_u16(code).expect("valid status");
    (code, Json(body)).into_response()
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        app.shared.render(),
    )
        .into_response()
}

async fn models(State(app): State<Arc<App>>) -> Response {
    let data: Vec<serde_json::Value> = app
        .shared
        .loaded
        .get()
        .map(|l| {
            vec![serde_json::json!({
                "id": l.model_name,
                "object": "model",
                "created": 0,
                "owned_by": "bitnet-wgpu",
            })]
        })
        .unwrap_or_default();
    Json(serde_json::json!({"object": "list", "data": data})).into_response()
}

async fn chat(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    generate(app, Endpoint::Chat, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn completions(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    generate(app, Endpoint::Completion, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn response_id(endpoint: Endpoint) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let prefix = match endpoint {
        Endpoint::Chat => "chatcmpl",
        Endpoint::Completion => "cmpl",
    };
    format!("{prefix}-{:x}{n:06x}", now_s())
}

/// Checks and tokenizes a request, queues it, and answers with a stream or the whole text.
async fn generate(
    app: Arc<App>,
    endpoint: Endpoint,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let shared = &app.shared;
    if shared.shutting_down.load(Ordering::Relaxed) {
        return Err(ApiError::with_status(
            503,
            "server_error",
            "the server is shutting down",
        ));
    }
    let Some(loaded) = shared.loaded.get() else {
        let msg = match shared.load_error.get() {
            Some(e) => format!("the model failed to load: {e}"),
            None => "the model is still loading".to_string(),
        };
        return Err(ApiError::with_status(503, "server_error", msg));
    };
    let body = body.map_err(|e| {
        ApiError::with_status(e.status().as_u16(), "invalid_request_error", e.body_text())
    })?;
    // Off the async workers: tokenizing a long prompt takes milliseconds, and the chat template
    // renders in a child process (up to its deadline for a hostile one).
    let ctx = loaded.ctx;
    let shared_for_prepare = Arc::clone(shared);
    let (params, prompt) = tokio::task::spawn_blocking(move || {
        let loaded = shared_for_prepare.loaded.get().expect("checked above");
        prepare(endpoint, &body, &loaded.tokenizer, ctx)
    })
    .await
    .map_err(|e| {
        ApiError::with_status(
            500,
            "server_error",
            format!("preparing the request failed: {e}"),
        )
    })??;
    let queued = shared
        .queued
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |q| {
            (q < app.queue).then_some(q + 1)
        });
    if queued.is_err() {
        return Err(ApiError::with_status(
            429,
            "rate_limit_error",
            format!(
                "the queue is full ({} requests waiting for a slot); retry later",
                app.queue
            ),
        ));
    }
    let (tx, rx) = unbounded_channel();
    let meta = ResponseMeta {
        endpoint,
        id: response_id(endpoint),
        created: now_s(),
        model: loaded.model_name.clone(),
    };
    let stream = params.stream;
    let include_usage = params.include_usage;
    let sent = app
        .scheduler
        .lock()
        .expect("scheduler sender lock")
        .send(Control::Submit(GenRequest {
            prompt,
            params,
            events: tx,
        }));
    if sent.is_err() {
        shared.queued.fetch_sub(1, Ordering::Relaxed);
        return Err(ApiError::with_status(
            503,
            "server_error",
            "the scheduler has stopped",
        ));
    }
    if stream {
        Ok(sse(rx, meta, include_usage))
    } else {
        collect(rx, meta).await
    }
}

async fn collect(
    mut rx: UnboundedReceiver<Event>,
    meta: ResponseMeta,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    loop {
        match rx.recv().await {
            Some(Event::Text(t)) => text.push_str(&t),
            Some(Event::Done { finish, usage }) => {
                return Ok(Json(meta.full(&text, finish.as_str(), usage)).into_response())
            }
            Some(Event::Error(m)) => return Err(ApiError::with_status(500, "server_error", m)),
            None => {
                return Err(ApiError::with_status(
                    500,
                    "server_error",
                    "the scheduler stopped before the response was complete",
                ))
            }
        }
    }
}

struct StreamState {
    rx: UnboundedReceiver<Event>,
    meta: ResponseMeta,
    include_usage: bool,
    first: bool,
    pending: VecDeque<String>,
    done: bool,
}

/// SSE in OpenAI's chunk format: one chunk per generated token, a chunk with the finish reason,
/// the usage chunk when asked for, then `data: [DONE]`.
fn sse(rx: UnboundedReceiver<Event>, meta: ResponseMeta, include_usage: bool) -> Response {
    let state = StreamState {
        rx,
        meta,
        include_usage,
        first: true,
        pending: VecDeque::new(),
        done: false,
    };
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(d) = st.pending.pop_front() {
                return Some((Ok::<_, Infallible>(SseEvent::default().data(d)), st));
            }
            if st.done {
                return None;
            }
            let json = |v: serde_json::Value| v.to_string();
            match st.rx.recv().await {
                Some(Event::Text(t)) => {
                    let c = st.meta.chunk(Some(&t), st.first, None);
                    st.first = false;
                    st.pending.push_back(json(c));
                }
                Some(Event::Done { finish, usage }) => {
                    let c = st.meta.chunk(None, st.first, Some(finish.as_str()));
                    st.pending.push_back(json(c));
                    if st.include_usage {
                        st.pending.push_back(json(st.meta.usage_chunk(usage)));
                    }
                    st.pending.push_back("[DONE]".into());
                    st.done = true;
                }
                Some(Event::Error(m)) => {
                    let e = ApiError::with_status(500, "server_error", m);
                    st.pending.push_back(json(e.body()));
                    st.pending.push_back("[DONE]".into());
                    st.done = true;
                }
                None => {
                    let e = ApiError::with_status(
                        500,
                        "server_error",
                        "the scheduler stopped before the response was complete",
                    );
                    st.pending.push_back(json(e.body()));
                    st.pending.push_back("[DONE]".into());
                    st.done = true;
                }
            }
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}
