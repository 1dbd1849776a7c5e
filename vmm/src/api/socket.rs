//! Binding the API socket path.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use super::ApiError;

/// Binds `path`, first removing a socket file left by a dead process. Refuses
/// (rather than steals) a path a live server answers on, and never deletes
/// a file that is not a socket.
pub fn bind_api_socket(path: &Path) -> Result<UnixListener, ApiError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(ApiError::NotASocket(path.to_path_buf()));
        }
        Ok(_) => remove_if_stale(path)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ApiError::Probe {
                path: path.to_path_buf(),
                source,
            })
        }
    }
    UnixListener::bind(path).map_err(|source| ApiError::Bind {
        path: path.to_path_buf(),
        source,
    })
}

fn remove_if_stale(path: &Path) -> Result<(), ApiError> {
    match UnixStream::connect(path) {
        Ok(_) => Err(ApiError::SocketInUse(path.to_path_buf())),
        // Nobody listens: the file is left over from a previous run.
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path)
            .or_else(|e| match e.kind() {
                io::ErrorKind::NotFound => Ok(()),
                _ => Err(e),
            })
            .map_err(|source| ApiError::RemoveStale {
                path: path.to_path_buf(),
                source,
            }),
        Err(source) => Err(ApiError::Probe {
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::tests::TempDir;

    #[test]
    fn binds_fresh_and_stale_paths() {
        let dir = TempDir::new("bind");
        let path = dir.path().join("api.sock");
        let first = bind_api_socket(&path).unwrap();
        // A live listener is not stolen.
        assert!(matches!(
            bind_api_socket(&path),
            Err(ApiError::SocketInUse(_))
        ));
        // Dropping a listener leaves its file behind: that one is stale.
        drop(first);
        assert!(path.exists());
        let _second = bind_api_socket(&path).unwrap();
    }

    #[test]
    fn refuses_non_sockets_and_bad_dirs() {
        let dir = TempDir::new("bind-bad");
        let file = dir.path().join("regular");
        std::fs::write(&file, b"keep me").unwrap();
        let e = bind_api_socket(&file).unwrap_err();
        assert!(matches!(e, ApiError::NotASocket(_)));
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");

        let e = bind_api_socket(&dir.path().join("missing/api.sock")).unwrap_err();
        assert!(matches!(e, ApiError::Bind { .. }));
        assert!(e.to_string().contains("missing/api.sock"), "{e}");
    }
}
