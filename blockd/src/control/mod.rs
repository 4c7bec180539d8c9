//! The control socket: JSON lines over `<run-dir>/control.sock` (mode 0600, so root only), and
//! the types `blockctl` shares with the daemon.
//!
//! ```text
//!  blockctl ── Client (blocking) ──► {"cmd":"status"}\n ──► server ──► Handler (daemon)
//!           ◄──────────────────────  {"ok":{"status":{...}}}\n  ◄──┘
//!                                or {"err":{"kind":"NotPrimary","message":"..."}}\n
//! ```
//!
//! One request per line, one response line per request, in order; a connection may carry many.
//! Growth: a new command is a new [`Request`] variant and a matching [`Reply`] variant; an old
//! daemon answers it with [`ErrorKind::BadRequest`], and an error kind a client does not know
//! reads as [`ErrorKind::Unknown`], so neither side breaks on the other's newer version.

pub mod client;
pub mod server;
pub mod socket;
pub mod status;

use serde::{Deserialize, Serialize};

pub use client::{Client, ClientError};
pub use server::Handler;
pub use status::{
    ConnState, Counters, DiskFailure, DiskOp, DiskState, LeaseStatus, NodeStatus, ResyncProgress,
    Role, VolumeStatus,
};

/// Longest request line the server reads; a request is a few dozen bytes.
pub const MAX_REQUEST_LINE: usize = 64 << 10;

/// Longest response line a client reads; a status of many volumes stays far below.
pub const MAX_RESPONSE_LINE: usize = 16 << 20;

/// What a client asks. JSON: `{"cmd":"status"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    /// This node's status: every volume with role, disk state and counters.
    Status,
    /// Change this node's role for every volume, or for `volume`. JSON:
    /// `{"cmd":"role","role":"Primary","force":false}`.
    Role {
        role: Role,
        #[serde(default)]
        force: bool,
        #[serde(default)]
        volume: Option<String>,
    },
    /// Ask the connected peer to run its whole promote plan (`blockctl swap`). JSON:
    /// `{"cmd":"peer-promote"}`. Answered when the peer's plan has finished.
    PeerPromote,
    /// After a split brain or with unrelated data: this node gives up its data at the next
    /// handshake (the link reconnects to hold it now). JSON:
    /// `{"cmd":"resolve","resolve":"DiscardLocal"}`.
    Resolve {
        resolve: crate::resync::Resolve,
        #[serde(default)]
        volume: Option<String>,
    },
    /// Compare every block with the peer's by checksum and repair differences (Primary,
    /// connected). Answered when done. JSON: `{"cmd":"verify"}`.
    Verify {
        #[serde(default)]
        volume: Option<String>,
    },
    /// Attach `/dev/nbdN` to the volume over the kernel's nbd netlink family, the daemon
    /// serving it (Primary only); a device recorded before a restart is taken back. JSON:
    /// `{"cmd":"attach","volume":"db"}`, answered with the device.
    Attach { volume: String },
    /// Disconnect the volume's `/dev/nbdN` (NBD_CMD_DISCONNECT). JSON:
    /// `{"cmd":"detach","volume":"db"}`.
    Detach { volume: String },
}

impl Request {
    /// The command's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Role { .. } => "role",
            Request::PeerPromote => "peer-promote",
            Request::Resolve { .. } => "resolve",
            Request::Verify { .. } => "verify",
            Request::Attach { .. } => "attach",
            Request::Detach { .. } => "detach",
        }
    }
}

/// The payload of a successful response, one variant per [`Request`] variant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reply {
    Status(NodeStatus),
    /// The request was carried out; nothing to report.
    Done,
    /// The peer ran its promote plan: its exit code (0 = promoted) and the tail of its output.
    PeerPromoted {
        code: i32,
        output: String,
    },
    /// `verify` finished: per volume, bytes compared and bytes that differed (now repaired).
    Verified(Vec<Verified>),
    /// `attach`: the block device now serving the volume.
    Attached {
        device: std::path::PathBuf,
    },
}

/// One volume's `verify` result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verified {
    pub volume: String,
    pub compared: u64,
    pub differed: u64,
}

/// What the daemon answers. JSON: `{"ok":{...}}` or `{"err":{"kind":...,"message":...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Response {
    Ok(Reply),
    Err { kind: ErrorKind, message: String },
}

impl Response {
    pub fn err(kind: ErrorKind, message: impl Into<String>) -> Self {
        Response::Err { kind, message: message.into() }
    }
}

/// Why a request failed: a kind `blockctl` can branch on, the message says the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The request could not be parsed, is too long, or names an unknown command.
    BadRequest,
    /// A volume (or other object) named in the request does not exist.
    NotFound,
    /// The operation needs this node to be Primary.
    NotPrimary,
    /// The local disk is not UpToDate, so the operation is refused.
    Inconsistent,
    /// The peer could not be reached.
    PeerUnreachable,
    /// The peer is Primary (or refused this node's promotion).
    PeerPrimary,
    /// The volume is in use (NBD clients connected), so the operation is refused.
    InUse,
    /// Both nodes changed data independently; an operator must resolve it.
    SplitBrain,
    /// The daemon is at its limit of control connections; retry.
    Busy,
    /// A bug or an unexpected failure inside the daemon.
    Internal,
    /// A kind this build does not know (a newer daemon sent it).
    #[serde(other)]
    Unknown,
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_json_is_the_documented_one() {
        assert_eq!(serde_json::to_string(&Request::Status).unwrap(), r#"{"cmd":"status"}"#);
        let r: Request = serde_json::from_str(r#"{"cmd":"status"}"#).unwrap();
        assert_eq!(r, Request::Status);
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"explode"}"#).is_err());
    }

    #[test]
    fn error_response_carries_a_kind() {
        let r = Response::err(ErrorKind::NotPrimary, "volume db is Secondary");
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(json, r#"{"err":{"kind":"NotPrimary","message":"volume db is Secondary"}}"#);
        assert_eq!(serde_json::from_str::<Response>(&json).unwrap(), r);
    }

    #[test]
    fn unknown_error_kind_from_a_newer_daemon_still_parses() {
        let json = r#"{"err":{"kind":"QuantumFlux","message":"m"}}"#;
        let r: Response = serde_json::from_str(json).unwrap();
        assert_eq!(r, Response::err(ErrorKind::Unknown, "m"));
    }

    #[test]
    fn status_reply_round_trips() {
        let status = NodeStatus { node: "alpha".into(), version: "0.1.0".into(), volumes: vec![] };
        let r = Response::Ok(Reply::Status(status));
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.starts_with(r#"{"ok":{"status":{"node":"alpha""#), "{json}");
        assert_eq!(serde_json::from_str::<Response>(&json).unwrap(), r);
    }
}
