//! Carrying a migration stream between two VMMs' unix sockets over TCP.
//! The destination's port takes one connection, which must open with the
//! ticket the destination handed out (so a stranger cannot feed a VM in).

use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

/// A ticket's length in bytes (hex of 16 random bytes).
pub const TICKET_LEN: usize = 32;

pub fn new_ticket() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Destination: accepts one connection on `listener` within `wait`,
/// checks its ticket, and joins it to the VMM listening on `vmm_socket`
/// until either side ends.
pub async fn serve_incoming(
    listener: TcpListener,
    ticket: String,
    vmm_socket: PathBuf,
    wait: Duration,
) -> Result<(), String> {
    let (mut tcp, peer) = tokio::time::timeout(wait, listener.accept())
        .await
        .map_err(|_| format!("no migration stream arrived within {wait:?}"))?
        .map_err(|e| format!("accepting the migration stream: {e}"))?;
    drop(listener);
    let mut got = [0u8; TICKET_LEN];
    tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut got))
        .await
        .map_err(|_| format!("{peer} sent no ticket"))?
        .map_err(|e| format!("reading the ticket from {peer}: {e}"))?;
    if got != ticket.as_bytes() {
        return Err(format!("{peer} sent a wrong ticket"));
    }
    let mut vmm = UnixStream::connect(&vmm_socket)
        .await
        .map_err(|e| format!("the receiving VMM at {}: {e}", vmm_socket.display()))?;
    tcp.set_nodelay(true).ok();
    tokio::io::copy_bidirectional(&mut tcp, &mut vmm)
        .await
        .map(|_| ())
        .map_err(|e| format!("migration stream: {e}"))
}

/// Source: accepts the VMM's connection on `listener` and joins it to the
/// destination's `addr`, opened with `ticket`. A destination that cannot
/// be reached ends the VMM's connection, which fails the migration (and
/// the source VM runs on).
pub async fn serve_outgoing(
    listener: UnixListener,
    addr: String,
    ticket: String,
    wait: Duration,
) -> Result<(), String> {
    let (mut vmm, _) = tokio::time::timeout(wait, listener.accept())
        .await
        .map_err(|_| "the VMM did not open its migration stream".to_string())?
        .map_err(|e| format!("accepting the VMM's stream: {e}"))?;
    let mut tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(&addr))
        .await
        .map_err(|_| format!("connecting to {addr} timed out"))?
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    tcp.set_nodelay(true).ok();
    tcp.write_all(ticket.as_bytes())
        .await
        .map_err(|e| format!("sending the ticket to {addr}: {e}"))?;
    tokio::io::copy_bidirectional(&mut vmm, &mut tcp)
        .await
        .map(|_| ())
        .map_err(|e| format!("migration stream to {addr}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream through both ends arrives whole; a wrong ticket is refused
    /// before anything reaches the VMM.
    #[tokio::test]
    async fn streams_pass_with_their_ticket_only() {
        let dir = tempfile::tempdir().unwrap();
        let vmm_in = dir.path().join("in.sock");
        let vmm_out = dir.path().join("out.sock");
        let dest_vmm = UnixListener::bind(&vmm_in).unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap().to_string();
        let ticket = new_ticket();
        let t2 = ticket.clone();
        let vin = vmm_in.clone();
        let dest =
            tokio::spawn(async move { serve_incoming(tcp, t2, vin, Duration::from_secs(5)).await });
        let src_listener = UnixListener::bind(&vmm_out).unwrap();
        let src = tokio::spawn(serve_outgoing(
            src_listener,
            addr,
            ticket,
            Duration::from_secs(5),
        ));
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

        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let dest = tokio::spawn(async move {
            serve_incoming(tcp, new_ticket(), vmm_in, Duration::from_secs(5)).await
        });
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(new_ticket().as_bytes()).await.unwrap();
        let err = dest.await.unwrap().unwrap_err();
        assert!(err.contains("wrong ticket"), "{err}");
    }
}
