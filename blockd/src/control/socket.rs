//! Claiming a unix socket path in run-dir: refuse when a live process answers there (a second
//! daemon must never steal the first one's clients), remove it when it is stale (left by a
//! crash), and bind with the mode asked for before anyone can connect.

use std::{
    io,
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::net::{UnixListener, UnixStream};

/// How long a socket that exists may take to accept before it counts as live anyway: a stopped
/// (SIGSTOP) daemon accepts nothing, and its socket must not be stolen either.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a socket path could not be claimed.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("{} is in use: another process (another blockd?) answers on it", path.display())]
    InUse { path: PathBuf },
    #[error("{} exists and is not a socket; remove it or change run-dir", path.display())]
    NotSocket { path: PathBuf },
    #[error("cannot check {}", path.display())]
    Probe {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove stale socket {}", path.display())]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on {}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Makes `path` free to bind: nothing there, or a stale socket (removed, logged).
pub async fn claim(path: &Path) -> Result<(), SocketError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(SocketError::Probe { path: path.into(), source }),
    };
    if !meta.file_type().is_socket() {
        return Err(SocketError::NotSocket { path: path.into() });
    }
    match tokio::time::timeout(PROBE_TIMEOUT, UnixStream::connect(path)).await {
        Ok(Ok(_)) | Err(_) => Err(SocketError::InUse { path: path.into() }),
        Ok(Err(e)) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
            tracing::info!(path = %path.display(), "removing stale socket");
            std::fs::remove_file(path)
                .or_else(|e| if e.kind() == io::ErrorKind::NotFound { Ok(()) } else { Err(e) })
                .map_err(|source| SocketError::RemoveStale { path: path.into(), source })
        }
        Ok(Err(e)) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Ok(Err(source)) => Err(SocketError::Probe { path: path.into(), source }),
    }
}

/// Claims `path` and listens on it. With `mode`, the socket appears at `path` only once it has
/// that mode: it is bound under a temporary name in the same directory, chmod-ed, then renamed,
/// so no client can connect in between.
pub async fn bind(path: &Path, mode: Option<u32>) -> Result<UnixListener, SocketError> {
    claim(path).await?;
    let bind_err = |source| SocketError::Bind { path: path.into(), source };
    let Some(mode) = mode else {
        return UnixListener::bind(path).map_err(bind_err);
    };
    // Short, so it fits wherever `path` fits (validate() checked `control.sock`).
    let tmp = path.with_file_name(format!(".{}.tmp", std::process::id() % 100_000));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(bind_err)?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(bind_err(e));
    }
    Ok(listener)
}

/// Removes a socket this process created; a missing file is fine, other failures are logged.
pub fn remove(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot remove socket"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bind_sets_the_mode_and_refuses_a_live_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let _live = bind(&path, Some(0o600)).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let err = bind(&path, Some(0o600)).await.unwrap_err();
        assert!(matches!(err, SocketError::InUse { .. }), "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary left");
    }

    #[tokio::test]
    async fn stale_socket_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists(), "a closed listener leaves its file behind");
        let _l = bind(&path, None).await.unwrap();
        UnixStream::connect(&path).await.unwrap();
    }

    #[tokio::test]
    async fn a_regular_file_is_not_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        std::fs::write(&path, b"precious").unwrap();
        let err = bind(&path, None).await.unwrap_err();
        assert!(matches!(err, SocketError::NotSocket { .. }), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    }
}
