//! Actions: what the page asks, run as the `blockctl` command an operator would type, with
//! its output streamed back; and the host view, `blockctl status --json`.
//!
//! | action    | runs                                   | body fields           |
//! |-----------|----------------------------------------|-----------------------|
//! | `swap`    | `blockctl swap`                        |                       |
//! | `promote` | `blockctl promote [--force]`           | `force`               |
//! | `demote`  | `blockctl demote`                      |                       |
//! | `verify`  | `blockctl verify [--volume V]`         | `volume`              |
//! | `resolve` | `blockctl resolve --discard-local [--volume V]` | `volume`     |
//!
//! Body: `{"action":"swap","who":"ana"}`; header `Authorization: Bearer <token>`. The
//! confirmation step is the page's (it shows the command and asks); the daemon's part is the
//! token. `who` is what the operator typed, so it is reported as "asked by", next to the
//! address the request came from, in the log and the history.

use std::{net::SocketAddr, process::Stdio, time::Duration};

use serde::Deserialize;
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader},
    net::TcpStream,
    process::Command,
    sync::mpsc,
};

use super::{
    history::{now_ms, Event},
    http::{answer, head, Request},
    lock, token, Console,
};

/// `blockctl status --json` probes services for up to 6 s each; past this it is stuck.
const STATUS_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Ask {
    action: String,
    #[serde(default)]
    who: String,
    #[serde(default)]
    force: bool,
    #[serde(default)]
    volume: Option<String>,
}

/// The `blockctl` arguments of an action, or why it is not one.
fn command(ask: &Ask) -> Result<Vec<String>, String> {
    let mut args: Vec<String> = match ask.action.as_str() {
        "swap" => vec!["swap".into()],
        "promote" if ask.force => vec!["promote".into(), "--force".into()],
        "promote" => vec!["promote".into()],
        "demote" => vec!["demote".into()],
        "verify" => vec!["verify".into()],
        "resolve" => vec!["resolve".into(), "--discard-local".into()],
        other => return Err(format!("unknown action {other:?}")),
    };
    if let Some(v) = &ask.volume {
        if !matches!(ask.action.as_str(), "verify" | "resolve") {
            return Err(format!("{} acts on every volume; no volume may be named", ask.action));
        }
        if v.is_empty() || !v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
            return Err("bad volume name".into());
        }
        args.extend(["--volume".into(), v.clone()]);
    }
    Ok(args)
}

/// Answers `POST /api/action`.
pub async fn handle(c: &Console, r: &Request, from: SocketAddr, stream: &mut TcpStream) {
    let ask: Ask = match serde_json::from_slice(&r.body) {
        Ok(a) => a,
        Err(e) => {
            return answer(stream, 400, "text/plain", format!("bad body: {e}\n").as_bytes()).await
        }
    };
    let who = if ask.who.trim().is_empty() {
        "someone".to_string()
    } else {
        ask.who.trim().chars().take(64).collect()
    };
    let args = match command(&ask) {
        Ok(a) => a,
        Err(why) => return answer(stream, 400, "text/plain", format!("{why}\n").as_bytes()).await,
    };
    let line = format!("blockctl {}", args.join(" "));
    let asked = format!("{line} asked by {who} from {from}");
    if let Err(why) = authorize(c, r.bearer.as_deref()) {
        tracing::warn!(action = %ask.action, %who, %from, "console: refused: {why}");
        record(c, format!("{asked}: refused ({why})"), None);
        let body = format!("refused: {why}\n");
        return answer(stream, 401, "text/plain", body.as_bytes()).await;
    }
    let Ok(_one) = c.busy.try_lock() else {
        record(c, format!("{asked}: refused (another action is running)"), None);
        return answer(stream, 409, "text/plain", b"another action is running\n").await;
    };
    tracing::info!(action = %ask.action, %who, %from, "console: running {line}");
    record(c, format!("{asked}: started"), None);
    let started = now_ms();
    let _ = stream.write_all(&head(200, "text/plain; charset=utf-8", None)).await;
    let _ = stream.write_all(format!("$ {line}\n").as_bytes()).await;
    let code = run(c, &args, stream).await;
    let outcome = match code {
        Some(0) => "done".to_string(),
        Some(n) => format!("failed, exit {n}"),
        None => "could not run blockctl".to_string(),
    };
    tracing::info!(action = %ask.action, %who, %from, ?code, "console: {line}: {outcome}");
    record(c, format!("{asked}: {outcome}"), Some(now_ms().saturating_sub(started)));
    let _ = stream.write_all(format!("exit {}\n", code.unwrap_or(-1)).as_bytes()).await;
    let _ = stream.shutdown().await;
    // What the action changed on this host shows at the page's next poll, not 3 s later.
    let view = host_view(c).await;
    *lock(&c.host) = Some(view);
}

/// The token must be given and match the file's (read now: a rotation applies at once).
fn authorize(c: &Console, given: Option<&str>) -> Result<(), String> {
    let Some(given) = given.filter(|g| !g.is_empty()) else {
        return Err("no access token (see blockctl console token)".into());
    };
    let expected = token::read(&c.token_path).map_err(|e| e.to_string())?;
    if token::matches(given, &expected) {
        Ok(())
    } else {
        Err("wrong access token".into())
    }
}

fn record(c: &Console, text: String, duration_ms: Option<u64>) {
    let e = Event { at_ms: now_ms(), kind: "action", volume: None, text, duration_ms, cause: None };
    lock(&c.history).push(e);
}

fn blockctl(c: &Console, args: &[String]) -> Command {
    let mut cmd = Command::new(&c.blockctl);
    cmd.arg("--config").arg(&c.config_path).arg("--node").arg(&c.node).args(args);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

/// Runs blockctl with `args`, copying each line of its output to `out` as it comes; waits for
/// it even when `out` is gone. Returns its exit code.
async fn run(c: &Console, args: &[String], out: &mut TcpStream) -> Option<i32> {
    let mut child = match blockctl(c, args).spawn() {
        Ok(child) => child,
        Err(e) => {
            let _ = out
                .write_all(format!("cannot run {}: {e}\n", c.blockctl.display()).as_bytes())
                .await;
            return None;
        }
    };
    let (tx, mut rx) = mpsc::channel::<String>(64);
    let readers = [
        child.stdout.take().map(|s| spawn_lines(s, tx.clone())),
        child.stderr.take().map(|s| spawn_lines(s, tx)),
    ];
    while let Some(line) = rx.recv().await {
        // A page that went away stops getting lines; the action goes on.
        let _ = out.write_all(line.as_bytes()).await;
    }
    for r in readers.into_iter().flatten() {
        let _ = r.await;
    }
    child.wait().await.ok().and_then(|s| s.code())
}

fn spawn_lines<R: AsyncRead + Unpin + Send + 'static>(
    r: R,
    tx: mpsc::Sender<String>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut lines = BufReader::new(r).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if tx.send(format!("{line}\n")).await.is_err() {
                return;
            }
        }
    })
}

/// `failover` and `agent` of `blockctl status --json`, or `{"error": ...}`.
pub async fn host_view(c: &Console) -> serde_json::Value {
    let mut cmd = blockctl(c, &["status".into(), "--json".into()]);
    cmd.kill_on_drop(true);
    let out = match tokio::time::timeout(STATUS_TIMEOUT, cmd.output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => return serde_json::json!({ "error": format!("cannot run blockctl: {e}") }),
        Err(_) => return serde_json::json!({ "error": "blockctl status did not answer" }),
    };
    match serde_json::from_slice::<serde_json::Value>(&out.stdout) {
        Ok(v) => serde_json::json!({ "failover": v.get("failover"), "agent": v.get("agent") }),
        Err(_) => {
            let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
            serde_json::json!({ "error": format!("blockctl status: {err}") })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(action: &str, volume: Option<&str>) -> Ask {
        Ask {
            action: action.into(),
            who: String::new(),
            force: false,
            volume: volume.map(Into::into),
        }
    }

    #[test]
    fn actions_are_the_blockctl_commands() {
        assert_eq!(command(&ask("swap", None)).unwrap(), ["swap"]);
        assert_eq!(
            command(&ask("resolve", Some("db"))).unwrap(),
            ["resolve", "--discard-local", "--volume", "db"]
        );
        let force = Ask { force: true, ..ask("promote", None) };
        assert_eq!(command(&force).unwrap(), ["promote", "--force"]);
        assert!(command(&ask("rm", None)).is_err());
        assert!(command(&ask("swap", Some("db"))).is_err());
        assert!(command(&ask("verify", Some("--x y"))).is_err());
    }
}
