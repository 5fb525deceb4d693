//! HTTPS for the webhook: warp's service behind tokio-rustls (TLS 1.2 and 1.3), with a
//! certificate that can be swapped while connections stay open, and the client a replica
//! uses to hand a review to the leader.

use std::{
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_rustls::{FixedServerNameResolver, HttpsConnector, HttpsConnectorBuilder};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
    service::TowerToHyperService,
};
use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    crypto::ring::default_provider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::net::TcpListener;
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

/// Serves `routes` over HTTPS on `addr` until the process ends.
pub async fn serve<F>(addr: SocketAddr, certs: Arc<Reloadable>, routes: F) -> std::io::Result<()>
where
    F: Filter + Clone + Send + Sync + 'static,
    F::Extract: warp::Reply,
{
    let mut config = ServerConfig::builder_with_provider(Arc::new(default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("ring supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(certs);
    // HTTP/2 lets the API server multiplex its calls over one connection (no handshake per
    // call under load); HTTP/1.1 for everything else.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving the admission webhook over HTTPS");
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a webhook connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let service = TowerToHyperService::new(warp::service(routes.clone()));
        tokio::spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(tls) => tls,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
            };
            if let Err(e) = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), service)
                .await
            {
                tracing::debug!(%peer, error = %e, "webhook connection ended with an error");
            }
        });
    }
}

/// A pooled HTTPS client that trusts the webhook's CA bundle and checks the serving
/// certificate against the service name, whatever address it connects to.
pub struct Forwarder {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    pub ca_bundle: String,
}

impl Forwarder {
    pub fn new(ca_bundle: &str, server_name: &str) -> Result<Forwarder, String> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_bundle.as_bytes()) {
            let cert = cert.map_err(|e| format!("ca.crt: {e}"))?;
            roots.add(cert).map_err(|e| format!("ca.crt: {e}"))?;
        }
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

    /// POSTs `body` to `https://<endpoint><path>` and returns the answer's body.
    pub async fn post(&self, endpoint: &str, path: &str, body: Bytes) -> Result<Bytes, String> {
        let request = hyper::Request::post(format!("https://{endpoint}{path}"))
            .header("content-type", "application/json")
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        let call = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| format!("{e:?}"))?;
            if !response.status().is_success() {
                return Err(format!("HTTP {}", response.status()));
            }
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?;
            Ok(body.to_bytes())
        };
        tokio::time::timeout(Duration::from_secs(4), call)
            .await
            .map_err(|_| "no answer within 4s".to_string())?
    }
}
