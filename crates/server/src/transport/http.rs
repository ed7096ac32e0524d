//! The front doors: one axum [`Router`] for REST (KServe v2 and TF Serving), one tonic router for gRPC (the same
//! two protocols), and the server's lifecycle (bind, serve both, drain on shutdown).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::Request;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tracing::Instrument;

use crate::core::infer::{Health, Infer};
use crate::core::reload::{ControlMode, Manager};
use crate::core::repository::ModelStore;
use crate::core::source::Repository;
use crate::error::{ErrorKind, InferError};
use crate::protocol::{kserve_rest as ks, tfserving_rest as tf};
use crate::transport::config::ServeConfig;

pub use crate::protocol::AppState;

/// The REST router, without a listener: tests call it in-process.
pub fn app(state: AppState, max_request_bytes: usize) -> Router {
    let defaults = ServeConfig::for_tests(Default::default());
    app_with_limit(
        state,
        max_request_bytes,
        Arc::new(crate::transport::front::Admission::new(
            usize::MAX,
            max_request_bytes,
            defaults.client_timeout,
            defaults.request_timeout,
        )),
    )
}

/// The REST router, letting requests in through `admission` ([`crate::transport::front::Admission`]: bodies read first, then
/// at most `--max-concurrent-requests` handled at once, probes exempt). The listener's direct inference path
/// ([`crate::transport::front`]) shares the same admission.
pub fn app_with_limit(
    state: AppState,
    max_request_bytes: usize,
    admission: Arc<crate::transport::front::Admission>,
) -> Router {
    Router::new()
        .route("/v2", get(ks::server_metadata))
        .route("/v2/health/live", get(ks::live))
        .route("/v2/health/ready", get(ks::ready))
        .route("/v2/models/{model}", get(ks::model_metadata))
        .route("/v2/models/{model}/ready", get(ks::model_ready))
        .route("/v2/models/{model}/drift", get(ks::model_drift))
        .route("/v2/models/{model}/importance", get(ks::model_importance))
        .route(
            "/v2/models/{model}/versions/{version}/importance",
            get(ks::version_importance),
        )
        .route(
            "/v2/models/{model}/versions/{version}/drift",
            get(ks::version_drift),
        )
        .route("/v2/models/{model}/infer", axum::routing::post(ks::infer))
        .route(
            "/v2/models/{model}/explain",
            axum::routing::post(ks::explain),
        )
        .route(
            "/v2/models/{model}/versions/{version}/explain",
            axum::routing::post(ks::explain_version),
        )
        .route(
            "/v2/models/{model}/versions/{version}",
            get(ks::version_metadata),
        )
        .route(
            "/v2/models/{model}/versions/{version}/ready",
            get(ks::version_ready),
        )
        .route(
            "/v2/models/{model}/versions/{version}/infer",
            axum::routing::post(ks::infer_version),
        )
        .route("/v1/models/{*rest}", get(tf::get).post(tf::post))
        .route("/metrics", get(metrics))
        .merge(crate::protocol::tei::routes())
        .merge(crate::protocol::openai::routes())
        .merge(crate::protocol::generate::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::map_response(json_errors))
        .layer(DefaultBodyLimit::max(max_request_bytes))
        .layer(middleware::from_fn_with_state(
            admission,
            crate::transport::front::admit,
        ))
        .layer(middleware::from_fn(request_id))
        .with_state(state)
}

/// `GET /metrics`: the Prometheus text exposition, or OpenMetrics when the `Accept` header asks for it (as
/// Prometheus does when it scrapes).
async fn metrics(
    axum::extract::State(state): axum::extract::State<AppState>,
    headers: axum::http::HeaderMap,
) -> Response {
    let infer = &state.infer;
    let format = crate::metrics::Format::negotiate(
        headers
            .get(axum::http::header::ACCEPT)
            .and_then(|v| v.to_str().ok()),
    );
    let now = crate::metrics::Snapshot {
        versions: infer.versions_for_metrics(),
        drift: infer.drift_for_metrics(),
        payload: infer.payload.as_ref().map(|p| {
            (
                p.queued.load(std::sync::atomic::Ordering::Relaxed),
                p.dropped.load(std::sync::atomic::Ordering::Relaxed),
            )
        }),
        rollouts: infer.rollouts_for_metrics(),
        importance: infer.importance_for_metrics(),
    };
    let text = infer.metrics.render(&now, format);
    (
        [(axum::http::header::CONTENT_TYPE, format.content_type())],
        text,
    )
        .into_response()
}

/// Every error the router answers is `{"error": "..."}`: axum's own rejections (a path segment that is not UTF-8
/// once percent-decoded, say) come as plain text, and are rewritten here with that text as the message (cut at
/// 1 KB, as it may echo the path).
async fn json_errors(response: Response) -> Response {
    use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
    let status = response.status();
    let json = response
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if json || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 << 10)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_lowercase()
    } else {
        crate::error::bounded_message(text, crate::error::MAX_GRPC_MESSAGE_BYTES)
    };
    parts.headers.remove(CONTENT_LENGTH);
    parts.headers.insert(
        CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    let body = serde_json::json!({ "error": message }).to_string();
    Response::from_parts(parts, axum::body::Body::from(body))
}

/// The router's fallback (and the management API's): no route has this path.
pub(crate) async fn not_found() -> InferError {
    InferError::not_found("no such endpoint")
}

/// The router's answer to a path it has with a method it does not take (and the management API's). axum adds the
/// `Allow` header, listing the path's methods, to whatever this answers.
pub(crate) async fn method_not_allowed() -> InferError {
    InferError::new(
        ErrorKind::MethodNotAllowed,
        "method not allowed on this endpoint",
    )
}

/// Gives every request an id (the client's `x-request-id`, or a new one), logs one line per request under a span
/// that carries it, and echoes it in the response.
async fn request_id(request: Request<axum::body::Body>, next: Next) -> Response {
    let id = crate::transport::front::request_id(request.headers());
    // A debug-level span: at the default level it is never built, so a request pays nothing for it; with
    // `RUST_LOG=ferry_server=debug` every line a request logs carries its id, method and path.
    let span = tracing::debug_span!("request", id = %id, method = %request.method(), path = %request.uri().path());
    let started = std::time::Instant::now();
    let mut response = next.run(request).instrument(span.clone()).await;
    span.in_scope(|| {
        tracing::debug!(
            status = response.status().as_u16(),
            micros = started.elapsed().as_micros() as u64,
            "request done"
        )
    });
    crate::transport::front::echo_id(&mut response, &id);
    response
}

/// A server that has loaded its repository and bound its ports, ready to [`Server::run`].
pub struct Server {
    listener: TcpListener,
    grpc_listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    admin_listener: Option<TcpListener>,
    front: crate::transport::front::Front,
    infer: Infer,
    manager: Arc<Manager>,
    tls: Option<crate::transport::listen::Tls>,
    auth: Option<Arc<crate::transport::auth::Auth>>,
    config: ServeConfig,
}

impl Server {
    /// Loads every model (in parallel) and binds the REST port. Fails only when the repository root cannot be read
    /// or the port cannot be bound; broken models are reported and served as UNAVAILABLE.
    ///
    /// `onnxruntime` is the loaded ONNX Runtime, or why it could not be loaded: models that need it are then
    /// UNAVAILABLE with that reason (builds with tract serve `engine = "auto"` models with tract instead).
    pub async fn start(
        config: ServeConfig,
        onnxruntime: Result<ferry_engine::OrtEngine, ferry_engine::EngineError>,
    ) -> std::io::Result<Server> {
        let store = Arc::new(ModelStore::default());
        let health = Arc::new(Health::default());
        let metrics = Arc::new(crate::metrics::Metrics::new(config.metrics));
        let mut infer = Infer::new(
            store.clone(),
            health.clone(),
            metrics.clone(),
            config.request_timeout,
        );
        if let Some(payload) = &config.payload_log {
            let logger =
                crate::core::payload_log::PayloadLogger::start(payload.clone()).map_err(|e| {
                    std::io::Error::new(
                        e.kind(),
                        format!(
                            "cannot open the payload log {}: {e}",
                            payload.path.display()
                        ),
                    )
                })?;
            tracing::info!(path = %payload.path.display(), sample_rate = payload.sample_rate, "payload logging on");
            infer = infer.with_payload_log(logger);
        }
        infer.limits = config.limits;
        let tls = match &config.tls {
            None => None,
            Some(files) => {
                let tls = crate::transport::listen::Tls::new(files)?;
                tracing::info!(cert = %files.cert.display(), client_certificates = files.client_ca.is_some(), "TLS on for every listener");
                Some(tls)
            }
        };
        let auth = crate::transport::auth::Auth::new(
            config.tokens.clone(),
            config.open_health,
            config.open_metrics,
        )
        .map(Arc::new);
        if let Some(a) = &auth {
            tracing::info!(
                open_health = config.open_health,
                open_metrics = config.open_metrics,
                admin_scope = a.has_scope(crate::transport::auth::Scope::Admin),
                "tokens required on the inference ports"
            );
        }
        // Every port is bound now, so one in use fails the start at once, but listens only once every model was
        // tried: until then a connection is refused rather than left waiting (TF Serving and Triton also open their
        // ports after loading).
        let listener = bind(SocketAddr::new(config.host, config.rest_port), "REST")?;
        let grpc_listener = bind(SocketAddr::new(config.host, config.grpc_port), "gRPC")?;
        let admin_listener = match config.admin {
            None => None,
            Some(addr) => {
                let admin_tokens = config.admin_token.is_some()
                    || auth
                        .as_ref()
                        .is_some_and(|a| a.has_scope(crate::transport::auth::Scope::Admin));
                if !addr.ip().is_loopback() && !admin_tokens {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("the management API would listen on {addr}, beyond loopback, without a token: set --admin-token (or FERRY_ADMIN_TOKEN), or keep --admin-host on 127.0.0.1"),
                    ));
                }
                Some(bind(addr, "management API")?)
            }
        };
        let metrics_listener = match config.metrics_port {
            None => None,
            Some(port) => Some(bind(SocketAddr::new(config.host, port), "metrics")?),
        };
        let repo = Repository::open(&config.model_repository, &config.cache_dir)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let manager = Arc::new(
            Manager::new(
                repo,
                store.clone(),
                onnxruntime,
                config.engine.clone(),
                metrics.clone(),
                config.model_control_mode,
                config.shutdown_grace_period,
            )
            .with_integrity(config.integrity.clone()),
        );
        manager
            .startup(&config.load_models)
            .await
            // As text: the message is what `ferry serve` prints, without the causes it already shows.
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        let names = store.model_names();
        tracing::info!(models = names.len(), "model repository loaded");
        health.set_loaded();
        let listener = listen(listener, "REST (KServe v2 and TF Serving) listening")?;
        let grpc_listener = listen(grpc_listener, "gRPC (KServe v2 and TF Serving) listening")?;
        let admin_listener = match admin_listener {
            None => None,
            Some(s) => Some(listen(s, "management API listening")?),
        };
        let metrics_listener = match metrics_listener {
            None => None,
            Some(s) => Some(listen(s, "metrics listening")?),
        };
        let admission = Arc::new(crate::transport::front::Admission::new(
            config.max_concurrent_requests,
            config.max_request_bytes,
            config.client_timeout,
            config.request_timeout,
        ));
        let mut router = app_with_limit(
            AppState {
                infer: infer.clone(),
            },
            config.max_request_bytes,
            admission.clone(),
        );
        if let Some(a) = &auth {
            router = router.layer(middleware::from_fn_with_state(
                a.clone(),
                crate::transport::auth::rest_layer,
            ));
        }
        let front = crate::transport::front::Front::with_direct_infer(
            router,
            crate::transport::front::DirectInfer {
                infer: infer.clone(),
                auth: auth.clone(),
                admission,
            },
        );
        Ok(Server {
            listener,
            grpc_listener,
            metrics_listener,
            admin_listener,
            front,
            infer,
            manager,
            tls,
            auth,
            config,
        })
    }

    /// The address the REST listener is bound to (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The address the gRPC listener is bound to.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The address of the separate metrics listener, when `metrics_port` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// The address of the management API, when it is on.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// The repository manager.
    pub fn manager(&self) -> &Arc<Manager> {
        &self.manager
    }

    /// The shared inference handle.
    pub fn infer(&self) -> &Infer {
        &self.infer
    }

    /// Serves until `shutdown` completes, then turns not-ready, stops accepting, and lets in-flight requests finish
    /// within the grace period.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let Server {
            listener,
            grpc_listener,
            metrics_listener,
            admin_listener,
            front,
            infer,
            manager,
            tls,
            auth,
            config,
        } = self;
        let (drain_tx, drain_rx) = tokio::sync::watch::channel(false);
        // Every background task ends once the drain signal turns true, and is joined before `run` returns (a rollout
        // decision being written finishes); dropping the set on an early return aborts them.
        let mut background = tokio::task::JoinSet::new();
        if config.model_control_mode == ControlMode::Poll {
            background.spawn(
                manager
                    .clone()
                    .run_poller(config.repository_poll, drain_rx.clone()),
            );
        }
        background.spawn(
            manager
                .clone()
                .run_rollouts(std::time::Duration::from_millis(100), drain_rx.clone()),
        );
        if let Some(l) = admin_listener {
            let admin = crate::transport::admin::router(crate::transport::admin::AdminState {
                manager: manager.clone(),
                infer: infer.clone(),
                token_sha256: config
                    .admin_token
                    .as_ref()
                    .map(|t| crate::transport::auth::token_digest(&t.0)),
                auth: auth.clone(),
            });
            let (tls, stop, timeout) = (
                tls.as_ref().map(|t| t.rest.clone()),
                drain_rx.clone(),
                config.client_timeout,
            );
            background.spawn(async move {
                let result =
                    crate::transport::listen::serve_http(l, tls, admin.into(), timeout, stop).await;
                if let Err(e) = result {
                    tracing::error!(error = %e, "the management API stopped");
                }
            });
        }
        let health = infer.health.clone();
        let store = infer.store.clone();
        background.spawn(async move {
            shutdown.await;
            tracing::info!(
                "shutdown requested: readiness is now false, draining in-flight requests"
            );
            health.set_draining();
            let _ = drain_tx.send(true);
        });
        if let Some(t) = &tls {
            background.spawn(t.clone().watch(drain_rx.clone()));
        }
        let serve = crate::transport::listen::serve_http(
            listener,
            tls.as_ref().map(|t| t.rest.clone()),
            front,
            config.client_timeout,
            drain_rx.clone(),
        );
        let mut grpc_drain = drain_rx.clone();
        let grpc_stop = async move {
            let _ = grpc_drain.wait_for(|d| *d).await;
        };
        let grpc_routes = grpc_router(
            &infer,
            config.max_request_bytes,
            auth.clone(),
            config.request_timeout + config.client_timeout,
        );
        // A connection (plain or TLS) must send the HTTP/2 preface within the client timeout.
        let grpc = grpc_routes.serve_with_incoming_shutdown(
            crate::transport::listen::grpc_incoming(
                grpc_listener,
                tls.as_ref().map(|t| t.grpc.clone()),
                config.client_timeout,
                drain_rx.clone(),
            ),
            grpc_stop,
        );
        // The metrics page can also have its own port, so scrapers need not reach the inference port.
        let mut metrics_router =
            Router::new()
                .route("/metrics", get(metrics))
                .with_state(AppState {
                    infer: infer.clone(),
                });
        // The metrics port answers as `/metrics` on the REST port does: open unless `--auth-open` closes it.
        if let Some(a) = &auth {
            metrics_router = metrics_router.layer(middleware::from_fn_with_state(
                a.clone(),
                crate::transport::auth::rest_layer,
            ));
        }
        let (metrics_tls, metrics_stop, metrics_timeout) = (
            tls.as_ref().map(|t| t.rest.clone()),
            drain_rx.clone(),
            config.client_timeout,
        );
        let metrics_serve = async move {
            match metrics_listener {
                Some(l) => {
                    crate::transport::listen::serve_http(
                        l,
                        metrics_tls,
                        metrics_router.into(),
                        metrics_timeout,
                        metrics_stop,
                    )
                    .await
                }
                None => Ok(()),
            }
        };
        let serve = async move {
            let (rest, grpc, metrics) = tokio::join!(serve, grpc, metrics_serve);
            rest?;
            metrics?;
            grpc.map_err(std::io::Error::other)
        };
        let mut grace_rx = drain_rx;
        let grace = config.shutdown_grace_period;
        let grace_timer = async move {
            let _ = grace_rx.wait_for(|d| *d).await;
            tokio::time::sleep(grace).await;
        };
        let mut serve = std::pin::pin!(serve);
        tokio::select! {
            result = &mut serve => result?,
            () = grace_timer => {
                // Requests still queued get 503 now; batches already running may still finish. Their answers get
                // a moment to reach the clients (the server stops sooner once every connection has closed).
                let answered = store.cut_queues();
                let _ = tokio::time::timeout(CUT_FLUSH.min(grace), &mut serve).await;
                let left = infer.metrics.requests_in_flight();
                store.mark_all_unloading();
                let left = left.map_or_else(|| "an unknown number of".to_string(), |n| n.to_string());
                tracing::error!(
                    grace_ms = grace.as_millis() as u64,
                    answered_503 = answered,
                    cut = %left,
                    "shutdown grace period ran out with requests still in flight"
                );
                return Err(std::io::Error::other(format!(
                    "the shutdown grace period ({} ms) ran out with requests in flight: {answered} queued \
                     request(s) answered 503, {left} inference request(s) still running cut without an answer \
                     (with any request whose body was still arriving)",
                    grace.as_millis()
                )));
            }
        }
        store.mark_all_unloading();
        let joined = tokio::time::timeout(grace, async {
            while background.join_next().await.is_some() {}
        })
        .await;
        if joined.is_err() {
            tracing::warn!(
                left = background.len(),
                "background tasks did not stop within the shutdown grace period; aborting them"
            );
        }
        tracing::info!("server stopped");
        Ok(())
    }
}

/// How long, once the shutdown grace period ran out, the 503 answers to queued requests get to reach their clients.
const CUT_FLUSH: std::time::Duration = std::time::Duration::from_secs(1);

/// A socket bound to `addr` (with `SO_REUSEADDR`, as `TcpListener::bind` sets it) that does not listen yet.
fn bind(addr: SocketAddr, what: &str) -> std::io::Result<tokio::net::TcpSocket> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket
        .bind(addr)
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot bind {addr}: {e}")))?;
    tracing::info!(address = %socket.local_addr()?, "{what} port bound; it listens once every model was tried");
    Ok(socket)
}

/// Starts listening on a bound socket (the backlog `TcpListener::bind` uses) and logs its address.
fn listen(socket: tokio::net::TcpSocket, what: &str) -> std::io::Result<TcpListener> {
    let listener = socket.listen(1024)?;
    tracing::info!(address = %listener.local_addr()?, "{what}");
    Ok(listener)
}

/// The gRPC server's layers: the status rewrite for oversized messages around the optional token check, and the
/// call deadline inside both.
type GrpcLayers = tower::layer::util::Stack<
    crate::protocol::grpc::GrpcDeadlineLayer,
    tower::layer::util::Stack<
        tower::util::MapResponseLayer<
            fn(axum::http::Response<tonic::body::Body>) -> axum::http::Response<tonic::body::Body>,
        >,
        tower::layer::util::Stack<
            tower::util::Either<
                crate::transport::auth::GrpcAuthLayer,
                tower::layer::util::Identity,
            >,
            tower::layer::util::Stack<
                crate::transport::idle::CountCallsLayer,
                tower::layer::util::Identity,
            >,
        >,
    >,
>;

/// The gRPC services (KServe v2 and TF Serving) over the shared inference path.
fn grpc_router(
    infer: &Infer,
    max_message_bytes: usize,
    auth: Option<Arc<crate::transport::auth::Auth>>,
    call_timeout: std::time::Duration,
) -> tonic::transport::server::Router<GrpcLayers> {
    use crate::protocol::grpc::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
    use crate::protocol::grpc::tensorflow::serving::{
        model_service_server::ModelServiceServer,
        prediction_service_server::PredictionServiceServer,
    };
    use crate::protocol::{kserve_grpc::KserveGrpc, tfserving_grpc::TfServingGrpc};
    let kserve = KserveGrpc {
        infer: infer.clone(),
    };
    let tf = TfServingGrpc {
        infer: infer.clone(),
        max_request_bytes: max_message_bytes,
    };
    tonic::transport::Server::builder()
        // Each call counts as open on its connection, which closes after --client-timeout without one.
        .layer(crate::transport::idle::CountCallsLayer)
        .layer(tower::util::option_layer(
            auth.map(crate::transport::auth::GrpcAuthLayer),
        ))
        .layer(tower::util::MapResponseLayer::new(
            crate::protocol::grpc::oversized_is_resource_exhausted::<tonic::body::Body>
                as fn(_) -> _,
        ))
        // Slow or silent clients: dead connections are found by keepalive pings, and no call (its upload
        // included) may take longer than the request timeout plus the client timeout; past it the call ends with
        // DEADLINE_EXCEEDED (tonic's own `timeout` would answer CANCELLED).
        .layer(crate::protocol::grpc::GrpcDeadlineLayer(call_timeout))
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        // Bound the calls decoded at once per connection, as the REST router does across connections.
        .concurrency_limit_per_connection(256)
        .max_concurrent_streams(Some(256))
        .add_service(
            GrpcInferenceServiceServer::new(kserve).max_decoding_message_size(max_message_bytes),
        )
        .add_service(
            PredictionServiceServer::new(tf.clone()).max_decoding_message_size(max_message_bytes),
        )
        .add_service(ModelServiceServer::new(tf).max_decoding_message_size(max_message_bytes))
}

/// Completes on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
