//! `blockctl agent` in the simulation: the real decision table ([`crate::agent::Agent`]) of
//! each node's agent, polling its node every [`POLL`] as the real one polls the control
//! socket, asking the real witness, and acting on the node the way the agent's plans would
//! (a MODEL of the plans: the role change and `resolve` only, no stack to move).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::{sleep, Instant};
use tokio_util::sync::CancellationToken;

use super::witness::SimWitness;
use crate::agent::{Agent, Decision};
use crate::control::{NodeStatus, Role};
use crate::node::Node;
use crate::resync::Resolve;

const POLL: Duration = Duration::from_millis(200);

/// Lines for the schedule's trace, with the virtual time they happened at.
pub type Log = Arc<Mutex<Vec<(Instant, String)>>>;

/// What a node's agent has seen since it started (from the same polls its decisions use):
/// the facts the liveness check's exceptions are made of (`check.rs` `liveness`).
#[derive(Debug, Clone, Copy)]
pub struct Seen {
    /// The agent's start, or its last poll that saw the peer connected.
    pub since: Instant,
    /// The peer was not connected at the first poll and has not been since (row 6).
    pub alone_since_start: bool,
    /// This node demoted itself giving up its local changes and has not reconnected since.
    pub gave_up_changes: bool,
}

impl Seen {
    pub fn new() -> Seen {
        Seen { since: Instant::now(), alone_since_start: false, gave_up_changes: false }
    }
}

pub type Facts = Arc<Mutex<Seen>>;

/// One node's agent; `peer` is the other node's, for a swap (the peer's `RunPromote`).
pub struct SimAgent {
    pub index: usize,
    pub facts: Facts,
    pub node: Arc<Node>,
    pub peer: String,
    pub witness: SimWitness,
    pub log: Log,
}

fn status(node: &Node) -> NodeStatus {
    NodeStatus {
        node: node.name().to_string(),
        version: "sim".into(),
        volumes: node.volumes().iter().map(|v| v.status()).collect(),
    }
}

impl SimAgent {
    fn say(&self, what: String) {
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        log.push((Instant::now(), format!("agent {}: {what}", self.node.name())));
    }

    /// Polls, decides and acts until `token` is cancelled (the node's power went).
    pub async fn run(self, token: CancellationToken) {
        let client = SimWitness::client(self.node.name());
        let mut agent = Agent::new(true);
        let mut last = String::new();
        let mut first = true;
        while !token.is_cancelled() {
            let s = status(&self.node);
            self.saw(&s, std::mem::take(&mut first));
            let mut d = agent.observe(Ok(&s), Instant::now().into_std());
            if d == Decision::Ask {
                let r = self.witness.ask(self.index, &client, false).await;
                d = agent.answer(r, &self.peer, Instant::now().into_std());
            }
            if token.is_cancelled() {
                return;
            }
            match d {
                Decision::Wait(why) => {
                    let words: String =
                        why.chars().filter(|c| !c.is_ascii_digit() && *c != '.').collect();
                    if words != last {
                        self.say(format!("wait: {why}"));
                        last = words;
                    }
                }
                Decision::Ask => {}
                d => {
                    last.clear();
                    self.act(&mut agent, d).await;
                }
            }
            let pause = agent.next_poll(POLL, Instant::now().into_std());
            tokio::select! {
                () = token.cancelled() => return,
                () = sleep(pause) => {}
            }
        }
    }

    fn saw(&self, s: &NodeStatus, first: bool) {
        use crate::control::ConnState::{Connected, SyncSource, SyncTarget};
        let connected = !s.volumes.is_empty()
            && s.volumes.iter().all(|v| matches!(v.conn, Connected | SyncSource | SyncTarget));
        let mut f = self.facts.lock().unwrap_or_else(|p| p.into_inner());
        if first {
            f.alone_since_start = !connected;
        }
        if connected {
            *f = Seen::new();
        }
    }

    async fn act(&self, agent: &mut Agent, d: Decision) {
        let n = &self.node;
        let (what, r) = match d {
            Decision::Promote(facts) => {
                (format!("PROMOTE: {facts}"), n.set_role(None, Role::Primary, true).await)
            }
            Decision::Resume(facts) => {
                (format!("RESUME: {facts}"), n.set_role(None, Role::Primary, false).await)
            }
            Decision::Demote(facts) => {
                let r = match n.set_role(None, Role::Secondary, false).await {
                    Ok(()) => n.resolve(None, Resolve::DiscardLocal).await,
                    e => e,
                };
                if r.is_ok() {
                    agent.demoted();
                    self.facts.lock().unwrap_or_else(|p| p.into_inner()).gave_up_changes = true;
                }
                (format!("DEMOTE: {facts}"), r)
            }
            // The swaps' peer half is the peer's promote plan; the simulation's operator and
            // the peer's agent take it from here (the peer is Connected and UpToDate).
            Decision::Swap(_, facts) | Decision::Failback(facts) => {
                (format!("SWAP: {facts}"), n.set_role(None, Role::Secondary, false).await)
            }
            other => (format!("{other:?}: nothing to do in the simulation"), Ok(())),
        };
        match r {
            Ok(()) => self.say(format!("{what}: done")),
            Err((_, why)) => {
                agent.failed(Instant::now().into_std());
                self.say(format!("{what}: failed: {why}"));
            }
        }
    }
}
