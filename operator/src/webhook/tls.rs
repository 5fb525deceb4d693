//! HTTPS for the webhook: warp's service behind tokio-rustls (TLS 1.2 and 1.3), with a
//! certificate that can be swapped while connections stay open, and the client a replica
//! uses to hand a review to the leader.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_rustls::{FixedServerNameResolver, HttpsConnector, HttpsConnectorBuilder};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{
        conn::auto,
        graceful::{GracefulShutdown, Watcher},
    },
};
use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    crypto::ring::default_provider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
};
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::Semaphore,
};
use tokio_rustls::TlsAcceptor;
use warp::Filter;

use super::certs::Serving;

/// The serving certificate, replaced in place when the Secret changes: new handshakes get the
/// new one, open connections carry on.
#[derive(Debug, Default)]
pub struct Reloadable {
    current: RwLock<Option<Arc<CertifiedKey>>>,
}

impl ResolvesServerCert for Reloadable {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().expect("certificate lock").clone()
    }
}

impl Reloadable {
    /// Serves `serving`'s chain and key from the next handshake on.
    pub fn load(&self, serving: &Serving) -> Result<(), String> {
        let chain = CertificateDer::pem_slice_iter(serving.cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("tls.crt: {e}"))?;
        let key = PrivateKeyDer::from_pem_slice(serving.key.as_bytes())
            .map_err(|e| format!("tls.key: {e}"))?;
        // Also checks that the key is the certificate's.
        let certified = CertifiedKey::from_der(chain, key, &default_provider())
            .map_err(|e| format!("tls.crt and tls.key: {e}"))?;
        *self.current.write().expect("certificate lock") = Some(Arc::new(certified));
        Ok(())
    }

    pub fn is_loaded(&self) -> bool {
        self.current.read().expect("certificate lock").is_some()
    }
}

/// What one client can hold of the webhook's server.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// A connection that has not finished its TLS handshake by then is closed.
    pub handshake: Duration,
    /// Connections open at once; past it the server accepts no more until one closes (the
    /// API server keeps its own open: it multiplexes every call over HTTP/2).
    pub max_connections: usize,
    /// How long open connections get to finish their requests once the server stops.
    pub drain: Duration,
}

/// Who is at the other end of a connection, as its TLS handshake showed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// It presented a client certificate that the client CA (`--webhook-client-ca`) signed:
    /// the API server.
    Verified,
    /// It presented none: another replica, or anyone when no client CA is configured.
    Anonymous,
}

/// The server's TLS settings: the reloadable certificate and, with `client_ca` (PEM), a
/// request for a client certificate signed by it. A client without one may still connect
/// (replicas call the leader path without one); a client with one that does not verify may
/// not.
pub fn server_config(
    certs: Arc<Reloadable>,
    client_ca: Option<&str>,
) -> Result<Arc<ServerConfig>, String> {
    let provider = Arc::new(default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("ring supports TLS 1.2 and 1.3");
    let mut config = match client_ca {
        None => builder.with_no_client_auth().with_cert_resolver(certs),
        Some(pem) => {
            let roots = Arc::new(roots(pem)?);
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| e.to_string())?;
            builder
                .with_client_cert_verifier(verifier)
                .with_cert_resolver(certs)
        }
    };
    // HTTP/2 lets the API server multiplex its calls over one connection (no handshake per
    // call under load); HTTP/1.1 for everything else.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves `routes` over HTTPS on `listener` until `stop` ends; then accepts no more
/// connections, tells open ones to finish (HTTP/2 GOAWAY, HTTP/1.1 `Connection: close`) and
/// returns when they have, or after `limits.drain`. Each request carries its connection's
/// [`Peer`] as an extension.
pub async fn serve<F>(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    routes: F,
    limits: Limits,
    open: prometheus_client::metrics::gauge::Gauge,
    stop: impl Future<Output = ()>,
) where
    F: Filter + Clone + Send + Sync + 'static,
    F::Extract: warp::Reply,
{
    let acceptor = TlsAcceptor::from(config);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // A client that opens a connection and sends nothing keeps it only this long.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.handshake);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30));
    tokio::pin!(stop);
    loop {
        let permit = tokio::select! {
            _ = &mut stop => break,
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let (tcp, peer) = tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a webhook connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, builder, routes, open) = (
            acceptor.clone(),
            builder.clone(),
            routes.clone(),
            open.clone(),
        );
        // Taken now: a connection still in its handshake when the server stops is waited
        // for too, and told to finish as soon as it is served.
        let watcher = graceful.watcher();
        open.inc();
        tokio::spawn(async move {
            let _permit = permit;
            serve_one(tcp, peer, acceptor, builder, routes, limits, watcher).await;
            open.dec();
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "webhook connections still open after {}s; closing them",
            limits.drain.as_secs()
        );
    }
}

/// One connection: its TLS handshake (closed when it takes longer than the limit), then its
/// requests, each tagged with what the handshake showed of the client.
async fn serve_one<F>(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    builder: auto::Builder<TokioExecutor>,
    routes: F,
    limits: Limits,
    watcher: Watcher,
) where
    F: Filter + Clone + Send + Sync + 'static,
    F::Extract: warp::Reply,
{
    let tls = match tokio::time::timeout(limits.handshake, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "no TLS handshake in time; closing");
            return;
        }
    };
    let who = match tls.get_ref().1.peer_certificates() {
        Some(_) => Peer::Verified,
        None => Peer::Anonymous,
    };
    let filtered = warp::service(routes);
    let service = service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(who);
        tower_service::Service::call(&mut filtered.clone(), request)
    });
    let connection = builder.serve_connection(TokioIo::new(tls), service);
    if let Err(e) = watcher.watch(connection).await {
        tracing::debug!(%peer, error = %e, "webhook connection ended with an error");
    }
}

/// Listens on `addr` with a backlog that absorbs a burst of connections while the accept
/// loop catches up (the kernel caps it at `net.core.somaxconn`).
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// A pooled HTTPS client that trusts the webhook's CA bundle and checks the serving
/// certificate against the service name, whatever address it connects to.
pub struct Forwarder {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    pub ca_bundle: String,
}

impl Forwarder {
    pub fn new(ca_bundle: &str, server_name: &str) -> Result<Forwarder, String> {
        let roots = roots(ca_bundle).map_err(|e| format!("ca.crt: {e}"))?;
        let tls = ClientConfig::builder_with_provider(Arc::new(default_provider()))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = ServerName::try_from(server_name.to_string())
            .map_err(|e| format!("{server_name}: {e}"))?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        let https = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .with_server_name_resolver(FixedServerNameResolver::new(name))
            .enable_http1()
            .wrap_connector(http);
        Ok(Forwarder {
            client: Client::builder(TokioExecutor::new()).build(https),
            ca_bundle: ca_bundle.to_string(),
        })
    }

    /// POSTs `body` to `https://<endpoint><path>` with the peer signature `signed` and
    /// returns the answer's body, if it comes `within` that time (which the leader is told).
    pub async fn post(
        &self,
        endpoint: &str,
        path: &str,
        body: Bytes,
        signed: &str,
        within: Duration,
    ) -> Result<Bytes, String> {
        let request = hyper::Request::post(format!("https://{endpoint}{path}"))
            .header("content-type", "application/json")
            .header(super::peer::HEADER, signed)
            .header(
                super::forward::ANSWER_WITHIN,
                within.as_millis().to_string(),
            )
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        let call = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| format!("{e:?}"))?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            match status.is_success() {
                true => Ok(body),
                false => Err(format!(
                    "HTTP {status}: {}",
                    String::from_utf8_lossy(&body).trim()
                )),
            }
        };
        tokio::time::timeout(within, call)
            .await
            .map_err(|_| format!("no answer within {}ms", within.as_millis()))?
    }
}

/// The certificates of a PEM bundle, as trust roots.
fn roots(pem: &str) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    match roots.is_empty() {
        true => Err("no certificate in it".into()),
        false => Ok(roots),
    }
}
