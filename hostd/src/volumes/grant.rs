//! An attachment as the volume service grants it, and where its NBD
//! connections go from this host.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Deserialize;

use super::VolumeError;

/// An attachment as the volume service grants it.
#[derive(Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Grant {
    pub volume: String,
    pub host: String,
    pub generation: u64,
    /// `<volume>@<credential>`: a secret, kept in hostd (never given to a
    /// VMM, never logged).
    pub export_name: String,
    #[serde(default)]
    pub uri: Option<String>,
    #[serde(default)]
    pub unix_uri: Option<String>,
    /// This host's TLS identity, for an `nbds://` endpoint (set by
    /// [`super::Volumes`], not by the service's answer).
    #[serde(skip)]
    pub tls: Option<ember_tls::Tls>,
}

impl std::fmt::Debug for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grant")
            .field("volume", &self.volume)
            .field("host", &self.host)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// Where NBD connections for a volume go from this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdTarget {
    Unix(PathBuf),
    Tcp(String),
    /// `HOST:PORT` of a service that requires TLS (`nbds://`).
    TcpTls(String),
}

impl Grant {
    /// The service's NBD endpoint: its unix socket when it has one and
    /// the socket is on this host, else its TCP address (`nbds://`: inside
    /// TLS, for a service on another host).
    pub fn target(&self) -> Result<NbdTarget, VolumeError> {
        if let Some(u) = &self.unix_uri {
            if let Some((_, sock)) = u.split_once("?socket=") {
                let sock = PathBuf::from(sock);
                if sock.exists() || self.uri.is_none() {
                    return Ok(NbdTarget::Unix(sock));
                }
            }
        }
        if let Some(u) = &self.uri {
            if let Some(rest) = u.strip_prefix("nbds://") {
                let addr = rest.split('/').next().unwrap_or_default();
                return Ok(NbdTarget::TcpTls(addr.to_string()));
            }
            if let Some(rest) = u.strip_prefix("nbd://") {
                let addr = rest.split('/').next().unwrap_or_default();
                return Ok(NbdTarget::Tcp(addr.to_string()));
            }
        }
        Err(VolumeError::NoEndpoint(self.volume.clone()))
    }

    /// The URI a VMM opens through the socket at `vm_socket`: the
    /// volume's name alone (the socket adds the credential).
    pub fn uri_via(&self, vm_socket: &Path) -> String {
        format!("nbd+unix:///{}?socket={}", self.volume, vm_socket.display())
    }

    /// What a jail's forwarder opens for this grant; an `nbds://`
    /// endpoint needs this host's TLS identity.
    pub fn pin(&self) -> Result<Pin, VolumeError> {
        let target = self.target()?;
        if let (NbdTarget::TcpTls(addr), None) = (&target, &self.tls) {
            return Err(VolumeError::NoTlsIdentity {
                volume: self.volume.clone(),
                addr: addr.clone(),
            });
        }
        Ok(Pin {
            target,
            export: self.export_name.clone(),
            tls: self.tls.clone(),
        })
    }
}

/// The one export a jail's NBD path opens, and where.
#[derive(Clone)]
pub struct Pin {
    pub target: NbdTarget,
    /// `<volume>@<credential>`.
    pub export: String,
    /// This host's identity, for [`NbdTarget::TcpTls`].
    pub tls: Option<ember_tls::Tls>,
}

/// A jail's pin, replaced when the attachment is granted again (a move
/// back after a failed migration): connections made after that use it.
pub type SharedPin = Arc<Mutex<Option<Pin>>>;

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(uri: Option<&str>, unix: Option<&str>) -> Grant {
        Grant {
            volume: "v".into(),
            host: "h".into(),
            generation: 3,
            export_name: "v@3".into(),
            uri: uri.map(str::to_string),
            unix_uri: unix.map(str::to_string),
            tls: None,
        }
    }

    #[test]
    fn grants_name_their_endpoint_and_the_uri_through_a_jail() {
        let here = tempfile::tempdir().unwrap();
        let sock = here.path().join("v.sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let unix = format!("nbd+unix:///v@3?socket={}", sock.display());
        let g = grant(Some("nbd://10.0.0.1:10809/v@3"), Some(&unix));
        assert_eq!(g.target().unwrap(), NbdTarget::Unix(sock.clone()));
        // A service on another host: its socket is not here, its port is.
        let g = grant(
            Some("nbds://10.0.0.1:10809/v@3"),
            Some("nbd+unix:///v@3?socket=/nonexistent/v.sock"),
        );
        assert_eq!(
            g.target().unwrap(),
            NbdTarget::TcpTls("10.0.0.1:10809".into())
        );
        let g = grant(Some("nbd://10.0.0.1:10809/v@3"), None);
        assert_eq!(g.target().unwrap(), NbdTarget::Tcp("10.0.0.1:10809".into()));
        assert!(grant(None, None).target().is_err());
        // Across hosts inside TLS: this host's identity is needed, and
        // without one the grant is refused at once, saying why.
        let mut t = grant(Some("nbds://10.0.0.1:10809/v@3"), None);
        assert_eq!(
            t.target().unwrap(),
            NbdTarget::TcpTls("10.0.0.1:10809".into())
        );
        let e = t.pin().err().expect("no TLS identity").to_string();
        assert!(e.contains("no TLS identity"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let files = ember_tls::dev_certs(dir.path(), "h", &["localhost".into()]).unwrap();
        t.tls = Some(ember_tls::Tls::load(&files).unwrap());
        assert!(t.pin().is_ok());
        // The VMM's URI names the volume alone: the credential stays here.
        assert_eq!(
            g.uri_via(Path::new("/run/nbd.sock")),
            "nbd+unix:///v?socket=/run/nbd.sock"
        );
        assert!(!format!("{g:?}").contains("v@3"), "{g:?}");
    }
}
