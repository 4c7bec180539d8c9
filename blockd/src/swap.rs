//! The far end of the swap relay (design.md §8): the peer asked over the link (`RunPromote`)
//! for a planned switchover, and this node runs its promote plan.
//!
//! ```text
//!  blockctl swap (old Primary) ─► control: peer-promote ─► node::peer_promote ─► RunPromote ─┐
//!  PromoteResult{code, output} ◄─ run_promote: `blockctl --config F --node N promote` ◄──────┘
//! ```
//!
//! The steps themselves (attach, fsck, mount, binds, VIP, services) are `blockctl`'s and run in
//! a `blockctl` process, never in the daemon: one implementation of the plan, and a step that
//! hangs or crashes cannot take the process serving the data with it (design.md §8 says why).

use std::{path::Path, path::PathBuf, time::Duration};

use crate::replication::Message;

/// How long the peer's promote plan may run before this node gives up on it.
const RUN_PROMOTE_TIMEOUT: Duration = Duration::from_secs(600);

/// Runs `blockctl promote` for this node, as the peer asked (a planned switchover). blockctl is
/// looked for next to this binary first, then on PATH.
pub(crate) async fn run_promote(config: &Path, node: &str) -> Message {
    let beside = std::env::current_exe().ok().map(|p| p.with_file_name("blockctl"));
    let program = beside.filter(|p| p.exists()).unwrap_or_else(|| PathBuf::from("blockctl"));
    tracing::info!(node, "the peer asks for a switchover: running {} promote", program.display());
    let mut cmd = tokio::process::Command::new(&program);
    cmd.arg("--config").arg(config).arg("--node").arg(node).arg("promote").kill_on_drop(true);
    let (code, output) = match tokio::time::timeout(RUN_PROMOTE_TIMEOUT, cmd.output()).await {
        Ok(Ok(out)) => {
            let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&out.stderr));
            (out.status.code().unwrap_or(-1), text)
        }
        Ok(Err(e)) => (-1, format!("cannot run {}: {e}", program.display())),
        Err(_) => (-1, format!("promote did not finish within {RUN_PROMOTE_TIMEOUT:?}")),
    };
    tracing::info!(node, code, "switchover promote finished");
    Message::PromoteResult { code, output }
}
