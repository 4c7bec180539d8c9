//! The web console: one page shipped in the binary (`page.html`, plain HTML, CSS and a small
//! script, no build step), the JSON it polls, and actions behind an access token.
//!
//! ```text
//!  browser ── GET /            ──► page.html (include_str!)
//!          ── GET /api/state   ──► State: both nodes, volumes, chart, history (polled, 1 s)
//!          ── POST /api/action ──► token? ─► blockctl --config F --node N <swap|promote|...>
//!                                              └ its output streamed back line by line
//!  tasks:  watch   every 500 ms: status ─► History::observe (events)
//!          sample  every 2 s:    status ─► Series (latency / IOPS ring, 15 min)
//!          host    every 3 s while a page polls: `blockctl status --json` ─► mounts,
//!                  VIP, services with their checks, the agent's decision
//! ```
//!
//! What the console shows of the peer is what this daemon knows over the link (role, disk,
//! connection) and the lease: it asks the peer nothing. What this host runs (mounts, VIP,
//! services) comes from `blockctl status --json`, the same checks `blockctl status` and the
//! promote plan use; actions run `blockctl` itself, so the console can do nothing an operator
//! at the shell could not, and does it the same way. Actions are refused without the token
//! (module [`token`]); every action, refused or not, is logged and put in the history with
//! who asked (the name the page sends) and from where (the TCP peer).
//!
//! Cost: nothing touches the write path; the tasks read the same atomics and state `blockctl
//! status` reads, a few times a second (bench/README.md, "console open vs closed").

mod actions;
pub mod history;
mod http;
pub mod series;
mod state;
pub mod token;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    config::{Config, LocalNode},
    control::NodeStatus,
};

/// How often the history compares the status with the last one.
const WATCH: Duration = Duration::from_millis(500);

/// How often the host's view (`blockctl status --json`) is refreshed while a page polls.
const HOST_EVERY: Duration = Duration::from_secs(3);

/// A page that polled within this long keeps the host view refreshed.
const HOST_WHILE_POLLED: Duration = Duration::from_secs(20);

/// The node's status, as the control socket answers it.
pub type StatusFn = Arc<dyn Fn() -> NodeStatus + Send + Sync>;

/// Everything the console's tasks and requests share.
pub struct Console {
    status: StatusFn,
    node: String,
    run_dir: PathBuf,
    config_path: PathBuf,
    token_path: PathBuf,
    blockctl: PathBuf,
    history: Mutex<history::History>,
    series: Mutex<series::Series>,
    host: Mutex<Option<serde_json::Value>>,
    polled: Mutex<Option<Instant>>,
    /// Held while an action runs: one at a time.
    busy: tokio::sync::Mutex<()>,
}

/// A poisoned lock only means a panic elsewhere; the data is still what it was.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Starts the console when `[console] listen` is set; logs and goes on when it cannot bind
/// (the volumes matter more). Returns the bound address.
pub async fn start(
    config: &Config,
    node: &LocalNode,
    status: StatusFn,
    token: CancellationToken,
    tracker: &TaskTracker,
) -> Option<SocketAddr> {
    let addr = config.console.listen?;
    let token_path = config.console.token_path(node);
    if let Err(e) = self::token::read_or_create(&token_path) {
        tracing::error!(error = %e, "console: no access token; actions will be refused");
    }
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%addr, error = %e, "cannot serve the console; going on without it");
            return None;
        }
    };
    let bound = listener.local_addr().ok()?;
    let console = Arc::new(Console {
        status,
        node: node.name.clone(),
        run_dir: node.settings.run_dir.clone(),
        config_path: config.source.clone(),
        token_path,
        blockctl: config.console.blockctl.clone().unwrap_or_else(default_blockctl),
        history: Mutex::default(),
        series: Mutex::default(),
        host: Mutex::default(),
        polled: Mutex::default(),
        busy: tokio::sync::Mutex::new(()),
    });
    tracing::info!("console at http://{bound}/ (token in {})", console.token_path.display());
    tracker.spawn(watch(Arc::clone(&console), token.clone()));
    tracker.spawn(sample(Arc::clone(&console), token.clone()));
    tracker.spawn(refresh_host(Arc::clone(&console), token.clone()));
    tracker.spawn(http::serve(listener, console, token, tracker.clone()));
    Some(bound)
}

/// `blockctl` beside the running executable (how the package installs both), else PATH's.
fn default_blockctl() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("blockctl")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("blockctl"))
}

async fn watch(c: Arc<Console>, token: CancellationToken) {
    loop {
        let status = (c.status)();
        let agent = recent_agent_decision(&c);
        lock(&c.history).observe(&status, history::now_ms(), agent.as_deref());
        tokio::select! {
            () = token.cancelled() => return,
            () = tokio::time::sleep(WATCH) => {}
        }
    }
}

/// The running agent's decision of the last minute ("promote: peer gone, lease won"): what a
/// failover seen now is blamed on. Older, or from a stopped agent, it explains nothing new.
fn recent_agent_decision(c: &Console) -> Option<String> {
    let a = crate::metrics::health::AgentFile::read(&c.run_dir)?;
    let since = humantime::parse_rfc3339_weak(&a.since).ok()?;
    let age = std::time::SystemTime::now().duration_since(since).unwrap_or_default();
    (a.running() && age < Duration::from_secs(60)).then(|| format!("{}: {}", a.decision, a.detail))
}

async fn sample(c: Arc<Console>, token: CancellationToken) {
    loop {
        let status = (c.status)();
        lock(&c.series).sample(&status, history::now_ms());
        tokio::select! {
            () = token.cancelled() => return,
            () = tokio::time::sleep(series::STEP) => {}
        }
    }
}

/// Runs `blockctl status --json` every [`HOST_EVERY`] while a page polls.
async fn refresh_host(c: Arc<Console>, token: CancellationToken) {
    loop {
        let wanted = lock(&c.polled).is_some_and(|t| t.elapsed() < HOST_WHILE_POLLED);
        if wanted {
            let view = actions::host_view(&c).await;
            *lock(&c.host) = Some(view);
        }
        tokio::select! {
            () = token.cancelled() => return,
            () = tokio::time::sleep(HOST_EVERY) => {}
        }
    }
}
