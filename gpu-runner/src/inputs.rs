//! Reading a job's start image (`spec.image`): a file below the model volume's root, or an
//! http(s) URL of a host the cluster allows (`--image-url-hosts`), within
//! [`MAX_IMAGE_BYTES`]. The admission rules ([`framelane_core::parameters::image_source`])
//! are checked again here, so a job that bypassed the webhook reads nothing it may not.

use std::path::{Path, PathBuf};
use std::time::Duration;

use framelane_core::parameters::{ImageSource, image_source};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder, builderstates::WantsSchemes};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;

use crate::image::MAX_IMAGE_BYTES;

/// How long fetching an image may take, connection included.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a start image could not be read. The message follows `spec.image` in the job's
/// status.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("{0}")]
    Refused(String),
    #[error("{path} does not exist in the model volume; put the image there or fix spec.image")]
    Missing { path: PathBuf },
    #[error("{path} leaves the model volume through a link; give the image's own path")]
    Escapes { path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("is larger than the {MAX_IMAGE_BYTES} bytes the runner takes")]
    TooLarge,
    #[error("cannot fetch {url}: {reason}")]
    Fetch { url: String, reason: String },
}

/// The bytes of the image `image` names.
pub async fn read_image(
    image: &str,
    models_dir: &Path,
    allowed_hosts: &[String],
) -> Result<Vec<u8>, InputError> {
    match image_source(image, allowed_hosts).map_err(InputError::Refused)? {
        ImageSource::Path(relative) => read_file(models_dir, relative).await,
        ImageSource::Url(url) => fetch(url).await,
    }
}

async fn read_file(models_dir: &Path, relative: &str) -> Result<Vec<u8>, InputError> {
    let path = models_dir.join(relative);
    let read = |source: std::io::Error| InputError::Read {
        path: path.clone(),
        source,
    };
    let resolved = match tokio::fs::canonicalize(&path).await {
        Ok(resolved) => resolved,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(InputError::Missing { path });
        }
        Err(e) => return Err(read(e)),
    };
    let root = tokio::fs::canonicalize(models_dir).await.map_err(read)?;
    if !resolved.starts_with(&root) {
        return Err(InputError::Escapes { path });
    }
    let size = tokio::fs::metadata(&resolved).await.map_err(read)?.len();
    if size > MAX_IMAGE_BYTES as u64 {
        return Err(InputError::TooLarge);
    }
    tokio::fs::read(&resolved).await.map_err(read)
}

/// GETs `url` without following redirects (they could lead to a host not allowed).
async fn fetch(url: &str) -> Result<Vec<u8>, InputError> {
    let failed = |reason: String| InputError::Fetch {
        url: url.to_owned(),
        reason,
    };
    let uri: hyper::Uri = url.parse().map_err(|e| failed(format!("{e}")))?;
    let client = Client::builder(TokioExecutor::new());
    let get = async {
        let response = if uri.scheme() == Some(&hyper::http::uri::Scheme::HTTPS) {
            client
                .build::<_, Empty<Bytes>>(https().map_err(|e| failed(e.to_string()))?)
                .get(uri)
                .await
        } else {
            client.build_http::<Empty<Bytes>>().get(uri).await
        }
        .map_err(|e| failed(e.to_string()))?;
        let status = response.status();
        if !status.is_success() {
            return Err(failed(format!(
                "the server answered {status}{}",
                if status.is_redirection() {
                    " (redirects are not followed: give the image's final URL)"
                } else {
                    ""
                }
            )));
        }
        let body = Limited::new(response.into_body(), MAX_IMAGE_BYTES)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    InputError::TooLarge
                } else {
                    failed(e.to_string())
                }
            })?;
        Ok(body.to_bytes().to_vec())
    };
    tokio::time::timeout(FETCH_TIMEOUT, get)
        .await
        .map_err(|_| failed(format!("no answer within {} s", FETCH_TIMEOUT.as_secs())))?
}

/// A TLS connector that trusts the system's CA certificates (`ca-certificates`, with any the
/// cluster's image adds), else, in an image without them (the runner's base has none), the
/// Mozilla roots built into the runner.
fn https() -> Result<HttpsConnector<HttpConnector>, rustls::Error> {
    let provider = rustls::crypto::ring::default_provider;
    https_from(HttpsConnectorBuilder::new().with_provider_and_native_roots(provider()))
}

/// [`https`], given what loading the system's CA certificates gave.
fn https_from(
    native: std::io::Result<HttpsConnectorBuilder<WantsSchemes>>,
) -> Result<HttpsConnector<HttpConnector>, rustls::Error> {
    let builder = match native {
        Ok(native) => native,
        Err(_) => HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())?,
    };
    Ok(builder.https_only().enable_http1().build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn paths_are_read_inside_the_volume_only() {
        let volume = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir(volume.path().join("inputs")).unwrap();
        std::fs::write(volume.path().join("inputs/a.png"), b"png bytes").unwrap();
        std::fs::write(outside.path().join("secret"), b"secret").unwrap();
        std::os::unix::fs::symlink(
            outside.path().join("secret"),
            volume.path().join("inputs/link.png"),
        )
        .unwrap();
        let read = |image: &'static str| read_image(image, volume.path(), &[]);
        assert_eq!(read("inputs/a.png").await.unwrap(), b"png bytes");
        assert!(matches!(
            read("inputs/b.png").await,
            Err(InputError::Missing { .. })
        ));
        assert!(matches!(
            read("inputs/link.png").await,
            Err(InputError::Escapes { .. })
        ));
        assert!(matches!(
            read("../x.png").await,
            Err(InputError::Refused(_))
        ));
        let url = read("https://example.com/a.png").await.unwrap_err();
        assert!(url.to_string().starts_with("URLs are not allowed"), "{url}");
    }

    #[tokio::test]
    async fn a_url_is_fetched_and_a_redirect_is_not_followed() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            for answer in [
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nimage",
                "HTTP/1.1 302 Found\r\nLocation: http://169.254.169.254/\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            ] {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut request = [0u8; 1024];
                let _ = socket.read(&mut request).await.unwrap();
                socket.write_all(answer.as_bytes()).await.unwrap();
            }
        });
        let hosts = ["127.0.0.1".to_owned()];
        let url = format!("http://127.0.0.1:{port}/a.png");
        let dir = Path::new("/nonexistent");
        assert_eq!(read_image(&url, dir, &hosts).await.unwrap(), b"image");
        let err = read_image(&url, dir, &hosts).await.unwrap_err();
        assert!(
            err.to_string()
                .contains("answered 302 Found (redirects are not followed"),
            "{err}"
        );
    }

    #[test]
    fn an_image_without_ca_certificates_still_fetches_over_https() {
        // What rustls-native-certs answers in the runner's base image (no ca-certificates).
        let none = std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no native root CA certificates found",
        );
        assert!(https_from(Err(none)).is_ok());
    }
}
