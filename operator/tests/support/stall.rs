//! A TCP proxy in front of the API server that a test can stall: once frozen, every
//! connection through it stays open but nothing more passes either way, and new
//! connections are accepted and stall too (a hung network path, not a refused one).

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpListener, TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};

pub struct StallProxy {
    pub port: u16,
    frozen: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl StallProxy {
    /// A proxy to the API server of `kubeconfig`; returns it and a copy of the kubeconfig
    /// that goes through it (written next to the original, under `name`).
    pub async fn start(kubeconfig: &Path, name: &str) -> Result<(StallProxy, PathBuf)> {
        let mut config = kube::config::Kubeconfig::read_from(kubeconfig)?;
        let cluster = config
            .clusters
            .first_mut()
            .and_then(|c| c.cluster.as_mut())
            .context("the kubeconfig names no cluster")?;
        let server: hyper::Uri = cluster.server.as_deref().context("no server")?.parse()?;
        let upstream = (
            server.host().context("no host")?.to_string(),
            server.port_u16().unwrap_or(443),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        cluster.server = Some(format!("https://127.0.0.1:{port}"));
        let path = kubeconfig.with_file_name(name);
        std::fs::write(&path, serde_yaml::to_string(&config)?)?;

        let frozen = Arc::new(AtomicBool::new(false));
        let stalls = frozen.clone();
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let (frozen, upstream) = (stalls.clone(), upstream.clone());
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (in_read, in_write) = inbound.into_split();
                    let (out_read, out_write) = outbound.into_split();
                    tokio::join!(
                        pump(in_read, out_write, frozen.clone()),
                        pump(out_read, in_write, frozen)
                    );
                });
            }
        });
        Ok((StallProxy { port, frozen, task }, path))
    }

    /// From now on nothing passes; nothing is closed.
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    /// Lets everything held pass again, in order.
    pub fn thaw(&self) {
        self.frozen.store(false, Ordering::SeqCst);
    }
}

/// Copies `from` to `to`; while frozen, holds what it read instead of writing it (so the
/// sender soon blocks, as on a hung path).
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, frozen: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        while frozen.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while frozen.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

impl Drop for StallProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
