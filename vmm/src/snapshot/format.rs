//! The snapshot file: a fixed header (magic, format version, payload
//! length, CRC-64 of the payload) followed by the JSON payload. Written to a
//! temporary name and renamed, so a reader never sees half a file.

use std::io::Write;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

pub const MAGIC: [u8; 8] = *b"EMBERSNP";
/// Bumped whenever the payload's shape changes incompatibly.
pub const FORMAT_VERSION: u32 = 1;
const HEADER_LEN: usize = 8 + 4 + 8 + 8;
/// No VM state is anywhere near this; a larger length means corruption.
const MAX_PAYLOAD: u64 = 256 << 20;

const CRC: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("cannot read snapshot file {path}: {err}")]
    Read { path: String, err: String },
    #[error("cannot write snapshot file {path}: {err}")]
    Write { path: String, err: String },
    #[error("{path} is not an Ember snapshot (bad magic)")]
    BadMagic { path: String },
    #[error("{path} is snapshot format version {found}; this VMM reads version {FORMAT_VERSION}")]
    Version { path: String, found: u32 },
    #[error("{path} is truncated: {found} bytes, expected {expected}")]
    Truncated {
        path: String,
        found: u64,
        expected: u64,
    },
    #[error("{path} is corrupt: checksum mismatch")]
    Checksum { path: String },
    #[error("{path} has an invalid payload: {err}")]
    Payload { path: String, err: String },
}

/// Serializes `value` and writes it to `path` atomically.
pub fn write<T: Serialize>(path: &Path, value: &T) -> Result<(), FormatError> {
    let err = |e: String| FormatError::Write {
        path: path.display().to_string(),
        err: e,
    };
    let bytes = encode(value).map_err(err)?;
    write_atomic(path, &bytes).map_err(|e| err(e.to_string()))
}

/// The snapshot file's bytes for `value` (header and payload); a migration
/// stream carries the same bytes, so it is checked the same way.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, String> {
    let payload = serde_json::to_vec(value).map_err(|e| e.to_string())?;
    let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len());
    bytes.extend_from_slice(&MAGIC);
    bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&CRC.checksum(&payload).to_le_bytes());
    bytes.extend_from_slice(&payload);
    Ok(bytes)
}

/// Writes `bytes` to a temporary file beside `path`, syncs, and renames.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = temp_path(path);
    let r = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename is durable only once the directory is.
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        std::fs::File::open(dir)?.sync_all()
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// The temporary name a file is written under before its rename.
pub fn temp_path(path: &Path) -> std::path::PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp.{}", std::process::id()));
    path.with_file_name(name)
}

/// Reads and checks a snapshot file, then deserializes its payload.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<T, FormatError> {
    use std::io::Read;
    let p = path.display().to_string();
    let read_err = |e: std::io::Error| FormatError::Read {
        path: p.clone(),
        err: e.to_string(),
    };
    // Never more than a valid file can hold: a longer one is refused by
    // `decode` for its length, without reading it all.
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(read_err)?
        .take(HEADER_LEN as u64 + MAX_PAYLOAD + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    decode(&bytes, &p)
}

/// Checks `bytes` as written by [`encode`] (named `p` in errors), then
/// deserializes the payload.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], p: &str) -> Result<T, FormatError> {
    let p = p.to_string();
    if bytes.len() < MAGIC.len() || bytes[..8] != MAGIC {
        return Err(FormatError::BadMagic { path: p });
    }
    if bytes.len() < HEADER_LEN {
        return Err(FormatError::Truncated {
            path: p,
            found: bytes.len() as u64,
            expected: HEADER_LEN as u64,
        });
    }
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(FormatError::Version {
            path: p,
            found: version,
        });
    }
    let len = u64_at(12);
    let crc = u64_at(20);
    let expected = HEADER_LEN as u64 + len.min(MAX_PAYLOAD);
    if len > MAX_PAYLOAD || bytes.len() as u64 != expected {
        return Err(FormatError::Truncated {
            path: p,
            found: bytes.len() as u64,
            expected,
        });
    }
    let payload = &bytes[HEADER_LEN..];
    if CRC.checksum(payload) != crc {
        return Err(FormatError::Checksum { path: p });
    }
    serde_json::from_slice(payload).map_err(|e| FormatError::Payload {
        path: p,
        err: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, serde::Deserialize, Debug, PartialEq)]
    struct S {
        a: u32,
        b: Vec<u8>,
    }

    #[test]
    fn round_trip_and_every_kind_of_damage() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("snap");
        let v = S {
            a: 7,
            b: vec![1, 2, 3],
        };
        write(&p, &v).unwrap();
        assert_eq!(read::<S>(&p).unwrap(), v);
        assert!(!temp_path(&p).exists());
        let good = std::fs::read(&p).unwrap();

        let mut bad = good.clone();
        bad[0] = b'X';
        std::fs::write(&p, &bad).unwrap();
        assert!(matches!(read::<S>(&p), Err(FormatError::BadMagic { .. })));

        let mut bad = good.clone();
        bad[8] = 99;
        std::fs::write(&p, &bad).unwrap();
        assert!(matches!(
            read::<S>(&p),
            Err(FormatError::Version { found: 99, .. })
        ));

        std::fs::write(&p, &good[..good.len() - 3]).unwrap();
        let e = read::<S>(&p).unwrap_err();
        assert!(matches!(e, FormatError::Truncated { .. }), "{e}");
        assert!(e.to_string().contains("truncated"));

        let mut bad = good.clone();
        let last = bad.len() - 2;
        bad[last] ^= 0x20;
        std::fs::write(&p, &bad).unwrap();
        assert!(matches!(read::<S>(&p), Err(FormatError::Checksum { .. })));

        std::fs::write(&p, &good[..10]).unwrap();
        assert!(matches!(read::<S>(&p), Err(FormatError::Truncated { .. })));

        assert!(matches!(
            read::<S>(&dir.path().join("missing")),
            Err(FormatError::Read { .. })
        ));
    }
}
