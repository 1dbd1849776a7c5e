//! hostd's state on disk, so that functions, versions, aliases and the
//! async queue survive a restart. One JSON file per function and per
//! queued invocation, each replaced atomically (temporary file, fsync,
//! rename, fsync of the directory), so a crash leaves the old or the new
//! content, never a torn file.
//!
//! Layout under the state directory:
//! * `functions/<name>.json`: a [`FunctionRecord`]
//! * `code/<sha256>.zip`, `code/<sha256>.ext4`: code as uploaded, and as
//!   the read-only drive the guest mounts
//! * `snapshots/<name>/<version>-<generation>/{vm.snap,mem}`
//! * `async/<request id>.json`: queued and finished async invocations
//! * `logs/<name>.log`: the functions' output

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::model::FunctionRecord;

#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Opens (creating if needed) the state directory `root`.
    pub fn open(root: &Path) -> io::Result<Store> {
        for sub in ["functions", "code", "snapshots", "async", "logs"] {
            fs::create_dir_all(root.join(sub))?;
        }
        Ok(Store {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn function_path(&self, name: &str) -> PathBuf {
        self.root.join("functions").join(format!("{name}.json"))
    }

    pub fn save_function(&self, f: &FunctionRecord) -> io::Result<()> {
        write_json_atomic(&self.function_path(&f.name), f)
    }

    pub fn delete_function(&self, name: &str) -> io::Result<()> {
        remove_if_exists(&self.function_path(name))?;
        let snaps = self.root.join("snapshots").join(name);
        if snaps.exists() {
            fs::remove_dir_all(snaps)?;
        }
        Ok(())
    }

    /// Every stored function. A file that cannot be read is reported and
    /// skipped (left in place for the operator), not fatal.
    pub fn load_functions(&self) -> io::Result<(Vec<FunctionRecord>, Vec<String>)> {
        load_dir(&self.root.join("functions"))
    }

    pub fn code_zip(&self, sha: &str) -> PathBuf {
        self.root.join("code").join(format!("{sha}.zip"))
    }

    pub fn code_image(&self, sha: &str) -> PathBuf {
        self.root.join("code").join(format!("{sha}.ext4"))
    }

    /// Directory for a new snapshot of `function`/`version`.
    pub fn snapshot_dir(&self, function: &str, version: &str, generation: u64) -> PathBuf {
        // `$LATEST` is a fine file name, but keep shell-friendly names.
        let v = version.replace('$', "");
        self.root
            .join("snapshots")
            .join(function)
            .join(format!("{v}-{generation}"))
    }

    /// Logical addresses reserved by accounts.
    pub fn reservations_path(&self) -> PathBuf {
        self.root.join("network").join("reservations.json")
    }

    pub fn async_dir(&self) -> PathBuf {
        self.root.join("async")
    }

    pub fn log_path(&self, function: &str) -> PathBuf {
        self.root.join("logs").join(format!("{function}.log"))
    }
}

/// Reads every `*.json` in `dir`; returns the parsed values and a message
/// per file that failed.
pub fn load_dir<T: DeserializeOwned>(dir: &Path) -> io::Result<(Vec<T>, Vec<String>)> {
    let mut out = Vec::new();
    let mut bad = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        match fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        {
            Ok(v) => out.push(v),
            Err(e) => bad.push(format!("{}: {e}", path.display())),
        }
    }
    Ok((out, bad))
}

/// Replaces `path` with `value` as pretty JSON, atomically and durably.
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    let body = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    write_atomic(path, &body)
}

pub fn write_atomic(path: &Path, body: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::other(format!("{} has no parent", path.display())))?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io::Error::other(format!("bad file name {}", path.display())))?;
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(body)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

/// Removes `path` durably (the directory is synced after); absent is fine.
pub fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(()) => match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => File::open(dir)?.sync_all(),
            _ => Ok(()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::*;

    #[test]
    fn functions_round_trip_and_bad_files_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut f = sample_record("f1");
        f.reserved_concurrency = Some(2);
        store.save_function(&f).unwrap();
        fs::write(dir.path().join("functions/broken.json"), b"{nope").unwrap();
        let (loaded, bad) = store.load_functions().unwrap();
        assert_eq!(loaded, vec![f]);
        assert_eq!(bad.len(), 1);
        assert!(bad[0].contains("broken.json"));
        store.delete_function("f1").unwrap();
        assert!(store.load_functions().unwrap().0.is_empty());
    }

    #[test]
    fn snapshot_dirs_avoid_dollar_signs() {
        let store = Store {
            root: PathBuf::from("/s"),
        };
        assert_eq!(
            store.snapshot_dir("f", LATEST, 3),
            PathBuf::from("/s/snapshots/f/LATEST-3")
        );
    }
}
