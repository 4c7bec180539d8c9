//! A fake blockd for the commands' tests: answers `status`, `role` and `peer-promote` on a
//! real unix control socket, from a state the test sets, and records what it was asked.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixListener,
    path::Path,
    sync::{Arc, Mutex},
    thread,
};

use blockd::control::{
    ConnState, DiskState, ErrorKind, NodeStatus, Reply, Request, Response, Role, VolumeStatus,
};

/// What the fake daemon reports and how it answers.
#[derive(Debug, Clone)]
pub struct State {
    pub role: Role,
    pub disk: DiskState,
    pub conn: ConnState,
    pub peer_role: Option<Role>,
    /// Exit code the peer's promote "returns" to peer-promote.
    pub peer_promote_code: i32,
    /// Requests received, by name ("status", "role Secondary", "peer-promote").
    pub asked: Vec<String>,
}

impl Default for State {
    fn default() -> Self {
        State {
            role: Role::Secondary,
            disk: DiskState::UpToDate,
            conn: ConnState::Connected,
            peer_role: Some(Role::Secondary),
            peer_promote_code: 0,
            asked: Vec::new(),
        }
    }
}

/// One volume "v" as the daemon would report it.
pub fn volume(
    disk: DiskState,
    conn: ConnState,
    role: Role,
    peer_role: Option<Role>,
) -> VolumeStatus {
    let json = serde_json::json!({
        "name": "v", "size": 4096, "role": role, "disk": disk, "clients": 0,
        "socket": "", "backing": "", "engine": "sync", "direct_io": false, "conn": conn,
        "conn_reason": null, "peer": "b", "peer_role": peer_role, "peer_disk": "UpToDate",
        "out_of_sync": 0, "resync": null, "generation": "1",
        "counters": {"reads": 0, "writes": 0, "bytes_read": 0, "bytes_written": 0,
                     "flushes": 0, "trims": 0, "zeroes": 0, "errors": 0}
    });
    serde_json::from_value(json).expect("a VolumeStatus")
}

/// Serves `socket` on a thread for the rest of the test process (the listener dies with it).
pub fn serve(socket: &Path, state: Arc<Mutex<State>>) {
    let listener = UnixListener::bind(socket).expect("bind the fake control socket");
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let state = Arc::clone(&state);
            thread::spawn(move || {
                let mut write = stream.try_clone().expect("clone");
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let request: Request = serde_json::from_str(&line).expect("a request");
                    let response = answer(&mut state.lock().unwrap(), request);
                    let mut out = serde_json::to_vec(&response).unwrap();
                    out.push(b'\n');
                    if write.write_all(&out).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

fn answer(s: &mut State, request: Request) -> Response {
    match request {
        Request::Status => {
            s.asked.push("status".into());
            let v = volume(s.disk, s.conn, s.role, s.peer_role);
            Response::Ok(Reply::Status(NodeStatus {
                node: "a".into(),
                version: "test".into(),
                volumes: vec![v],
            }))
        }
        Request::Role { role, .. } => {
            s.asked.push(format!("role {role:?}"));
            s.role = role;
            Response::Ok(Reply::Done)
        }
        Request::PeerPromote => {
            s.asked.push("peer-promote".into());
            if s.peer_promote_code == 0 {
                s.peer_role = Some(Role::Primary);
            }
            let output = format!("[b] promote exit {}\n", s.peer_promote_code);
            Response::Ok(Reply::PeerPromoted { code: s.peer_promote_code, output })
        }
        #[allow(unreachable_patterns)] // requests added to blockd later
        other => Response::err(ErrorKind::BadRequest, format!("fake: {}", other.name())),
    }
}
