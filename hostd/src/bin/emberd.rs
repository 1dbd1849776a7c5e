//! `emberd`: the Ember host daemon. Serves Lambda's API shapes on a unix
//! socket and runs every invocation in a microVM restored from the
//! function's snapshot.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use ember_hostd::daemon::{Config, Daemon};
use ember_hostd::model::RuntimeKind;
use ember_hostd::vm::{JailConfig, LaunchConfig};
use ember_startup::fail;

/// Ember host daemon: functions on warm microVMs.
#[derive(Debug, Parser)]
#[command(name = "emberd", version)]
struct Args {
    /// The API socket.
    #[arg(long, env = "EMBER_SOCKET", default_value = "/run/ember/emberd.sock")]
    socket: PathBuf,
    /// Functions, code, snapshots, the async queue and logs.
    #[arg(long, env = "EMBER_STATE_DIR", default_value = "/var/lib/ember")]
    state_dir: PathBuf,
    /// Working files of running VMMs (jails, sockets, VMM logs).
    #[arg(long, env = "EMBER_RUN_DIR", default_value = "/run/ember")]
    run_dir: PathBuf,
    /// Instances' `/tmp` disks (EphemeralStorage), a 0700 directory each
    /// (default: `disks` in --state-dir). Put it on a disk-backed
    /// filesystem with room for them: on tmpfs their contents would be
    /// held in memory, charged to each VMM's memory limit.
    #[arg(long, env = "EMBER_DISK_DIR")]
    disk_dir: Option<PathBuf>,
    /// Guest kernel (vmlinux) from kernels/build.sh.
    #[arg(long, env = "EMBER_KERNEL")]
    kernel: PathBuf,
    /// Root filesystem of the `provided` runtime (rootfs/build.sh provided).
    #[arg(long, env = "EMBER_ROOTFS_PROVIDED")]
    rootfs_provided: Option<PathBuf>,
    /// Root filesystem of the `python3` runtime (rootfs/build.sh python3).
    #[arg(long, env = "EMBER_ROOTFS_PYTHON3")]
    rootfs_python3: Option<PathBuf>,
    /// Root filesystem of the `nodejs18.x` runtime (rootfs/build.sh nodejs).
    #[arg(long, env = "EMBER_ROOTFS_NODEJS")]
    rootfs_nodejs: Option<PathBuf>,
    /// The VMM binary (default: `ember-vmm` beside this program).
    #[arg(long, env = "EMBER_VMM_BIN")]
    vmm_bin: Option<PathBuf>,
    /// `ember-export`, which serves a migrating instance's `/tmp` disk
    /// (default: beside this program).
    #[arg(long, env = "EMBER_EXPORT_BIN")]
    export_bin: Option<PathBuf>,
    /// The jailer binary (default: `ember-jailer` beside this program).
    #[arg(long, env = "EMBER_JAILER_BIN")]
    jailer_bin: Option<PathBuf>,
    /// Run VMMs without a jail (development only: no chroot, no cgroup,
    /// VMMs run as this daemon's user).
    #[arg(long)]
    no_jail: bool,
    /// First uid of jailed VMMs; each VMM gets its own from a range of --jail-uid-count.
    #[arg(long, default_value_t = 900_000)]
    jail_uid_base: u32,
    #[arg(long, default_value_t = 10_000)]
    jail_uid_count: u32,
    #[arg(long, default_value_t = 900_000)]
    jail_gid: u32,
    /// Region and account in ARNs and in the functions' environment.
    #[arg(long, default_value = "us-east-1")]
    region: String,
    #[arg(long, default_value = "000000000000")]
    account: String,
    /// Idle instances kept ready per function version (provisioned
    /// concurrency overrides it per version or alias).
    #[arg(long, default_value_t = 1)]
    warm_instances: u32,
    /// Concurrent invocations per function, all versions together
    /// (reserved concurrency overrides it).
    #[arg(long, default_value_t = 10)]
    max_concurrency: u32,
    /// Seconds an idle instance beyond the warm count is kept.
    #[arg(long, default_value_t = 300)]
    idle_ttl_secs: u64,
    /// Longest runtime init before the snapshot (seconds).
    #[arg(long, default_value_t = 600)]
    init_timeout_secs: u64,
    /// Longest guest boot to its agent (seconds).
    #[arg(long, default_value_t = 600)]
    boot_timeout_secs: u64,
    /// Snapshot builds (guest boots) at once.
    #[arg(long, default_value_t = 2)]
    parallel_builds: usize,
    #[arg(long, default_value_t = 4)]
    async_workers: usize,
    /// Delay before the first retry of a failed async invocation, in
    /// milliseconds (doubles for the second; Lambda waits about a minute).
    #[arg(long, default_value_t = 60_000)]
    async_retry_delay_ms: u64,
    /// Give instances no network device (no namespaces, taps or NAT).
    #[arg(long)]
    no_network: bool,
    /// Neither record snapshots' working sets (the pages a first clone
    /// touches up to its first answer) nor prefetch them in later clones.
    #[arg(long)]
    no_working_sets: bool,
    /// Physical addresses of instances on this host, a /30 per instance
    /// (must not overlap the host's other networks).
    #[arg(long, default_value = "10.200.0.0/16")]
    physical_net: ipnet::Ipv4Net,
    /// Keep instances' open TCP connections when they pause (by default
    /// the VMM resets them both ways, so neither end hangs).
    #[arg(long)]
    keep_connections_on_pause: bool,
    /// A service of this host that guests may reach, ADDRESS[/PREFIX]:PORTS
    /// [/udp] (e.g. 10.0.0.5:8080, 10.0.0.53:53/udp); repeatable. Nothing
    /// else of this host (any address, any port, Ember's own included) is
    /// reachable from an instance.
    #[arg(long, value_name = "ADDRESS:PORTS")]
    allow_guest_to_host: Vec<ember_hostd::net::HostService>,
    /// A network no guest may reach whatever its function's egress policy
    /// says (e.g. the network the hosts and their services share);
    /// repeatable.
    #[arg(long, value_name = "CIDR")]
    deny_guest_net: Vec<ipnet::Ipv4Net>,
    /// Also serve the API over TCP on this address, for the cluster and
    /// the other hosts: mutual TLS only (needs --tls-cert, --tls-key and
    /// --tls-ca, or --tls-dev-dir) and a token (--api-token-file; requests
    /// carry `Authorization: Bearer TOKEN`). Migration streams and disk
    /// exports use ports on this address, with the same TLS.
    #[arg(long)]
    listen_tcp: Option<std::net::SocketAddr>,
    /// This host's certificate (PEM, leaf first), signed by --tls-ca; it is
    /// presented to peers as server and as client, and to a volume
    /// service's nbds:// port (NBD across hosts).
    #[arg(long, requires_all = ["tls_key", "tls_ca"], conflicts_with = "tls_dev_dir")]
    tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The CA every peer's certificate must be signed by (other hosts, the
    /// cluster): connections without such a certificate are refused.
    #[arg(long, requires = "tls_cert")]
    tls_ca: Option<PathBuf>,
    /// Development only: make a CA in this directory if it has none (its
    /// key stays there) and a certificate for this host signed by it;
    /// hosts given the same directory trust each other.
    #[arg(long)]
    tls_dev_dir: Option<PathBuf>,
    /// A file holding the token TCP requests must carry.
    #[arg(long)]
    api_token_file: Option<PathBuf>,
    /// Join a cluster whose store is etcd at these endpoints (comma-separated).
    #[arg(long, value_delimiter = ',')]
    cluster_etcd: Vec<String>,
    /// The volume service's API socket (ember-volumed --api-socket), for
    /// volume attachments through this host's API.
    #[arg(long)]
    volume_service: Option<PathBuf>,
    /// This host's id in the cluster and to the volume service (default:
    /// the hostname).
    #[arg(long)]
    host_id: Option<String>,
    /// The URL the cluster reaches this host's API at (default: https://
    /// and --listen-tcp).
    #[arg(long)]
    advertise: Option<String>,
    /// Invocations this host takes at once, all functions together (what
    /// it reports to the cluster).
    #[arg(long, default_value_t = 16)]
    host_capacity: u32,
    /// Seconds without a heartbeat before the cluster marks this host down.
    #[arg(long, default_value_t = 10)]
    cluster_ttl_secs: u64,
    /// Extra guest kernel arguments (appended to the VMM's defaults).
    #[arg(long)]
    boot_args: Option<String>,
    /// Seconds an orderly shutdown (SIGTERM) may take before emberd exits
    /// regardless, its VMMs with it.
    #[arg(long, default_value_t = 30)]
    shutdown_timeout_secs: u64,
    /// emberd's own `oom_score_adj` (-1000 to 1000). Every VMM dies with
    /// emberd, so by default the kernel's OOM killer takes a VMM (each
    /// starts at 0) long before emberd.
    #[arg(long, default_value_t = -800, allow_hyphen_values = true,
          value_parser = clap::value_parser!(i32).range(-1000..=1000))]
    oom_score_adj: i32,
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log_level: String,
}

/// Watches SIGTERM and SIGINT on a thread of its own (so that a busy or
/// stuck runtime cannot delay it). The first starts an orderly shutdown
/// (the receiver turns true); a second, or `limit` after the first, ends
/// the process at once. Its VMMs die with it (they are spawned with
/// PR_SET_PDEATHSIG), and the next start removes what it left.
fn watch_signals(limit: Duration) -> tokio::sync::watch::Receiver<bool> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let (tx, rx) = tokio::sync::watch::channel(false);
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .unwrap_or_else(|e| fail!("cannot watch SIGTERM: {e}"));
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for (n, signal) in signals.forever().enumerate() {
                if n > 0 {
                    log::error!("signal {signal} during the shutdown: exiting now");
                    std::process::exit(1);
                }
                log::info!("shutting down (signal {signal}; at most {limit:?})");
                let _ = tx.send(true);
                let timer = std::thread::Builder::new()
                    .name("shutdown-limit".into())
                    .spawn(move || {
                        std::thread::sleep(limit);
                        log::error!(
                            "the shutdown took longer than {limit:?}: exiting now, \
                             killing the VMMs left"
                        );
                        std::process::exit(1);
                    });
                if let Err(e) = timer {
                    log::error!("cannot time the shutdown ({e}): exiting now");
                    std::process::exit(1);
                }
            }
        });
    if let Err(e) = spawned {
        fail!("cannot watch SIGTERM: {e}");
    }
    rx
}

fn beside_me(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .unwrap_or_else(|| PathBuf::from(name))
}

/// `p` made absolute where it exists (the jailer needs absolute paths,
/// and the daemon's working directory is not its caller's concern).
fn absolute(p: PathBuf) -> PathBuf {
    std::fs::canonicalize(&p).unwrap_or(p)
}

/// The host of a URL like `https://HOST:PORT/`.
fn url_host(url: &str) -> Option<String> {
    let uri: hyper::Uri = url.parse().ok()?;
    uri.host()
        .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_string())
}

fn main() {
    let args = Args::parse();
    ember_startup::init_logging(&args.log_level);
    ember_startup::runtime!().block_on(run(args));
}

async fn run(mut args: Args) {
    // The TCP API (and so migrations) is mutual TLS or nothing.
    if let (Some(addr), None, None) = (args.listen_tcp, &args.tls_cert, &args.tls_dev_dir) {
        fail!(
            "--listen-tcp {addr} needs TLS: --tls-cert, --tls-key and --tls-ca (or --tls-dev-dir \
             for development); the TCP API is never served in the clear"
        );
    }
    if let Err(e) = ember_hostd::oom::set_own(args.oom_score_adj) {
        log::warn!(
            "cannot set emberd's oom_score_adj to {}: {e}; the OOM killer may take emberd, \
             and every VMM with it",
            args.oom_score_adj
        );
    }
    args.kernel = absolute(args.kernel);
    args.rootfs_provided = args.rootfs_provided.map(absolute);
    args.rootfs_python3 = args.rootfs_python3.map(absolute);
    args.rootfs_nodejs = args.rootfs_nodejs.map(absolute);
    let mut rootfs = BTreeMap::new();
    if let Some(p) = args.rootfs_provided {
        rootfs.insert(RuntimeKind::Provided, p);
    }
    if let Some(p) = args.rootfs_python3 {
        rootfs.insert(RuntimeKind::Python3, p);
    }
    if let Some(p) = args.rootfs_nodejs {
        rootfs.insert(RuntimeKind::Nodejs, p);
    }
    if rootfs.is_empty() {
        fail!("no runtime root filesystem given (--rootfs-provided, --rootfs-python3, --rootfs-nodejs)");
    }
    for (what, p) in rootfs
        .values()
        .map(|p| ("root filesystem", p))
        .chain([("kernel", &args.kernel)])
    {
        if !p.is_file() {
            fail!("{what} {} is not a file", p.display());
        }
    }
    let vmm_bin = args.vmm_bin.unwrap_or_else(|| beside_me("ember-vmm"));
    if !vmm_bin.is_file() {
        fail!("VMM binary {} not found (--vmm-bin)", vmm_bin.display());
    }
    let vmm_bin = absolute(vmm_bin);
    let jail = if args.no_jail {
        log::warn!("--no-jail: VMMs run unjailed, as this daemon's user");
        None
    } else {
        let jailer_bin = args.jailer_bin.unwrap_or_else(|| beside_me("ember-jailer"));
        if !jailer_bin.is_file() {
            fail!(
                "jailer binary {} not found (--jailer-bin, or --no-jail for development)",
                jailer_bin.display()
            );
        }
        let jailer_bin = absolute(jailer_bin);
        if !nix::unistd::geteuid().is_root() {
            fail!("jailing VMMs needs root (or run with --no-jail for development)");
        }
        Some(JailConfig {
            jailer_bin,
            chroot_base: args.run_dir.join("jail"),
            uid_base: args.jail_uid_base,
            uid_count: args.jail_uid_count,
            gid: args.jail_gid,
        })
    };
    let boot_args = args
        .boot_args
        .map(|extra| format!("{} {extra}", ember_hostd::vm::DEFAULT_BOOT_ARGS));
    let network = if args.no_network {
        None
    } else {
        let net = ember_hostd::net::NetManager::new(ember_hostd::net::NetConfig {
            physical_net: args.physical_net.trunc(),
            state_dir: args.run_dir.join("net"),
            terminate_connections: !args.keep_connections_on_pause,
            host_services: args.allow_guest_to_host.clone(),
            denied: args.deny_guest_net.iter().map(|n| n.trunc()).collect(),
        });
        match net {
            Ok(m) => Some(std::sync::Arc::new(m)),
            Err(e) => fail!("instance networking: {e} (or --no-network)"),
        }
    };
    let host_id = args.host_id.clone().unwrap_or_else(|| {
        nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "ember-host".into())
    });
    // The TCP API's token, shared by the hosts of a cluster: peers check
    // it, and this host sends it to them (migrations).
    let token = args.api_token_file.as_ref().map(|f| {
        let token = std::fs::read_to_string(f).unwrap_or_else(|e| fail!("{}: {e}", f.display()));
        if token.trim().len() < 16 {
            fail!("{}: the token must be at least 16 characters", f.display());
        }
        token.trim().to_string()
    });
    // TLS for everything on TCP: there is no plaintext TCP.
    let tls = match (args.listen_tcp, &args.tls_cert, &args.tls_dev_dir) {
        (None, None, None) => None,
        (None, _, _) => fail!("--tls-cert/--tls-dev-dir are for --listen-tcp"),
        (Some(_), Some(cert), None) => Some(ember_tls::TlsFiles {
            cert: cert.clone(),
            key: args.tls_key.clone().unwrap_or_default(),
            ca: args.tls_ca.clone().unwrap_or_default(),
        }),
        (Some(addr), None, Some(dir)) => {
            let mut names = vec![
                addr.ip().to_string(),
                "localhost".to_string(),
                "127.0.0.1".to_string(),
            ];
            if let Some(h) = args.advertise.as_deref().and_then(url_host) {
                names.push(h);
            }
            names.sort();
            names.dedup();
            let files = ember_tls::dev_certs(dir, &host_id, &names)
                .unwrap_or_else(|e| fail!("development certificates: {e}"));
            log::warn!(
                "--tls-dev-dir: using the development CA in {} (not for production)",
                dir.display()
            );
            Some(files)
        }
        (Some(_), Some(_), Some(_)) => {
            fail!("--tls-cert and --tls-dev-dir exclude each other")
        }
        (Some(addr), None, None) => fail!(
            "--listen-tcp {addr} needs TLS: --tls-cert, --tls-key and --tls-ca (or --tls-dev-dir \
             for development); the TCP API is never served in the clear"
        ),
    };
    let tls = tls.map(|files| ember_tls::Tls::load(&files).unwrap_or_else(|e| fail!("TLS: {e}")));
    // (Its TLS identity is also what opens NBD to a volume service's
    // nbds:// port on another host.)
    let volume_service =
        args.volume_service
            .clone()
            .map(|socket| ember_hostd::volumes::VolumeService {
                socket,
                host_id: host_id.clone(),
                account: args.account.clone(),
                tls: tls.clone(),
            });
    let peers = match (args.listen_tcp, &token, &tls) {
        (Some(addr), Some(token), Some(tls)) => Some(ember_hostd::migrate::PeerConfig {
            token: token.clone(),
            stream_ip: addr.ip(),
            tls: tls.clone(),
        }),
        _ => None,
    };
    let disk_dir = args
        .disk_dir
        .clone()
        .unwrap_or_else(|| args.state_dir.join("disks"));
    if let Err(e) = std::fs::create_dir_all(&disk_dir) {
        fail!("cannot create {}: {e}", disk_dir.display());
    }
    let disk_dir = absolute(disk_dir);
    match ember_hostd::ephemeral::in_memory_fs(&disk_dir) {
        Ok(Some(fs)) => log::warn!(
            "--disk-dir {} is on {fs}: /tmp disks there are held in memory and count against              their VMMs' memory limits (a function writing to /tmp can be OOM-killed); use a              disk-backed directory",
            disk_dir.display()
        ),
        Ok(None) => {}
        Err(e) => log::warn!("cannot tell the filesystem of {}: {e}", disk_dir.display()),
    }
    let cfg = Config {
        state_dir: args.state_dir,
        launch: LaunchConfig {
            vmm_bin,
            jail,
            run_dir: args.run_dir.clone(),
            disk_dir,
            boot_args,
            boot_timeout: Duration::from_secs(args.boot_timeout_secs),
            working_sets: !args.no_working_sets,
        },
        kernel: args.kernel,
        rootfs,
        region: args.region,
        account: args.account,
        default_warm: args.warm_instances,
        default_concurrency: args.max_concurrency,
        idle_ttl: Duration::from_secs(args.idle_ttl_secs),
        init_timeout: Duration::from_secs(args.init_timeout_secs),
        parallel_builds: args.parallel_builds,
        async_workers: args.async_workers,
        async_retry_delay: Duration::from_millis(args.async_retry_delay_ms),
        network,
        volume_service,
        peers,
        export_bin: absolute(
            args.export_bin
                .clone()
                .unwrap_or_else(|| beside_me("ember-export")),
        ),
    };
    // From here on a SIGTERM is an orderly shutdown, bounded in time.
    let signalled = watch_signals(Duration::from_secs(args.shutdown_timeout_secs));
    if let Err(e) = ember_hostd::vm::clean_run_dir(&cfg.launch) {
        fail!("cannot prepare {}: {e}", args.run_dir.display());
    }
    let d = match Daemon::open(cfg) {
        Ok(d) => d,
        Err(e) => fail!("cannot open the state directory: {e}"),
    };
    d.start();
    if let Some(dir) = args.socket.parent() {
        if let Err(e) = std::fs::create_dir_all(dir) {
            fail!("cannot create {}: {e}", dir.display());
        }
    }
    let _ = std::fs::remove_file(&args.socket);
    let listener = match tokio::net::UnixListener::bind(&args.socket) {
        Ok(l) => l,
        Err(e) => fail!("cannot listen on {}: {e}", args.socket.display()),
    };
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&args.socket, std::fs::Permissions::from_mode(0o660));
    }
    log::info!(
        "emberd {} serving on {}",
        env!("CARGO_PKG_VERSION"),
        args.socket.display()
    );
    let app = ember_hostd::api::router(d.clone());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let tcp = match (args.listen_tcp, &token, &tls) {
        (None, _, _) => None,
        (Some(_), None, _) => fail!("--listen-tcp needs --api-token-file"),
        (Some(_), Some(_), None) => fail!("--listen-tcp needs TLS"),
        (Some(addr), Some(token), Some(tls)) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .unwrap_or_else(|e| fail!("cannot listen on {addr}: {e}"));
            let l = ember_tls::TlsListener::new(l, tls)
                .unwrap_or_else(|e| fail!("cannot listen on {addr}: {e}"));
            let hash = std::sync::Arc::new(ember_hostd::cluster::token_hash(token));
            let app = app.clone().layer(axum::middleware::from_fn_with_state(
                hash,
                ember_hostd::cluster::require_token,
            ));
            let mut stop = stop_rx.clone();
            log::info!("also serving the API on tcp {addr} (mutual TLS)");
            Some(tokio::spawn(async move {
                let r = axum::serve(l, app)
                    .with_graceful_shutdown(async move {
                        let _ = stop.changed().await;
                    })
                    .await;
                if let Err(e) = r {
                    log::error!("tcp server: {e}");
                }
            }))
        }
    };
    let membership = if args.cluster_etcd.is_empty() {
        None
    } else {
        let endpoint = args
            .advertise
            .clone()
            .or_else(|| args.listen_tcp.map(|a| format!("https://{a}")))
            .unwrap_or_else(|| fail!("--cluster-etcd needs --advertise or --listen-tcp"));
        let cfg = ember_hostd::cluster::ClusterConfig {
            etcd: args.cluster_etcd.clone(),
            host_id: host_id.clone(),
            endpoint,
            capacity: args.host_capacity,
            ttl: Duration::from_secs(args.cluster_ttl_secs.max(2)),
        };
        Some(tokio::spawn(ember_hostd::cluster::run_membership(
            d.clone(),
            cfg,
            stop_rx.clone(),
        )))
    };
    let mut signalled = signalled;
    let shutdown = async move {
        let _ = signalled.wait_for(|s| *s).await;
    };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        log::error!("server: {e}");
    }
    let _ = stop_tx.send(true);
    for task in [tcp, membership].into_iter().flatten() {
        let _ = task.await;
    }
    d.pools.shutdown().await;
    if let Some(net) = d.cfg.network.clone() {
        let _ = tokio::task::spawn_blocking(move || net.remove_all()).await;
    }
    let _ = std::fs::remove_file(&args.socket);
}
