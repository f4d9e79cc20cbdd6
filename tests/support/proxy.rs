//! A fault-injecting TCP proxy on loopback, to put between backends and Redis: it passes bytes
//! through, or swallows them in both directions while keeping every connection open (a
//! half-open connection, as a NAT or proxy that dropped it silently makes), or only the replies
//! (commands run, their callers never hear), or resets every connection at once.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

/// A running proxy to `127.0.0.1:<upstream port>`; dropped, it closes everything.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    blackhole: Arc<AtomicBool>,
    replies_muted: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    acceptor: JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy to the server on `upstream_port`, on the current runtime.
    pub async fn start(upstream_port: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a free port");
        let addr = listener.local_addr().unwrap();
        let blackhole = Arc::new(AtomicBool::new(false));
        let replies_muted = Arc::new(AtomicBool::new(false));
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let acceptor = tokio::spawn({
            let (blackhole, replies_muted, connections) = (
                Arc::clone(&blackhole),
                Arc::clone(&replies_muted),
                Arc::clone(&connections),
            );
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream_port)).await else {
                        continue;
                    };
                    let pump = tokio::spawn(pump(
                        client,
                        server,
                        Arc::clone(&blackhole),
                        Arc::clone(&replies_muted),
                    ));
                    connections.lock().unwrap().push(pump);
                }
            }
        });
        Self {
            addr,
            blackhole,
            replies_muted,
            connections,
            acceptor,
        }
    }

    /// `redis://127.0.0.1:<proxy port>`.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Swallows every byte from now on, both ways, on open and new connections alike.
    pub fn blackhole(&self) {
        self.blackhole.store(true, Ordering::SeqCst);
    }

    /// Swallows the server's bytes from now on, passing the client's: commands still run.
    pub fn mute_replies(&self) {
        self.replies_muted.store(true, Ordering::SeqCst);
    }

    /// Passes bytes through again, both ways.
    pub fn pass(&self) {
        self.blackhole.store(false, Ordering::SeqCst);
        self.replies_muted.store(false, Ordering::SeqCst);
    }

    /// Closes every open connection at once; new ones are accepted.
    pub fn reset(&self) {
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.acceptor.abort();
        self.reset();
    }
}

/// Copies bytes both ways until either side closes, swallowing them while `blackhole` is set,
/// and the server's while `replies_muted` is.
async fn pump(
    client: TcpStream,
    server: TcpStream,
    blackhole: Arc<AtomicBool>,
    replies_muted: Arc<AtomicBool>,
) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let up = {
        let blackhole = Arc::clone(&blackhole);
        async move {
            let mut buffer = vec![0; 16 * 1024];
            while let Ok(read) = client_read.read(&mut buffer).await {
                if read == 0 {
                    break;
                }
                if !blackhole.load(Ordering::SeqCst)
                    && server_write.write_all(&buffer[..read]).await.is_err()
                {
                    break;
                }
            }
        }
    };
    let down = async move {
        let mut buffer = vec![0; 16 * 1024];
        while let Ok(read) = server_read.read(&mut buffer).await {
            if read == 0 {
                break;
            }
            if !blackhole.load(Ordering::SeqCst)
                && !replies_muted.load(Ordering::SeqCst)
                && client_write.write_all(&buffer[..read]).await.is_err()
            {
                break;
            }
        }
    };
    tokio::select! {
        () = up => {}
        () = down => {}
    }
}
