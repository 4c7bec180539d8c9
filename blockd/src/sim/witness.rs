//! The witness in the simulation: the real lease table and server (`witness::server`, its
//! state persisted to a file and restored on a restart) and the real client exchange and
//! fence (`fence::keep_lease`); what is a MODEL is the connection: each request is a fresh
//! pipe pair, and a node cut off from the witness (or a witness that is down) makes the
//! request wait out the client's timeout.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::{sleep, timeout};

use super::agent::Log;
use super::net;
use crate::fence::{self, Fence};
use crate::replication::Secrets;
use crate::witness::server::{serve, Shared};
use crate::witness::{state, ClientSettings, Lease, LeaseClient, WitnessError};

pub const TERM: Duration = Duration::from_secs(3);
const TIMEOUT: Duration = Duration::from_secs(1);
const SECRET: &[u8] = b"simulated cluster secret, 32 bytes or more";

pub fn addr() -> SocketAddr {
    ([10, 0, 0, 9], 7790).into()
}

/// The witness's process and its network, shared with the nodes' lease tasks.
#[derive(Default)]
struct State {
    /// The running witness (None while it is down).
    shared: Option<Arc<Shared>>,
    /// Nodes (by index) cut off from the witness.
    cut: [bool; 2],
    /// Whether each node's last grant was asked as degraded (the witness's record of it,
    /// kept here because the next grant to the other node overwrites it).
    last_degraded: [bool; 2],
    /// When each node last got a grant asked as degraded.
    degraded_at: [Option<tokio::time::Instant>; 2],
}

/// The witness of a schedule.
#[derive(Clone)]
pub struct SimWitness {
    state: Arc<Mutex<State>>,
    path: PathBuf,
    log: Log,
}

impl SimWitness {
    pub fn new(dir: &Path, log: Log) -> Result<SimWitness, String> {
        let w = SimWitness { state: Arc::default(), path: dir.join("witness.state"), log };
        w.start()?;
        Ok(w)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts (or restarts) the witness from its state file: quiet for a term after a restart.
    pub fn start(&self) -> Result<(), String> {
        let shared =
            Shared::open(&self.path, TERM, Secrets::fixed(SECRET)).map_err(|e| e.to_string())?;
        self.lock().shared = Some(Arc::new(shared));
        Ok(())
    }

    pub fn stop(&self) {
        self.lock().shared = None;
    }

    pub fn cut(&self, node: usize, cut: bool) {
        self.lock().cut[node] = cut;
    }

    /// Whether the witness is running.
    pub fn running(&self) -> bool {
        self.lock().shared.is_some()
    }

    /// When node `node` last got a grant asked as degraded.
    pub fn degraded_at(&self, node: usize) -> Option<tokio::time::Instant> {
        self.lock().degraded_at[node]
    }

    /// Whether node `node`'s last grant was asked as degraded.
    pub fn last_degraded(&self, node: usize) -> bool {
        self.lock().last_degraded[node]
    }

    /// The newest epoch granted and its holder, as persisted (before the grant was answered).
    pub fn newest(&self) -> Option<(u64, Option<String>)> {
        state::load(&self.path).ok().flatten().map(|r| (r.epoch, r.holder))
    }

    /// One request of node `node`, as a real node's lease task or agent makes it; the answer
    /// goes into the trace.
    pub async fn ask(
        &self,
        node: usize,
        client: &LeaseClient,
        degraded: bool,
    ) -> Result<crate::witness::Granted, WitnessError> {
        let r = self.request(node, client, degraded).await;
        if r.is_ok() {
            let mut s = self.lock();
            s.last_degraded[node] = degraded;
            if degraded {
                s.degraded_at[node] = Some(tokio::time::Instant::now());
            }
        }
        let what = match &r {
            Ok(g) => format!(
                "epoch {} granted (previous holder degraded: {:?})",
                g.lease.epoch, g.prev_degraded
            ),
            Err(e) => e.to_string(),
        };
        let name = ["alpha", "beta"][node];
        let how = if degraded { " as degraded" } else { "" };
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((tokio::time::Instant::now(), format!("witness: {name} asks{how}: {what}")));
        r
    }

    async fn request(
        &self,
        node: usize,
        client: &LeaseClient,
        degraded: bool,
    ) -> Result<crate::witness::Granted, WitnessError> {
        let shared = {
            let s = self.lock();
            if s.cut[node] {
                None
            } else {
                s.shared.clone()
            }
        };
        let Some(shared) = shared else {
            sleep(TIMEOUT).await;
            return Err(WitnessError::Timeout { addr: addr(), after: TIMEOUT });
        };
        let (near, far) = net::connection();
        let from: SocketAddr = ([10, 0, 0, node as u8 + 1], 40000).into();
        tokio::spawn(async move {
            let _ = serve(&shared, far, from).await;
        });
        match timeout(TIMEOUT, client.ask_on(near, degraded)).await {
            Ok(r) => r,
            Err(_) => Err(WitnessError::Timeout { addr: addr(), after: TIMEOUT }),
        }
    }

    /// A node's lease client.
    pub fn client(name: &str) -> LeaseClient {
        let settings = ClientSettings { term: Some(TERM), margin: None, timeout: TIMEOUT };
        LeaseClient::with_secrets(addr(), name, Secrets::fixed(SECRET), settings)
    }

    /// Runs the real `keep_lease` for node `node` until `token` is cancelled.
    pub async fn keep_lease(
        self,
        node: usize,
        name: String,
        fence: Arc<Fence>,
        primary: impl Fn() -> bool,
        token: tokio_util::sync::CancellationToken,
    ) {
        let client = Self::client(&name);
        let ask = |client: LeaseClient, held: Option<Lease>, degraded: bool| {
            let w = self.clone();
            async move {
                let got = w.ask(node, &client, degraded).await?.lease;
                match held {
                    Some(h) => crate::witness::client::continues(&h, got),
                    None => Ok(got),
                }
            }
        };
        fence::keep_lease(&fence, client, primary, ask, token).await;
    }
}
