//! Wiring: configuration → volumes → listeners, then the main loop until a signal, then an
//! orderly shutdown.
//!
//! ```text
//!  run ─► sys settings ─► dirs ─► claim control.sock ─► open stores ─► volumes
//!          ─► bind <vol>.sock (one each) + nbd-tcp (all) + control.sock
//!          ─► accept loops on a TaskTracker ── each client: nbd::serve(child token)
//!          ─► "ready" ─► main loop: wait for an Event (SIGTERM / SIGINT)
//!  shutdown: cancel ─► accept loops stop, connections finish in-flight requests (≤ 30 s)
//!          ─► flush every volume ─► remove sockets ─► Ok
//! ```
//!
//! Durability at exit: every write acknowledged to a client was already completed by the
//! backing store; the final flush makes those still in the device's volatile cache durable for
//! clients that never sent FLUSH themselves.

use std::{fmt, io, path::PathBuf, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    sync::mpsc,
    task::JoinHandle,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    accept::{self, Listener, Policy},
    config::{Config, LocalNode},
    control::{
        self,
        socket::{self, SocketError},
        Handler, NodeStatus, Reply, Request, Response,
    },
    fence::{self, Fence},
    kernel::{self, KernelAttach},
    meta::MetaFile,
    metrics,
    nbd::{self, Exports, Limits},
    node::Node,
    replication::{self, auth::Secrets, wire::VolumeParams, LinkConfig},
    storage::{StorageError, Store, StoreOptions},
    sys,
    volume::{Volume, VolumeError, VolumeInfo},
    witness::LeaseClient,
};

/// How long shutdown waits for NBD connections to finish their in-flight requests.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the final flush of one volume may take before shutdown gives up on it.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(60);

/// Mode of the control socket: it can promote and demote, so root only.
const CONTROL_MODE: u32 = 0o600;

/// Why the daemon could not start, or did not stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot create directory {}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open the backing store of volume {volume}")]
    OpenStore {
        volume: String,
        #[source]
        source: StorageError,
    },
    #[error("cannot open the metadata of volume {volume}")]
    Meta {
        volume: String,
        #[source]
        source: crate::meta::MetaError,
    },
    #[error("cannot open the dirty bitmap and activity log of volume {volume}")]
    Tracking {
        volume: String,
        #[source]
        source: VolumeError,
    },
    #[error("cannot record the start in the metadata of volume {volume}")]
    MarkRunning {
        volume: String,
        #[source]
        source: VolumeError,
    },
    #[error("cannot read the cluster secret")]
    Secret(#[source] crate::replication::auth::AuthError),
    #[error("cannot start the replication link")]
    Link(#[source] crate::replication::LinkError),
    #[error("cannot serve volume {volume}")]
    VolumeSocket {
        volume: String,
        #[source]
        source: SocketError,
    },
    #[error("cannot open the control socket")]
    ControlSocket(#[source] SocketError),
    #[error("cannot listen on nbd-tcp {addr}")]
    Tcp {
        addr: std::net::SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot install signal handlers")]
    Signals(#[source] io::Error),
    #[error("final flush of volume {volume} failed; acknowledged writes may not be durable")]
    Flush {
        volume: String,
        #[source]
        source: VolumeError,
    },
    #[error("final flush of volume {volume} did not finish within {FLUSH_TIMEOUT:?}")]
    FlushTimeout { volume: String },
}

/// What the main loop reacts to. Signals arrive as events, so tests can send them too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Stop: SIGTERM, SIGINT, or a test. A second one during shutdown stops the wait for
    /// connections.
    Terminate(&'static str),
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Terminate(why) => write!(f, "{why}"),
        }
    }
}

/// Runs the daemon for `node` until SIGTERM or SIGINT. Must be called inside a tokio runtime.
pub async fn run(config: Config, node: LocalNode) -> Result<(), DaemonError> {
    let (tx, rx) = mpsc::channel(4);
    let signals = spawn_signal_events(tx)?;
    let result = run_with_events(config, node, rx).await;
    signals.abort();
    result
}

/// [`run`] with the events coming from `events` instead of signals.
pub async fn run_with_events(
    config: Config,
    node: LocalNode,
    mut events: mpsc::Receiver<Event>,
) -> Result<(), DaemonError> {
    sys::apply(&config.daemon);
    create_dirs(&node)?;
    // First, so a second daemon stops here, before it opens (and maybe creates) anything.
    socket::claim(&node.control_socket()).await.map_err(DaemonError::ControlSocket)?;
    let volumes = open_volumes(&config, &node)?;
    for v in &volumes {
        // Cleared now, set again by an orderly stop: a later start can tell a crash.
        v.mark_clean(false)
            .await
            .map_err(|source| DaemonError::MarkRunning { volume: v.name().to_string(), source })?;
    }
    let cluster = Node::new(
        node.name.clone(),
        peer_name(&config, &node),
        volumes.clone(),
        config.source.clone(),
        config.resync.clone(),
        config.cluster.witness.map(|addr| Arc::new(Fence::for_volumes(addr, config.volume.len()))),
    );
    let mut serving = Serving::default();
    if let Err(e) = serving.start(&config, &node, &cluster).await {
        // A client may already have written through a socket bound before the failure.
        serving.token.cancel();
        drain(&serving.tracker, &mut events).await;
        let _logged = flush_all(&volumes).await;
        return Err(e);
    }
    log_ready(&node, &volumes);
    crate::notify::ready(&format!("serving {} volumes", volumes.len()));
    let _watchdog = crate::notify::watchdog();

    let why = events.recv().await.map_or("event channel closed".to_string(), |e| e.to_string());
    tracing::info!("{why}: shutting down");
    crate::notify::stopping();
    serving.token.cancel();
    let drained = drain(&serving.tracker, &mut events).await;
    let flushed = flush_all(&volumes).await;
    // A clean stop promises that nothing was in flight: a request still running after the
    // drain could complete (or not) after the record, so the stop is recorded as a crash.
    if flushed.is_ok() && drained {
        for v in &volumes {
            if let Err(e) = v.mark_clean(true).await {
                tracing::warn!(volume = %v.name(), error = %e, "cannot record the clean stop");
            }
        }
    }
    drop(serving);
    tracing::info!("stopped");
    flushed
}

/// Everything that serves clients: one token stops it all, the tracker waits for it all, and
/// the socket files go when it is dropped.
#[derive(Default)]
struct Serving {
    token: CancellationToken,
    tracker: TaskTracker,
    bound: BoundSockets,
}

impl Serving {
    /// Binds every socket and spawns its accept loop; the control socket comes last, so that
    /// once it answers, everything else is there too.
    async fn start(
        &mut self,
        config: &Config,
        node: &LocalNode,
        cluster: &Arc<Node>,
    ) -> Result<(), DaemonError> {
        let limits = config.nbd.limits();
        let volumes = cluster.volumes();
        for v in volumes {
            let path = node.nbd_socket(v.name());
            let listener = socket::bind(&path, None).await.map_err(|source| {
                DaemonError::VolumeSocket { volume: v.name().to_string(), source }
            })?;
            self.bound.0.push(path);
            let exports = Exports::new(vec![Arc::clone(v)], Some(v.name()));
            self.spawn_accept(listener, exports, &limits);
        }
        if let Some(addr) = node.settings.nbd_tcp {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| DaemonError::Tcp { addr, source })?;
            // "" is unambiguous only when there is one volume.
            let default = match volumes {
                [only] => Some(only.name()),
                _ => None,
            };
            self.spawn_accept(listener, Exports::new(volumes.to_vec(), default), &limits);
        }
        start_link(config, node, cluster, self)?;
        start_lease(config, node, cluster, self)?;
        if let Some(addr) = config.metrics.listen {
            let (cluster, run_dir) = (Arc::clone(cluster), node.settings.run_dir.clone());
            let text = move || metrics::health::full(&node_status(&cluster), &run_dir);
            metrics::http::start_text(addr, text, self.token.clone(), &self.tracker).await;
        }
        let c = Arc::clone(cluster);
        let status: crate::console::StatusFn = Arc::new(move || node_status(&c));
        crate::console::start(config, node, status, self.token.clone(), &self.tracker).await;
        let path = node.control_socket();
        let control =
            socket::bind(&path, Some(CONTROL_MODE)).await.map_err(DaemonError::ControlSocket)?;
        self.bound.0.push(path);
        let (token, tracker) = (self.token.clone(), self.tracker.clone());
        let kernel = KernelAttach::new(&node.name, &node.settings.run_dir, limits, token, tracker);
        let kernel = Arc::new(kernel);
        // Before the control socket answers: a restarted daemon first takes its devices back.
        kernel.reattach(volumes).await;
        let handler = Arc::new(NodeHandler { node: Arc::clone(cluster), kernel });
        let (token, tracker) = (self.token.clone(), self.tracker.clone());
        self.tracker.spawn(control::server::serve(control, handler, token, tracker));
        Ok(())
    }

    fn spawn_accept<L: Listener>(&self, listener: L, exports: Exports, limits: &Limits)
    where
        L::Stream: AsyncRead + AsyncWrite + Unpin,
    {
        let (token, tracker) = (self.token.clone(), self.tracker.clone());
        let task = accept_loop(listener, Arc::new(exports), limits.clone(), token, tracker);
        self.tracker.spawn(task);
    }
}

/// Forwards SIGTERM and SIGINT to the main loop as [`Event::Terminate`].
fn spawn_signal_events(tx: mpsc::Sender<Event>) -> Result<JoinHandle<()>, DaemonError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    Ok(tokio::spawn(async move {
        loop {
            let event = tokio::select! {
                _ = term.recv() => Event::Terminate("SIGTERM"),
                _ = int.recv() => Event::Terminate("SIGINT"),
            };
            if tx.send(event).await.is_err() {
                return;
            }
        }
    }))
}

fn create_dirs(node: &LocalNode) -> Result<(), DaemonError> {
    for dir in [&node.settings.data_dir, &node.settings.run_dir] {
        std::fs::create_dir_all(dir)
            .map_err(|source| DaemonError::CreateDir { path: dir.clone(), source })?;
    }
    Ok(())
}

/// Opens every volume's store and metadata. A single-node volume starts Primary; with two
/// nodes each starts Secondary and Connecting until promoted (design.md §7).
fn open_volumes(config: &Config, node: &LocalNode) -> Result<Vec<Arc<Volume>>, DaemonError> {
    let peer = peer_name(config, node);
    config
        .volume
        .iter()
        .enumerate()
        .map(|(index, v)| {
            let backing = node.backing(v);
            let opts = StoreOptions {
                path: backing.clone(),
                size: v.size.bytes(),
                engine: config.storage.engine,
                direct: config.storage.direct_io,
                allocate: config.storage.allocate,
            };
            let store = Store::open(&opts)
                .map_err(|source| DaemonError::OpenStore { volume: v.name.clone(), source })?;
            let meta_path = node.settings.data_dir.join(format!("{}.meta", v.name));
            let (file, meta) = MetaFile::open_or_create_with(
                &meta_path,
                v.size.bytes(),
                &node.name,
                store.created(),
                config.resync.granularity(),
            )
            .map_err(|source| DaemonError::Meta { volume: v.name.clone(), source })?;
            tracing::info!(
                volume = %v.name, size = v.size.bytes(), backing = %backing.display(),
                engine = store.engine_name(), direct_io = store.is_direct(),
                generation = %format!("{:016x}", meta.gens.current), consistent = meta.flags.consistent,
                "volume opened"
            );
            let info = VolumeInfo {
                name: v.name.clone(),
                index: u16::try_from(index).unwrap_or(u16::MAX),
                node: node.name.clone(),
                peer: peer.clone(),
                socket: node.nbd_socket(&v.name),
                backing,
            };
            let volume = Volume::open(info, store, meta, file, config.resync.al())
                .map_err(|source| DaemonError::Tracking { volume: v.name.clone(), source })?;
            Ok(Arc::new(volume))
        })
        .collect()
}

/// The other node's name on a two-node setup.
fn peer_name(config: &Config, node: &LocalNode) -> Option<String> {
    config.node.keys().find(|n| **n != node.name).cloned()
}

/// Starts the replication link to the peer, if there is one, and the node's handling of it.
fn start_link(
    config: &Config,
    local: &LocalNode,
    node: &Arc<Node>,
    serving: &Serving,
) -> Result<(), DaemonError> {
    let Some(peer) = peer_name(config, local) else { return Ok(()) };
    let secrets = Secrets::Files {
        current: config.cluster.secret_file.clone().unwrap_or_default(),
        previous: config.cluster.previous_secret_file.clone(),
    };
    // Read now so that a bad file stops the start; the link reads them again at every
    // handshake (a rotation needs no restart).
    secrets.load().map_err(DaemonError::Secret)?;
    let addr = |name: &str| config.node.get(name).and_then(|n| n.replication);
    let (Some(listen), Some(peer_addr)) = (addr(&local.name), addr(&peer)) else {
        return Ok(()); // validate() requires both; nothing to do otherwise
    };
    let cfg = LinkConfig {
        node: local.name.clone(),
        peer,
        listen,
        peer_addr,
        secrets,
        protection: config.cluster.encryption.protection(),
        peer_timeout: config.cluster.peer_timeout,
        volumes: volume_params(config, node),
        max_in_flight_bytes: usize::try_from(config.cluster.max_in_flight_bytes.bytes())
            .unwrap_or(usize::MAX),
    };
    let events = replication::spawn(cfg, serving.token.clone()).map_err(DaemonError::Link)?;
    let task = Arc::clone(node).run_link(events, serving.tracker.clone(), serving.token.clone());
    serving.tracker.spawn(task);
    Ok(())
}

/// What the handshake compares with the peer: each volume's name and size as configured, and
/// its tracking geometry as its metadata has it.
fn volume_params(config: &Config, node: &Node) -> Vec<VolumeParams> {
    let geometry = |name: &str| {
        let v = node.volumes().iter().find(|v| v.name() == name)?;
        let (granularity, al) = v.tracking();
        Some((granularity, al.extent_size, al.extents))
    };
    let params = |v: &crate::config::VolumeConfig| {
        let (granularity, al_extent_size, al_extents) = geometry(&v.name).unwrap_or((0, 0, 0));
        VolumeParams {
            name: v.name.clone(),
            size: v.size.bytes(),
            granularity,
            al_extent_size,
            al_extents,
        }
    };
    config.volume.iter().map(params).collect()
}

/// With `cluster.witness` on a two-node setup: keeps this node's lease while it is Primary, so
/// that degraded writes can complete (see `fence.rs`).
fn start_lease(
    config: &Config,
    local: &LocalNode,
    node: &Arc<Node>,
    serving: &Serving,
) -> Result<(), DaemonError> {
    let (Some(addr), Some(fence)) = (config.cluster.witness, node.fence().cloned()) else {
        return Ok(());
    };
    if peer_name(config, local).is_none() {
        return Ok(());
    }
    let current = config.cluster.secret_file.clone().unwrap_or_default();
    let secrets = Secrets::Files { current, previous: None };
    secrets.load().map_err(DaemonError::Secret)?;
    let client =
        LeaseClient::with_secrets(addr, &local.name, secrets, config.lease.client_settings());
    let (node, token) = (Arc::clone(node), serving.token.clone());
    tracing::info!(witness = %addr, "degraded writes are fenced by the witness lease");
    serving.tracker.spawn(async move {
        let primary = || node.any_primary();
        fence::keep_lease(&fence, client, primary, fence::ask_witness, token).await;
    });
    Ok(())
}

fn log_ready(node: &LocalNode, volumes: &[Arc<Volume>]) {
    let sockets: Vec<String> = volumes
        .iter()
        .map(|v| format!("{} at {}", v.name(), node.nbd_socket(v.name()).display()))
        .collect();
    let tcp = node.settings.nbd_tcp.map(|a| format!("; nbd-tcp {a}")).unwrap_or_default();
    tracing::info!(
        "ready: serving {} volumes: {}{tcp}; control at {}",
        volumes.len(),
        sockets.join(", "),
        node.control_socket().display()
    );
}

/// How NBD sockets accept (table in `crate::accept`): no bound here (each volume bounds its
/// clients), and cancelling stops reading new requests but lets in-flight ones finish.
const NBD_POLICY: Policy = Policy::new("NBD").nodelay();

/// Accepts NBD clients until `token` is cancelled; each is served on `tracker` with a child
/// token.
async fn accept_loop<L: Listener>(
    listener: L,
    exports: Arc<Exports>,
    limits: Limits,
    token: CancellationToken,
    tracker: TaskTracker,
) where
    L::Stream: AsyncRead + AsyncWrite + Unpin,
{
    accept::serve(listener, NBD_POLICY, token, tracker, move |c| {
        tracing::debug!(from = ?c.from, "NBD client");
        nbd::serve(c.stream, Arc::clone(&exports), limits.clone(), c.token)
    })
    .await;
}

/// Waits for every task on `tracker` (bounded); a second event stops the wait early.
/// Returns whether every task finished.
async fn drain(tracker: &TaskTracker, events: &mut mpsc::Receiver<Event>) -> bool {
    tracker.close();
    tokio::select! {
        () = tracker.wait() => {
            tracing::info!("all connections finished");
            true
        }
        () = tokio::time::sleep(DRAIN_TIMEOUT) => {
            tracing::warn!(
                tasks = tracker.len(),
                "connections still busy after {DRAIN_TIMEOUT:?}; going on without them, \
                 the stop is not recorded as clean"
            );
            false
        }
        Some(e) = events.recv() => {
            tracing::warn!(tasks = tracker.len(), "{e} again: not waiting for connections");
            tracker.is_empty()
        }
    }
}

/// Flushes every volume, even after one failed; returns the first failure.
async fn flush_all(volumes: &[Arc<Volume>]) -> Result<(), DaemonError> {
    let mut first = Ok(());
    for v in volumes {
        let volume = v.name().to_string();
        let flush = async {
            v.flush().await?;
            v.flush_bitmap().await
        };
        let result = match tokio::time::timeout(FLUSH_TIMEOUT, flush).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(DaemonError::Flush { volume, source }),
            Err(_) => Err(DaemonError::FlushTimeout { volume }),
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "shutdown");
            first = first.and(Err(e));
        }
    }
    first
}

/// Socket files this process created; removed when dropped, on every path out of `run`.
#[derive(Default)]
struct BoundSockets(Vec<PathBuf>);

impl Drop for BoundSockets {
    fn drop(&mut self) {
        self.0.iter().map(PathBuf::as_path).for_each(socket::remove);
    }
}

/// What `status` (control socket) and `/metrics` report: every volume of the node.
fn node_status(node: &Node) -> NodeStatus {
    NodeStatus {
        node: node.name().to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        volumes: node.volumes().iter().map(|v| v.status()).collect(),
    }
}

/// Answers control requests.
struct NodeHandler {
    node: Arc<Node>,
    kernel: Arc<KernelAttach>,
}

impl Handler for NodeHandler {
    async fn handle(&self, request: Request) -> Response {
        match request {
            Request::Status => Response::Ok(Reply::Status(node_status(&self.node))),
            Request::Role { role, force, volume } => {
                match self.node.set_role(volume.as_deref(), role, force).await {
                    Ok(()) => Response::Ok(Reply::Done),
                    Err((kind, message)) => Response::err(kind, message),
                }
            }
            Request::PeerPromote => match self.node.peer_promote().await {
                Ok((code, output)) => Response::Ok(Reply::PeerPromoted { code, output }),
                Err((kind, message)) => Response::err(kind, message),
            },
            Request::Resolve { resolve, volume } => {
                match self.node.resolve(volume.as_deref(), resolve).await {
                    Ok(()) => Response::Ok(Reply::Done),
                    Err((kind, message)) => Response::err(kind, message),
                }
            }
            Request::Verify { volume } => match self.node.verify(volume.as_deref()).await {
                Ok(results) => Response::Ok(Reply::Verified(results)),
                Err((kind, message)) => Response::err(kind, message),
            },
            Request::Attach { volume } => {
                kernel::control::attach(&self.kernel, self.node.volumes(), &volume).await
            }
            Request::Detach { volume } => {
                kernel::control::detach(&self.kernel, self.node.volumes(), &volume).await
            }
        }
    }
}

#[cfg(test)]
#[path = "daemon_tests.rs"]
mod tests;
