//! Mutual TLS between Ember's hosts, the cluster and the volume service:
//! emberd's TCP API, the migration streams between hosts, the `/tmp` disk
//! exports and NBD to the volume service across hosts all run inside TLS where both ends present a certificate signed by the
//! cluster's CA (`--tls-cert`, `--tls-key`, `--tls-ca`). A peer without
//! one, or with one from another CA, or expired, does not get past the
//! handshake. `dev_certs` makes a CA and a certificate for development
//! and tests (`--tls-dev-dir`).

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use rcgen;
pub use rustls;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
pub use tokio_rustls;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Longest a TLS handshake may take, either side.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes in progress at once on one listener; connections beyond
/// are closed at once (so strangers cannot pile up sockets).
pub const MAX_HANDSHAKES: usize = 64;

/// The PEM files of a host's (or the cluster's) TLS identity.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The certificate chain (leaf first).
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA that signs every peer's certificate.
    pub ca: PathBuf,
}

/// Server and client settings of one identity, both requiring the peer's
/// certificate to chain to the CA.
#[derive(Clone)]
pub struct Tls {
    pub server: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls { .. }")
    }
}

/// The cryptography: rustls's `ring` provider (no C toolchain for
/// aws-lc-rs needed). rustls 0.23.48 marks it deprecated because it has no
/// post-quantum key exchange; key exchange is X25519/ECDHE, which is what
/// every peer here supports.
#[allow(deprecated)]
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

impl Tls {
    /// Loads the identity in `files`.
    pub fn load(files: &TlsFiles) -> Result<Tls, String> {
        let certs = read_certs(&files.cert)?;
        let key = PrivateKeyDer::from_pem_file(&files.key)
            .map_err(|e| format!("{}: {e}", files.key.display()))?;
        let mut roots = RootCertStore::empty();
        for c in read_certs(&files.ca)? {
            roots
                .add(c)
                .map_err(|e| format!("{}: {e}", files.ca.display()))?;
        }
        Tls::new(certs, key, roots)
    }

    /// The identity `certs` (leaf first) with `key`, trusting `roots`.
    pub fn new(
        certs: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: RootCertStore,
    ) -> Result<Tls, String> {
        let roots = Arc::new(roots);
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| format!("client certificate verifier: {e}"))?;
        let server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs.clone(), key.clone_key())
            .map_err(|e| format!("the certificate and key: {e}"))?;
        let client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .map_err(|e| format!("the certificate and key: {e}"))?;
        Ok(Tls {
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.server.clone())
    }

    pub fn connector(&self) -> TlsConnector {
        TlsConnector::from(self.client.clone())
    }

    /// Opens TCP to `addr` (`HOST:PORT`, `[V6]:PORT`) and does the TLS
    /// handshake, checking the server's certificate for `HOST`; each step
    /// within `timeout`.
    pub async fn connect(
        &self,
        addr: &str,
        timeout: Duration,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
        let name = server_name(addr)?;
        let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| format!("connecting to {addr} timed out"))?
            .map_err(|e| format!("connecting to {addr}: {e}"))?;
        tcp.set_nodelay(true).ok();
        tokio::time::timeout(timeout, self.connector().connect(name, tcp))
            .await
            .map_err(|_| format!("TLS handshake with {addr} timed out"))?
            .map_err(|e| format!("TLS handshake with {addr}: {e}"))
    }

    /// The server's side of the handshake on `tcp`, within
    /// [`HANDSHAKE_TIMEOUT`].
    pub async fn accept(
        &self,
        tcp: TcpStream,
    ) -> Result<tokio_rustls::server::TlsStream<TcpStream>, String> {
        tcp.set_nodelay(true).ok();
        tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor().accept(tcp))
            .await
            .map_err(|_| "TLS handshake timed out".to_string())?
            .map_err(|e| format!("TLS handshake: {e}"))
    }
}

/// A TLS stream over a blocking std `TcpStream`, server side.
pub type SyncServerStream = rustls::StreamOwned<rustls::ServerConnection, std::net::TcpStream>;
/// A TLS stream over a blocking std `TcpStream`, client side.
pub type SyncClientStream = rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>;

/// Drives `conn`'s handshake on the blocking `tcp` to its end, every read
/// and write bounded by what is left of `deadline`. The socket's timeouts
/// are left as they were before (none, if the caller set none).
fn handshake_sync<C, D>(
    conn: &mut C,
    tcp: &mut std::net::TcpStream,
    deadline: Instant,
) -> Result<(), String>
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<D>>,
    D: rustls::SideData,
{
    let (rt, wt) = (tcp.read_timeout(), tcp.write_timeout());
    let done = (|| {
        while conn.is_handshaking() || conn.wants_write() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("TLS handshake timed out".to_string());
            }
            tcp.set_read_timeout(Some(left))
                .map_err(|e| e.to_string())?;
            tcp.set_write_timeout(Some(left))
                .map_err(|e| e.to_string())?;
            match conn.complete_io(tcp) {
                Ok((0, 0)) if conn.is_handshaking() && !conn.wants_write() => {
                    return Err("TLS handshake: the peer closed the connection".to_string())
                }
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err("TLS handshake timed out".to_string())
                }
                Err(e) => return Err(format!("TLS handshake: {e}")),
            }
        }
        Ok(())
    })();
    if let (Ok(rt), Ok(wt)) = (rt, wt) {
        let _ = tcp.set_read_timeout(rt);
        let _ = tcp.set_write_timeout(wt);
    }
    done
}

impl Tls {
    /// The server's side of the handshake on a blocking `tcp` (for
    /// threaded servers), done by `deadline`: the client must present a
    /// certificate chaining to the CA.
    pub fn accept_sync(
        &self,
        mut tcp: std::net::TcpStream,
        deadline: Instant,
    ) -> Result<SyncServerStream, String> {
        let mut conn =
            rustls::ServerConnection::new(self.server.clone()).map_err(|e| format!("TLS: {e}"))?;
        handshake_sync(&mut conn, &mut tcp, deadline)?;
        Ok(rustls::StreamOwned::new(conn, tcp))
    }

    /// The client's side of the handshake on a blocking `tcp`, done by
    /// `deadline`, checking that the server's certificate names `name`.
    pub fn connect_sync(
        &self,
        name: ServerName<'static>,
        mut tcp: std::net::TcpStream,
        deadline: Instant,
    ) -> Result<SyncClientStream, String> {
        let mut conn = rustls::ClientConnection::new(self.client.clone(), name)
            .map_err(|e| format!("TLS: {e}"))?;
        handshake_sync(&mut conn, &mut tcp, deadline)?;
        Ok(rustls::StreamOwned::new(conn, tcp))
    }
}

/// The name a server at `addr` (`HOST:PORT`) must have in its certificate.
pub fn server_name(addr: &str) -> Result<ServerName<'static>, String> {
    let host = match addr.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => h,
        _ => return Err(format!("{addr:?} is not HOST:PORT")),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).map_err(|e| format!("{addr:?}: {e}"))
}

/// A TLS listener for `axum::serve`: handshakes run in tasks of their own
/// (a slow or silent stranger holds up no one), within
/// [`HANDSHAKE_TIMEOUT`], at most [`MAX_HANDSHAKES`] at once; a failed
/// handshake is logged and closed, and the listener goes on.
pub struct TlsListener {
    rx: tokio::sync::mpsc::Receiver<(tokio_rustls::server::TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    pub fn new(listener: TcpListener, tls: &Tls) -> std::io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let tls = tls.clone();
        let task = tokio::spawn(async move {
            let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        log::warn!("tls listener {local}: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    log::warn!("tls listener {local}: too many handshakes; {peer} closed");
                    continue;
                };
                let (tls, tx) = (tls.clone(), tx.clone());
                tokio::spawn(async move {
                    let r = tls.accept(tcp).await;
                    drop(slot);
                    match r {
                        Ok(s) => {
                            let _ = tx.send((s, peer)).await;
                        }
                        Err(e) => log::info!("tls listener {local}: refused {peer}: {e}"),
                    }
                });
            }
        });
        Ok(TlsListener { rx, local, task })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accepting task is gone (it never ends on its own).
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// A file name made of `name` (other characters become `_`).
fn file_stem(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn write_private(path: &Path, data: &str, mode: u32) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    f.write_all(data.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

/// The development CA's parameters (the same each time: with the same key
/// the certificate it makes again is one that the stored one verifies).
pub fn dev_ca_params() -> rcgen::CertificateParams {
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "Ember development CA");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    p
}

/// A leaf certificate's parameters: `name` as its common name, `sans` (IP
/// addresses or DNS names) as its subject alternative names; good for
/// both ends of a connection.
pub fn leaf_params(name: &str, sans: &[String]) -> Result<rcgen::CertificateParams, String> {
    let mut p = rcgen::CertificateParams::new(sans.to_vec())
        .map_err(|e| format!("certificate names {sans:?}: {e}"))?;
    p.distinguished_name.push(rcgen::DnType::CommonName, name);
    p.is_ca = rcgen::IsCa::ExplicitNoCa;
    // (Key encipherment too: GnuTLS-based peers such as qemu insist on it.)
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::DigitalSignature,
        rcgen::KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    Ok(p)
}

/// Development certificates in `dir`: a CA (`ca.pem`, `ca-key.pem`), made
/// once and then kept, and a certificate for `name` (`NAME.pem`,
/// `NAME-key.pem`) for the names and addresses `sans`, made anew each
/// call. Several processes may share `dir` (a lock orders them). The CA's
/// key lies beside them: for development and tests only.
pub fn dev_certs(dir: &Path, name: &str, sans: &[String]) -> Result<TlsFiles, String> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let lock_path = dir.join(".lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| format!("{}: {e}", lock_path.display()))?;
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| format!("{}: {e}", lock_path.display()))?;
    let ca = dir.join("ca.pem");
    let ca_key_path = dir.join("ca-key.pem");
    let (ca_cert, ca_key) = if ca.exists() && ca_key_path.exists() {
        let pem = std::fs::read_to_string(&ca_key_path)
            .map_err(|e| format!("{}: {e}", ca_key_path.display()))?;
        let key = rcgen::KeyPair::from_pem(&pem)
            .map_err(|e| format!("{}: {e}", ca_key_path.display()))?;
        // The same name and key as the stored CA certificate: what this
        // signs chains to it.
        let cert = dev_ca_params()
            .self_signed(&key)
            .map_err(|e| format!("the development CA: {e}"))?;
        (cert, key)
    } else {
        let key = rcgen::KeyPair::generate().map_err(|e| format!("a CA key: {e}"))?;
        let cert = dev_ca_params()
            .self_signed(&key)
            .map_err(|e| format!("the development CA: {e}"))?;
        write_private(&ca_key_path, &key.serialize_pem(), 0o600)?;
        write_private(&ca, &cert.pem(), 0o644)?;
        (cert, key)
    };
    let key = rcgen::KeyPair::generate().map_err(|e| format!("a key: {e}"))?;
    let cert = leaf_params(name, sans)?
        .signed_by(&key, &ca_cert, &ca_key)
        .map_err(|e| format!("a certificate for {name}: {e}"))?;
    let stem = file_stem(name);
    let files = TlsFiles {
        cert: dir.join(format!("{stem}.pem")),
        key: dir.join(format!("{stem}-key.pem")),
        ca,
    };
    write_private(&files.key, &key.serialize_pem(), 0o600)?;
    write_private(&files.cert, &cert.pem(), 0o644)?;
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Ca {
        cert: rcgen::Certificate,
        key: rcgen::KeyPair,
    }

    fn ca(name: &str) -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = dev_ca_params();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        Ca {
            cert: p.self_signed(&key).unwrap(),
            key,
        }
    }

    fn roots(ca: &Ca) -> RootCertStore {
        let mut r = RootCertStore::empty();
        r.add(ca.cert.der().clone()).unwrap();
        r
    }

    /// An identity signed by `signer`, trusting `trust`.
    fn identity(signer: &Ca, trust: &Ca, expired: bool) -> Tls {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = leaf_params("peer", &["127.0.0.1".into(), "localhost".into()]).unwrap();
        if expired {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = p.signed_by(&key, &signer.cert, &signer.key).unwrap();
        let key = PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        Tls::new(vec![cert.der().clone()], key, roots(trust)).unwrap()
    }

    /// A client trusting `trust` without a certificate of its own.
    fn anonymous(trust: &Ca) -> Arc<ClientConfig> {
        Arc::new(
            ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots(trust))
                .with_no_client_auth(),
        )
    }

    /// Connects with `client`, sends a line and answers what came back
    /// (an error if the connection failed anywhere).
    async fn exchange(addr: SocketAddr, client: Arc<ClientConfig>) -> Result<Vec<u8>, String> {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let mut s = TlsConnector::from(client)
            .connect(server_name(&addr.to_string())?, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        s.write_all(b"ping\n").await.map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .map_err(|_| "no answer".to_string())?
            .map_err(|e| format!("read: {e}"))?;
        buf.truncate(n);
        if n == 0 {
            return Err("closed".into());
        }
        Ok(buf)
    }

    /// Peers with a certificate of the CA get through; no certificate,
    /// another CA's, an expired one, a client trusting another CA and
    /// plain HTTP are all refused, and the server goes on serving.
    #[tokio::test]
    async fn only_peers_with_the_cas_certificates_get_through() {
        let (ours, theirs) = (ca("ours"), ca("theirs"));
        let server = identity(&ours, &ours, false);
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let mut l = TlsListener::new(l, &server).unwrap();
        let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let s2 = served.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = axum::serve::Listener::accept(&mut l).await;
                s2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut b = [0u8; 5];
                    if s.read_exact(&mut b).await.is_ok() {
                        let _ = s.write_all(b"pong\n").await;
                        let _ = s.shutdown().await;
                    }
                });
            }
        });
        let good = identity(&ours, &ours, false).client;
        assert_eq!(exchange(addr, good.clone()).await.unwrap(), b"pong\n");

        // A silent connection holds up no one.
        let _silent = TcpStream::connect(addr).await.unwrap();
        let attempts: Vec<(&str, Arc<ClientConfig>)> = vec![
            ("no client certificate", anonymous(&ours)),
            (
                "a certificate of another CA",
                identity(&theirs, &ours, false).client,
            ),
            (
                "an expired certificate",
                identity(&ours, &ours, true).client,
            ),
            (
                "a client trusting another CA",
                identity(&theirs, &theirs, false).client,
            ),
        ];
        let mut got_through = 0;
        for (what, client) in attempts {
            let r = exchange(addr, client).await;
            eprintln!("{what}: {r:?}");
            if r.is_ok() {
                got_through += 1;
            }
        }
        // Plain HTTP to the TLS port: no HTTP answer, the connection ends.
        let mut plain = TcpStream::connect(addr).await.unwrap();
        plain
            .write_all(b"GET /ember/v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut back = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut back))
            .await
            .expect("the server closes a plain HTTP connection");
        assert!(!back.starts_with(b"HTTP/"), "{back:?}");
        eprintln!("plain HTTP: {} bytes back, closed", back.len());
        assert_eq!(got_through, 0);
        // Only the good peer reached the application; it still serves.
        assert_eq!(exchange(addr, good).await.unwrap(), b"pong\n");
        assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    /// Development certificates: one CA for every name made in a
    /// directory, which each name's certificate chains to.
    #[tokio::test]
    async fn dev_certs_share_one_ca() {
        let dir = tempfile::tempdir().unwrap();
        let a = dev_certs(dir.path(), "host-a", &["127.0.0.1".into()]).unwrap();
        let ca_before = std::fs::read(&a.ca).unwrap();
        let b = dev_certs(dir.path(), "host/b", &["127.0.0.1".into()]).unwrap();
        assert_eq!(std::fs::read(&b.ca).unwrap(), ca_before);
        assert!(b.cert.ends_with("host_b.pem"));
        let (ta, tb) = (Tls::load(&a).unwrap(), Tls::load(&b).unwrap());
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = l.accept().await.unwrap();
            let mut s = ta.accept(tcp).await.unwrap();
            let mut b = [0u8; 5];
            s.read_exact(&mut b).await.unwrap();
            s.write_all(b"pong\n").await.unwrap();
            s.shutdown().await.unwrap();
        });
        assert_eq!(exchange(addr, tb.client.clone()).await.unwrap(), b"pong\n");
        server.await.unwrap();
        assert!(Tls::load(&TlsFiles {
            cert: a.cert.clone(),
            key: a.key.clone(),
            ca: dir.path().join("missing.pem"),
        })
        .is_err());
    }

    /// The blocking handshakes: a peer of the CA gets through both ways;
    /// another CA's certificate and a silent peer are refused by the
    /// deadline, and the listener's next peer is served.
    #[test]
    fn blocking_handshakes_check_the_peer_and_keep_the_deadline() {
        use std::io::{Read, Write};
        let (ours, theirs) = (ca("ours"), ca("theirs"));
        let server = identity(&ours, &ours, false);
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let s2 = server.clone();
        let accepted = std::thread::spawn(move || {
            let mut out = Vec::new();
            for _ in 0..3 {
                let (tcp, _) = l.accept().unwrap();
                let deadline = Instant::now() + Duration::from_secs(2);
                out.push(match s2.accept_sync(tcp, deadline) {
                    Ok(mut s) => {
                        let mut b = [0u8; 4];
                        s.read_exact(&mut b).unwrap();
                        s.write_all(b"pong").unwrap();
                        s.flush().unwrap();
                        Ok(())
                    }
                    Err(e) => Err(e),
                });
            }
            out
        });
        let connect = |tls: &Tls| -> Result<Vec<u8>, String> {
            let tcp = std::net::TcpStream::connect(addr).unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut s = tls.connect_sync(server_name(&addr.to_string())?, tcp, deadline)?;
            s.write_all(b"ping").map_err(|e| e.to_string())?;
            let mut b = vec![0u8; 4];
            s.read_exact(&mut b).map_err(|e| e.to_string())?;
            Ok(b)
        };
        assert_eq!(connect(&identity(&ours, &ours, false)).unwrap(), b"pong");
        assert!(connect(&identity(&theirs, &ours, false)).is_err());
        let silent = std::net::TcpStream::connect(addr).unwrap();
        let out = accepted.join().unwrap();
        drop(silent);
        eprintln!("{out:?}");
        assert!(out[0].is_ok());
        assert!(out[1].is_err());
        assert!(out[2].as_ref().is_err_and(|e| e.contains("timed out")));
    }
}
