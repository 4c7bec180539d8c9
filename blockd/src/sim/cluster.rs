//! Two nodes in one process: each incarnation is the real [`Volume`] (over a [`ModelDisk`] and
//! a real metadata file) and the real [`Node`] dispatcher; sessions are the real handshake
//! (Noise, PARAMS, READY) and the real session and writer tasks, over [`net`](super::net)
//! pipes. What stands in for the link's manager (`link.rs`, a MODEL): when both nodes are up
//! and the network lets a connection through, the lower-named node "dials"; a node's ended
//! session becomes `LinkEvent::Down`; a half-dead session (one side still holds it) is closed
//! when the next connection is made, as the real manager's newer connection replaces it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::agent::{Log, SimAgent};
use super::disk::ModelDisk;
use super::net::{self, Pipe};
use super::witness::{self, SimWitness};
use crate::config::ResyncConfig;
use crate::fence::Fence;
use crate::meta::{AlConfig, MetaFile};
use crate::replication::handshake;
use crate::replication::record::Protection;
use crate::replication::wire::{Frame, Message, VolumeParams};
use crate::replication::{LinkConfig, LinkEvent, Secrets, Session};
use crate::storage::{Allocate, DirectIo, EngineKind, Store, StoreOptions};
use crate::volume::{Volume, VolumeInfo};
use crate::{node::Node, replication::session as sess};

pub const SIZE: u64 = 4 << 20;
pub const PEER_TIMEOUT: Duration = Duration::from_secs(3);
const GRANULARITY: u32 = 4096;
/// Small extents, few of them: evictions and log-full flushes happen within a schedule.
pub const AL: AlConfig = AlConfig { extent_size: 1 << 20, extents: 3 };

/// One running incarnation of a node.
pub struct Incarnation {
    pub volume: Arc<Volume>,
    pub node: Arc<Node>,
    pub disk: ModelDisk,
    events: mpsc::Sender<LinkEvent>,
    ended: mpsc::UnboundedSender<(u64, String)>,
    pub session: Option<Session>,
    /// Both directions of this incarnation's connection, to cut or partition it.
    pub pipes: Vec<Pipe>,
    token: CancellationToken,
    instance: u64,
}

/// A node: its name, its files, and its running incarnation (None while powered off).
pub struct SimNode {
    pub name: &'static str,
    peer: &'static str,
    dir: PathBuf,
    /// Incarnations so far: each one gets its own copy of the metadata file.
    pub generation: u32,
    pub up: Option<Incarnation>,
    /// A finished session of the running incarnation, reported by its forwarding task.
    ended_rx: Option<mpsc::UnboundedReceiver<u64>>,
    /// The witness, when the schedule has one: each incarnation fences its degraded writes,
    /// and runs an agent that logs here.
    pub witness: Option<(SimWitness, Log)>,
    /// What the running incarnation's agent has seen (reset at each start).
    pub agent_facts: super::agent::Facts,
}

fn link_config(name: &str, peer: &str) -> LinkConfig {
    let addr: SocketAddr = ([10, 0, 0, u8::from(name > peer) + 1], 7789).into();
    let peer_addr: SocketAddr = ([10, 0, 0, u8::from(peer > name) + 1], 7789).into();
    LinkConfig {
        node: name.to_string(),
        peer: peer.to_string(),
        listen: addr,
        peer_addr,
        secrets: Secrets::fixed(b"simulated cluster secret, 32 bytes or more"),
        protection: Protection::Encrypt,
        peer_timeout: PEER_TIMEOUT,
        volumes: vec![VolumeParams {
            name: "v".into(),
            size: SIZE,
            granularity: GRANULARITY,
            al_extent_size: AL.extent_size,
            al_extents: AL.extents,
        }],
        max_in_flight_bytes: 64 << 20,
    }
}

impl SimNode {
    pub fn new(name: &'static str, peer: &'static str, dir: &Path) -> SimNode {
        let dir = dir.to_path_buf();
        SimNode {
            name,
            peer,
            dir,
            generation: 0,
            up: None,
            ended_rx: None,
            witness: None,
            agent_facts: Arc::new(std::sync::Mutex::new(super::agent::Seen::new())),
        }
    }

    fn meta_path(&self, generation: u32) -> PathBuf {
        self.dir.join(format!("{}.{generation}.meta", self.name))
    }

    /// Starts an incarnation on `image` (zeroes at first, what a power cut left later).
    pub async fn start(&mut self, image: Vec<u8>, seed: u64) -> Result<(), String> {
        let first = self.generation == 0;
        let meta = self.meta_path(self.generation);
        let backing = self.dir.join(format!("{}.{}.img", self.name, self.generation));
        let opts = StoreOptions {
            path: backing.clone(),
            size: SIZE,
            engine: EngineKind::Sync,
            direct: DirectIo::Off,
            allocate: Allocate::Sparse,
        };
        let disk = ModelDisk::new(image, seed);
        let engine = disk.clone();
        let store = Store::open(&opts).map_err(|e| e.to_string())?.map_engine(|_| Arc::new(engine));
        // Without the file every range is data to a resync (no SEEK_HOLE answers from a file
        // the model disk does not write).
        std::fs::remove_file(&backing).map_err(|e| e.to_string())?;
        let (file, m) = MetaFile::open_or_create_with(&meta, SIZE, self.name, first, GRANULARITY)
            .map_err(|e| e.to_string())?;
        let info = VolumeInfo {
            name: "v".into(),
            index: 0,
            node: self.name.into(),
            peer: Some(self.peer.into()),
            socket: PathBuf::new(),
            backing,
        };
        let volume = Arc::new(Volume::open(info, store, m, file, AL).map_err(|e| e.to_string())?);
        // As the daemon does at start: a crash from now on is not a clean stop.
        volume.mark_clean(false).await.map_err(|e| e.to_string())?;
        let resync = ResyncConfig::default();
        let fence = self.witness.as_ref().map(|_| Arc::new(Fence::new(witness::addr())));
        let index = usize::from(self.name > self.peer);
        let node = Node::new(
            self.name.into(),
            Some(self.peer.into()),
            vec![Arc::clone(&volume)],
            PathBuf::new(),
            resync,
            fence.clone(),
        );
        let (events, events_rx) = mpsc::channel(1024);
        let token = CancellationToken::new();
        if let (Some((w, log)), Some(fence)) = (self.witness.clone(), fence) {
            let (n, t) = (Arc::clone(&node), token.clone());
            let name = self.name.to_string();
            tokio::spawn(w.clone().keep_lease(index, name, fence, move || n.any_primary(), t));
            let (node, peer) = (Arc::clone(&node), self.peer.to_string());
            let facts = Arc::clone(&self.agent_facts);
            *facts.lock().unwrap_or_else(|e| e.into_inner()) = super::agent::Seen::new();
            let agent = SimAgent { index, facts, node, peer, witness: w, log };
            tokio::spawn(agent.run(token.clone()));
        }
        tokio::spawn(Arc::clone(&node).run_link(events_rx, TaskTracker::new(), token.clone()));
        let (ended, ended_rx) = mpsc::unbounded_channel::<(u64, String)>();
        let (gone_tx, gone_rx) = mpsc::unbounded_channel();
        let (ev, tok) = (events.clone(), token.clone());
        tokio::spawn(forward_ended(ended_rx, ev, gone_tx, tok));
        self.ended_rx = Some(gone_rx);
        let instance = 1000 + u64::from(self.generation);
        let up = Incarnation {
            volume,
            node,
            disk,
            events,
            ended,
            session: None,
            pipes: Vec::new(),
            token,
            instance,
        };
        self.up = Some(up);
        Ok(())
    }

    /// Powers the running incarnation off: its tasks stop seeing the network and its disk;
    /// returns the disk image the power cut left. The next incarnation gets a copy of the
    /// metadata file as it is now (the old incarnation's tasks may still write the old one).
    pub fn power_cut(&mut self, rng: &mut super::Rng) -> Option<(Vec<u8>, usize, usize)> {
        let up = self.up.take()?;
        up.token.cancel();
        up.pipes.iter().for_each(Pipe::close);
        let cut = up.disk.power_cut(rng);
        let next = self.generation + 1;
        if std::fs::copy(self.meta_path(self.generation), self.meta_path(next)).is_err() {
            return None;
        }
        self.generation = next;
        Some(cut)
    }

    /// Forgets sessions that ended.
    pub fn reap(&mut self) {
        let (Some(rx), Some(up)) = (self.ended_rx.as_mut(), self.up.as_mut()) else { return };
        while let Ok(id) = rx.try_recv() {
            if up.session.as_ref().is_some_and(|s| s.id() == id) {
                up.session = None;
            }
        }
        if up.session.as_ref().is_some_and(|s| !s.is_open()) {
            up.session = None;
        }
    }
}

/// A session's end becomes `LinkEvent::Down` for its node (as `link.rs` reports it).
async fn forward_ended(
    mut ended: mpsc::UnboundedReceiver<(u64, String)>,
    events: mpsc::Sender<LinkEvent>,
    gone: mpsc::UnboundedSender<u64>,
    token: CancellationToken,
) {
    loop {
        let (session, reason) = tokio::select! {
            () = token.cancelled() => return,
            e = ended.recv() => match e { Some(e) => e, None => return },
        };
        let _ = gone.send(session);
        let _ = events.send(LinkEvent::Down { session, reason }).await;
    }
}

/// Connects the two running incarnations (`a` is the lower-named, dialing node): closes any
/// session either still holds, runs both handshakes, and starts both sessions with READY
/// first from `a`, as `link.rs` does. Returns false when a handshake failed.
pub async fn connect(a: &mut Incarnation, b: &mut Incarnation, epoch: u64, id: u64) -> bool {
    for s in [a.session.take(), b.session.take()].into_iter().flatten() {
        s.close("replaced by a newer connection");
    }
    let (mut ea, mut eb) = net::connection();
    a.pipes = vec![ea.tx.clone(), ea.rx.clone()];
    b.pipes = a.pipes.clone();
    let (cfg_a, cfg_b) = (
        link_config(a.volume_node(), b.volume_node()),
        link_config(b.volume_node(), a.volume_node()),
    );
    let (addr_a, addr_b) = (cfg_a.listen, cfg_b.listen);
    let inst_b = b.instance;
    let hb = tokio::spawn(async move {
        let mut buf = BytesMut::with_capacity(4096);
        let r = handshake::handshake(&mut eb, &mut buf, &cfg_b, inst_b, addr_a, false).await;
        r.map(|(hello, ch)| (eb, buf, hello, ch, cfg_b))
    });
    let mut buf = BytesMut::with_capacity(4096);
    let Ok((hello, ch)) =
        handshake::handshake(&mut ea, &mut buf, &cfg_a, a.instance, addr_b, true).await
    else {
        hb.abort();
        return false;
    };
    let first = Frame { volume: 0, id: 0, reply: false, msg: Message::Ready { epoch } };
    let sa = start_session(a, ea, buf, ch, &hello.node, addr_b, id, epoch, Some(first)).await;
    let Ok(Ok((eb, buf, hello_b, ch_b, _))) = hb.await else {
        sa.close("peer handshake failed");
        return false;
    };
    let sb = start_session(b, eb, buf, ch_b, &hello_b.node, addr_a, id, epoch, None).await;
    a.session = Some(sa);
    b.session = Some(sb);
    true
}

impl Incarnation {
    /// Cancelled once this incarnation lost its power.
    pub fn alive(&self) -> CancellationToken {
        self.token.clone()
    }

    fn volume_node(&self) -> &'static str {
        if self.node.name() == "alpha" {
            "alpha"
        } else {
            "beta"
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn start_session(
    inc: &Incarnation,
    end: net::End,
    buf: BytesMut,
    ch: crate::replication::record::Channel,
    peer: &str,
    peer_addr: SocketAddr,
    id: u64,
    epoch: u64,
    first: Option<Frame>,
) -> Session {
    let params = sess::SessionParams {
        id,
        epoch,
        peer: peer.to_string(),
        peer_addr,
        peer_timeout: PEER_TIMEOUT,
        events: inc.events.clone(),
        ended: inc.ended.clone(),
        first,
        budget: sess::Budget::new(64 << 20),
    };
    let (rd, wr) = end.split();
    let (session, reader) = sess::start_on(rd, wr, buf, ch, params);
    let _ = inc.events.send(LinkEvent::Up(session.clone())).await;
    reader.spawn();
    session
}
