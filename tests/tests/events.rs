//! `blockctl events` against a real two-node cluster (issue 7): the stream on one node shows
//! the peer's promotion, the peer's death, its own forced promotion, its daemon going away and
//! coming back, in that order; `--until` and `--exit-on-loss` end it with their exit codes, and
//! SIGTERM ends it with 0.

use std::{
    fs,
    path::Path,
    time::{Duration, Instant},
};

use blockd_tests::{
    cluster::{Alpha, Beta, Cluster},
    cmd::{signal, Background},
};
use serde_json::Value;

const SYNC_TIMEOUT: Duration = Duration::from_secs(40);

/// The JSON events in `log` (blockctl's stdout and stderr share the file; only stdout's lines
/// are JSON objects).
fn events(log: &Path) -> Vec<Value> {
    let text = fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// `(field, from, to)` of an event, `null` as "none".
fn brief(e: &Value) -> (String, String, String) {
    let s = |v: &Value| v.as_str().unwrap_or("none").to_string();
    (s(&e["field"]), s(&e["from"]), s(&e["to"]))
}

/// Waits until an event after index `after` satisfies `pred`; returns its index.
fn wait_event(log: &Path, after: usize, what: &str, pred: impl Fn(&Value) -> bool) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let all = events(log);
        if let Some(i) = all.iter().skip(after).position(&pred) {
            return after + i;
        }
        assert!(
            Instant::now() < deadline,
            "no event {what} after #{after}; events so far:\n{}",
            all.iter().map(Value::to_string).collect::<Vec<_>>().join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn is(field: &str, from: &str, to: &str) -> impl Fn(&Value) -> bool {
    let want = (field.to_string(), from.to_string(), to.to_string());
    move |e| brief(e) == want
}

#[test]
fn events_follow_promotion_loss_and_restart_in_order() {
    let mut c = Cluster::new("events", "16MiB");
    c.start(Alpha);
    c.start(Beta);
    c.wait_in_sync(SYNC_TIMEOUT);
    let dir = c.dir().to_path_buf();

    let beta_log = dir.join("events-beta.log");
    let mut cmd = c.blockctl(Beta);
    cmd.args(["events", "--json", "--interval", "100ms"]);
    let mut stream = Background::spawn(&mut cmd, &beta_log);
    let mut until = Background::spawn(
        c.blockctl(Alpha).args(["events", "--until", "role=Primary"]),
        &dir.join("events-alpha-until.log"),
    );

    // The first poll: the state as it is, marked initial.
    let first = wait_event(&beta_log, 0, "initial clients", |e| e["field"] == "clients");
    let initial = events(&beta_log);
    assert!(initial[..=first].iter().all(|e| e["initial"] == true), "{initial:?}");
    assert!(initial[..=first].iter().any(is("role", "none", "Secondary")), "{initial:?}");
    assert!(initial[..=first].iter().any(is("peer_role", "none", "Secondary")), "{initial:?}");
    for e in &initial {
        assert_eq!(e["node"], "beta", "{e}");
        let ts = e["timestamp"].as_str().unwrap_or_default();
        assert!(ts.len() == 24 && ts.ends_with('Z'), "RFC 3339 UTC with ms: {e}");
    }

    c.role(Alpha, "primary", false).unwrap_or_else(|e| panic!("role primary on alpha: {e}"));
    let status = until.wait(Duration::from_secs(20)).expect("--until role=Primary must end");
    assert!(status.success(), "--until exits 0: {status}\n{}", until.log_text());
    assert!(
        until.log_text().contains("alpha/vol role Secondary -> Primary"),
        "{}",
        until.log_text()
    );
    let promoted =
        wait_event(&beta_log, first + 1, "peer Primary", is("peer_role", "Secondary", "Primary"));

    c.kill(Alpha);
    let lost = wait_event(&beta_log, promoted + 1, "peer gone", is("peer_role", "Primary", "none"));
    wait_event(&beta_log, promoted + 1, "conn down", |e| {
        e["field"] == "conn" && e["from"] == "Connected" && e["to"] != "Connected"
    });

    let mut exits = Background::spawn(
        c.blockctl(Beta).args(["events", "--exit-on-loss"]),
        &dir.join("events-exit-on-loss.log"),
    );
    c.role(Beta, "primary", true).unwrap_or_else(|e| panic!("role primary --force on beta: {e}"));
    let forced =
        wait_event(&beta_log, lost + 1, "beta Primary", is("role", "Secondary", "Primary"));

    c.kill(Beta);
    let gone =
        wait_event(&beta_log, forced + 1, "daemon gone", is("daemon", "running", "unreachable"));
    let detail = events(&beta_log)[gone]["detail"].as_str().unwrap_or_default().to_string();
    assert!(detail.contains("control.sock"), "the detail says what failed: {detail}");
    let status = exits.wait(Duration::from_secs(20)).expect("--exit-on-loss must end");
    assert_eq!(status.code(), Some(3), "--exit-on-loss exits 3:\n{}", exits.log_text());

    c.start(Beta);
    let back =
        wait_event(&beta_log, gone + 1, "daemon back", is("daemon", "unreachable", "running"));
    wait_event(&beta_log, back + 1, "restarted Secondary", is("role", "Primary", "Secondary"));
    let all = events(&beta_log);
    assert_eq!(
        all.iter().filter(|e| is("daemon", "running", "unreachable")(e)).count(),
        1,
        "a lost daemon is reported once, not once per poll"
    );
    assert!(
        all[first + 1..].iter().all(|e| e.get("initial").is_none()),
        "only the first poll is initial"
    );

    signal(stream.pid(), libc::SIGTERM);
    let status = stream.wait(Duration::from_secs(10)).expect("SIGTERM ends the stream");
    assert!(status.success(), "SIGTERM exits 0: {status}\n{}", stream.log_text());
}
