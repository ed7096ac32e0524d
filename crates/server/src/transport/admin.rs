//! The management API, on its own listener (loopback by default): the KServe v2 repository extension as Triton
//! exposes it (`POST /v2/repository/index`, `.../models/{m}/load`, `.../unload`), version labels for TF Serving's
//! `/labels/{l}` routes, and the state of canary rollouts.
//!
//! When a token is configured every call needs `Authorization: Bearer <token>`; the server refuses to start with
//! this API on a non-loopback address without one. Tokens are compared as sha256 digests, in constant time.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde_json::json;

use crate::core::infer::Infer;
use crate::core::reload::{ManageError, Manager};
use crate::core::repository::{validate_name, VersionState};

/// What the management handlers share.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// Loads and unloads.
    pub manager: Arc<Manager>,
    /// The model table (labels, rollouts).
    pub infer: Infer,
    /// The sha256 of the token calls must carry, when one is set.
    pub token_sha256: Option<[u8; 32]>,
    /// The inference ports' tokens: those with the `admin` scope are accepted here too.
    pub auth: Option<Arc<crate::transport::auth::Auth>>,
}

/// The management router.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/v2/repository/index", post(index))
        .route("/v2/repository/models/{model}/load", post(load))
        .route("/v2/repository/models/{model}/unload", post(unload))
        .route("/v2/repository/models/{model}/labels", get(labels))
        .route(
            "/v2/repository/models/{model}/labels/{label}",
            put(set_label).delete(delete_label),
        )
        .route("/v2/repository/models/{model}/rollout", get(rollout))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(axum::extract::DefaultBodyLimit::max(1 << 20))
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .with_state(state)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

async fn authorize(
    State(state): State<AdminState>,
    request: axum::extract::Request,
    next: Next,
) -> Response {
    let scoped = state
        .auth
        .as_ref()
        .filter(|a| a.has_scope(crate::transport::auth::Scope::Admin));
    if state.token_sha256.is_none() && scoped.is_none() {
        return next.run(request).await;
    }
    let header_value = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let given = crate::transport::auth::bearer(header_value);
    let admin_token = |token: &str| {
        state.token_sha256.as_ref().is_some_and(|expected| {
            crate::transport::auth::digests_equal(
                &crate::transport::auth::token_digest(token.trim()),
                expected,
            )
        })
    };
    let scoped_ok = || {
        scoped.is_some_and(|a| {
            a.check(
                header_value,
                crate::transport::auth::Endpoint::Scoped(crate::transport::auth::Scope::Admin),
            )
            .is_ok()
        })
    };
    match given {
        Some(token) if admin_token(token) || scoped_ok() => next.run(request).await,
        Some(_) => error(StatusCode::FORBIDDEN, "the admin token is not valid"),
        None => {
            let mut r = error(
                StatusCode::UNAUTHORIZED,
                "the management API needs an admin token (Authorization: Bearer <token>)",
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                "Bearer".parse().expect("static header"),
            );
            r
        }
    }
}

fn manage_error(e: ManageError) -> Response {
    match e {
        ManageError::NotFound(m) | ManageError::Refused(m) => error(StatusCode::BAD_REQUEST, m),
    }
}

/// `POST /v2/repository/index` with an optional `{"ready": true}`.
async fn index(State(state): State<AdminState>, body: Bytes) -> Response {
    let ready = if body.iter().all(u8::is_ascii_whitespace) {
        false
    } else {
        match serde_json::from_slice::<serde_json::Value>(&body) {
            Ok(v) => v
                .get("ready")
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(false),
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("malformed index request: {e}"),
                )
            }
        }
    };
    match state.manager.index(ready).await {
        Ok(rows) => Json(rows).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// `POST /v2/repository/models/{m}/load` (explicit mode).
async fn load(State(state): State<AdminState>, Path(model): Path<String>) -> Response {
    if let Err(e) = validate_name(&model) {
        return error(StatusCode::BAD_REQUEST, e);
    }
    match state.manager.load(&model).await {
        Ok(()) => (StatusCode::OK, Json(json!({}))).into_response(),
        Err(e) => manage_error(e),
    }
}

/// `POST /v2/repository/models/{m}/unload` (explicit mode).
async fn unload(State(state): State<AdminState>, Path(model): Path<String>) -> Response {
    if let Err(e) = validate_name(&model) {
        return error(StatusCode::BAD_REQUEST, e);
    }
    match state.manager.unload(&model).await {
        Ok(()) => (StatusCode::OK, Json(json!({}))).into_response(),
        Err(e) => manage_error(e),
    }
}

/// `GET /v2/repository/models/{m}/labels`: every label and its version.
async fn labels(State(state): State<AdminState>, Path(model): Path<String>) -> Response {
    match state.infer.store.with_model(&model, |r| r.labels()) {
        Some(labels) => Json(json!({ "name": model, "labels": labels })).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("model `{model}` not found")),
    }
}

/// `PUT /v2/repository/models/{m}/labels/{l}` with `{"version": N}`: points a label at a READY version (as TF
/// Serving requires by default). Labels set here live in this process and take precedence over `config.toml`'s.
async fn set_label(
    State(state): State<AdminState>,
    Path((model, label)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    if let Err(e) = validate_name(&label) {
        return error(StatusCode::BAD_REQUEST, e.replace("model name", "label"));
    }
    let version = match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(v) => match v.get("version").and_then(serde_json::Value::as_u64) {
            Some(n) if n > 0 => n,
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "expected {\"version\": N} with N a positive integer",
                )
            }
        },
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("malformed label request: {e}"),
            )
        }
    };
    let result = state.infer.store.update(&model, |r| {
        let ready = r
            .versions
            .get(&version)
            .is_some_and(|s| s.state == VersionState::Ready);
        if !ready {
            return Err(format!(
                "version {version} of model `{model}` is not ready; labels point at ready versions"
            ));
        }
        r.api_labels.insert(label.clone(), version);
        Ok(())
    });
    match result {
        None => error(StatusCode::NOT_FOUND, format!("model `{model}` not found")),
        Some(Err(e)) => error(StatusCode::BAD_REQUEST, e),
        Some(Ok(())) => {
            tracing::info!(model = %model, label = %label, version, "version label set");
            Json(json!({ "name": model, "label": label, "version": version })).into_response()
        }
    }
}

/// `DELETE /v2/repository/models/{m}/labels/{l}`: removes a label set through this API.
async fn delete_label(
    State(state): State<AdminState>,
    Path((model, label)): Path<(String, String)>,
) -> Response {
    match state
        .infer
        .store
        .update(&model, |r| r.api_labels.remove(&label))
    {
        None => error(StatusCode::NOT_FOUND, format!("model `{model}` not found")),
        Some(None) => error(
            StatusCode::NOT_FOUND,
            format!("model `{model}` has no label `{label}` set through this API"),
        ),
        Some(Some(_)) => StatusCode::NO_CONTENT.into_response(),
    }
}

/// `GET /v2/repository/models/{m}/rollout`: the plan this replica applies, its current step and weight.
async fn rollout(State(state): State<AdminState>, Path(model): Path<String>) -> Response {
    match state.infer.store.with_model(&model, |r| r.rollout.clone()) {
        None => error(StatusCode::NOT_FOUND, format!("model `{model}` not found")),
        Some(None) => error(
            StatusCode::NOT_FOUND,
            format!("model `{model}` has no rollout"),
        ),
        Some(Some(live)) => Json(json!({
            "plan": live.plan(),
            "step": live.step(),
            "weight": live.weight(),
        }))
        .into_response(),
    }
}
