//! One schedule: the steps, the operator MODEL, the client, and the checker.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::{sleep, timeout, Instant};

use super::cluster::{connect, SimNode, SIZE};
use super::Rng;
use crate::control::{ConnState, DiskState, Role};
use crate::storage::AlignedBuf;

const BLOCK: u64 = 4096;
const BLOCKS: u64 = SIZE / BLOCK;

/// Writes the client saw acknowledged, in order: (write id, first block, blocks).
type Acked = Arc<Mutex<Vec<(u64, u64, u64)>>>;

struct World {
    nodes: [SimNode; 2],
    rng: Rng,
    trace: Vec<String>,
    start: Instant,
    /// Partitioned directions: alpha→beta, beta→alpha.
    held: [bool; 2],
    next_session: u64,
    next_write: u64,
    acked: Acked,
    /// Client requests not finished yet (a frozen or timed-out one may finish later).
    pending: Arc<Mutex<u64>>,
    /// Per block: the write ids issued into it.
    issued: BTreeMap<u64, BTreeSet<u64>>,
    /// Per block: the newest write acknowledged before a completed flush.
    required: BTreeMap<u64, u64>,
    /// The nodes holding every acknowledged write, as the operator knows it.
    newest: BTreeSet<usize>,
    /// What each powered-off node's disk held when the power went.
    images: [Option<Vec<u8>>; 2],
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A block's content: the write id and the block number, then the id's low byte.
fn block_bytes(id: u64, block: u64) -> Vec<u8> {
    let mut b = vec![id as u8; BLOCK as usize];
    b[..8].copy_from_slice(&id.to_le_bytes());
    b[8..16].copy_from_slice(&block.to_le_bytes());
    b
}

fn block_id(b: &[u8]) -> u64 {
    let mut id = [0u8; 8];
    id.copy_from_slice(&b[..8]);
    u64::from_le_bytes(id)
}

pub async fn run(seed: u64, steps: u32, dir: &Path) -> Result<Vec<String>, Vec<String>> {
    let mut w = World {
        nodes: [SimNode::new("alpha", "beta", dir), SimNode::new("beta", "alpha", dir)],
        rng: Rng::new(seed),
        trace: Vec::new(),
        start: Instant::now(),
        held: [false; 2],
        next_session: 1,
        next_write: 1,
        acked: Arc::default(),
        pending: Arc::default(),
        issued: BTreeMap::new(),
        required: BTreeMap::new(),
        newest: BTreeSet::from([0, 1]),
        images: [None, None],
    };
    for i in 0..2 {
        let seed = w.rng.next();
        if let Err(e) = w.nodes[i].start(vec![0; SIZE as usize], seed).await {
            return Err(vec![format!("start: {e}")]);
        }
    }
    w.reconnect().await;
    w.settle(Duration::from_millis(500)).await;
    w.operator().await;
    for step in 0..steps {
        w.step(step).await;
        w.reconnect().await;
        let pause = Duration::from_millis(200 + w.rng.below(1300));
        w.settle(pause).await;
        w.operator().await;
        w.settle(Duration::from_millis(100)).await;
        if let Err(why) = w.check() {
            w.note(format!("INVARIANT VIOLATED: {why}"));
            return Err(w.trace);
        }
    }
    Ok(w.trace)
}

impl World {
    fn note(&mut self, what: String) {
        let t = self.start.elapsed().as_millis();
        self.trace.push(format!("{:>7}.{:03} s  {what}", t / 1000, t % 1000));
    }

    fn state(&self) -> String {
        let one = |n: &SimNode| match &n.up {
            None => format!("{}: off", n.name),
            Some(i) => {
                let s = i.volume.status();
                format!(
                    "{}: {:?} {:?} {:?} oos={}{}",
                    n.name,
                    s.role,
                    s.disk,
                    s.conn,
                    s.out_of_sync,
                    if s.resync.is_some() { " resync" } else { "" }
                )
            }
        };
        format!("[{} | {}]", one(&self.nodes[0]), one(&self.nodes[1]))
    }

    async fn settle(&mut self, d: Duration) {
        sleep(d).await;
        self.nodes.iter_mut().for_each(SimNode::reap);
    }

    fn primary(&self) -> Option<usize> {
        (0..2).find(|&i| {
            self.nodes[i].up.as_ref().is_some_and(|u| u.volume.machine().role == Role::Primary)
        })
    }

    async fn step(&mut self, step: u32) {
        let roll = self.rng.below(100);
        match roll {
            0..=29 => self.writes().await,
            30..=41 => self.flush().await,
            42..=46 => self.partition([true, true]),
            47..=50 => {
                let dir = self.rng.below(2) as usize;
                let mut held = [false; 2];
                held[dir] = true;
                self.partition(held);
            }
            51..=62 => self.partition([false, false]),
            63..=71 => {
                let who = match (roll < 68, self.primary()) {
                    (true, Some(p)) => p,
                    (false, Some(p)) => 1 - p,
                    _ => self.rng.below(2) as usize,
                };
                self.power_cut(who);
            }
            72..=73 => {
                self.power_cut(0);
                self.power_cut(1);
            }
            74..=87 => self.restart().await,
            88..=93 => self.swap().await,
            _ => {
                let d = Duration::from_millis(1000 + self.rng.below(9000));
                self.note(format!("time passes: {d:?}"));
                sleep(d).await;
            }
        }
        let s = self.state();
        self.note(format!("step {step} done {s}"));
    }

    async fn writes(&mut self) {
        let Some(p) = self.primary() else {
            self.note("client: no Primary to write to".into());
            return;
        };
        let Some(up) = self.nodes[p].up.as_ref() else { return };
        let n = 1 + self.rng.below(4);
        let mut tasks = Vec::new();
        let mut what = Vec::new();
        for _ in 0..n {
            let (id, first, len) =
                (self.next_write, self.rng.below(BLOCKS - 3), 1 + self.rng.below(3));
            self.next_write += 1;
            let mut data = Vec::new();
            for b in first..first + len {
                data.extend(block_bytes(id, b));
                self.issued.entry(b).or_default().insert(id);
            }
            what.push(format!("w{id}@{first}+{len}"));
            let (v, acked, pending) =
                (Arc::clone(&up.volume), Arc::clone(&self.acked), Arc::clone(&self.pending));
            let alive = up.alive();
            *lock(&pending) += 1;
            tasks.push(tokio::spawn(async move {
                let r = v.write(first * BLOCK, AlignedBuf::copy_from(&data), false).await;
                *lock(&pending) -= 1;
                // A node that lost its power acknowledges nothing any more.
                let ok = r.is_ok() && !alive.is_cancelled();
                if ok {
                    lock(&acked).push((id, first, len));
                }
                ok
            }));
        }
        let name = self.nodes[p].name;
        self.note(format!("client: {} on {name}", what.join(" ")));
        if self.rng.below(3) == 0 {
            // A fault while the writes are in flight.
            sleep(Duration::from_micros(self.rng.below(3000))).await;
            self.fault_in_flight();
        }
        let mut results = Vec::new();
        for t in tasks {
            match timeout(Duration::from_secs(8), t).await {
                Ok(Ok(true)) => results.push("ack"),
                Ok(_) => results.push("error"),
                Err(_) => results.push("no answer yet"),
            }
        }
        self.note(format!("client: {}", results.join(" ")));
    }

    async fn flush(&mut self) {
        let Some(p) = self.primary() else { return };
        let Some(up) = self.nodes[p].up.as_ref() else { return };
        let covered = lock(&self.acked).clone();
        let (v, alive) = (Arc::clone(&up.volume), up.alive());
        let r = timeout(Duration::from_secs(8), v.flush()).await;
        let name = self.nodes[p].name;
        match r {
            Ok(Ok(())) if !alive.is_cancelled() => {
                for (id, first, len) in covered {
                    for b in first..first + len {
                        let r = self.required.entry(b).or_insert(0);
                        *r = (*r).max(id);
                    }
                }
                self.note(format!("client: flush on {name} ok"));
            }
            Ok(Ok(())) => {}
            Ok(Err(e)) => self.note(format!("client: flush on {name} failed: {e}")),
            Err(_) => self.note(format!("client: flush on {name}: no answer yet")),
        }
    }

    fn fault_in_flight(&mut self) {
        match self.rng.below(4) {
            0 => self.partition([true, true]),
            1 => {
                self.note("network: connection reset".into());
                if let Some(up) = self.nodes[0].up.as_ref() {
                    up.pipes.iter().for_each(super::net::Pipe::close);
                }
            }
            w => self.power_cut(w as usize - 2),
        }
    }

    fn partition(&mut self, held: [bool; 2]) {
        self.held = held;
        self.note(format!("network: alpha→beta {}, beta→alpha {}", cut(held[0]), cut(held[1])));
        if let Some(up) = self.nodes[0].up.as_ref() {
            // pipes[0] is alpha's sending direction, pipes[1] its receiving one.
            if let [tx, rx] = &up.pipes[..] {
                tx.hold(held[0]);
                rx.hold(held[1]);
            }
        }
    }

    fn power_cut(&mut self, who: usize) {
        // Acknowledged writes no flush covered yet survive the cut only where the survivor
        // holds them: it is the Primary that acknowledged them, or in sync with it. Otherwise a
        // later flush does not cover them (losing them is allowed).
        let survivor = self.nodes[1 - who].up.as_ref();
        let primary = survivor.is_some_and(|u| u.volume.machine().role == Role::Primary);
        if !(primary || self.in_sync()) {
            lock(&self.acked).clear();
        }
        let Some((image, kept, total)) = self.nodes[who].power_cut(&mut self.rng) else { return };
        let name = self.nodes[who].name;
        self.note(format!("power cut: {name} (kept {kept} of {total} unflushed disk writes)"));
        self.images[who] = Some(image);
    }
}

fn cut(held: bool) -> &'static str {
    if held {
        "held"
    } else {
        "open"
    }
}

impl World {
    async fn restart(&mut self) {
        for i in 0..2 {
            if self.nodes[i].up.is_none() && self.rng.below(2) == 0 {
                let image = self.images[i].take().unwrap_or_else(|| vec![0; SIZE as usize]);
                let name = self.nodes[i].name;
                let seed = self.rng.next();
                match self.nodes[i].start(image, seed).await {
                    Ok(()) => self.note(format!("restart: {name}")),
                    Err(e) => self.note(format!("restart: {name} failed: {e}")),
                }
            }
        }
    }

    /// Connects the two running nodes when neither holds an open session and the network
    /// lets a connection through (the link manager's redial, a MODEL).
    async fn reconnect(&mut self) {
        if self.held != [false, false] {
            return;
        }
        let [a, b] = &mut self.nodes;
        let (Some(ua), Some(ub)) = (a.up.as_mut(), b.up.as_mut()) else { return };
        let open =
            |s: &Option<crate::replication::Session>| s.as_ref().is_some_and(|s| s.is_open());
        if open(&ua.session) && open(&ub.session) {
            return;
        }
        let id = self.next_session;
        self.next_session += 1;
        let ok = connect(ua, ub, id, id).await;
        self.note(format!("link: session {id} {}", if ok { "up" } else { "handshake failed" }));
    }

    /// The operator MODEL: keeps one Primary, promoting only a node that holds the newest
    /// data (with --force only when its peer is powered off), the lower name first.
    async fn operator(&mut self) {
        self.observe_newest();
        if self.primary().is_some() {
            return;
        }
        for i in 0..2 {
            let Some(up) = self.nodes[i].up.as_ref() else { continue };
            let m = up.volume.machine();
            if !self.newest.contains(&i) || m.disk != DiskState::UpToDate {
                continue;
            }
            let peer_off = self.nodes[1 - i].up.is_none();
            if !peer_off && m.conn != ConnState::Connected {
                continue;
            }
            let node = Arc::clone(&up.node);
            let r =
                timeout(Duration::from_secs(8), node.set_role(None, Role::Primary, peer_off)).await;
            let name = self.nodes[i].name;
            let how = if peer_off { "promote --force" } else { "promote" };
            match r {
                Ok(Ok(())) => self.note(format!("operator: {how} {name}: ok")),
                Ok(Err((_, why))) => self.note(format!("operator: {how} {name}: refused: {why}")),
                Err(_) => self.note(format!("operator: {how} {name}: no answer")),
            }
            return;
        }
    }

    /// Who holds every acknowledged write: the Primary, and a peer in sync with it.
    fn observe_newest(&mut self) {
        let Some(p) = self.primary() else { return };
        let mut newest = BTreeSet::from([p]);
        if self.in_sync() {
            newest.insert(1 - p);
        }
        self.newest = newest;
    }

    /// Both running, Connected, UpToDate, nothing out of sync, no resync.
    fn in_sync(&self) -> bool {
        self.nodes.iter().all(|n| {
            n.up.as_ref().is_some_and(|u| {
                let s = u.volume.status();
                s.conn == ConnState::Connected
                    && s.disk == DiskState::UpToDate
                    && s.peer_disk == Some(DiskState::UpToDate)
                    && s.out_of_sync == 0
                    && s.resync.is_none()
            })
        })
    }

    /// A planned switchover, when in sync: demote the Primary, promote its peer.
    async fn swap(&mut self) {
        let Some(p) = self.primary() else { return };
        if !self.in_sync() || *lock(&self.pending) > 0 {
            return;
        }
        let (Some(a), Some(b)) = (self.nodes[p].up.as_ref(), self.nodes[1 - p].up.as_ref()) else {
            return;
        };
        let (from, to) = (Arc::clone(&a.node), Arc::clone(&b.node));
        let demoted =
            timeout(Duration::from_secs(8), from.set_role(None, Role::Secondary, false)).await;
        let promoted = match demoted {
            Ok(Ok(())) => {
                timeout(Duration::from_secs(8), to.set_role(None, Role::Primary, false)).await
            }
            _ => Ok(Err((crate::control::ErrorKind::Internal, "demote failed".into()))),
        };
        let names = (self.nodes[p].name, self.nodes[1 - p].name);
        self.note(format!(
            "operator: swap {} -> {}: {:?}",
            names.0,
            names.1,
            promoted.map(|r| r.map_err(|e| e.1))
        ));
    }

    fn check(&mut self) -> Result<(), String> {
        self.observe_newest();
        let primaries = (0..2)
            .filter(|&i| {
                self.nodes[i].up.as_ref().is_some_and(|u| u.volume.machine().role == Role::Primary)
            })
            .count();
        if primaries > 1 {
            return Err("two running Primaries".into());
        }
        if self.in_sync() && *lock(&self.pending) == 0 {
            let (Some(a), Some(b)) = (self.nodes[0].up.as_ref(), self.nodes[1].up.as_ref()) else {
                return Ok(());
            };
            if let Some(at) = a.disk.first_difference(&b.disk, BLOCK as usize) {
                let at = at as u64;
                let x = block_id(&a.disk.read(at * BLOCK, BLOCK as usize));
                let y = block_id(&b.disk.read(at * BLOCK, BLOCK as usize));
                return Err(format!(
                    "both in sync, but block {at} differs: alpha has w{x}, beta has w{y}"
                ));
            }
        }
        let Some(p) = self.primary() else { return Ok(()) };
        let Some(up) = self.nodes[p].up.as_ref() else { return Ok(()) };
        for (&block, &want) in &self.required {
            let got = block_id(&up.disk.read(block * BLOCK, BLOCK as usize));
            let later = self.issued.get(&block).is_some_and(|ids| ids.contains(&got));
            if got < want || !later {
                return Err(format!(
                    "Primary {} lost block {block}: w{want} was acknowledged and flushed, the disk has w{got}",
                    self.nodes[p].name
                ));
            }
        }
        Ok(())
    }
}
