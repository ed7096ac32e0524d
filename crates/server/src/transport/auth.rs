//! Bearer tokens with scopes on the inference ports (REST and gRPC), and a per-token rate limit.
//!
//! Scopes: `infer` (inference calls), `read` (metadata, status, model readiness, drift, `/metrics` unless left
//! open), `admin` (the management API). Health endpoints (and `/metrics`, by default) stay open so probes and
//! scrapers work without a token; `--auth-open` says which. Tokens are kept only as sha256 digests and every
//! presented token is compared with every stored digest without an early exit. With no token configured, nothing
//! is checked (as before).

use parking_lot::Mutex;
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Instant;

use serde::Deserialize;

use crate::error::{ErrorKind, InferError};

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// Inference.
    Infer,
    /// Metadata and status.
    Read,
    /// The management API.
    Admin,
}

impl Scope {
    /// Parses `infer`, `read` or `admin`.
    pub fn parse(text: &str) -> Result<Scope, TokenError> {
        match text.trim() {
            "infer" => Ok(Scope::Infer),
            "read" => Ok(Scope::Read),
            "admin" => Ok(Scope::Admin),
            other => Err(TokenError::UnknownScope(other.to_string())),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Scope::Infer => "infer",
            Scope::Read => "read",
            Scope::Admin => "admin",
        }
    }
}

/// What kind of endpoint a call is, for deciding what it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// Liveness and readiness.
    Health,
    /// `/metrics`.
    Metrics,
    /// Needs this scope.
    Scoped(Scope),
}

/// One configured token.
#[derive(Clone, PartialEq)]
pub struct TokenSpec {
    /// A name for logs (never the token).
    pub name: String,
    /// The sha256 of the token.
    pub sha256: [u8; 32],
    /// What it may do.
    pub scopes: BTreeSet<Scope>,
    /// Requests per second it may make (a token bucket with a burst of one second's worth); `None`: unlimited.
    pub rate_limit: Option<f64>,
}

impl std::fmt::Debug for TokenSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSpec")
            .field("name", &self.name)
            .field("scopes", &self.scopes)
            .field("rate_limit", &self.rate_limit)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    #[serde(default)]
    token: Vec<RawToken>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    name: String,
    /// The token itself (hashed at load), or
    token: Option<String>,
    /// its sha256 in hex, so the file need not hold the secret.
    sha256: Option<String>,
    scopes: Vec<String>,
    rate_limit: Option<f64>,
}

fn parse_hex32(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in text.as_bytes().chunks(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(chunk).ok()?, 16).ok()?;
    }
    Some(out)
}

/// Why tokens given to `ferry serve` (`--tokens-file`, `--tokens`) cannot be used; the messages are the ones the CLI
/// prints after the flag's name.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// A scope other than `infer`, `read` or `admin`.
    #[error("unknown scope `{0}` (expected infer, read or admin)")]
    UnknownScope(String),
    /// A token with no scope.
    #[error("a token needs at least one scope")]
    NoScope,
    /// A rate limit that is not a positive number.
    #[error("rate_limit must be a positive number of requests per second")]
    BadRateLimit,
    /// An environment entry not of the form `name:scope+scope:secret`.
    #[error("a token is `name:scope+scope:secret`")]
    Malformed,
    /// An environment entry whose secret is empty.
    #[error("token `{0}` has an empty secret")]
    EmptySecret(String),
    /// A file entry with a `sha256` that is not 64 hex digits.
    #[error("sha256 must be 64 hex digits")]
    BadSha256,
    /// A file entry with both or neither of `token` and `sha256`.
    #[error("give exactly one of `token` or `sha256`")]
    SecretOrSha256,
    /// The tokens file cannot be read.
    #[error("{0}")]
    Read(std::io::Error),
    /// The tokens file is not valid TOML for a tokens file.
    #[error("{0}")]
    Syntax(String),
    /// An error about one named token.
    #[error("token `{name}`: {error}")]
    InToken {
        /// The token's name.
        name: String,
        /// What is wrong with it.
        error: Box<TokenError>,
    },
    /// An error in a tokens file.
    #[error("{}: {error}", path.display())]
    InFile {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong in it.
        error: Box<TokenError>,
    },
}

impl TokenError {
    fn in_token(self, name: &str) -> TokenError {
        TokenError::InToken {
            name: name.to_string(),
            error: Box::new(self),
        }
    }
}

/// Reads a tokens file:
///
/// ```toml
/// [[token]]
/// name = "frontend"
/// sha256 = "9f86d08..."        # or token = "the secret"
/// scopes = ["infer", "read"]
/// rate_limit = 200             # requests per second, optional
/// ```
pub fn read_tokens_file(path: &Path) -> Result<Vec<TokenSpec>, TokenError> {
    let in_file = |error: TokenError| TokenError::InFile {
        path: path.to_path_buf(),
        error: Box::new(error),
    };
    let text = std::fs::read_to_string(path).map_err(|e| in_file(TokenError::Read(e)))?;
    let file: TokensFile =
        toml::from_str(&text).map_err(|e| in_file(TokenError::Syntax(e.message().to_string())))?;
    file.token
        .into_iter()
        .map(|t| {
            let sha256 = match (&t.token, &t.sha256) {
                (Some(secret), None) if !secret.trim().is_empty() => {
                    Ok(token_digest(secret.trim()))
                }
                (None, Some(hex)) => parse_hex32(hex).ok_or(TokenError::BadSha256),
                _ => Err(TokenError::SecretOrSha256),
            };
            sha256
                .and_then(|sha256| spec(t.name.clone(), sha256, &t.scopes, t.rate_limit))
                .map_err(|e| in_file(e.in_token(&t.name)))
        })
        .collect()
}

/// Parses tokens from the environment form `name:scope+scope:secret`, comma-separated.
pub fn parse_tokens_env(text: &str) -> Result<Vec<TokenSpec>, TokenError> {
    text.split(',')
        .filter(|t| !t.trim().is_empty())
        .map(|item| {
            let mut parts = item.trim().splitn(3, ':');
            let (Some(name), Some(scopes), Some(secret)) =
                (parts.next(), parts.next(), parts.next())
            else {
                return Err(TokenError::Malformed);
            };
            let secret = secret.trim();
            if secret.is_empty() {
                return Err(TokenError::EmptySecret(name.to_string()));
            }
            let scopes: Vec<String> = scopes.split('+').map(str::to_string).collect();
            spec(name.to_string(), token_digest(secret), &scopes, None)
                .map_err(|e| e.in_token(name))
        })
        .collect()
}

fn spec(
    name: String,
    sha256: [u8; 32],
    scopes: &[String],
    rate_limit: Option<f64>,
) -> Result<TokenSpec, TokenError> {
    let scopes = scopes
        .iter()
        .map(|s| Scope::parse(s))
        .collect::<Result<BTreeSet<_>, _>>()?;
    if scopes.is_empty() {
        return Err(TokenError::NoScope);
    }
    if let Some(r) = rate_limit {
        if !(r.is_finite() && r > 0.0) {
            return Err(TokenError::BadRateLimit);
        }
    }
    Ok(TokenSpec {
        name,
        sha256,
        scopes,
        rate_limit,
    })
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

#[derive(Debug)]
struct Token {
    spec: TokenSpec,
    bucket: Option<Mutex<Bucket>>,
}

/// The token table of a server.
#[derive(Debug)]
pub struct Auth {
    tokens: Vec<Token>,
    open_health: bool,
    open_metrics: bool,
}

impl Auth {
    /// A table of `tokens`; `open_health` and `open_metrics` leave those endpoints open. `None` when there are no
    /// tokens (nothing is checked then).
    pub fn new(tokens: Vec<TokenSpec>, open_health: bool, open_metrics: bool) -> Option<Auth> {
        if tokens.is_empty() {
            return None;
        }
        Some(Auth {
            tokens: tokens
                .into_iter()
                .map(|spec| Token {
                    bucket: spec.rate_limit.map(|r| {
                        Mutex::new(Bucket {
                            tokens: r.max(1.0),
                            at: Instant::now(),
                        })
                    }),
                    spec,
                })
                .collect(),
            open_health,
            open_metrics,
        })
    }

    /// Whether a token with this scope exists (the management API accepts them).
    pub fn has_scope(&self, scope: Scope) -> bool {
        self.tokens.iter().any(|t| t.spec.scopes.contains(&scope))
    }

    /// Decides a call: `authorization` is the header's value (`Bearer <token>`).
    pub fn check(&self, authorization: Option<&str>, endpoint: Endpoint) -> Result<(), InferError> {
        let scope = match endpoint {
            Endpoint::Health if self.open_health => return Ok(()),
            Endpoint::Metrics if self.open_metrics => return Ok(()),
            Endpoint::Health | Endpoint::Metrics => Scope::Read,
            Endpoint::Scoped(s) => s,
        };
        let Some(given) = bearer(authorization) else {
            return Err(InferError::new(
                ErrorKind::Unauthenticated,
                "this call needs a token: send `Authorization: Bearer <token>`",
            ));
        };
        let digest = token_digest(given);
        // Compare with every token, without stopping at a match.
        let mut found = None;
        for (i, t) in self.tokens.iter().enumerate() {
            if digests_equal(&digest, &t.spec.sha256) && found.is_none() {
                found = Some(i);
            }
        }
        let Some(token) = found.map(|i| &self.tokens[i]) else {
            return Err(InferError::new(
                ErrorKind::Unauthenticated,
                "the token is not valid",
            ));
        };
        if !token.spec.scopes.contains(&scope) {
            return Err(InferError::new(
                ErrorKind::PermissionDenied,
                format!(
                    "token `{}` lacks the `{}` scope this call needs",
                    token.spec.name,
                    scope.name()
                ),
            ));
        }
        if let (Some(bucket), Some(rate)) = (&token.bucket, token.spec.rate_limit) {
            let mut b = bucket.lock();
            let now = Instant::now();
            let burst = rate.max(1.0);
            b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(burst);
            b.at = now;
            if b.tokens < 1.0 {
                return Err(InferError::new(
                    ErrorKind::Overloaded,
                    format!(
                        "token `{}` is over its rate limit of {rate} requests per second",
                        token.spec.name
                    ),
                ));
            }
            b.tokens -= 1.0;
        }
        Ok(())
    }
}

/// The token of an `Authorization: Bearer <token>` header value (the scheme in any case), trimmed.
pub fn bearer(authorization: Option<&str>) -> Option<&str> {
    let value = authorization?.trim_start();
    let (scheme, token) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    Some(token.trim()).filter(|t| !t.is_empty())
}

/// What a REST call is.
pub fn rest_endpoint(method: &axum::http::Method, path: &str) -> Endpoint {
    if path.starts_with("/v2/health/") {
        return Endpoint::Health;
    }
    if path == "/metrics" {
        return Endpoint::Metrics;
    }
    if method == axum::http::Method::POST {
        return Endpoint::Scoped(Scope::Infer);
    }
    Endpoint::Scoped(Scope::Read)
}

/// What a gRPC call is, by its path (`/package.Service/Method`).
pub fn grpc_endpoint(path: &str) -> Endpoint {
    let method = path.rsplit('/').next().unwrap_or("");
    match method {
        // Model readiness says which models exist, so it needs `read` (as REST's /v2/models/{m}/ready does).
        "ServerLive" | "ServerReady" => Endpoint::Health,
        "ModelInfer" | "ModelStreamInfer" | "Predict" | "Classify" | "Regress"
        | "MultiInference" => Endpoint::Scoped(Scope::Infer),
        _ => Endpoint::Scoped(Scope::Read),
    }
}

/// The REST middleware.
pub async fn rest_layer(
    axum::extract::State(auth): axum::extract::State<std::sync::Arc<Auth>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let endpoint = rest_endpoint(request.method(), request.uri().path());
    let header = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match auth.check(header, endpoint) {
        Ok(()) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

/// The gRPC layer: checks each call before its service sees it.
#[derive(Debug, Clone)]
pub struct GrpcAuthLayer(pub std::sync::Arc<Auth>);

impl<S> tower::Layer<S> for GrpcAuthLayer {
    type Service = GrpcAuth<S>;
    fn layer(&self, inner: S) -> GrpcAuth<S> {
        GrpcAuth {
            auth: self.0.clone(),
            inner,
        }
    }
}

/// The service [`GrpcAuthLayer`] makes.
#[derive(Debug, Clone)]
pub struct GrpcAuth<S> {
    auth: std::sync::Arc<Auth>,
    inner: S,
}

impl<S, B> tower::Service<axum::http::Request<B>> for GrpcAuth<S>
where
    S: tower::Service<axum::http::Request<B>, Response = axum::http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: axum::http::Request<B>) -> Self::Future {
        let endpoint = grpc_endpoint(request.uri().path());
        let header = request
            .headers()
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        match self.auth.check(header, endpoint) {
            Ok(()) => Box::pin(self.inner.call(request)),
            Err(e) => {
                let status: tonic::Status = e.into();
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

/// The sha256 digest of a token.
pub fn token_digest(token: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes()).into()
}

/// Equal digests, compared without an early exit.
pub fn digests_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(rate: Option<f64>) -> Auth {
        let mut specs = parse_tokens_env("app:infer+read:s1,ops:admin:s2").unwrap();
        specs[0].rate_limit = rate;
        Auth::new(specs, true, false).unwrap()
    }

    #[test]
    fn scopes_decide_and_errors_say_why() {
        let a = auth(None);
        let infer = Endpoint::Scoped(Scope::Infer);
        assert!(a.check(Some("Bearer s1"), infer).is_ok());
        assert_eq!(
            a.check(None, infer).unwrap_err().kind,
            ErrorKind::Unauthenticated
        );
        assert_eq!(
            a.check(Some("Bearer nope"), infer).unwrap_err().kind,
            ErrorKind::Unauthenticated
        );
        assert_eq!(
            a.check(Some("Basic s1"), infer).unwrap_err().kind,
            ErrorKind::Unauthenticated
        );
        assert_eq!(
            a.check(Some("Bearer s2"), infer).unwrap_err().kind,
            ErrorKind::PermissionDenied
        );
        assert!(a.check(None, Endpoint::Health).is_ok());
        assert_eq!(
            a.check(None, Endpoint::Metrics).unwrap_err().kind,
            ErrorKind::Unauthenticated
        );
        assert!(a.check(Some("Bearer s1"), Endpoint::Metrics).is_ok());
        assert!(Auth::new(Vec::new(), true, true).is_none());
        assert!(parse_tokens_env("x:write:s").is_err());
        assert!(parse_tokens_env("x:infer:").is_err());
        assert!(parse_tokens_env("x:infer").is_err());
    }

    #[test]
    fn token_errors_say_which_token_and_file() {
        let env = |text: &str| parse_tokens_env(text).unwrap_err().to_string();
        assert_eq!(
            env("x:write:s"),
            "token `x`: unknown scope `write` (expected infer, read or admin)"
        );
        assert_eq!(env("x:infer:"), "token `x` has an empty secret");
        assert_eq!(env("x:infer"), "a token is `name:scope+scope:secret`");
        let path = std::env::temp_dir().join(format!("ferry-tokens-{}.toml", std::process::id()));
        let file = |text: &str| {
            std::fs::write(&path, text).unwrap();
            read_tokens_file(&path).unwrap_err().to_string()
        };
        let p = path.display();
        assert_eq!(
            file("[[token]]\nname = \"a\"\nsha256 = \"00\"\nscopes = [\"read\"]\n"),
            format!("{p}: token `a`: sha256 must be 64 hex digits")
        );
        assert_eq!(
            file("[[token]]\nname = \"a\"\nscopes = [\"read\"]\n"),
            format!("{p}: token `a`: give exactly one of `token` or `sha256`")
        );
        assert_eq!(
            file("[[token]]\nname = \"a\"\ntoken = \"s\"\nscopes = []\n"),
            format!("{p}: token `a`: a token needs at least one scope")
        );
        assert!(file("[[token]\n").starts_with(&format!("{p}: ")));
        std::fs::remove_file(&path).unwrap();
        assert!(read_tokens_file(&path)
            .unwrap_err()
            .to_string()
            .starts_with(&format!("{p}: ")));
    }

    #[test]
    fn bearer_headers_parse_in_any_case() {
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(Some("BEARER abc")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(Some("Bearer ")), None);
        assert_eq!(bearer(Some("Bearer")), None);
        assert_eq!(bearer(None), None);
        assert_eq!(
            grpc_endpoint("/inference.GRPCInferenceService/ModelReady"),
            Endpoint::Scoped(Scope::Read)
        );
    }

    #[test]
    fn the_rate_limit_is_a_token_bucket() {
        let a = auth(Some(5.0));
        let infer = Endpoint::Scoped(Scope::Infer);
        let allowed = (0..20)
            .filter(|_| a.check(Some("Bearer s1"), infer).is_ok())
            .count();
        assert_eq!(allowed, 5);
        assert_eq!(
            a.check(Some("Bearer s1"), infer).unwrap_err().kind,
            ErrorKind::Overloaded
        );
    }

    #[test]
    fn endpoints_are_classified() {
        use axum::http::Method;
        assert_eq!(
            rest_endpoint(&Method::GET, "/v2/health/ready"),
            Endpoint::Health
        );
        assert_eq!(
            rest_endpoint(&Method::POST, "/v2/models/m/infer"),
            Endpoint::Scoped(Scope::Infer)
        );
        assert_eq!(
            rest_endpoint(&Method::GET, "/v2/models/m"),
            Endpoint::Scoped(Scope::Read)
        );
        assert_eq!(
            rest_endpoint(&Method::POST, "/v1/models/m:predict"),
            Endpoint::Scoped(Scope::Infer)
        );
        assert_eq!(
            grpc_endpoint("/inference.GRPCInferenceService/ModelInfer"),
            Endpoint::Scoped(Scope::Infer)
        );
        assert_eq!(
            grpc_endpoint("/inference.GRPCInferenceService/ServerReady"),
            Endpoint::Health
        );
        assert_eq!(
            grpc_endpoint("/tensorflow.serving.ModelService/GetModelStatus"),
            Endpoint::Scoped(Scope::Read)
        );
    }
}
