//! `ember-cluster`: the cluster API. `serve` runs one replica (any number
//! may run against one etcd); `account create NAME` makes an access key.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use ember_cluster::service::{Cluster, Config};
use ember_lambda::host_client::HostClient;
use ember_startup::fail;
use ember_store::Store;
use ember_tls::{Tls, TlsFiles};

/// Ember's cluster API: Lambda's REST API over many emberd hosts.
#[derive(Debug, Parser)]
#[command(name = "ember-cluster", version)]
struct Args {
    /// The cluster store: etcd at these endpoints (comma-separated); the
    /// embedded store in --state-dir without.
    #[arg(long, env = "EMBER_CLUSTER_ETCD", value_delimiter = ',', global = true)]
    etcd: Vec<String>,
    /// Where the embedded store keeps its file (without --etcd).
    #[arg(
        long,
        env = "EMBER_CLUSTER_STATE_DIR",
        default_value = "/var/lib/ember-cluster",
        global = true
    )]
    state_dir: PathBuf,
    #[arg(long, env = "RUST_LOG", default_value = "info", global = true)]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start-up: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the API (one replica).
    Serve {
        /// TCP address of the Lambda API.
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: std::net::SocketAddr,
        /// The token hosts' APIs want (their --api-token-file).
        #[arg(long)]
        host_token_file: PathBuf,
        /// The certificate this replica presents to hosts (signed by
        /// --host-tls-ca); hosts' APIs are reached over mutual TLS only.
        #[arg(long, requires_all = ["host_tls_key", "host_tls_ca"], conflicts_with = "host_tls_dev_dir")]
        host_tls_cert: Option<PathBuf>,
        #[arg(long, requires = "host_tls_cert")]
        host_tls_key: Option<PathBuf>,
        /// The CA hosts' certificates are checked against.
        #[arg(long, requires = "host_tls_cert")]
        host_tls_ca: Option<PathBuf>,
        /// Development only: a CA and this replica's certificate made in
        /// this directory (the CA kept there, shared with hosts given the
        /// same --tls-dev-dir).
        #[arg(long)]
        host_tls_dev_dir: Option<PathBuf>,
        /// This replica's id (default: hostname and port).
        #[arg(long)]
        replica_id: Option<String>,
        /// Region in ARNs.
        #[arg(long, default_value = "us-east-1")]
        region: String,
        /// Seconds a replica's leadership and lease last unrenewed.
        #[arg(long, default_value_t = 6)]
        leader_ttl_secs: u64,
        /// Delay before the first retry of a failed async invocation, in
        /// milliseconds (doubles for the second).
        #[arg(long, default_value_t = 60_000)]
        async_retry_delay_ms: u64,
        /// MiB of request bodies held in memory at once, for all requests
        /// together (at least one largest CreateFunction body, ~67 MiB);
        /// a request that finds no room within 10 s is throttled (429).
        #[arg(long, default_value_t = Config::DEFAULT_BODY_BUDGET >> 20)]
        body_budget_mib: usize,
        /// Signatures the replay cache holds at most (each kept for the
        /// 15-minute skew window after its date; a quarter of them per
        /// access key). 0 turns the cache off.
        #[arg(long, default_value_t = Config::DEFAULT_REPLAY_CACHE_ENTRIES)]
        replay_cache_entries: usize,
    },
    /// Accounts and their access keys.
    Account {
        #[command(subcommand)]
        command: AccountCommand,
    },
}

#[derive(Debug, Subcommand)]
enum AccountCommand {
    /// Creates the account NAME if new, and a new access key for it;
    /// prints both as JSON.
    Create { name: String },
}

fn main() {
    let args = Args::parse();
    ember_startup::init_logging(&args.log_level);
    ember_startup::runtime!().block_on(run(args));
}

async fn run(args: Args) {
    let store = match Store::open(&args.etcd, &args.state_dir).await {
        Ok(s) => s,
        Err(e) => fail!("cluster store: {e}"),
    };
    match args.command {
        Command::Account {
            command: AccountCommand::Create { name },
        } => {
            let made = async {
                let id = ember_cluster::accounts::account_named(&store, &name).await?;
                ember_cluster::accounts::new_key(&store, &id).await
            }
            .await;
            match made {
                Ok(k) => println!(
                    "{}",
                    serde_json::json!({
                        "Account": name,
                        "AccountId": k.account,
                        "AccessKeyId": k.access_key_id,
                        "SecretAccessKey": k.secret_access_key,
                    })
                ),
                Err(e) => fail!("{e}"),
            }
        }
        Command::Serve {
            listen,
            host_token_file,
            host_tls_cert,
            host_tls_key,
            host_tls_ca,
            host_tls_dev_dir,
            replica_id,
            region,
            leader_ttl_secs,
            async_retry_delay_ms,
            body_budget_mib,
            replay_cache_entries,
        } => {
            let token = std::fs::read_to_string(&host_token_file)
                .unwrap_or_else(|e| fail!("{}: {e}", host_token_file.display()));
            let replica_id = replica_id.unwrap_or_else(|| {
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_string())
                    .unwrap_or_else(|_| "ember-cluster".into());
                format!("{host}:{}", listen.port())
            });
            let cfg = Config {
                replica_id,
                region,
                leader_ttl: Duration::from_secs(leader_ttl_secs.max(2)),
                async_retry_delay: Duration::from_millis(async_retry_delay_ms),
                body_budget: body_budget_mib.saturating_mul(1 << 20),
                replay_cache_entries,
            };
            let files = match (host_tls_cert, host_tls_key, host_tls_ca, host_tls_dev_dir) {
                (Some(cert), Some(key), Some(ca), None) => TlsFiles { cert, key, ca },
                (None, None, None, Some(dir)) => {
                    let name = format!("ember-cluster-{}", cfg.replica_id);
                    ember_tls::dev_certs(&dir, &name, &["localhost".into()])
                        .unwrap_or_else(|e| fail!("development certificates: {e}"))
                }
                _ => fail!(
                    "hosts are reached over mutual TLS: give --host-tls-cert, --host-tls-key \
                     and --host-tls-ca (or --host-tls-dev-dir for development)"
                ),
            };
            let tls = Tls::load(&files).unwrap_or_else(|e| fail!("TLS: {e}"));
            serve(store, HostClient::new(&token, &tls), cfg, listen).await
        }
    }
}

async fn serve(store: Store, hosts: HostClient, cfg: Config, listen: std::net::SocketAddr) {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .unwrap_or_else(|e| fail!("cannot listen on {listen}: {e}"));
    log::info!(
        "ember-cluster {} (replica {}) serving on {listen}",
        env!("CARGO_PKG_VERSION"),
        cfg.replica_id
    );
    let c = Cluster::new(store, hosts, cfg);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let background = tokio::spawn(c.clone().run_background(stop_rx));
    let app = ember_cluster::api::router(c);
    let signal =
        ember_startup::shutdown_signal().unwrap_or_else(|e| fail!("cannot watch SIGTERM: {e}"));
    let shutdown = async {
        signal.await;
        log::info!("shutting down");
    };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        log::error!("server: {e}");
    }
    let _ = stop_tx.send(true);
    let _ = background.await;
}
