//! Client side of the control socket: small and blocking (std `UnixStream` with timeouts), so
//! `blockctl` needs no runtime.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use super::{ErrorKind, NodeStatus, Reply, Request, Response, MAX_RESPONSE_LINE};

/// Why a control request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket: the daemon is not running (or uses another run-dir).
    #[error("blockd is not running: nothing listens on {}", path.display())]
    NotRunning {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot connect to blockd at {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("talking to blockd at {} failed", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("blockd closed the connection without replying")]
    Closed,
    #[error("blockd's reply is longer than {MAX_RESPONSE_LINE} bytes")]
    TooLong,
    #[error("blockd's reply is not valid")]
    Decode(#[source] serde_json::Error),
    /// The daemon refused the request; `kind` says why in a way scripts can branch on.
    #[error("blockd refused: {message} ({kind})")]
    Refused { kind: ErrorKind, message: String },
    #[error("blockd answered a {sent} request with another kind of reply")]
    Unexpected { sent: &'static str },
}

/// A connection to the daemon's control socket.
#[derive(Debug)]
pub struct Client {
    path: PathBuf,
    reader: BufReader<UnixStream>,
}

impl Client {
    /// Connects to `path`; `timeout` bounds each later read and write.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| {
            let not_running = matches!(source.kind(), io::ErrorKind::NotFound)
                || source.raw_os_error() == Some(libc::ECONNREFUSED);
            let path = path.to_path_buf();
            if not_running {
                ClientError::NotRunning { path, source }
            } else {
                ClientError::Connect { path, source }
            }
        })?;
        let io_err = |source| ClientError::Io { path: path.to_path_buf(), source };
        stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
        stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
        Ok(Client { path: path.to_path_buf(), reader: BufReader::new(stream) })
    }

    /// Sends `request` and returns the daemon's reply, or its refusal as [`ClientError::Refused`].
    pub fn call(&mut self, request: &Request) -> Result<Reply, ClientError> {
        let mut line = serde_json::to_vec(request).map_err(ClientError::Decode)?;
        line.push(b'\n');
        self.reader.get_mut().write_all(&line).map_err(|e| self.io(e))?;
        let mut buf = Vec::new();
        let limit = MAX_RESPONSE_LINE as u64 + 1;
        let n =
            (&mut self.reader).take(limit).read_until(b'\n', &mut buf).map_err(|e| self.io(e))?;
        if n == 0 {
            return Err(ClientError::Closed);
        }
        if buf.last() != Some(&b'\n') {
            return Err(if n > MAX_RESPONSE_LINE {
                ClientError::TooLong
            } else {
                ClientError::Closed
            });
        }
        match serde_json::from_slice(&buf).map_err(ClientError::Decode)? {
            Response::Ok(reply) => Ok(reply),
            Response::Err { kind, message } => Err(ClientError::Refused { kind, message }),
        }
    }

    /// This node's status.
    pub fn status(&mut self) -> Result<NodeStatus, ClientError> {
        match self.call(&Request::Status)? {
            Reply::Status(s) => Ok(s),
            #[allow(unreachable_patterns)]
            _ => Err(ClientError::Unexpected { sent: Request::Status.name() }),
        }
    }

    fn io(&self, source: io::Error) -> ClientError {
        ClientError::Io { path: self.path.clone(), source }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio_util::{sync::CancellationToken, task::TaskTracker};

    use super::*;
    use crate::control::Handler;

    struct Refuser;

    impl Handler for Refuser {
        async fn handle(&self, _: Request) -> Response {
            Response::err(ErrorKind::NotPrimary, "not here")
        }
    }

    #[test]
    fn missing_socket_means_not_running() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let err = Client::connect(&path, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, ClientError::NotRunning { .. }), "{err}");
        assert!(err.to_string().contains(&path.display().to_string()), "{err}");
    }

    #[test]
    fn refusal_keeps_its_kind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let token = CancellationToken::new();
        let listener = rt.block_on(async { tokio::net::UnixListener::bind(&path) }).unwrap();
        let server = crate::control::server::serve(
            listener,
            Arc::new(Refuser),
            token.clone(),
            TaskTracker::new(),
        );
        let handle = std::thread::spawn(move || rt.block_on(server));
        let mut client = Client::connect(&path, Duration::from_secs(5)).unwrap();
        match client.status() {
            Err(ClientError::Refused { kind: ErrorKind::NotPrimary, message }) => {
                assert_eq!(message, "not here")
            }
            other => panic!("expected a NotPrimary refusal, got {other:?}"),
        }
        token.cancel();
        handle.join().unwrap();
    }
}
