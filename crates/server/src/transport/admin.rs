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
use crate::core::reload::{IndexEntry, ManageError, Manager};
use crate::core::repository::{validate_name, VersionState};
use crate::error::{ErrorKind, InferError};

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

/// The management router. Every error it answers is an [`InferError`] through the one table in
/// [`crate::error`]: the statuses are Triton's (400 for a load or unload the server refuses or that fails, 404 for an
/// unknown model or label), the bodies `{"error": "..."}` as on the inference ports.
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
        .fallback(crate::transport::http::not_found)
        .method_not_allowed_fallback(crate::transport::http::method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(1 << 20))
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .with_state(state)
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
        Some(_) => InferError::new(ErrorKind::PermissionDenied, "the admin token is not valid")
            .into_response(),
        // The table adds `WWW-Authenticate: Bearer`.
        None => InferError::new(
            ErrorKind::Unauthenticated,
            "the management API needs an admin token (Authorization: Bearer <token>)",
        )
        .into_response(),
    }
}

/// Triton answers 400 for every load or unload it does not do: an unknown model, a mode that forbids it, a model
/// that fails to load.
fn manage_error(e: ManageError) -> InferError {
    match e {
        ManageError::NotFound(m) | ManageError::Refused(m) => InferError::invalid(m),
    }
}

/// A model name from the path, checked as the repository checks it: 400 when it could not name a model.
fn model_name(model: &str) -> Result<(), InferError> {
    Ok(validate_name(model)?)
}

fn model_not_found(model: &str) -> InferError {
    InferError::not_found(format!("model `{model}` not found"))
}

/// `POST /v2/repository/index` with an optional `{"ready": true}`.
async fn index(
    State(state): State<AdminState>,
    body: Bytes,
) -> Result<Json<Vec<IndexEntry>>, InferError> {
    let ready = if body.iter().all(u8::is_ascii_whitespace) {
        false
    } else {
        serde_json::from_slice::<serde_json::Value>(&body)
            .map_err(|e| InferError::invalid(format!("malformed index request: {e}")))?
            .get("ready")
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false)
    };
    let rows = state
        .manager
        .index(ready)
        .await
        .map_err(|e| InferError::new(ErrorKind::Internal, e.to_string()))?;
    Ok(Json(rows))
}

/// `POST /v2/repository/models/{m}/load` (explicit mode).
async fn load(
    State(state): State<AdminState>,
    Path(model): Path<String>,
) -> Result<Json<serde_json::Value>, InferError> {
    model_name(&model)?;
    state.manager.load(&model).await.map_err(manage_error)?;
    Ok(Json(json!({})))
}

/// `POST /v2/repository/models/{m}/unload` (explicit mode).
async fn unload(
    State(state): State<AdminState>,
    Path(model): Path<String>,
) -> Result<Json<serde_json::Value>, InferError> {
    model_name(&model)?;
    state.manager.unload(&model).await.map_err(manage_error)?;
    Ok(Json(json!({})))
}

/// `GET /v2/repository/models/{m}/labels`: every label and its version.
async fn labels(
    State(state): State<AdminState>,
    Path(model): Path<String>,
) -> Result<Json<serde_json::Value>, InferError> {
    let labels = state
        .infer
        .store
        .with_model(&model, |r| r.labels())
        .ok_or_else(|| model_not_found(&model))?;
    Ok(Json(json!({ "name": model, "labels": labels })))
}

/// `PUT /v2/repository/models/{m}/labels/{l}` with `{"version": N}`: points a label at a READY version (as TF
/// Serving requires by default). Labels set here live in this process and take precedence over `config.toml`'s.
async fn set_label(
    State(state): State<AdminState>,
    Path((model, label)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, InferError> {
    validate_name(&label)
        .map_err(|e| InferError::invalid(e.to_string().replace("model name", "label")))?;
    let version = serde_json::from_slice::<serde_json::Value>(&body)
        .map_err(|e| InferError::invalid(format!("malformed label request: {e}")))?
        .get("version")
        .and_then(serde_json::Value::as_u64)
        .filter(|n| *n > 0)
        .ok_or_else(|| {
            InferError::invalid("expected {\"version\": N} with N a positive integer")
        })?;
    state
        .infer
        .store
        .update(&model, |r| {
            let ready = r
                .versions
                .get(&version)
                .is_some_and(|s| s.state == VersionState::Ready);
            if !ready {
                return Err(InferError::invalid(format!(
                    "version {version} of model `{model}` is not ready; labels point at ready versions"
                )));
            }
            r.api_labels.insert(label.clone(), version);
            Ok(())
        })
        .ok_or_else(|| model_not_found(&model))??;
    tracing::info!(model = %model, label = %label, version, "version label set");
    Ok(Json(
        json!({ "name": model, "label": label, "version": version }),
    ))
}

/// `DELETE /v2/repository/models/{m}/labels/{l}`: removes a label set through this API.
async fn delete_label(
    State(state): State<AdminState>,
    Path((model, label)): Path<(String, String)>,
) -> Result<StatusCode, InferError> {
    state
        .infer
        .store
        .update(&model, |r| r.api_labels.remove(&label))
        .ok_or_else(|| model_not_found(&model))?
        .ok_or_else(|| {
            InferError::not_found(format!(
                "model `{model}` has no label `{label}` set through this API"
            ))
        })?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v2/repository/models/{m}/rollout`: the plan this replica applies, its current step and weight.
async fn rollout(
    State(state): State<AdminState>,
    Path(model): Path<String>,
) -> Result<Json<serde_json::Value>, InferError> {
    let live = state
        .infer
        .store
        .with_model(&model, |r| r.rollout.clone())
        .ok_or_else(|| model_not_found(&model))?
        .ok_or_else(|| InferError::not_found(format!("model `{model}` has no rollout")))?;
    Ok(Json(json!({
        "plan": live.plan(),
        "step": live.step(),
        "weight": live.weight(),
    })))
}
