//! `ember-volumed`: Ember's volume service. Serves volumes over NBD
//! (`nbds://HOST:PORT/<volume>@<credential>`: TCP inside mutual TLS; or a
//! unix socket on the same host) and takes its
//! HTTP API on a unix socket; with `--vhost-user-dir`, also as vhost-user-blk
//! on a socket per attachment.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use ember_startup::fail;
use ember_volumed::api::{router, Service};
use ember_volumed::nbd::{Exports, Limits, Timeouts};
use ember_volumed::registry::Registry;
use ember_volumed::store::KvStore;
use ember_volumed::vhost_user::VhostUserServer;

/// Ember volume service: volumes over NBD and vhost-user-blk with fenced attachments.
#[derive(Debug, Parser)]
#[command(name = "ember-volumed", version)]
struct Args {
    /// Volume images and the state file.
    #[arg(long, default_value = "/var/lib/ember-volumes")]
    data_dir: PathBuf,
    /// The HTTP API socket.
    #[arg(long, default_value = "/run/ember/volumed.sock")]
    api_socket: PathBuf,
    /// NBD over TCP on this address (e.g. 0.0.0.0:10809). With TLS
    /// settings the port requires TLS (NBD_OPT_STARTTLS, then a client
    /// certificate signed by --tls-ca); without them only a loopback
    /// address is taken, unless --nbd-insecure-plaintext.
    #[arg(long)]
    nbd_listen: Option<String>,
    /// Serve --nbd-listen in the clear on a non-loopback address (anyone
    /// who can reach the port and knows an export's credential can use it,
    /// and the traffic can be read on the way).
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_dev_dir"])]
    nbd_insecure_plaintext: bool,
    /// This service's certificate (PEM, leaf first), signed by --tls-ca:
    /// presented to NBD clients, and as a client when copying a volume to
    /// another service's nbds:// port.
    #[arg(long, requires_all = ["tls_key", "tls_ca"], conflicts_with = "tls_dev_dir")]
    tls_cert: Option<PathBuf>,
    /// The key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The CA (PEM) that every NBD client's certificate must chain to.
    #[arg(long, requires = "tls_cert")]
    tls_ca: Option<PathBuf>,
    /// Development TLS: a CA in DIR (made once, shared with emberd's
    /// --tls-dev-dir) and a certificate for --tls-name. Not for production.
    #[arg(long, value_name = "DIR")]
    tls_dev_dir: Option<PathBuf>,
    /// The certificate's name with --tls-dev-dir.
    #[arg(long, default_value = "volumed", requires = "tls_dev_dir")]
    tls_name: String,
    /// The address clients are told to use (default: --nbd-listen).
    #[arg(long)]
    nbd_advertise: Option<String>,
    /// etcd endpoints (comma-separated) for the volume state, shared by the
    /// cluster; without them an embedded store in --data-dir.
    #[arg(long, value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    /// NBD on a unix socket.
    #[arg(long)]
    nbd_socket: Option<PathBuf>,
    /// Serve each attachment as vhost-user-blk on a socket in DIR whose
    /// name derives from the attachment's credential (DIR is made 0711:
    /// only who was told the name can connect).
    #[arg(long, value_name = "DIR")]
    vhost_user_dir: Option<PathBuf>,
    /// Open NBD connections at most, per listener.
    #[arg(long, default_value_t = 1024)]
    nbd_max_connections: usize,
    /// Open NBD connections at most per client (a TCP peer's address, a
    /// unix socket peer's uid), per listener.
    #[arg(long, default_value_t = 256)]
    nbd_max_connections_per_client: usize,
    /// A connection must finish the NBD handshake within this (ms).
    #[arg(long, default_value_t = 10_000)]
    nbd_handshake_timeout_ms: u64,
    /// A request's payload must arrive, and an answer be taken, within this (ms).
    #[arg(long, default_value_t = 60_000)]
    nbd_io_timeout_ms: u64,
    /// A connection without a request for this long is closed (ms; 0:
    /// never, the default, since a VMM's drive may be idle for hours).
    #[arg(long, default_value_t = 0)]
    nbd_idle_timeout_ms: u64,
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log_level: String,
}

/// Whether every address `addr` (`HOST:PORT`) names is a loopback one.
fn loopback_only(addr: &str) -> bool {
    use std::net::ToSocketAddrs;
    match addr.to_socket_addrs() {
        Ok(a) => {
            let a: Vec<_> = a.collect();
            !a.is_empty() && a.iter().all(|a| a.ip().is_loopback())
        }
        Err(_) => false,
    }
}

/// The host part of `HOST:PORT`.
fn host_of(addr: &str) -> Option<String> {
    let (h, _) = addr.rsplit_once(':')?;
    Some(h.trim_start_matches('[').trim_end_matches(']').to_string())
}

/// The TLS identity from the flags, if any.
fn tls_settings(args: &Args) -> Option<ember_tls::Tls> {
    let files = match (&args.tls_cert, &args.tls_dev_dir) {
        (None, None) => return None,
        (Some(cert), None) => ember_tls::TlsFiles {
            cert: cert.clone(),
            key: args.tls_key.clone().unwrap_or_default(),
            ca: args.tls_ca.clone().unwrap_or_default(),
        },
        (None, Some(dir)) => {
            let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
            for a in [&args.nbd_listen, &args.nbd_advertise]
                .into_iter()
                .flatten()
            {
                names.extend(host_of(a).filter(|h| !h.is_empty() && h != "0.0.0.0" && h != "::"));
            }
            names.sort();
            names.dedup();
            let files = ember_tls::dev_certs(dir, &args.tls_name, &names)
                .unwrap_or_else(|e| fail!("development certificates: {e}"));
            log::warn!(
                "--tls-dev-dir: using the development CA in {} (not for production)",
                dir.display()
            );
            files
        }
        (Some(_), Some(_)) => fail!("--tls-cert and --tls-dev-dir exclude each other"),
    };
    Some(ember_tls::Tls::load(&files).unwrap_or_else(|e| fail!("TLS: {e}")))
}

fn main() {
    let args = Args::parse();
    ember_startup::init_logging(&args.log_level);
    if args.nbd_listen.is_none() && args.nbd_socket.is_none() && args.vhost_user_dir.is_none() {
        fail!("give --nbd-listen ADDR, --nbd-socket PATH or --vhost-user-dir DIR (or several)");
    }
    let ms = |name: &str, v: u64| {
        if v == 0 {
            fail!("--{name} must be more than 0");
        }
        std::time::Duration::from_millis(v)
    };
    if args.nbd_max_connections == 0 || args.nbd_max_connections_per_client == 0 {
        fail!("--nbd-max-connections and --nbd-max-connections-per-client must be more than 0");
    }
    let limits = Limits {
        total: args.nbd_max_connections,
        per_client: args.nbd_max_connections_per_client,
        timeouts: Timeouts {
            handshake: ms("nbd-handshake-timeout-ms", args.nbd_handshake_timeout_ms),
            io: ms("nbd-io-timeout-ms", args.nbd_io_timeout_ms),
            idle: (args.nbd_idle_timeout_ms > 0)
                .then(|| std::time::Duration::from_millis(args.nbd_idle_timeout_ms)),
        },
    };
    let tls = tls_settings(&args);
    if let (Some(addr), None, false) = (&args.nbd_listen, &tls, args.nbd_insecure_plaintext) {
        if !loopback_only(addr) {
            fail!(
                "--nbd-listen {addr} is not a loopback address and would serve NBD in the \
                 clear: give --tls-cert, --tls-key and --tls-ca (or --tls-dev-dir for \
                 development), or --nbd-insecure-plaintext"
            );
        }
    }
    // Private before the store writes its first file there.
    ember_volumed::registry::private_dir(&args.data_dir)
        .unwrap_or_else(|e| fail!("{}: {e}", args.data_dir.display()));
    let store = KvStore::open(
        &args.etcd_endpoints,
        &args.data_dir.join("store"),
        "/ember/volumes/state",
    )
    .unwrap_or_else(|e| fail!("the state store: {e}"));
    let registry = Registry::open(&args.data_dir, Box::new(store))
        .unwrap_or_else(|e| fail!("{}: {e}", args.data_dir.display()));
    if let Some(addr) = &args.nbd_listen {
        let l =
            std::net::TcpListener::bind(addr).unwrap_or_else(|e| fail!("NBD listen {addr}: {e}"));
        let reg = registry.clone();
        match tls.clone() {
            Some(tls) => {
                log::info!("NBD on {addr}: TLS required");
                std::thread::spawn(move || {
                    ember_volumed::nbd::serve_tcp_tls(l, Exports::Volumes(reg), limits, tls)
                });
            }
            None => {
                log::warn!("NBD on {addr}: in the clear (no TLS settings)");
                std::thread::spawn(move || {
                    ember_volumed::nbd::serve_tcp(l, Exports::Volumes(reg), limits)
                });
            }
        }
    }
    if let Some(p) = &args.nbd_socket {
        let _ = std::fs::remove_file(p);
        let l = std::os::unix::net::UnixListener::bind(p)
            .unwrap_or_else(|e| fail!("NBD socket {}: {e}", p.display()));
        let reg = registry.clone();
        std::thread::spawn(move || {
            ember_volumed::nbd::serve_unix(l, Exports::Volumes(reg), limits)
        });
    }
    let vhost_user = args.vhost_user_dir.as_ref().map(|d| {
        VhostUserServer::start(d, registry.clone())
            .unwrap_or_else(|e| fail!("vhost-user dir {}: {e}", d.display()))
    });
    let svc = Arc::new(Service {
        vhost_user,
        registry,
        nbd_tcp: args.nbd_advertise.clone().or(args.nbd_listen.clone()),
        nbd_tls: tls,
        nbd_unix: args.nbd_socket.as_ref().map(|p| p.display().to_string()),
    });
    ember_startup::runtime!().block_on(async move {
        if let Some(dir) = args.api_socket.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let _ = std::fs::remove_file(&args.api_socket);
        let l = tokio::net::UnixListener::bind(&args.api_socket)
            .unwrap_or_else(|e| fail!("API socket {}: {e}", args.api_socket.display()));
        log::info!(
            "ember-volumed serving its API on {}",
            args.api_socket.display()
        );
        let signal = ember_startup::shutdown_signal().unwrap_or_else(|e| fail!("signals: {e}"));
        let app = router(svc);
        tokio::select! {
            r = axum::serve(l, app) => if let Err(e) = r { log::error!("API: {e}") },
            _ = signal => {},
        }
        let _ = std::fs::remove_file(&args.api_socket);
    });
}
