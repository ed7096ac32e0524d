//! Accepting connections: plain TCP or TLS (rustls), the HTTP/1 connection loop for REST with a header-read
//! timeout against slow clients and graceful shutdown, and the stream of connections (plain or TLS) gRPC serves, each
//! closed unless it sends the HTTP/2 preface within the client timeout.
//!
//! Certificates are re-read when their files change (checked every two seconds), so a rotated certificate
//! takes effect without a restart; a file that fails to parse leaves the previous certificate in use. With a client
//! CA, clients must present a certificate it signed (mutual TLS).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

/// Where the certificate, its key and (for mutual TLS) the client CA are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates (PEM) that client certificates must chain to; `None` accepts clients without one.
    pub client_ca: Option<PathBuf>,
}

/// The TLS acceptors for REST (HTTP/1.1) and gRPC (HTTP/2), sharing one reloading certificate.
#[derive(Clone)]
pub struct Tls {
    /// For the REST and management listeners (ALPN `http/1.1`).
    pub rest: TlsAcceptor,
    /// For the gRPC listener (ALPN `h2`).
    pub grpc: TlsAcceptor,
    resolver: Arc<Reloading>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("files", &self.resolver.files)
            .finish()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Tls {
    /// Reads the files and builds both acceptors; fails with a message naming the file at fault.
    pub fn new(files: &TlsFiles) -> io::Result<Tls> {
        let resolver = Arc::new(Reloading::new(files.clone())?);
        let verifier = match &files.client_ca {
            None => WebPkiClientVerifier::no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in read_certs(ca)? {
                    roots
                        .add(cert)
                        .map_err(|e| invalid(format!("{}: {e}", ca.display())))?;
                }
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                    .build()
                    .map_err(|e| invalid(format!("{}: {e}", ca.display())))?
            }
        };
        let config = |alpn: &[&[u8]]| -> io::Result<Arc<rustls::ServerConfig>> {
            let mut c = rustls::ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| invalid(e.to_string()))?
                .with_client_cert_verifier(verifier.clone())
                .with_cert_resolver(resolver.clone());
            c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            Ok(Arc::new(c))
        };
        Ok(Tls {
            rest: TlsAcceptor::from(config(&[b"http/1.1"])?),
            grpc: TlsAcceptor::from(config(&[b"h2"])?),
            resolver,
        })
    }

    /// Re-reads the certificate every two seconds when its files change, until `stop`.
    pub async fn watch(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        while crate::core::sleep_unless_stopped(Duration::from_secs(2), &mut stop).await {
            let r = self.resolver.clone();
            let _ = tokio::task::spawn_blocking(move || r.reload_if_changed()).await;
        }
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

fn read_certs(path: &Path) -> io::Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| invalid(format!("{}: {e}", path.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| invalid(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(invalid(format!(
            "{}: no PEM certificate in it",
            path.display()
        )));
    }
    Ok(certs)
}

fn load_key(files: &TlsFiles) -> io::Result<Arc<CertifiedKey>> {
    let certs = read_certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| invalid(format!("{}: {e}", files.key.display())))?;
    let key = CertifiedKey::from_der(certs, key, &provider()).map_err(|e| {
        invalid(format!(
            "{} and {}: {e}",
            files.cert.display(),
            files.key.display()
        ))
    })?;
    Ok(Arc::new(key))
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The certificate in use, replaced when its files change.
#[derive(Debug)]
struct Reloading {
    files: TlsFiles,
    current: RwLock<Arc<CertifiedKey>>,
    stamp: parking_lot::Mutex<(Option<SystemTime>, Option<SystemTime>)>,
}

impl Reloading {
    fn new(files: TlsFiles) -> io::Result<Reloading> {
        let key = load_key(&files)?;
        let stamp = (modified(&files.cert), modified(&files.key));
        Ok(Reloading {
            files,
            current: RwLock::new(key),
            stamp: parking_lot::Mutex::new(stamp),
        })
    }

    fn reload_if_changed(&self) {
        let now = (modified(&self.files.cert), modified(&self.files.key));
        let mut stamp = self.stamp.lock();
        if *stamp == now {
            return;
        }
        match load_key(&self.files) {
            Ok(key) => {
                *self.current.write() = key;
                *stamp = now;
                tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
            }
            // A half-written pair (the certificate replaced before its key) is tried again on the next check.
            Err(e) => {
                tracing::warn!(error = %e, "TLS certificate changed but cannot be used yet; keeping the previous one")
            }
        }
    }
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().clone())
    }
}

/// Serves `router` over HTTP/1.1 on `listener` (TLS when `tls` is given) until `stop`, then lets open connections
/// finish their requests. Headers must arrive within `header_timeout` (and a TLS handshake within the same time).
pub async fn serve_http(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    front: crate::transport::front::Front,
    header_timeout: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> io::Result<()> {
    use crate::transport::parse_errors::JsonParseErrors;
    use hyper_util::rt::{TokioIo, TokioTimer};
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = crate::core::stopped(&mut stop) => break,
        };
        let _ = tcp.set_nodelay(true);
        let front = front.clone();
        let service = hyper::service::service_fn(move |request| {
            let front = front.clone();
            async move { Ok::<_, std::convert::Infallible>(front.call(request).await) }
        });
        let watcher = graceful.watcher();
        let tls = tls.clone();
        tokio::spawn(async move {
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .keep_alive(true);
            // Each connection future is boxed: an idle plain connection then holds only its own state, not
            // room for the larger TLS one (every open connection costs memory; see the overload benchmark).
            let result = match tls {
                None => {
                    Box::pin(watcher.watch(
                        http.serve_connection(TokioIo::new(JsonParseErrors::new(tcp)), service),
                    ))
                    .await
                }
                Some(acceptor) => {
                    match tokio::time::timeout(header_timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            Box::pin(watcher.watch(http.serve_connection(
                                TokioIo::new(JsonParseErrors::new(stream)),
                                service,
                            )))
                            .await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!("TLS handshake timed out");
                            return;
                        }
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// What a gRPC connection runs over.
enum GrpcIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// A connection gRPC can serve (plain or TLS) that must send the HTTP/2 client preface (24 bytes) within the
/// client timeout, and is closed at shutdown if it has not: tonic (hyper, h2) would otherwise wait for it forever
/// (holding file descriptors until the ports starve, and shutdown for the whole grace period). Once it has sent
/// it, the connection ends after the client timeout without an open call (see [`crate::transport::idle`]).
pub struct GrpcConnection {
    io: GrpcIo,
    /// Preface bytes seen so far, and what ends the wait for the rest (the timeout or shutdown); `None` once they
    /// all came.
    preface: Option<(usize, GiveUp)>,
    /// The connection's open calls, and how long it may stay without one.
    calls: std::sync::Arc<crate::transport::idle::Calls>,
    idle_limit: Duration,
    /// When bytes last arrived, and the timer that wakes the connection to look at its idleness.
    last_read: std::time::Instant,
    idle_timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

/// Completes when a connection has waited long enough for its preface.
type GiveUp = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// The HTTP/2 client connection preface's length (RFC 9113, 3.4).
const PREFACE_BYTES: usize = 24;

impl GrpcConnection {
    fn new(
        io: GrpcIo,
        timeout: Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> GrpcConnection {
        let give_up = async move {
            tokio::select! {
                () = tokio::time::sleep(timeout) => {}
                () = crate::core::stopped(&mut stop) => {}
            }
        };
        let now = std::time::Instant::now();
        GrpcConnection {
            io,
            preface: Some((0, Box::pin(give_up))),
            calls: crate::transport::idle::Calls::new(now),
            idle_limit: timeout,
            last_read: now,
            idle_timer: None,
        }
    }

    /// Whether the connection has been idle past its limit; otherwise arms the timer that wakes it to look again.
    fn idle_past_limit(&mut self, cx: &mut std::task::Context<'_>) -> bool {
        loop {
            let now = std::time::Instant::now();
            let wait = match self.calls.idle_for(now, self.last_read) {
                Some(idle) if idle >= self.idle_limit => return true,
                Some(idle) => self.idle_limit - idle,
                None => self.idle_limit,
            };
            let deadline = tokio::time::Instant::from_std(now + wait);
            let timer = self
                .idle_timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            timer.as_mut().reset(deadline);
            if std::future::Future::poll(timer.as_mut(), cx).is_pending() {
                return false;
            }
        }
    }
}

impl tonic::transport::server::Connected for GrpcConnection {
    type ConnectInfo = crate::transport::idle::OpenCalls;
    fn connect_info(&self) -> crate::transport::idle::OpenCalls {
        crate::transport::idle::OpenCalls(self.calls.clone())
    }
}

impl tokio::io::AsyncRead for GrpcConnection {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        use std::task::Poll;
        let this = &mut *self;
        let before = buf.filled().len();
        let read = match &mut this.io {
            GrpcIo::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            GrpcIo::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        };
        if let Some((seen, deadline)) = &mut this.preface {
            match &read {
                Poll::Ready(Ok(())) => {
                    let n = buf.filled().len() - before;
                    *seen += n;
                    if *seen >= PREFACE_BYTES || n == 0 {
                        this.preface = None;
                    }
                }
                Poll::Ready(Err(_)) => {}
                Poll::Pending => {
                    if deadline.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "no HTTP/2 preface within --client-timeout (or before shutdown)",
                        )));
                    }
                }
            }
            return read;
        }
        match &read {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                this.last_read = std::time::Instant::now();
            }
            // No call for the idle limit: the connection ends as if the client had closed it (end of file), so
            // hyper closes it; the client reconnects on its next call.
            Poll::Pending if this.idle_past_limit(cx) => {
                tracing::debug!("closing a gRPC connection idle for --client-timeout");
                return Poll::Ready(Ok(()));
            }
            _ => {}
        }
        read
    }
}

impl tokio::io::AsyncWrite for GrpcConnection {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        match &mut self.io {
            GrpcIo::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            GrpcIo::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match &mut self.io {
            GrpcIo::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            GrpcIo::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match &mut self.io {
            GrpcIo::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            GrpcIo::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Accepts TCP connections for gRPC, completing TLS handshakes (when `tls` is given) off the accept loop within
/// `client_timeout`, and yields connections that must then send the HTTP/2 preface within `client_timeout` too
/// (and before `stop`).
pub fn grpc_incoming(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    client_timeout: Duration,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<GrpcConnection>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                // gRPC stopped taking connections (shutdown): stop accepting.
                () = tx.closed() => return,
            };
            let tcp = match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a gRPC connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let Some(acceptor) = tls.clone() else {
                let connection =
                    GrpcConnection::new(GrpcIo::Plain(tcp), client_timeout, stop.clone());
                if tx.send(Ok(connection)).await.is_err() {
                    return;
                }
                continue;
            };
            let (tx, stop) = (tx.clone(), stop.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(client_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let io = GrpcIo::Tls(Box::new(stream));
                        let connection = GrpcConnection::new(io, client_timeout, stop);
                        let _ = tx.send(Ok(connection)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, "gRPC TLS handshake failed"),
                    Err(_) => tracing::debug!("gRPC TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
