//! A jail's NBD path: a unix socket in the jail that hostd joins to the
//! volume service's NBD socket or port, pinned to the one export granted.
//! The VMM never holds the credential, and whatever export it names, only
//! the granted one is opened. To a service on another host (`nbds://`),
//! hostd itself upgrades the session to mutual TLS with
//! `NBD_OPT_STARTTLS`, while the VMM speaks plain NBD on its jail socket.

use std::time::Duration;

use ember_nbd::{
    encode_option, GoRequest, OptionHeader, OptionReplyHeader, ServerGreeting,
    FLAG_C_FIXED_NEWSTYLE, FLAG_FIXED_NEWSTYLE, MAX_OPTION_DATA, OPT_ABORT, OPT_EXPORT_NAME,
    OPT_GO, OPT_INFO, OPT_STARTTLS, OPT_STRUCTURED_REPLY, REP_ACK, REP_ERR_INVALID, REP_ERR_UNSUP,
    REP_FLAG_ERROR,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{NbdTarget, Pin, SharedPin};

/// Serves a VMM's NBD connections made on `listener` (in its jail) to the
/// export pinned in `pin`, until the task is aborted: each connection's
/// negotiation is relayed option by option, the export name of every
/// `NBD_OPT_GO`, `NBD_OPT_INFO` or `NBD_OPT_EXPORT_NAME` replaced by the
/// pinned one and any option that could name another export answered
/// "unsupported" here; once the export is open, bytes are joined both
/// ways.
pub async fn forward_pinned(listener: tokio::net::UnixListener, pin: SharedPin) {
    loop {
        let Ok((vmm, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Some(p) = pin.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            continue;
        };
        tokio::spawn(async move {
            if let Err(e) = pinned_connection(vmm, &p).await {
                log::warn!("NBD connection to {:?} ended: {e}", p.target);
            }
        });
    }
}

/// Any stream to the volume service.
trait Upstream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Upstream for T {}

async fn tcp(addr: &str) -> std::io::Result<tokio::net::TcpStream> {
    let s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true).ok();
    Ok(s)
}

/// Opens the service's end of a VMM's connection: the server's greeting
/// and the VMM's flags are relayed; for [`NbdTarget::TcpTls`] hostd then
/// sends `NBD_OPT_STARTTLS`, and on its `NBD_REP_ACK` does the TLS
/// handshake with this host's identity (the server's certificate must
/// chain to the CA and name the URI's host). Option haggling goes on
/// inside TLS; the VMM sees plain NBD throughout.
async fn open_upstream(
    pin: &Pin,
    vmm: &mut tokio::net::UnixStream,
) -> std::io::Result<Box<dyn Upstream>> {
    match &pin.target {
        NbdTarget::Unix(p) => {
            let mut up = tokio::net::UnixStream::connect(p).await?;
            relay_greeting(&mut up, vmm, false).await?;
            Ok(Box::new(up))
        }
        NbdTarget::Tcp(a) => {
            let mut up = tcp(a).await?;
            relay_greeting(&mut up, vmm, false).await?;
            Ok(Box::new(up))
        }
        NbdTarget::TcpTls(a) => {
            let Some(tls) = &pin.tls else {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!("nbds://{a} needs this host's TLS identity (--tls-*) and it has none"),
                ));
            };
            let name = ember_tls::server_name(a)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            let mut up = tcp(a).await?;
            relay_greeting(&mut up, vmm, true).await?;
            start_tls(&mut up, a).await?;
            let s = tls.connector().connect(name, up).await.map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!("TLS handshake with the volume service at {a}: {e}"),
                )
            })?;
            Ok(Box::new(s))
        }
    }
}

/// The server's greeting to the VMM, the VMM's flags to the server; for
/// TLS both must speak fixed newstyle.
async fn relay_greeting<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    up: &mut S,
    vmm: &mut tokio::net::UnixStream,
    tls: bool,
) -> std::io::Result<()> {
    let mut hello = [0u8; ServerGreeting::LEN];
    up.read_exact(&mut hello).await?;
    let fixed = ServerGreeting::decode(&hello).is_ok_and(|g| g.flags & FLAG_FIXED_NEWSTYLE != 0);
    if tls && !fixed {
        return Err(bad(
            "the volume service does not speak fixed newstyle (no TLS)",
        ));
    }
    vmm.write_all(&hello).await?;
    let mut flags = [0u8; 4];
    vmm.read_exact(&mut flags).await?;
    if tls && u32::from_be_bytes(flags) & FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(bad("the VMM does not speak fixed newstyle"));
    }
    up.write_all(&flags).await
}

/// `NBD_OPT_STARTTLS` on `up` (in the clear), up to its `NBD_REP_ACK`;
/// any other answer ends the connection (nothing else is sent in the
/// clear).
async fn start_tls(up: &mut tokio::net::TcpStream, addr: &str) -> std::io::Result<()> {
    let start = OptionHeader {
        option: OPT_STARTTLS,
        len: 0,
    };
    up.write_all(&start.encode()).await?;
    let not_starttls = || bad("bad reply to NBD_OPT_STARTTLS");
    let (_, reply, rd) = read_option_reply(up).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::InvalidData {
            not_starttls()
        } else {
            e
        }
    })?;
    if reply.option != OPT_STARTTLS {
        return Err(not_starttls());
    }
    if reply.reply != REP_ACK {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "the volume service at {addr} did not start TLS (reply {:#x}: {})",
                reply.reply,
                String::from_utf8_lossy(&rd)
            ),
        ));
    }
    Ok(())
}

/// One option reply from the service: its header's bytes (to relay as
/// they came), the header, and its data (larger than
/// [`MAX_OPTION_DATA`]: an error, nothing read).
async fn read_option_reply<S: tokio::io::AsyncRead + Unpin>(
    up: &mut S,
) -> std::io::Result<([u8; OptionReplyHeader::LEN], OptionReplyHeader, Vec<u8>)> {
    let mut rh = [0u8; OptionReplyHeader::LEN];
    up.read_exact(&mut rh).await?;
    let reply = OptionReplyHeader::decode(&rh).map_err(std::io::Error::from)?;
    if reply.len > MAX_OPTION_DATA {
        return Err(bad("option reply too long"));
    }
    let mut rd = vec![0u8; reply.len as usize];
    up.read_exact(&mut rd).await?;
    Ok((rh, reply, rd))
}

/// An option reply of `reply` without data, from hostd itself.
fn own_reply(option: u32, reply: u32) -> [u8; OptionReplyHeader::LEN] {
    OptionReplyHeader {
        option,
        reply,
        len: 0,
    }
    .encode()
}

/// The negotiation must be done within this.
const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(30);

fn bad(msg: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.to_string())
}

/// `data` of an `NBD_OPT_GO`/`INFO` with the export name replaced, or
/// `None` if it is malformed.
fn repin_go(data: &[u8], export: &str) -> Option<Vec<u8>> {
    let go = GoRequest::decode(data).ok()?;
    GoRequest {
        export: export.to_string(),
        ..go
    }
    .encode()
    .ok()
}

/// One VMM connection through the pin (see [`forward_pinned`]).
async fn pinned_connection(mut vmm: tokio::net::UnixStream, pin: &Pin) -> std::io::Result<()> {
    let negotiated = tokio::time::timeout(NEGOTIATION_TIMEOUT, async {
        let mut up = open_upstream(pin, &mut vmm).await?;
        loop {
            let mut head = [0u8; OptionHeader::LEN];
            vmm.read_exact(&mut head).await?;
            let OptionHeader { option, len } =
                OptionHeader::decode(&head).map_err(|_| bad("bad option magic"))?;
            if len > MAX_OPTION_DATA {
                return Err(bad("option too long"));
            }
            let mut data = vec![0u8; len as usize];
            vmm.read_exact(&mut data).await?;
            let data = match option {
                OPT_GO | OPT_INFO => match repin_go(&data, &pin.export) {
                    Some(d) => d,
                    None => {
                        // Not passed on: what the service would answer.
                        vmm.write_all(&own_reply(option, REP_ERR_INVALID)).await?;
                        continue;
                    }
                },
                OPT_EXPORT_NAME => pin.export.as_bytes().to_vec(),
                OPT_ABORT | OPT_STRUCTURED_REPLY => data,
                _ => {
                    // Not passed on: answered "unsupported" here.
                    vmm.write_all(&own_reply(option, REP_ERR_UNSUP)).await?;
                    continue;
                }
            };
            up.write_all(&encode_option(option, &data)?).await?;
            if matches!(option, OPT_EXPORT_NAME | OPT_ABORT) {
                // The answer (or a close) and what follows are joined as is.
                return Ok(up);
            }
            // The replies to this option, up to its last one.
            loop {
                let (rh, reply, rd) = read_option_reply(&mut up).await?;
                vmm.write_all(&rh).await?;
                vmm.write_all(&rd).await?;
                if reply.reply == REP_ACK && option == OPT_GO {
                    return Ok(up);
                }
                if reply.reply == REP_ACK || reply.reply & REP_FLAG_ERROR != 0 {
                    break;
                }
            }
        }
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "NBD negotiation timed out"))?;
    let mut up = negotiated?;
    tokio::io::copy_bidirectional(&mut vmm, &mut up).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};
    use std::sync::{Arc, Mutex};

    /// The jail's NBD path against a real volume service (its NBD server
    /// and registry, in this process, on real unix sockets): whatever
    /// export a VMM names (another volume, that volume's own credential,
    /// the generation, nothing), it opens the pinned volume and no other;
    /// options that could name an export otherwise are refused; a new pin
    /// (a move back) is used by the next connection, and the connection
    /// on the old credential is fenced.
    #[test]
    fn the_jail_path_opens_only_the_pinned_export() {
        use ember_volumed::nbd::client::Client;
        use ember_volumed::nbd::{serve_unix, Exports, Limits};
        use ember_volumed::registry::{export_name, Registry};
        use std::os::unix::fs::FileExt;

        let dir = tempfile::tempdir().unwrap();
        let store =
            ember_volumed::store::KvStore::open(&[], &dir.path().join("store"), "/v").unwrap();
        let reg = Registry::open(&dir.path().join("data"), Box::new(store)).unwrap();
        let mut creds = Vec::new();
        for (name, byte) in [("mine", 0x4du8), ("theirs", 0x74)] {
            reg.create(name, 1 << 20, None).unwrap();
            let a = reg.attach(name, "h", None).unwrap();
            creds.push(a.credential);
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(reg.image_path(name))
                .unwrap();
            f.write_all_at(&[byte; 512], 0).unwrap();
        }
        let nbd = dir.path().join("nbd.sock");
        let l = std::os::unix::net::UnixListener::bind(&nbd).unwrap();
        let exports = Exports::Volumes(reg.clone());
        std::thread::spawn(move || serve_unix(l, exports, Limits::default()));

        let rt = tokio::runtime::Runtime::new().unwrap();
        let jail = dir.path().join("jail-nbd.sock");
        let pin: SharedPin = Arc::new(Mutex::new(Some(Pin {
            target: NbdTarget::Unix(nbd.clone()),
            export: export_name("mine", &creds[0]),
            tls: None,
        })));
        {
            let _g = rt.enter();
            let l = tokio::net::UnixListener::bind(&jail).unwrap();
            rt.spawn(forward_pinned(l, pin.clone()));
        }
        let asks = [
            "mine".to_string(),
            String::new(),
            "theirs".to_string(),
            export_name("theirs", &creds[1]),
            "theirs@1".into(),
            "mine@1".into(),
            "../x@y".into(),
        ];
        let mut other = 0;
        for ask in &asks {
            let mut c = Client::connect_unix(&jail, ask).unwrap();
            let r = c.read(0, 512).unwrap();
            assert_eq!(r.error, 0);
            if r.data != vec![0x4d; 512] {
                other += 1;
            }
        }
        println!(
            "jail NBD path: {} export names asked, {other} opened anything but the pinned one",
            asks.len()
        );
        assert_eq!(other, 0);

        // NBD_OPT_LIST (and any option but GO/INFO/EXPORT_NAME) is
        // answered "unsupported" by the forwarder itself.
        let mut s = std::os::unix::net::UnixStream::connect(&jail).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        ember_nbd::client_greet(&mut s).unwrap();
        ember_nbd::write_option(&mut s, ember_nbd::OPT_LIST, &[]).unwrap();
        let reply = ember_nbd::OptionReply::read(&mut s).unwrap();
        assert_eq!(reply.reply, REP_ERR_UNSUP);
        // A malformed NBD_OPT_GO is answered "invalid" here, never passed on.
        ember_nbd::write_option(&mut s, OPT_GO, &[0, 0, 0, 9, b'x']).unwrap();
        let reply = ember_nbd::OptionReply::read_for(&mut s, OPT_GO).unwrap();
        assert_eq!(reply.reply, REP_ERR_INVALID);

        // A move (away and back, as after a failed migration): the open
        // connection is fenced, the next one opens the new grant.
        let mut held = Client::connect_unix(&jail, "mine").unwrap();
        reg.move_to("mine", "h2", None).unwrap();
        let back = reg.move_to("mine", "h", None).unwrap();
        assert_ne!(held.read(0, 512).unwrap().error, 0, "fenced");
        // Still the old pin: refused.
        assert!(Client::connect_unix(&jail, "mine").is_err());
        *pin.lock().unwrap() = Some(Pin {
            target: NbdTarget::Unix(nbd.clone()),
            export: export_name("mine", &back.credential),
            tls: None,
        });
        let mut c = Client::connect_unix(&jail, "mine").unwrap();
        assert_eq!(c.read(0, 512).unwrap().data, vec![0x4d; 512]);
        drop(rt);
    }

    /// A GnuTLS tool's certificate directory: `ca-cert.pem`,
    /// `server-cert.pem`, `server-key.pem`.
    fn server_dir(dir: &Path, f: &ember_tls::TlsFiles) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::copy(&f.ca, dir.join("ca-cert.pem")).unwrap();
        std::fs::copy(&f.cert, dir.join("server-cert.pem")).unwrap();
        std::fs::copy(&f.key, dir.join("server-key.pem")).unwrap();
        dir.to_path_buf()
    }

    /// The jail's NBD path to a volume service on another host
    /// (`nbds://`): hostd starts TLS itself (the VMM speaks plain NBD on
    /// its socket) against the real volume service's TLS port (in this
    /// process) and against `nbdkit --tls=require --tls-verify-peer`:
    /// with this host's identity it reads and writes; with a certificate
    /// of another CA, trusting another CA, or to a server that will not
    /// start TLS, the VMM's connection gets nothing.
    #[test]
    fn the_jail_path_runs_inside_tls_across_hosts() {
        use ember_tls::{dev_certs, Tls, TlsFiles};
        use ember_volumed::nbd::client::Client;
        use ember_volumed::nbd::{serve_tcp, serve_tcp_tls, Exports, Limits};
        use ember_volumed::registry::{export_name, Registry};
        use std::os::unix::fs::FileExt;

        let dir = tempfile::tempdir().unwrap();
        let sans = ["127.0.0.1".to_string(), "localhost".to_string()];
        let service = dev_certs(&dir.path().join("ours"), "volumed", &sans).unwrap();
        let host = dev_certs(&dir.path().join("ours"), "host", &sans).unwrap();
        let other = dev_certs(&dir.path().join("theirs"), "host", &sans).unwrap();
        let ours = Tls::load(&host).unwrap();
        // Another CA's certificate, trusting ours: the server refuses it.
        let theirs = Tls::load(&TlsFiles {
            cert: other.cert.clone(),
            key: other.key.clone(),
            ca: service.ca.clone(),
        })
        .unwrap();
        // Ours, trusting another CA: hostd refuses the server.
        let distrustful = Tls::load(&TlsFiles {
            cert: host.cert.clone(),
            key: host.key.clone(),
            ca: other.ca.clone(),
        })
        .unwrap();

        let store =
            ember_volumed::store::KvStore::open(&[], &dir.path().join("store"), "/v").unwrap();
        let reg = Registry::open(&dir.path().join("data"), Box::new(store)).unwrap();
        reg.create("mine", 1 << 20, None).unwrap();
        let cred = reg.attach("mine", "h", None).unwrap().credential;
        let image = std::fs::File::open(reg.image_path("mine")).unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let tls_addr = l.local_addr().unwrap().to_string();
        let (exports, server) = (Exports::Volumes(reg.clone()), Tls::load(&service).unwrap());
        std::thread::spawn(move || serve_tcp_tls(l, exports, Limits::default(), server));
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let plain_addr = l.local_addr().unwrap().to_string();
        let exports = Exports::Volumes(reg.clone());
        std::thread::spawn(move || serve_tcp(l, exports, Limits::default()));

        let rt = tokio::runtime::Runtime::new().unwrap();
        let mut n = 0;
        let mut through = |target: NbdTarget, export: &str, tls: &Tls| -> PathBuf {
            n += 1;
            let jail = dir.path().join(format!("jail-{n}.sock"));
            let pin: SharedPin = Arc::new(Mutex::new(Some(Pin {
                target,
                export: export.to_string(),
                tls: Some(tls.clone()),
            })));
            let _g = rt.enter();
            let l = tokio::net::UnixListener::bind(&jail).unwrap();
            rt.spawn(forward_pinned(l, pin));
            jail
        };
        let mine = export_name("mine", &cred);
        let tls_target = NbdTarget::TcpTls(tls_addr.clone());
        let jail = through(tls_target.clone(), &mine, &ours);
        let mut c = Client::connect_unix(&jail, "anything").expect("through TLS");
        assert_eq!(c.size, 1 << 20);
        assert_eq!(c.write(0, &[0x3c; 4096]).unwrap().error, 0);
        assert_eq!(c.read(0, 4096).unwrap().data, vec![0x3c; 4096]);
        let mut b = [0u8; 4096];
        image.read_exact_at(&mut b, 0).unwrap();
        assert_eq!(b, [0x3c; 4096], "the write is on the volume");

        let mut attempts = vec![
            (
                "volumed, another CA's certificate",
                through(tls_target.clone(), &mine, &theirs),
            ),
            (
                "volumed, trusting another CA",
                through(tls_target.clone(), &mine, &distrustful),
            ),
            (
                "a plaintext server",
                through(NbdTarget::TcpTls(plain_addr), &mine, &ours),
            ),
        ];
        let mut _nbdkit = None;
        let have_nbdkit = std::process::Command::new("nbdkit")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if have_nbdkit {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let sdir = server_dir(&dir.path().join("nbdkit"), &service);
            let child = std::process::Command::new("nbdkit")
                .args(["-f", "--exit-with-parent", "-i", "127.0.0.1", "-p"])
                .arg(port.to_string())
                .args(["--tls=require", "--tls-verify-peer"])
                .arg(format!("--tls-certificates={}", sdir.display()))
                .args(["memory", "16M"])
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            struct Kill(std::process::Child);
            impl Drop for Kill {
                fn drop(&mut self) {
                    let _ = self.0.kill();
                    let _ = self.0.wait();
                }
            }
            let mut child = Kill(child);
            let start = std::time::Instant::now();
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(child.0.try_wait().unwrap().is_none(), "nbdkit exited");
                assert!(
                    start.elapsed() < Duration::from_secs(20),
                    "nbdkit did not listen"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            let target = NbdTarget::TcpTls(format!("127.0.0.1:{port}"));
            let jail = through(target.clone(), "", &ours);
            let mut c = Client::connect_unix(&jail, "x").expect("nbdkit through TLS");
            assert_eq!(c.size, 16 << 20);
            assert_eq!(c.write(512, &[0x9e; 512]).unwrap().error, 0);
            assert_eq!(c.read(512, 512).unwrap().data, vec![0x9e; 512]);
            println!("nbdkit --tls=require: read and written through the jail path");
            attempts.push((
                "nbdkit, another CA's certificate",
                through(target.clone(), "", &theirs),
            ));
            attempts.push((
                "nbdkit, trusting another CA",
                through(target, "", &distrustful),
            ));
            _nbdkit = Some(child);
        } else {
            println!("nbdkit skipped: not installed");
        }
        let mut got_through = 0;
        for (what, jail) in &attempts {
            match Client::connect_unix(jail, "x").and_then(|mut c| c.read(0, 512)) {
                Ok(r) if r.error == 0 => {
                    got_through += 1;
                    println!("{what}: GOT THROUGH");
                }
                r => println!("{what}: nothing ({:?})", r.err()),
            }
        }
        // The service still serves this host.
        let mut c = Client::connect_unix(&jail, "again").unwrap();
        assert_eq!(c.read(0, 4096).unwrap().data, vec![0x3c; 4096]);
        println!(
            "jail NBD path over TLS: {} attempts without the right identity, {got_through} got through",
            attempts.len()
        );
        assert_eq!(got_through, 0);
        drop(rt);
    }
}
