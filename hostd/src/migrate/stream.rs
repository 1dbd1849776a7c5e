//! Carrying a migration stream between two VMMs' unix sockets over TCP,
//! and a migrating instance's `/tmp` disk export between hosts.
//!
//! Every such connection is mutual TLS (both hosts present a certificate
//! of the cluster's CA) and then opens with a one-use ticket the port's
//! host handed out through its API. A connection that fails either check
//! (no certificate, another CA's, a wrong ticket, nothing sent in time) is
//! closed and the port goes on waiting for the right peer, so a stranger
//! can neither feed a VM in, read a disk, nor end a migration by
//! connecting first.

use std::path::PathBuf;
use std::time::Duration;

use ember_tls::{Tls, MAX_HANDSHAKES};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use ember_tls::tokio_rustls::{self, server::TlsStream};

/// Why a stream or a peer's connection failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The TCP connection or TLS handshake (the TLS layer's account).
    #[error("{0}")]
    Tls(String),
    #[error("sending the ticket to {addr}: {error}")]
    SendTicket {
        addr: String,
        #[source]
        error: std::io::Error,
    },
    #[error("sent no ticket")]
    NoTicket,
    #[error("reading the ticket: {0}")]
    ReadTicket(#[source] std::io::Error),
    #[error("sent a wrong ticket")]
    WrongTicket,
    #[error("no peer with the ticket connected within {0:?}")]
    NoPeer(Duration),
    #[error("the receiving VMM at {}: {error}", socket.display())]
    ReceivingVmm {
        socket: PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[error("the VMM did not open its migration stream")]
    VmmSilent,
    #[error("accepting the VMM's stream: {0}")]
    AcceptVmm(#[source] std::io::Error),
    /// The stream broke while it was carried (on the destination).
    #[error("migration stream: {0}")]
    Carry(#[source] std::io::Error),
    /// The stream to `addr` broke while it was carried (on the source).
    #[error("migration stream to {addr}: {error}")]
    CarryTo {
        addr: String,
        #[source]
        error: std::io::Error,
    },
}

/// A ticket's length in bytes (hex of 16 random bytes).
pub const TICKET_LEN: usize = 32;

/// Longest wait for a connection's ticket after its handshake.
const TICKET_WAIT: Duration = Duration::from_secs(10);

pub fn new_ticket() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Equal, in a time that does not depend on where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A port on another host guarded by a ticket: where to connect, and
/// with what.
#[derive(Debug, Clone)]
pub struct PeerTarget {
    /// `HOST:PORT`.
    pub addr: String,
    pub ticket: String,
    pub tls: Tls,
}

impl PeerTarget {
    /// Connects, checks the host's certificate, sends the ticket.
    pub async fn connect(&self) -> Result<tokio_rustls::client::TlsStream<TcpStream>, StreamError> {
        let mut s = self
            .tls
            .connect(&self.addr, Duration::from_secs(10))
            .await
            .map_err(StreamError::Tls)?;
        let sent = match s.write_all(self.ticket.as_bytes()).await {
            Ok(()) => s.flush().await,
            Err(e) => Err(e),
        };
        sent.map_err(|error| StreamError::SendTicket {
            addr: self.addr.clone(),
            error,
        })?;
        Ok(s)
    }
}

/// One connection's checks: the TLS handshake (a certificate of the CA),
/// then the ticket.
async fn check(
    tls: Tls,
    ticket: String,
    tcp: TcpStream,
) -> Result<TlsStream<TcpStream>, StreamError> {
    let mut s = tls.accept(tcp).await.map_err(StreamError::Tls)?;
    let mut got = [0u8; TICKET_LEN];
    tokio::time::timeout(TICKET_WAIT, s.read_exact(&mut got))
        .await
        .map_err(|_| StreamError::NoTicket)?
        .map_err(StreamError::ReadTicket)?;
    if !same(&got, ticket.as_bytes()) {
        return Err(StreamError::WrongTicket);
    }
    Ok(s)
}

/// Accepts connections on `listener` until one passes [`check`], within
/// `wait`; the others are closed as they fail (logged), and those still
/// being checked when one passes are dropped.
pub async fn accept_peer(
    listener: &TcpListener,
    tls: &Tls,
    ticket: &str,
    wait: Duration,
) -> Result<TlsStream<TcpStream>, StreamError> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut pending = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, peer)) if pending.len() < MAX_HANDSHAKES => {
                    let (tls, ticket) = (tls.clone(), ticket.to_string());
                    pending.spawn(async move {
                        check(tls, ticket, tcp).await.map_err(|e| (peer, e))
                    });
                }
                Ok((_, peer)) => log::warn!("too many connections being checked; {peer} closed"),
                Err(e) => {
                    log::warn!("accepting: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(r) = pending.join_next(), if !pending.is_empty() => match r {
                Ok(Ok(s)) => return Ok(s),
                Ok(Err((peer, e))) => log::warn!("refused a connection: {peer} {e}"),
                Err(e) => log::warn!("checking a connection: {e}"),
            },
            _ = tokio::time::sleep_until(deadline) => {
                return Err(StreamError::NoPeer(wait));
            }
        }
    }
}

/// Destination: waits on `listener` (up to `wait`) for the source's
/// connection with `ticket`, then joins it to the VMM listening on
/// `vmm_socket` until either side ends.
pub async fn serve_incoming(
    listener: TcpListener,
    ticket: String,
    vmm_socket: PathBuf,
    wait: Duration,
    tls: Tls,
) -> Result<(), StreamError> {
    let mut tcp = accept_peer(&listener, &tls, &ticket, wait).await?;
    drop(listener);
    let mut vmm = match UnixStream::connect(&vmm_socket).await {
        Ok(s) => s,
        Err(error) => {
            return Err(StreamError::ReceivingVmm {
                socket: vmm_socket,
                error,
            })
        }
    };
    tokio::io::copy_bidirectional(&mut tcp, &mut vmm)
        .await
        .map(|_| ())
        .map_err(StreamError::Carry)
}

/// Source: accepts the VMM's connection on `listener` and joins it to the
/// destination's port. A destination that cannot be reached ends the
/// VMM's connection, which fails the migration (and the source VM runs
/// on).
pub async fn serve_outgoing(
    listener: UnixListener,
    dest: PeerTarget,
    wait: Duration,
) -> Result<(), StreamError> {
    let (mut vmm, _) = tokio::time::timeout(wait, listener.accept())
        .await
        .map_err(|_| StreamError::VmmSilent)?
        .map_err(StreamError::AcceptVmm)?;
    let mut tcp = dest.connect().await?;
    tokio::io::copy_bidirectional(&mut vmm, &mut tcp)
        .await
        .map(|_| ())
        .map_err(|error| StreamError::CarryTo {
            addr: dest.addr.clone(),
            error,
        })
}

/// Source of a disk: serves every connection on `listener` that passes
/// [`check`] with `ticket` by joining it to the unix socket `to` (the
/// export), until aborted. Others are closed; the port goes on.
pub async fn serve_checked(listener: TcpListener, tls: Tls, ticket: String, to: PathBuf) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                log::warn!("disk export: accepting: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            log::warn!("disk export: too many connections; {peer} closed");
            continue;
        };
        let (tls, ticket, to) = (tls.clone(), ticket.clone(), to.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let mut s = match check(tls, ticket, tcp).await {
                Ok(s) => s,
                Err(e) => {
                    log::warn!("disk export: refused {peer}: {e}");
                    return;
                }
            };
            match UnixStream::connect(&to).await {
                Ok(mut u) => {
                    let _ = tokio::io::copy_bidirectional(&mut s, &mut u).await;
                }
                Err(e) => log::warn!("disk export {}: {e}", to.display()),
            }
        });
    }
}

/// Destination of a disk: joins each connection the VMM makes on
/// `listener` (in its jail) to `target`, until aborted.
pub async fn forward_to_peer(listener: UnixListener, target: PeerTarget) {
    loop {
        let Ok((mut vmm, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let target = target.clone();
        tokio::spawn(async move {
            match target.connect().await {
                Ok(mut s) => {
                    if let Err(e) = tokio::io::copy_bidirectional(&mut vmm, &mut s).await {
                        log::debug!("connection to {} ended: {e}", target.addr);
                    }
                }
                Err(e) => log::warn!("{e}"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_tls::dev_certs;

    /// Two hosts' identities of one CA, and a stranger's certificate of
    /// another CA (trusting the hosts' CA, so that it gets to present it).
    fn identities(dir: &std::path::Path) -> (Tls, Tls, Tls) {
        let names = ["127.0.0.1".to_string()];
        let load =
            |d: &std::path::Path, n: &str| Tls::load(&dev_certs(d, n, &names).unwrap()).unwrap();
        let mut stranger = dev_certs(&dir.join("other-ca"), "stranger", &names).unwrap();
        stranger.ca = dir.join("ca/ca.pem");
        (
            load(&dir.join("ca"), "a"),
            load(&dir.join("ca"), "b"),
            Tls::load(&stranger).unwrap(),
        )
    }

    /// What a stranger's connection to `addr` reads (after sending a
    /// ticket), or why it got nothing. A TLS alert alone (the answer to
    /// plain bytes at a TLS port) is nothing.
    async fn stranger(addr: &str, how: &str, other: &Tls, ours: &Tls) -> Result<usize, String> {
        let mut buf = vec![0u8; 64];
        let read = match how {
            "plain" => {
                let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
                s.write_all(new_ticket().as_bytes())
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::time::timeout(Duration::from_secs(15), s.read(&mut buf)).await
            }
            "other CA" | "wrong ticket" => {
                let tls = if how == "other CA" { other } else { ours };
                let target = PeerTarget {
                    addr: addr.into(),
                    ticket: new_ticket(),
                    tls: tls.clone(),
                };
                let mut s = target.connect().await.map_err(|e| e.to_string())?;
                tokio::time::timeout(Duration::from_secs(15), s.read(&mut buf)).await
            }
            _ => unreachable!(),
        };
        match read {
            Ok(Ok(0)) => Err("closed".into()),
            Ok(Ok(n)) if how == "plain" && buf[0] == 0x15 && n <= 7 => {
                Err(format!("a TLS alert ({n} bytes), closed"))
            }
            Ok(Ok(n)) => Ok(n),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer".into()),
        }
    }

    /// A stream through both ends arrives whole, inside TLS; strangers
    /// before it (plain TCP, another CA's certificate, a wrong ticket, a
    /// silent connection) are closed and do not end the wait.
    #[tokio::test]
    async fn streams_pass_with_their_ticket_only() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, other) = identities(dir.path());
        let vmm_in = dir.path().join("in.sock");
        let vmm_out = dir.path().join("out.sock");
        let dest_vmm = UnixListener::bind(&vmm_in).unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap().to_string();
        let ticket = new_ticket();
        let (t2, vin, b2) = (ticket.clone(), vmm_in.clone(), b.clone());
        let dest =
            tokio::spawn(
                async move { serve_incoming(tcp, t2, vin, Duration::from_secs(60), b2).await },
            );
        let _silent = TcpStream::connect(&addr).await.unwrap();
        let mut through = 0;
        for how in ["plain", "other CA", "wrong ticket"] {
            let r = stranger(&addr, how, &other, &a).await;
            eprintln!("stranger ({how}): {r:?}");
            through += usize::from(r.is_ok());
        }
        assert_eq!(through, 0);
        let src_listener = UnixListener::bind(&vmm_out).unwrap();
        let target = PeerTarget {
            addr: addr.clone(),
            ticket,
            tls: a.clone(),
        };
        let src = tokio::spawn(serve_outgoing(src_listener, target, Duration::from_secs(5)));
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let p2 = payload.clone();
        let sender = tokio::spawn(async move {
            let mut s = UnixStream::connect(&vmm_out).await.unwrap();
            s.write_all(&p2).await.unwrap();
            s.shutdown().await.unwrap();
            let mut back = Vec::new();
            s.read_to_end(&mut back).await.unwrap();
            back
        });
        let (mut conn, _) = dest_vmm.accept().await.unwrap();
        let mut got = Vec::new();
        conn.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, payload);
        conn.write_all(b"loaded").await.unwrap();
        drop(conn);
        assert_eq!(sender.await.unwrap(), b"loaded");
        dest.await.unwrap().unwrap();
        src.await.unwrap().unwrap();

        // Nobody with the ticket: the wait ends, saying so.
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap().to_string();
        let dest = tokio::spawn(async move {
            serve_incoming(tcp, new_ticket(), vmm_in, Duration::from_secs(3), b).await
        });
        assert!(stranger(&addr, "wrong ticket", &other, &a).await.is_err());
        let err = dest.await.unwrap().unwrap_err().to_string();
        assert!(err.contains("no peer with the ticket"), "{err}");
    }

    /// A disk export's port serves the peer with the ticket, as often as
    /// it connects, and nobody else.
    #[tokio::test]
    async fn exports_serve_their_ticket_only() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, other) = identities(dir.path());
        let sock = dir.path().join("export.sock");
        let export = UnixListener::bind(&sock).unwrap();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = export.accept().await {
                tokio::spawn(async move {
                    let _ = c.write_all(b"NBDMAGIC").await;
                    let mut sink = Vec::new();
                    let _ = c.read_to_end(&mut sink).await;
                });
            }
        });
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap().to_string();
        let ticket = new_ticket();
        let task = tokio::spawn(serve_checked(tcp, a.clone(), ticket.clone(), sock));
        let mut through = 0;
        for how in ["plain", "other CA", "wrong ticket"] {
            let r = stranger(&addr, how, &other, &b).await;
            eprintln!("stranger ({how}): {r:?}");
            through += usize::from(r.is_ok());
        }
        assert_eq!(through, 0);
        let fill = dir.path().join("fill.sock");
        let l = UnixListener::bind(&fill).unwrap();
        let fwd = tokio::spawn(forward_to_peer(
            l,
            PeerTarget {
                addr,
                ticket,
                tls: b,
            },
        ));
        for _ in 0..2 {
            let mut c = UnixStream::connect(&fill).await.unwrap();
            let mut got = [0u8; 8];
            c.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"NBDMAGIC");
        }
        fwd.abort();
        task.abort();
    }
}
