//! NBD URIs (the NBD project's URI spec): `nbd://host[:port][/export]` and
//! `nbd+unix:///[export]?socket=PATH`.

use std::fmt;

/// The default NBD TCP port (IANA).
pub const DEFAULT_PORT: u16 = 10809;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Tcp { host: String, port: u16 },
    Unix { path: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub address: Address,
    /// Export name; empty selects the server's default export.
    pub export: String,
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.address {
            Address::Tcp { host, port } if host.contains(':') => {
                write!(f, "nbd://[{host}]:{port}/{}", self.export)
            }
            Address::Tcp { host, port } => write!(f, "nbd://{host}:{port}/{}", self.export),
            Address::Unix { path } => write!(f, "nbd+unix:///{}?socket={path}", self.export),
        }
    }
}

impl NbdUri {
    pub fn parse(uri: &str) -> Result<NbdUri, String> {
        let (scheme, rest) = uri
            .split_once("://")
            .ok_or_else(|| format!("{uri:?} is not a URI (expected nbd://host:port/export)"))?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, export) = match rest.split_once('/') {
            Some((a, e)) => (a, e),
            None => (rest, ""),
        };
        let export = percent_decode(export)?;
        match scheme {
            "nbd" => {
                if query.is_some() {
                    return Err(format!("{uri:?}: nbd:// takes no query parameters"));
                }
                let (host, port) = split_host_port(authority)?;
                Ok(NbdUri {
                    address: Address::Tcp { host, port },
                    export,
                })
            }
            "nbd+unix" => {
                if !authority.is_empty() {
                    return Err(format!(
                        "{uri:?}: nbd+unix:// takes no host (write nbd+unix:///export?socket=PATH)"
                    ));
                }
                let mut path = None;
                for param in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
                    match param.split_once('=') {
                        Some(("socket", p)) if !p.is_empty() => path = Some(percent_decode(p)?),
                        _ => return Err(format!("{uri:?}: unknown query parameter {param:?}")),
                    }
                }
                let path = path.ok_or_else(|| format!("{uri:?}: missing ?socket=PATH"))?;
                Ok(NbdUri {
                    address: Address::Unix { path },
                    export,
                })
            }
            "nbds" | "nbds+unix" => Err(format!("{uri:?}: TLS (nbds) is not supported")),
            other => Err(format!(
                "{uri:?}: unsupported scheme {other:?} (expected nbd or nbd+unix)"
            )),
        }
    }
}

fn split_host_port(authority: &str) -> Result<(String, u16), String> {
    if authority.is_empty() {
        return Err("nbd:// needs a host".into());
    }
    // A bracketed IPv6 literal may itself contain colons.
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("unterminated IPv6 literal in {authority:?}"))?;
        match after {
            "" => (host, None),
            p => (
                host,
                Some(p.strip_prefix(':').ok_or_else(|| {
                    format!("expected :port after the IPv6 literal in {authority:?}")
                })?),
            ),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(format!("empty host in {authority:?}"));
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("bad port {p:?}"))?,
    };
    Ok((host.to_string(), port))
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8 once decoded"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16, export: &str) -> NbdUri {
        NbdUri {
            address: Address::Tcp {
                host: host.into(),
                port,
            },
            export: export.into(),
        }
    }

    #[test]
    fn parses_tcp() {
        assert_eq!(
            NbdUri::parse("nbd://127.0.0.1:1234/disk").unwrap(),
            tcp("127.0.0.1", 1234, "disk")
        );
        assert_eq!(
            NbdUri::parse("nbd://example.com").unwrap(),
            tcp("example.com", DEFAULT_PORT, "")
        );
        assert_eq!(
            NbdUri::parse("nbd://[::1]:99/a%20b").unwrap(),
            tcp("::1", 99, "a b")
        );
    }

    #[test]
    fn parses_unix() {
        assert_eq!(
            NbdUri::parse("nbd+unix:///exp?socket=/tmp/s.sock").unwrap(),
            NbdUri {
                address: Address::Unix {
                    path: "/tmp/s.sock".into()
                },
                export: "exp".into()
            }
        );
        let u = NbdUri::parse("nbd+unix://?socket=/x").unwrap();
        assert_eq!(u.export, "");
    }

    #[test]
    fn round_trips_through_display() {
        for s in ["nbd://h:1/e", "nbd://[::1]:2/", "nbd+unix:///e?socket=/s"] {
            assert_eq!(NbdUri::parse(s).unwrap().to_string(), s);
        }
    }

    #[test]
    fn rejects_bad_uris() {
        for bad in [
            "",
            "/path/file",
            "http://h/e",
            "nbd://",
            "nbd://h:0/e",
            "nbd://h:70000/e",
            "nbd://h:x/e",
            "nbd://[::1/e",
            "nbd://h/e?socket=/x",
            "nbd+unix:///e",
            "nbd+unix://host/e?socket=/x",
            "nbd+unix:///e?sock=/x",
            "nbd://h/%zz",
            "nbds://h/e",
        ] {
            assert!(NbdUri::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
