//! `ember`: the command line of the Ember host daemon (`emberd`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;
use clap::{Parser, Subcommand};
use ember_hostd::vm::api_client::{raw_request, RawResponse};
use serde_json::{json, Value};

/// Manage and invoke functions on an Ember host.
#[derive(Debug, Parser)]
#[command(name = "ember", version)]
struct Cli {
    /// emberd's API socket.
    #[arg(long, env = "EMBER_SOCKET", default_value = "/run/ember/emberd.sock")]
    socket: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, clap::Args)]
struct SpecArgs {
    /// provided, provided.al2023, python3, python3.11, nodejs18.x, ...
    #[arg(long)]
    runtime: Option<String>,
    /// module.function for python, file.function for Node.js; anything for provided.
    #[arg(long)]
    handler: Option<String>,
    /// MiB (128 to 10240).
    #[arg(long)]
    memory: Option<u32>,
    /// Seconds (1 to 900).
    #[arg(long)]
    timeout: Option<u32>,
    /// KEY=VALUE, repeatable. Replaces the whole environment.
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    #[arg(long)]
    description: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create a function from a zip file or a directory.
    Create {
        name: String,
        /// A .zip file or a directory (zipped for you, modes kept).
        #[arg(long)]
        code: PathBuf,
        #[command(flatten)]
        spec: SpecArgs,
        /// Also publish version 1.
        #[arg(long)]
        publish: bool,
        /// Return at once instead of waiting for the snapshot.
        #[arg(long)]
        no_wait: bool,
        /// Mount this volume (of the host's volume service) in every
        /// instance, at --mount-path; the function then runs one instance
        /// at a time.
        #[arg(long, requires = "mount_path")]
        volume: Option<String>,
        /// /mnt/NAME.
        #[arg(long, requires = "volume")]
        mount_path: Option<String>,
    },
    /// Update the code and/or configuration of $LATEST.
    Update {
        name: String,
        #[arg(long)]
        code: Option<PathBuf>,
        #[command(flatten)]
        spec: SpecArgs,
        #[arg(long)]
        publish: bool,
        #[arg(long)]
        no_wait: bool,
    },
    /// Show a function (or one version / alias of it).
    Get {
        name: String,
        #[arg(long)]
        qualifier: Option<String>,
    },
    /// List functions.
    List,
    /// Delete a function, or one published version of it.
    Delete {
        name: String,
        #[arg(long)]
        qualifier: Option<String>,
    },
    /// Publish $LATEST as a new numbered version.
    Publish {
        name: String,
        #[arg(long)]
        no_wait: bool,
    },
    /// List versions.
    Versions { name: String },
    /// Manage aliases.
    #[command(subcommand)]
    Alias(AliasCmd),
    /// Invoke a function. The payload goes to stdout; a function error
    /// also prints the log tail to stderr and exits with status 1.
    Invoke {
        name: String,
        #[arg(long)]
        qualifier: Option<String>,
        /// JSON event (default `{}`).
        #[arg(long, conflicts_with = "payload_file")]
        payload: Option<String>,
        #[arg(long)]
        payload_file: Option<PathBuf>,
        /// Queue it (InvocationType Event) and print the request id.
        #[arg(long = "async")]
        is_async: bool,
        /// Print the log tail to stderr even on success.
        #[arg(long)]
        log: bool,
    },
    /// Show an async invocation's outcome, or list a function's.
    Async {
        /// A request id, or `--function NAME` to list.
        request_id: Option<String>,
        #[arg(long)]
        function: Option<String>,
    },
    /// Print a function's log.
    Logs {
        name: String,
        /// Bytes from the end.
        #[arg(long, default_value_t = 65536)]
        tail: u64,
    },
    /// Set (or with `--clear` remove) a function's concurrency limit.
    Concurrency {
        name: String,
        limit: Option<u32>,
        #[arg(long)]
        clear: bool,
    },
    /// Set how many warm instances a version or alias keeps.
    Warm {
        name: String,
        #[arg(long)]
        qualifier: String,
        count: u32,
    },
    /// Show the warm pools.
    Pools,
    /// Show the address table (instance, logical and physical address).
    Network,
    /// Show, or with a JSON policy set, a function's egress policy, e.g.
    /// '{"DefaultAction":"Deny","Rules":[{"Action":"Allow","Cidr":"10.0.0.0/8","Protocol":"Tcp","Ports":["443"]}]}'.
    Egress {
        name: String,
        policy: Option<String>,
    },
    /// Show, set (`--address A/N --gateway G`) or `--clear` an account's
    /// reserved logical address.
    Reserve {
        account: String,
        #[arg(long, requires = "gateway")]
        address: Option<String>,
        #[arg(long)]
        gateway: Option<String>,
        #[arg(long, conflicts_with = "address")]
        clear: bool,
    },
    /// Migrate a running instance (see `ember pools`) to another host.
    Migrate {
        instance: String,
        /// The destination host's API, https://HOST:PORT (its --listen-tcp; mutual TLS).
        #[arg(long, required_unless_present = "cancel")]
        to: Option<String>,
        /// Cancel the instance's migration (before its switch-over).
        #[arg(long, conflicts_with = "to")]
        cancel: bool,
        /// The pause the guest may see.
        #[arg(long)]
        downtime_ms: Option<u64>,
    },
    /// Drain this host: migrate every instance to another host and warm
    /// no more here (`--stop` ends draining; neither shows whether it is).
    Drain {
        #[arg(long, conflicts_with = "stop")]
        to: Option<String>,
        #[arg(long)]
        downtime_ms: Option<u64>,
        #[arg(long)]
        stop: bool,
    },
    /// Show the migrations to this host.
    Migrations,
    /// Check the daemon.
    Health,
    /// Development certificates (no daemon needed): a CA in DIR if it has
    /// none, and a certificate for NAME signed by it, for emberd's
    /// --tls-cert/--tls-key/--tls-ca and ember-cluster's --host-tls-*.
    /// The CA's key stays in DIR: for development and tests only.
    TlsCert {
        #[arg(long)]
        dir: PathBuf,
        /// The certificate's name (its files: NAME.pem, NAME-key.pem).
        #[arg(long)]
        name: String,
        /// Addresses and DNS names peers reach it at (repeatable).
        #[arg(long = "san", value_name = "IP|NAME", default_value = "localhost")]
        sans: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum AliasCmd {
    Create {
        name: String,
        alias: String,
        version: String,
        #[arg(long)]
        description: Option<String>,
    },
    Update {
        name: String,
        alias: String,
        version: String,
    },
    Get {
        name: String,
        alias: String,
    },
    Delete {
        name: String,
        alias: String,
    },
    List {
        name: String,
    },
}

struct Client {
    socket: PathBuf,
    rt: tokio::runtime::Runtime,
}

/// Exit code 2: the request failed (1 is the function's failure: a Failed
/// state, a FunctionError).
fn die(msg: impl std::fmt::Display) -> ! {
    ember_startup::exit_with("ember", 2, msg)
}

impl Client {
    fn raw(&self, method: &str, uri: &str, headers: &[(&str, &str)], body: Vec<u8>) -> RawResponse {
        self.rt
            .block_on(raw_request(&self.socket, method, uri, headers, body))
            .unwrap_or_else(|e| die(format!("{e} (is emberd running?)")))
    }

    /// A request whose non-2xx answer is fatal (the error printed as Lambda gave it).
    fn json(&self, method: &str, uri: &str, body: Option<Value>) -> Value {
        let body = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        let resp = self.raw(method, uri, &[], body);
        if !(200..300).contains(&resp.status) {
            let kind = resp
                .headers
                .get("x-amzn-errortype")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("Error");
            let msg = serde_json::from_slice::<Value>(&resp.body)
                .ok()
                .and_then(|v| v["message"].as_str().map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&resp.body).into_owned());
            die(format!("{kind} ({}): {msg}", resp.status));
        }
        if resp.body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&resp.body).unwrap_or(Value::Null)
        }
    }

    /// Polls until `name`:`qualifier` is no longer being built.
    fn wait_ready(&self, name: &str, qualifier: &str) -> Value {
        let start = Instant::now();
        loop {
            let cfg = self.json(
                "GET",
                &format!(
                    "/2015-03-31/functions/{name}/configuration?Qualifier={}",
                    enc(qualifier)
                ),
                None,
            );
            if cfg["LastUpdateStatus"] != "InProgress" {
                return cfg;
            }
            if start.elapsed() > Duration::from_secs(1800) {
                die("gave up waiting for the function to become ready");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

fn enc(s: &str) -> String {
    s.replace('$', "%24")
}

fn print(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn read_code(path: &Path) -> String {
    let bytes = if path.is_dir() {
        ember_hostd::code::zip_dir(path)
    } else {
        std::fs::read(path)
    }
    .unwrap_or_else(|e| die(format!("reading {}: {e}", path.display())));
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn spec_json(spec: &SpecArgs) -> Value {
    let mut m = serde_json::Map::new();
    if let Some(r) = &spec.runtime {
        m.insert("Runtime".into(), json!(r));
    }
    if let Some(h) = &spec.handler {
        m.insert("Handler".into(), json!(h));
    }
    if let Some(x) = spec.memory {
        m.insert("MemorySize".into(), json!(x));
    }
    if let Some(x) = spec.timeout {
        m.insert("Timeout".into(), json!(x));
    }
    if let Some(x) = &spec.description {
        m.insert("Description".into(), json!(x));
    }
    if !spec.env.is_empty() {
        let mut vars = BTreeMap::new();
        for kv in &spec.env {
            let (k, v) = kv
                .split_once('=')
                .unwrap_or_else(|| die(format!("--env {kv:?} is not KEY=VALUE")));
            vars.insert(k.to_string(), v.to_string());
        }
        m.insert("Environment".into(), json!({"Variables": vars}));
    }
    Value::Object(m)
}

fn main() {
    let cli = Cli::parse();
    if let Cmd::TlsCert { dir, name, sans } = &cli.cmd {
        match ember_tls::dev_certs(dir, name, sans) {
            Ok(f) => {
                println!("{}", json!({"Cert": f.cert, "Key": f.key, "Ca": f.ca}));
                return;
            }
            Err(e) => die(e),
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| die(e));
    let c = Client {
        socket: cli.socket,
        rt,
    };
    let f = |name: &str| format!("/2015-03-31/functions/{name}");
    match cli.cmd {
        Cmd::Create {
            name,
            code,
            spec,
            publish,
            no_wait,
            volume,
            mount_path,
        } => {
            let mut body = spec_json(&spec);
            body["FunctionName"] = json!(name);
            if let (Some(v), Some(p)) = (volume, mount_path) {
                // The region and account are the host's; any pass here.
                body["FileSystemConfigs"] = json!([{
                    "Arn": format!("arn:aws:ember:::volume/{v}"),
                    "LocalMountPath": p,
                }]);
            }
            body["Code"] = json!({"ZipFile": read_code(&code)});
            body["Publish"] = json!(publish);
            let mut out = c.json("POST", "/2015-03-31/functions", Some(body));
            if !no_wait {
                out = c.wait_ready(&name, "$LATEST");
                if publish {
                    let versions = c.json("GET", &format!("{}/versions", f(&name)), None);
                    if let Some(v) = versions["Versions"].as_array().and_then(|a| a.last()) {
                        if let Some(n) = v["Version"].as_str() {
                            c.wait_ready(&name, n);
                        }
                    }
                }
            }
            print(&out);
            if out["State"] == "Failed" {
                std::process::exit(1);
            }
        }
        Cmd::Update {
            name,
            code,
            spec,
            publish,
            no_wait,
        } => {
            let cfg = spec_json(&spec);
            let has_cfg = cfg.as_object().is_some_and(|m| !m.is_empty());
            let mut out = Value::Null;
            if let Some(code) = code {
                out = c.json(
                    "PUT",
                    &format!("{}/code", f(&name)),
                    Some(json!({"ZipFile": read_code(&code), "Publish": publish && !has_cfg})),
                );
                if has_cfg || !no_wait {
                    out = c.wait_ready(&name, "$LATEST");
                }
            }
            if has_cfg {
                out = c.json("PUT", &format!("{}/configuration", f(&name)), Some(cfg));
                if !no_wait || publish {
                    out = c.wait_ready(&name, "$LATEST");
                }
                if publish {
                    out = c.json("POST", &format!("{}/versions", f(&name)), Some(json!({})));
                }
            }
            if out.is_null() {
                die("nothing to update: give --code and/or configuration flags");
            }
            print(&out);
        }
        Cmd::Get { name, qualifier } => {
            let q = qualifier.map(|q| format!("?Qualifier={}", enc(&q))).unwrap_or_default();
            print(&c.json("GET", &format!("{}{q}", f(&name)), None));
        }
        Cmd::List => print(&c.json("GET", "/2015-03-31/functions", None)),
        Cmd::Delete { name, qualifier } => {
            let q = qualifier.map(|q| format!("?Qualifier={}", enc(&q))).unwrap_or_default();
            c.json("DELETE", &format!("{}{q}", f(&name)), None);
        }
        Cmd::Publish { name, no_wait } => {
            let mut out = c.json("POST", &format!("{}/versions", f(&name)), Some(json!({})));
            if !no_wait {
                if let Some(v) = out["Version"].as_str().map(str::to_string) {
                    out = c.wait_ready(&name, &v);
                }
            }
            print(&out);
        }
        Cmd::Versions { name } => print(&c.json("GET", &format!("{}/versions", f(&name)), None)),
        Cmd::Alias(a) => match a {
            AliasCmd::Create {
                name,
                alias,
                version,
                description,
            } => print(&c.json(
                "POST",
                &format!("{}/aliases", f(&name)),
                Some(json!({"Name": alias, "FunctionVersion": version, "Description": description.unwrap_or_default()})),
            )),
            AliasCmd::Update {
                name,
                alias,
                version,
            } => print(&c.json(
                "PUT",
                &format!("{}/aliases/{alias}", f(&name)),
                Some(json!({"FunctionVersion": version})),
            )),
            AliasCmd::Get { name, alias } => {
                print(&c.json("GET", &format!("{}/aliases/{alias}", f(&name)), None))
            }
            AliasCmd::Delete { name, alias } => {
                c.json("DELETE", &format!("{}/aliases/{alias}", f(&name)), None);
            }
            AliasCmd::List { name } => print(&c.json("GET", &format!("{}/aliases", f(&name)), None)),
        },
        Cmd::Invoke {
            name,
            qualifier,
            payload,
            payload_file,
            is_async,
            log,
        } => {
            let body = match (payload, payload_file) {
                (Some(p), _) => p.into_bytes(),
                (None, Some(file)) => std::fs::read(&file)
                    .unwrap_or_else(|e| die(format!("reading {}: {e}", file.display()))),
                (None, None) => b"{}".to_vec(),
            };
            let q = qualifier.map(|q| format!("?Qualifier={}", enc(&q))).unwrap_or_default();
            let kind = if is_async { "Event" } else { "RequestResponse" };
            let resp = c.raw(
                "POST",
                &format!("{}/invocations{q}", f(&name)),
                &[("X-Amz-Invocation-Type", kind), ("X-Amz-Log-Type", "Tail")],
                body,
            );
            let header = |h: &str| {
                resp.headers
                    .get(h)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            if !(200..300).contains(&resp.status) {
                let kind = header("x-amzn-errortype").unwrap_or_else(|| "Error".into());
                let msg = serde_json::from_slice::<Value>(&resp.body)
                    .ok()
                    .and_then(|v| v["message"].as_str().map(str::to_string))
                    .unwrap_or_else(|| String::from_utf8_lossy(&resp.body).into_owned());
                die(format!("{kind} ({}): {msg}", resp.status));
            }
            if is_async {
                println!("{}", header("x-amzn-requestid").unwrap_or_default());
                return;
            }
            println!("{}", String::from_utf8_lossy(&resp.body));
            let function_error = header("x-amz-function-error");
            if log || function_error.is_some() {
                if let Some(tail) = header("x-amz-log-result") {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(tail)
                        .unwrap_or_default();
                    eprint!("{}", String::from_utf8_lossy(&bytes));
                }
            }
            if function_error.is_some() {
                std::process::exit(1);
            }
        }
        Cmd::Async {
            request_id,
            function,
        } => match (request_id, function) {
            (Some(id), _) => print(&c.json("GET", &format!("/ember/v1/async-invocations/{id}"), None)),
            (None, Some(fun)) => print(&c.json(
                "GET",
                &format!("/ember/v1/async-invocations?FunctionName={fun}"),
                None,
            )),
            (None, None) => print(&c.json("GET", "/ember/v1/async-invocations", None)),
        },
        Cmd::Logs { name, tail } => {
            let resp = c.raw("GET", &format!("/ember/v1/functions/{name}/logs?Tail={tail}"), &[], Vec::new());
            if resp.status != 200 {
                die(String::from_utf8_lossy(&resp.body));
            }
            print!("{}", String::from_utf8_lossy(&resp.body));
        }
        Cmd::Concurrency { name, limit, clear } => {
            let uri = format!("/2017-10-31/functions/{name}/concurrency");
            match (limit, clear) {
                (_, true) => {
                    c.json("DELETE", &uri, None);
                }
                (Some(n), false) => print(&c.json(
                    "PUT",
                    &uri,
                    Some(json!({"ReservedConcurrentExecutions": n})),
                )),
                (None, false) => print(&c.json(
                    "GET",
                    &format!("/2019-09-30/functions/{name}/concurrency"),
                    None,
                )),
            }
        }
        Cmd::Warm {
            name,
            qualifier,
            count,
        } => print(&c.json(
            "PUT",
            &format!(
                "/2019-09-30/functions/{name}/provisioned-concurrency?Qualifier={}",
                enc(&qualifier)
            ),
            Some(json!({"ProvisionedConcurrentExecutions": count})),
        )),
        Cmd::Pools => print(&c.json("GET", "/ember/v1/pools", None)),
        Cmd::Network => print(&c.json("GET", "/ember/v1/network", None)),
        Cmd::Egress { name, policy } => {
            let uri = format!("/ember/v1/functions/{name}/egress");
            match policy {
                None => print(&c.json("GET", &uri, None)),
                Some(p) => {
                    let v: Value = serde_json::from_str(&p)
                        .unwrap_or_else(|e| die(format!("the policy is not JSON: {e}")));
                    print(&c.json("PUT", &uri, Some(v)))
                }
            }
        }
        Cmd::Reserve {
            account,
            address,
            gateway,
            clear,
        } => {
            let uri = format!("/ember/v1/accounts/{account}/logical-address");
            match (address, gateway, clear) {
                (_, _, true) => {
                    c.json("DELETE", &uri, None);
                }
                (Some(a), Some(g), false) => print(&c.json(
                    "PUT",
                    &uri,
                    Some(json!({"Address": a, "Gateway": g})),
                )),
                _ => print(&c.json("GET", &uri, None)),
            }
        }
        Cmd::Migrate {
            instance,
            to,
            cancel,
            downtime_ms,
        } => {
            let uri = format!("/ember/v1/instances/{instance}/migrate");
            match to {
                Some(to) if !cancel => {
                    print(&c.json("POST", &uri, Some(migrate_input(to, downtime_ms))))
                }
                _ => {
                    c.json("DELETE", &uri, None);
                }
            }
        }
        Cmd::Drain {
            to,
            downtime_ms,
            stop,
        } => match (to, stop) {
            (_, true) => {
                c.json("DELETE", "/ember/v1/drain", None);
            }
            (Some(to), false) => print(&c.json(
                "POST",
                "/ember/v1/drain",
                Some(migrate_input(to, downtime_ms)),
            )),
            (None, false) => print(&c.json("GET", "/ember/v1/drain", None)),
        },
        Cmd::Migrations => print(&c.json("GET", "/ember/v1/migrations", None)),
        Cmd::Health => print(&c.json("GET", "/ember/v1/health", None)),
        Cmd::TlsCert { .. } => unreachable!("handled above"),
    }
}

fn migrate_input(to: String, downtime_ms: Option<u64>) -> Value {
    let mut v = json!({"Destination": to});
    if let Some(ms) = downtime_ms {
        v["DowntimeMs"] = json!(ms);
    }
    v
}
