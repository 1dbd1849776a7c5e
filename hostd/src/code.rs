//! Function code: a zip as Lambda takes it, turned into the read-only ext4
//! drive the guest agent mounts at `/var/task`. Both are stored once per
//! content hash, so versions sharing code share files.

use std::fs;
use std::io::{self, Cursor};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine;
use sha2::{Digest, Sha256};

use crate::store::Store;

/// Lambda's limits: 50 MB zipped (direct upload), 250 MB unzipped.
pub const MAX_ZIP_BYTES: usize = 50 * 1024 * 1024;
pub const MAX_UNZIPPED_BYTES: u64 = 250 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CodeError {
    #[error("the code is not a valid zip file: {0}")]
    BadZip(String),
    #[error("the code is too large: {0}")]
    TooLarge(String),
    #[error("cannot store the code: {0}")]
    Io(#[from] io::Error),
    #[error("mkfs.ext4 failed to build the code drive: {0}")]
    Mkfs(String),
}

/// Stored code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Code {
    pub sha256_hex: String,
    /// Lambda's `CodeSha256`: base64 of the zip's SHA-256.
    pub sha256_b64: String,
    pub size: u64,
    pub image: PathBuf,
}

/// Checks `zip`, stores it and its ext4 image (unless already stored).
pub fn ingest(store: &Store, zip: &[u8]) -> Result<Code, CodeError> {
    if zip.len() > MAX_ZIP_BYTES {
        return Err(CodeError::TooLarge(format!(
            "{} bytes zipped; the limit is {MAX_ZIP_BYTES}",
            zip.len()
        )));
    }
    let digest = Sha256::digest(zip);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let b64 = base64::engine::general_purpose::STANDARD.encode(digest);
    let mut archive =
        zip::ZipArchive::new(Cursor::new(zip)).map_err(|e| CodeError::BadZip(e.to_string()))?;
    let mut total: u64 = 0;
    for i in 0..archive.len() {
        let f = archive
            .by_index(i)
            .map_err(|e| CodeError::BadZip(e.to_string()))?;
        if f.enclosed_name().is_none() {
            return Err(CodeError::BadZip(format!(
                "entry {:?} points outside the code directory",
                f.name()
            )));
        }
        total = total.saturating_add(f.size());
    }
    if total > MAX_UNZIPPED_BYTES {
        return Err(CodeError::TooLarge(format!(
            "{total} bytes unzipped; the limit is {MAX_UNZIPPED_BYTES}"
        )));
    }
    let image = store.code_image(&hex);
    if !image.exists() {
        let tmp = store.root().join("code").join(format!(".unzip-{hex}"));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp)?;
        let result = archive
            .extract(&tmp)
            .map_err(|e| CodeError::BadZip(e.to_string()))
            .and_then(|()| make_readable(&tmp).map_err(CodeError::Io))
            .and_then(|()| build_image(&tmp, total, &image));
        let _ = fs::remove_dir_all(&tmp);
        result?;
    }
    let zip_path = store.code_zip(&hex);
    if !zip_path.exists() {
        crate::store::write_atomic(&zip_path, zip)?;
    }
    Ok(Code {
        sha256_hex: hex,
        sha256_b64: b64,
        size: zip.len() as u64,
        image,
    })
}

/// The function runs as an unprivileged user in the guest: everything must
/// be readable, directories searchable. Execute bits stay as zipped (a
/// `bootstrap` must be executable, as on Lambda).
fn make_readable(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        let mut perm = meta.permissions();
        if meta.is_dir() {
            perm.set_mode(perm.mode() | 0o555);
            fs::set_permissions(entry.path(), perm)?;
            make_readable(&entry.path())?;
        } else if meta.is_file() {
            perm.set_mode(perm.mode() | 0o444);
            fs::set_permissions(entry.path(), perm)?;
        }
    }
    Ok(())
}

/// `mkfs.ext4 -d`: no journal (the drive is read-only), sized for the
/// content plus room for metadata.
fn build_image(src: &Path, content_bytes: u64, out: &Path) -> Result<(), CodeError> {
    let kib = (content_bytes / 1024) * 5 / 4 + 4096;
    let tmp = out.with_extension("ext4.tmp");
    let result = Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-O",
            "^has_journal",
            "-m",
            "0",
            "-L",
            "code",
            "-d",
        ])
        .arg(src)
        .arg(&tmp)
        .arg(format!("{kib}K"))
        .output();
    match result {
        Ok(o) if o.status.success() => {
            fs::set_permissions(&tmp, fs::Permissions::from_mode(0o444))?;
            fs::rename(&tmp, out)?;
            Ok(())
        }
        Ok(o) => {
            let _ = fs::remove_file(&tmp);
            Err(CodeError::Mkfs(
                String::from_utf8_lossy(&o.stderr).trim().to_string(),
            ))
        }
        Err(e) => Err(CodeError::Mkfs(format!(
            "cannot run mkfs.ext4 (install e2fsprogs): {e}"
        ))),
    }
}

/// Zips a directory (for `ember create --code DIR`), keeping unix modes.
pub fn zip_dir(dir: &Path) -> io::Result<Vec<u8>> {
    let mut buf = Cursor::new(Vec::new());
    {
        let mut w = zip::ZipWriter::new(&mut buf);
        add_dir(&mut w, dir, dir)?;
        w.finish().map_err(io::Error::other)?;
    }
    Ok(buf.into_inner())
}

fn add_dir<W: io::Write + io::Seek>(
    w: &mut zip::ZipWriter<W>,
    root: &Path,
    dir: &Path,
) -> io::Result<()> {
    let mut entries: Vec<_> = fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let rel = path
            .strip_prefix(root)
            .map_err(io::Error::other)?
            .to_string_lossy()
            .into_owned();
        let meta = fs::metadata(&path)?;
        let opts = zip::write::SimpleFileOptions::default()
            .unix_permissions(meta.permissions().mode() & 0o7777);
        if meta.is_dir() {
            w.add_directory(format!("{rel}/"), opts)
                .map_err(io::Error::other)?;
            add_dir(w, root, &path)?;
        } else if meta.is_file() {
            w.start_file(rel, opts).map_err(io::Error::other)?;
            io::copy(&mut fs::File::open(&path)?, w)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zip_round_trip_builds_an_image_once() {
        let src = tempfile::tempdir().unwrap();
        fs::write(src.path().join("bootstrap"), b"#!/bin/sh\necho hi\n").unwrap();
        fs::set_permissions(
            src.path().join("bootstrap"),
            fs::Permissions::from_mode(0o700),
        )
        .unwrap();
        fs::create_dir(src.path().join("lib")).unwrap();
        fs::write(src.path().join("lib/x.py"), b"x = 1\n").unwrap();
        let zip = zip_dir(src.path()).unwrap();

        let state = tempfile::tempdir().unwrap();
        let store = Store::open(state.path()).unwrap();
        let code = ingest(&store, &zip).unwrap();
        assert_eq!(code.sha256_hex.len(), 64);
        assert!(code.image.is_file());
        assert!(store.code_zip(&code.sha256_hex).is_file());
        // Same bytes, same files.
        assert_eq!(ingest(&store, &zip).unwrap(), code);

        // The image holds the files, with bootstrap still executable and
        // now readable by everyone (debugfs reads without mounting).
        let out = Command::new("debugfs")
            .args(["-R", "stat /bootstrap"])
            .arg(&code.image)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Mode:  0744"), "{text}");
    }

    #[test]
    fn bad_zips_are_refused() {
        let state = tempfile::tempdir().unwrap();
        let store = Store::open(state.path()).unwrap();
        let err = ingest(&store, b"not a zip").unwrap_err();
        assert!(matches!(err, CodeError::BadZip(_)), "{err}");

        let mut buf = Cursor::new(Vec::new());
        {
            let mut w = zip::ZipWriter::new(&mut buf);
            w.start_file("../evil", zip::write::SimpleFileOptions::default())
                .unwrap();
            io::Write::write_all(&mut w, b"x").unwrap();
            w.finish().unwrap();
        }
        let err = ingest(&store, &buf.into_inner()).unwrap_err();
        assert!(err.to_string().contains("outside"), "{err}");
    }
}
