//! A TCP proxy in front of the API server that a test can stall or cut. Once frozen, every
//! connection through it stays open but nothing more passes either way, and new
//! connections are accepted and stall too (a hung network path, not a refused one). Once
//! cut, every connection through it is closed and new ones are closed at once (a partition
//! that clients notice), until restored.

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
    sync::{oneshot, watch},
};

pub struct StallProxy {
    pub port: u16,
    frozen: Arc<AtomicBool>,
    open: watch::Sender<bool>,
    /// Dropped with the proxy: its thread stops, closing every connection.
    _stop: oneshot::Sender<()>,
}

impl StallProxy {
    /// A proxy to the API server of `kubeconfig`; returns it and a copy of the kubeconfig
    /// that goes through it (written next to the original, under `name`).
    pub fn start(kubeconfig: &Path, name: &str) -> Result<(StallProxy, PathBuf)> {
        let mut config = kube::config::Kubeconfig::read_from(kubeconfig)?;
        let cluster = config
            .clusters
            .first_mut()
            .and_then(|c| c.cluster.as_mut())
            .context("the kubeconfig names no cluster")?;
        let server = cluster.server.as_deref().context("no server")?;
        // https://HOST:PORT[/...]
        let upstream = server
            .split_once("://")
            .map_or(server, |(_, rest)| rest)
            .split('/')
            .next()
            .unwrap_or_default()
            .to_string();
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        cluster.server = Some(format!("https://127.0.0.1:{port}"));
        let path = kubeconfig.with_file_name(name);
        // JSON is YAML: every kubeconfig reader takes it.
        std::fs::write(&path, serde_json::to_string(&config)?)?;
        let frozen = Arc::new(AtomicBool::new(false));
        let stalls = frozen.clone();
        let (open, opened) = watch::channel(true);
        let (stop, stopped) = oneshot::channel::<()>();
        // Its own thread and runtime: a test whose runtime is busy (or blocked) must not
        // slow down every connection of the processes behind the proxy.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::spawn(move || {
            runtime.block_on(async move {
                let Ok(listener) = TcpListener::from_std(listener) else {
                    return;
                };
                tokio::select! {
                    _ = stopped => {}
                    _ = serve(listener, upstream, stalls, opened) => {}
                }
            })
        });
        Ok((
            StallProxy {
                port,
                frozen,
                open,
                _stop: stop,
            },
            path,
        ))
    }

    /// From now on nothing passes; nothing is closed.
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    /// Lets everything held pass again, in order.
    pub fn thaw(&self) {
        self.frozen.store(false, Ordering::SeqCst);
    }

    /// Closes every connection through the proxy; new ones are closed at once until
    /// [`StallProxy::restore`].
    pub fn cut(&self) {
        self.open.send_replace(false);
    }

    /// Passes new connections again.
    pub fn restore(&self) {
        self.open.send_replace(true);
    }
}

/// Accepts connections and forwards each to `upstream` while `opened` says so; a connection
/// accepted while cut is closed at once, and cutting closes every open one.
async fn serve(
    listener: TcpListener,
    upstream: String,
    frozen: Arc<AtomicBool>,
    opened: watch::Receiver<bool>,
) {
    while let Ok((inbound, _)) = listener.accept().await {
        let mut state = opened.clone();
        if !*state.borrow() {
            continue;
        }
        let (frozen, upstream) = (frozen.clone(), upstream.clone());
        tokio::spawn(async move {
            let Ok(outbound) = TcpStream::connect(upstream).await else {
                return;
            };
            let (in_read, in_write) = inbound.into_split();
            let (out_read, out_write) = outbound.into_split();
            tokio::select! {
                _ = async {
                    tokio::join!(
                        pump(in_read, out_write, frozen.clone()),
                        pump(out_read, in_write, frozen)
                    )
                } => {}
                _ = state.wait_for(|open| !*open) => {}
            }
        });
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
