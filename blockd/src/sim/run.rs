//! One schedule: the steps, the operator MODEL, the client, and the checker.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::{sleep, timeout, Instant};

use super::agent::Log;
use super::cluster::{connect, SimNode, SIZE};
use super::disk::Fault;
use super::witness::SimWitness;
use super::Rng;
use crate::control::{ConnState, Role};
use crate::fence::Fence;
use crate::storage::AlignedBuf;

pub(super) const BLOCK: u64 = 4096;
pub(super) const BLOCKS: u64 = SIZE / BLOCK;

/// Writes the client saw acknowledged, in order: (write id, first block, blocks).
type Acked = Arc<Mutex<Vec<(u64, u64, u64)>>>;

pub(super) struct World {
    pub(super) nodes: [SimNode; 2],
    pub(super) rng: Rng,
    /// Disk faults' own choices: a schedule without them makes the same choices as before
    /// they existed (so older seeds replay).
    faults: Rng,
    trace: Vec<String>,
    start: Instant,
    /// Partitioned directions: alpha→beta, beta→alpha.
    held: [bool; 2],
    next_session: u64,
    next_write: u64,
    pub(super) acked: Acked,
    /// Client requests not finished yet (a frozen or timed-out one may finish later).
    pub(super) pending: Arc<Mutex<u64>>,
    /// Per block: the write ids issued into it.
    pub(super) issued: BTreeMap<u64, BTreeSet<u64>>,
    /// Per block: the newest write acknowledged before a completed flush.
    pub(super) required: BTreeMap<u64, u64>,
    /// The nodes holding every acknowledged write, as the operator knows it.
    pub(super) newest: BTreeSet<usize>,
    /// What each powered-off node's disk held when the power went.
    images: [Option<Vec<u8>>; 2],
    /// The witness, in schedules that have one.
    pub(super) witness: Option<SimWitness>,
    /// Invariant violations seen while a step ran (by the client's tasks).
    violations: Arc<Mutex<Vec<String>>>,
    /// What the agents did, for the trace.
    log: Log,
    /// Since when each node has been powered off.
    pub(super) off_since: [Option<Instant>; 2],
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A block's content: the write id and the block number, then the id's low byte.
pub(super) fn block_bytes(id: u64, block: u64) -> Vec<u8> {
    let mut b = vec![id as u8; BLOCK as usize];
    b[..8].copy_from_slice(&id.to_le_bytes());
    b[8..16].copy_from_slice(&block.to_le_bytes());
    b
}

pub(super) fn block_id(b: &[u8]) -> u64 {
    let mut id = [0u8; 8];
    id.copy_from_slice(&b[..8]);
    u64::from_le_bytes(id)
}

pub async fn run(
    seed: u64,
    steps: u32,
    dir: &Path,
    with_witness: bool,
) -> Result<Vec<String>, Vec<String>> {
    let mut w = World {
        nodes: [SimNode::new("alpha", "beta", dir), SimNode::new("beta", "alpha", dir)],
        rng: Rng::new(seed),
        faults: Rng::new(seed ^ 0x6469_736b_6661_756c),
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
        witness: None,
        violations: Arc::default(),
        log: Arc::default(),
        off_since: [None, None],
    };
    if with_witness {
        let wit =
            SimWitness::new(dir, Arc::clone(&w.log)).map_err(|e| vec![format!("witness: {e}")])?;
        for n in &mut w.nodes {
            n.witness = Some((wit.clone(), Arc::clone(&w.log)));
        }
        w.witness = Some(wit);
    }
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
        let seen = std::mem::take(&mut *lock(&w.violations));
        if let Some(why) = seen.into_iter().next().map(Err).unwrap_or_else(|| w.check()).err() {
            w.note(format!("INVARIANT VIOLATED: {why}"));
            return Err(w.trace);
        }
    }
    if let Err(why) = w.liveness().await {
        w.note(format!("INVARIANT VIOLATED: {why}"));
        return Err(w.trace);
    }
    Ok(w.trace)
}

impl World {
    pub(super) fn note(&mut self, what: String) {
        let agents = std::mem::take(&mut *lock(&self.log));
        for (at, line) in agents {
            let t = (at - self.start).as_millis();
            self.trace.push(format!("{:>7}.{:03} s  {line}", t / 1000, t % 1000));
        }
        let t = self.start.elapsed().as_millis();
        self.trace.push(format!("{:>7}.{:03} s  {what}", t / 1000, t % 1000));
    }

    pub(super) fn state(&self) -> String {
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

    pub(super) async fn settle(&mut self, d: Duration) {
        sleep(d).await;
        self.nodes.iter_mut().for_each(SimNode::reap);
    }

    pub(super) fn primary(&self) -> Option<usize> {
        (0..2).find(|&i| {
            self.nodes[i].up.as_ref().is_some_and(|u| u.volume.machine().role == Role::Primary)
        })
    }

    async fn step(&mut self, step: u32) {
        if self.witness.is_some() && self.faults.below(100) < 10 {
            self.witness_event();
            let s = self.state();
            self.note(format!("step {step} done {s}"));
            return;
        }
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
                if self.faults.below(2) == 0 {
                    self.disk_fault();
                }
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
            let linked = |v: &crate::volume::Volume| {
                matches!(
                    v.machine().conn,
                    ConnState::Connected | ConnState::SyncSource | ConnState::SyncTarget
                )
            };
            // Degraded for sure: no session when the write started, nor when it ended.
            let alone = !linked(&v);
            let fenced = self.witness.clone().zip(up.node.fence().cloned());
            let (name, violations) = (self.nodes[p].name, Arc::clone(&self.violations));
            *lock(&pending) += 1;
            tasks.push(tokio::spawn(async move {
                let r = v.write(first * BLOCK, AlignedBuf::copy_from(&data), false).await;
                *lock(&pending) -= 1;
                // A node that lost its power acknowledges nothing any more.
                let ok = r.is_ok() && !alive.is_cancelled();
                if ok {
                    lock(&acked).push((id, first, len));
                    if let (true, Some((w, fence))) = (alone && !linked(&v), fenced) {
                        let why = check_epoch(&w, &fence, name);
                        lock(&violations).extend(why.map(|why| format!("w{id}: {why}")));
                    }
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

    /// A disk starts failing (EIO, ENOSPC, a failed write-back: until the operator replaces it)
    /// or hangs (for a while, or until its power goes).
    fn disk_fault(&mut self) {
        let who = match (self.faults.below(2), self.primary()) {
            (0, Some(p)) => p,
            (_, Some(p)) => 1 - p,
            _ => self.faults.below(2) as usize,
        };
        let Some(up) = self.nodes[who].up.as_ref() else { return };
        let disk = up.disk.clone();
        let name = self.nodes[who].name;
        let (fault, what) = match self.faults.below(4) {
            0 => (Fault::Errors(libc::EIO), "fails with EIO".to_string()),
            1 => (Fault::Errors(libc::ENOSPC), "is full (ENOSPC)".to_string()),
            2 => (Fault::FlushErrors, "fails its write-back (every flush EIO)".to_string()),
            _ => {
                let d = Duration::from_millis(500 + self.faults.below(8000));
                let thaw = disk.clone();
                tokio::spawn(async move {
                    sleep(d).await;
                    thaw.thaw();
                });
                (Fault::Hang, format!("hangs for {d:?}"))
            }
        };
        disk.fault(fault);
        self.note(format!("disk: {name}'s disk {what}"));
    }

    /// The witness: a node cut off from it or back, the witness stopped, (re)started.
    fn witness_event(&mut self) {
        let Some(w) = self.witness.clone() else { return };
        let roll = self.faults.below(4);
        let who = self.faults.below(2) as usize;
        let what = match roll {
            0 => {
                w.cut(who, true);
                format!("{} cut off from the witness", self.nodes[who].name)
            }
            1 => {
                w.cut(0, false);
                w.cut(1, false);
                "both nodes reach the witness".to_string()
            }
            2 => {
                w.stop();
                "witness stopped".to_string()
            }
            _ => match w.start() {
                Ok(()) => "witness (re)started from its state file".to_string(),
                Err(e) => format!("witness start failed: {e}"),
            },
        };
        self.note(format!("witness: {what}"));
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
        // holds them: it is the Primary that acknowledged them, or in sync with it and
        // promoted before the cut node returns (the operator does so at once; the agent of a
        // witness schedule may not, and a returning crashed Primary is then the source of the
        // crash's resync). Otherwise a later flush does not cover them (losing them is
        // allowed: the client's connection went with the Primary).
        let survivor = self.nodes[1 - who].up.as_ref();
        let primary = survivor.is_some_and(|u| u.volume.machine().role == Role::Primary);
        if !(primary || (self.in_sync() && self.witness.is_none())) {
            lock(&self.acked).clear();
        }
        let Some((image, kept, total)) = self.nodes[who].power_cut(&mut self.rng) else { return };
        let name = self.nodes[who].name;
        self.note(format!("power cut: {name} (kept {kept} of {total} unflushed disk writes)"));
        self.images[who] = Some(image);
        self.off_since[who] = Some(Instant::now());
    }
}

/// Invariant 5: a degraded write is acknowledged under the newest epoch the witness gave
/// out, held by the node that acknowledges it: no two nodes acknowledge writes in one epoch,
/// nor one in an epoch the witness already gave to the other.
fn check_epoch(w: &SimWitness, fence: &Fence, node: &str) -> Option<String> {
    let held = fence.held().map(|l| l.epoch);
    let newest = w.newest();
    match (&held, &newest) {
        (Some(e), Some((n, Some(holder)))) if e == n && holder == node => None,
        _ => Some(format!(
            "{node} acknowledged a degraded write holding epoch {held:?}; the witness's newest \
             is {newest:?}"
        )),
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
                self.off_since[i] = None;
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
}
