//! `/dev/nbdN` attached by blockd itself (design.md §8 step 3, NBD-NOTES §3.3): one end of a
//! socketpair goes to the kernel with `NBD_CMD_CONNECT` over generic netlink, the other is
//! served by the same transmission code as every NBD client (simple replies, compact headers:
//! all the kernel speaks).
//!
//! ```text
//!  blockctl attach ─► control {"cmd":"attach"} ─► socketpair ─┬─ ours ─► nbd::server::transmission
//!                                                             └─ theirs ─► CONNECT / RECONFIGURE
//!  <run-dir>/<vol>.nbd: "INDEX IDENTIFIER"  (survives a daemon restart, not a reboot)
//! ```
//!
//! A restarted daemon finds the record and, once the volume is Primary, hands the kernel a new
//! socket with `NBD_CMD_RECONFIGURE` on the same device: the kernel held the I/O that was in
//! flight (up to `DEAD_CONN_TIMEOUT`) and resends it after `TIMEOUT`, so the mounted
//! filesystem sees a pause, not an error. `BACKEND_IDENTIFIER` (node and volume) makes sure a
//! RECONFIGURE can never give a device another volume's data. `detach` is `NBD_CMD_DISCONNECT`.

pub mod control;
pub mod netlink;

use std::{
    collections::HashMap,
    fs, io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::BytesMut;
use tokio::task::JoinHandle;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    nbd::{codec, handshake::Session, server, Limits},
    volume::Volume,
};
use netlink::{attr, NbdCmd, NbdNetlink, NetlinkError};

/// Request timeout given to the kernel (NBD_ATTR_TIMEOUT, NBD-NOTES §3.4): a request
/// unanswered this long marks its socket dead and is requeued, so one slow request tears the
/// connection down. 30 s is far above a mirrored write's worst latency (peer-timeout, a few
/// seconds, plus an fsync on each node), so ordinary slowness never trips it; it is also how
/// long requests stranded on a dead socket wait before the kernel resends them on the socket a
/// restarted blockd hands over (the restart test saw 14.8 s and 31.8 s).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the kernel queues I/O while no socket is alive (NBD_ATTR_DEAD_CONN_TIMEOUT)
/// before failing it with EIO and marking the device disconnected: a blockd restart must fit
/// in it, i.e. systemd's RestartSec plus the daemon's start (volumes opened, peer handshake)
/// with margin for a loaded machine. 120 s, like multipath's queue_if_no_path with a bound: a
/// mounted filesystem sees a pause, not an error, and a node whose daemon never comes back
/// still fails its I/O within two minutes instead of hanging for ever.
pub const DEAD_CONN_TIMEOUT: Duration = Duration::from_secs(120);

/// How long `detach` waits for the kernel to close its end after DISCONNECT.
const DETACH_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("volume {0} is not served here: {1}")]
    NotServing(String, String),
    #[error("too many connections to volume {0}")]
    Busy(String),
    #[error("socketpair")]
    Socket(#[source] io::Error),
    #[error("cannot write {}", path.display())]
    Record {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the netlink call panicked")]
    Join,
}

/// One device this daemon serves.
#[derive(Debug)]
struct Attached {
    index: u32,
    task: JoinHandle<()>,
}

/// The kernel attachments of one daemon.
#[derive(Debug)]
pub struct KernelAttach {
    node: String,
    run_dir: PathBuf,
    limits: Limits,
    token: CancellationToken,
    tracker: TaskTracker,
    attached: Mutex<HashMap<String, Attached>>,
}

/// `<run-dir>/<vol>.nbd`: which device carries the volume, and under which identifier.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    index: u32,
    identifier: String,
}

impl Record {
    fn parse(text: &str) -> Option<Record> {
        let (index, identifier) = text.trim().split_once(' ')?;
        Some(Record { index: index.parse().ok()?, identifier: identifier.to_string() })
    }

    /// True while the kernel still holds this device's configuration for this volume.
    fn still_configured(&self) -> bool {
        let path = format!("/sys/block/nbd{}/backend", self.index);
        fs::read_to_string(path).is_ok_and(|b| b.trim() == self.identifier)
    }
}

impl KernelAttach {
    pub fn new(
        node: &str,
        run_dir: &Path,
        limits: Limits,
        token: CancellationToken,
        tracker: TaskTracker,
    ) -> KernelAttach {
        KernelAttach {
            node: node.to_string(),
            run_dir: run_dir.to_path_buf(),
            limits,
            token,
            tracker,
            attached: Mutex::new(HashMap::new()),
        }
    }

    fn record_path(&self, volume: &str) -> PathBuf {
        self.run_dir.join(format!("{volume}.nbd"))
    }

    fn record(&self, volume: &str) -> Option<Record> {
        Record::parse(&fs::read_to_string(self.record_path(volume)).ok()?)
    }

    /// The device serving `volume`: an existing one of this daemon, the recorded one taken
    /// back with RECONFIGURE, or a new one from CONNECT.
    pub async fn attach(&self, volume: &Arc<Volume>) -> Result<PathBuf, KernelError> {
        let name = volume.name().to_string();
        if let Some(index) = self.live_index(&name) {
            return Ok(device(index));
        }
        volume.check_serving().map_err(|e| KernelError::NotServing(name.clone(), e.to_string()))?;
        let guard = volume
            .add_client(self.limits.max_connections)
            .ok_or_else(|| KernelError::Busy(name.clone()))?;
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(KernelError::Socket)?;
        ours.set_nonblocking(true).map_err(KernelError::Socket)?;
        let stream = tokio::net::UnixStream::from_std(ours).map_err(KernelError::Socket)?;
        let session = Session {
            volume: Arc::clone(volume),
            guard,
            structured: false,
            leftover: BytesMut::new(),
        };
        // Served before the kernel has the other end: it may read (partition scan) at once.
        let (limits, token) = (self.limits.clone(), self.token.child_token());
        let task = self
            .tracker
            .spawn(async move { server::transmission(stream, session, &limits, token).await });
        let previous = self.record(&name).filter(Record::still_configured);
        let request = self.request(volume, previous.clone());
        let result = tokio::task::spawn_blocking(move || connect(request, &theirs))
            .await
            .map_err(|_| KernelError::Join)?;
        let index = match result {
            Ok(index) => index,
            Err(e) => {
                task.abort();
                return Err(e);
            }
        };
        tune_queue(index, self.limits.max_request);
        let record = Record { index, identifier: self.identifier(&name) };
        self.save(&name, &record)?;
        let how = if previous.is_some() { "taken back (RECONFIGURE)" } else { "connected" };
        tracing::info!(volume = %name, device = %device(index).display(), "{how} over netlink");
        self.attached
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name, Attached { index, task });
        Ok(device(index))
    }

    /// NBD_CMD_DISCONNECT of the volume's device (the kernel fails what is still in flight),
    /// then waits for its socket to close so the volume counts no client any more.
    pub async fn detach(&self, volume: &str) -> Result<(), KernelError> {
        let live = self.attached.lock().unwrap_or_else(|p| p.into_inner()).remove(volume);
        let index = live.as_ref().map(|a| a.index).or_else(|| self.record(volume).map(|r| r.index));
        if let Some(index) = index {
            tokio::task::spawn_blocking(move || disconnect(index))
                .await
                .map_err(|_| KernelError::Join)??;
            tracing::info!(volume, device = %device(index).display(), "disconnected over netlink");
        }
        if let Some(a) = live {
            if tokio::time::timeout(DETACH_WAIT, a.task).await.is_err() {
                tracing::warn!(volume, "the kernel kept its socket open after DISCONNECT");
            }
        }
        let _ = fs::remove_file(self.record_path(volume));
        Ok(())
    }

    /// At start: every Primary volume with a record of a device still configured for it is
    /// taken back, so a filesystem mounted on it goes on without an error.
    pub async fn reattach(&self, volumes: &[Arc<Volume>]) {
        for v in volumes {
            let recorded = self.record(v.name()).filter(Record::still_configured);
            if recorded.is_none() || v.check_serving().is_err() {
                continue;
            }
            if let Err(e) = self.attach(v).await {
                tracing::error!(volume = %v.name(), error = %e, "cannot take the nbd device back");
            }
        }
    }

    fn live_index(&self, volume: &str) -> Option<u32> {
        let map = self.attached.lock().unwrap_or_else(|p| p.into_inner());
        map.get(volume).filter(|a| !a.task.is_finished()).map(|a| a.index)
    }

    fn identifier(&self, volume: &str) -> String {
        format!("blockd:{}:{volume}", self.node)
    }

    fn request(&self, volume: &Volume, previous: Option<Record>) -> Request {
        Request {
            previous: previous.map(|r| r.index),
            size: volume.size(),
            identifier: self.identifier(volume.name()),
        }
    }

    fn save(&self, volume: &str, r: &Record) -> Result<(), KernelError> {
        let path = self.record_path(volume);
        let tmp = path.with_extension("nbd.tmp");
        fs::write(&tmp, format!("{} {}\n", r.index, r.identifier))
            .and_then(|()| fs::rename(&tmp, &path))
            .map_err(|source| KernelError::Record { path, source })
    }
}

/// `/dev/nbdN`.
pub fn device(index: u32) -> PathBuf {
    PathBuf::from(format!("/dev/nbd{index}"))
}

/// What CONNECT or RECONFIGURE needs, sent from a blocking thread.
#[derive(Debug)]
struct Request {
    previous: Option<u32>,
    size: u64,
    identifier: String,
}

/// CONNECT (or RECONFIGURE of `previous`) with `sock` as the device's only socket; the index.
fn connect(r: Request, sock: &std::os::unix::net::UnixStream) -> Result<u32, KernelError> {
    let mut nl = NbdNetlink::open()?;
    let fd = u32::try_from(sock.as_raw_fd()).map_err(|_| NetlinkError::Malformed)?;
    let (cmd, what) = match r.previous {
        Some(_) => (NbdCmd::Reconfigure, "NBD_CMD_RECONFIGURE"),
        None => (NbdCmd::Connect, "NBD_CMD_CONNECT"),
    };
    let mut msg = nl.message(cmd);
    if let Some(index) = r.previous {
        msg = msg.u32(attr::INDEX, index);
    } else {
        let block = if r.size % 4096 == 0 { 4096 } else { 512 };
        msg = msg
            .u64(attr::SIZE_BYTES, r.size)
            .u64(attr::BLOCK_SIZE_BYTES, block)
            .u64(attr::SERVER_FLAGS, u64::from(codec::TRANSMISSION_FLAGS));
    }
    let msg = msg
        .u64(attr::TIMEOUT, REQUEST_TIMEOUT.as_secs())
        .u64(attr::DEAD_CONN_TIMEOUT, DEAD_CONN_TIMEOUT.as_secs())
        .string(attr::BACKEND_IDENTIFIER, &r.identifier)
        .nest(attr::SOCKETS)
        .nest(attr::SOCK_ITEM)
        .u32(attr::SOCK_FD, fd)
        .end()
        .end();
    let answer = nl.call(msg, what)?;
    match r.previous {
        Some(index) => Ok(index),
        None => netlink::find(&answer, attr::INDEX)
            .and_then(|v| v.try_into().ok())
            .map(u32::from_ne_bytes)
            .ok_or(KernelError::Netlink(NetlinkError::Malformed)),
    }
}

fn disconnect(index: u32) -> Result<(), KernelError> {
    let mut nl = NbdNetlink::open()?;
    let msg = nl.message(NbdCmd::Disconnect).u32(attr::INDEX, index);
    nl.call(msg, "NBD_CMD_DISCONNECT")?;
    Ok(())
}

/// Queue settings for a network block device: no I/O scheduler (blockd orders nothing by
/// position, the backing device's own queue does), not rotational, requests up to the NBD
/// request limit. Best effort: a value the kernel refuses is logged, the device still works.
fn tune_queue(index: u32, max_request: u32) {
    let q = PathBuf::from(format!("/sys/block/nbd{index}/queue"));
    let hw = fs::read_to_string(q.join("max_hw_sectors_kb"))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(u32::MAX);
    let max_kb = (max_request / 1024).min(hw).max(4);
    for (key, value) in [
        ("scheduler", "none".to_string()),
        ("rotational", "0".into()),
        ("max_sectors_kb", max_kb.to_string()),
    ] {
        if let Err(e) = fs::write(q.join(key), &value) {
            tracing::warn!(device = index, key, value, error = %e, "cannot set the nbd queue");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_and_rejects_garbage() {
        let r = Record::parse("3 blockd:alpha:vol\n").unwrap();
        assert_eq!(r, Record { index: 3, identifier: "blockd:alpha:vol".into() });
        assert_eq!(Record::parse("x blockd:alpha:vol"), None);
        assert_eq!(Record::parse("3"), None);
    }
}
