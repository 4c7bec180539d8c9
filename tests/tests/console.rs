//! The web console (issue 15) in a real browser: headless Chromium (Debian's `chromium` and
//! `chromium-driver`, driven over WebDriver by `tests/src/browser.py`) in the client
//! namespace of a two-node MariaDB cluster, loading each node's console from its address on
//! the LAN (`[console] listen = "0.0.0.0:9796"`).
//!
//! One test walks through the states the issue names and saves a screenshot of each under
//! `target/tmp/console/` (`CARGO_TARGET_TMPDIR`):
//!
//! | file                 | what it shows                                                    |
//! |----------------------|------------------------------------------------------------------|
//! | `1-both-nodes.png`   | alpha Primary and beta Secondary side by side, mount and MariaDB healthy on alpha, the VIP here |
//! | `2-resync.png`       | beta back after 40 MiB written without it: the resync bar part-way, rate and ETA |
//! | `3-refused.png`      | swap confirmed without the token: refused (401), the stack still on alpha |
//! | `4-swapped.png`      | swap with the token: blockctl's steps streamed, alpha Secondary, beta Primary |
//! | `5-failover.png`     | beta (Primary) killed, alpha promoted: the failover in the history with its duration |
//!
//! The swap's oracle is the failover tests': roles swapped, the VIP on beta, MariaDB answering
//! through the VIP with every row written before, alpha left clean.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use blockd_tests::{
    browser::Browser,
    cluster::{
        lan::Lan,
        mariadb::{self, DATADIR},
        Alpha, Beta, Cluster, NodeId,
    },
};
use serde_json::Value;

const PORT: u16 = 9796;
/// Long enough for a loaded machine; the page polls every second.
const SEEN: Duration = Duration::from_secs(60);

fn shots() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console");
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    dir
}

fn url(n: NodeId) -> String {
    format!("http://{}:{PORT}/", n.ip())
}

/// JS: the role badge of `node`'s volume row, as the page shows it.
fn role_js(node: &str) -> String {
    format!(
        "const r = document.querySelector('#node-{node} tr.vol .role'); return r && r.textContent;"
    )
}

fn wait_role(b: &mut Browser, node: &str, role: &str) {
    let js = format!(
        "const r = document.querySelector('#node-{node} tr.vol .role'); \
         return r && r.textContent === '{role}';"
    );
    b.try_wait(&js, SEEN).unwrap_or_else(|e| {
        let shown = b.js(&role_js(node));
        panic!("the page never showed {node} {role} (shows {shown}): {e}")
    });
}

/// Waits until the row of `node`'s card whose first cell starts with `fact` starts with `shows`
/// (the host view: VIP, mounts, services).
fn wait_host(b: &mut Browser, node: &str, fact: &str, shows: &str) {
    let js = format!(
        "return [...document.querySelectorAll('#node-{node} tr')].some(r => r.cells.length > 1 \
         && r.cells[0].textContent.startsWith('{fact}') && r.cells[1].textContent.startsWith('{shows}'));"
    );
    b.try_wait(&js, SEEN)
        .unwrap_or_else(|e| panic!("{node}'s card never showed {fact}: {shows}: {e}"));
}

/// JS: the resync percentage the page shows, when it is above `above`.
fn progress_js(above: f64) -> String {
    format!(
        "const p = document.querySelector('#vol-db .progress'); \
         const v = p && parseFloat(p.textContent); return v > {above} && v;"
    )
}

/// Confirms `action` on the page and waits for the page's verdict ("swap: done", ...).
fn run_action(b: &mut Browser, action: &str, timeout: Duration) -> String {
    b.click(&format!("#act-{action}"));
    let cmd = b.wait("return document.getElementById('confirm-cmd').textContent;", SEEN);
    assert_eq!(
        cmd,
        Value::from(format!("blockctl {action}")),
        "the confirmation names the command"
    );
    b.click("#confirm-yes");
    let js = "const s = document.getElementById('action-status').textContent; \
              return !s.endsWith('running…') && s;";
    b.wait(js, timeout).as_str().unwrap_or_default().to_string()
}

fn token(c: &Cluster) -> String {
    let out = c.blockctl_run(Alpha, &["console", "token"]);
    assert!(out.status.success(), "console token: {out}");
    let t = out.stdout.trim().to_string();
    assert_eq!(t.len(), 64, "a 64-hex-digit token: {t:?}");
    t
}

fn rows(c: &Cluster) -> String {
    let out = mariadb::sql(c, "SELECT COUNT(*) FROM t");
    assert!(out.status.success(), "SELECT through the VIP: {out}");
    out.stdout.trim().to_string()
}

#[test]
fn console_in_chromium_roles_resync_swap_with_token_and_failover() {
    let mut c = mariadb::cluster_with("console", |s| {
        s.extra_toml.push_str(&format!(
            "[console]\nlisten = \"0.0.0.0:{PORT}\"\n\n[resync]\nmax-rate = \"6MiB\"\n"
        ));
    });
    let (out, _) = c.promote(Alpha, &[]);
    assert!(out.status.success());
    mariadb::wait_select_1(&c, Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}"));
    let ins = mariadb::sql(&c, "INSERT INTO t VALUES (1),(2),(3)");
    assert!(ins.status.success(), "{ins}");
    let dir = shots();
    let mut b = Browser::start(c.lan().client_netns().name(), &c.dir().join("browser"));

    // 1. Both nodes' roles, and this host's stack.
    b.get(&url(Alpha));
    wait_role(&mut b, "alpha", "Primary");
    wait_role(&mut b, "beta", "Secondary");
    b.wait(
        "return [...document.querySelectorAll('#node-alpha tr.service')]\
         .some(r => r.textContent.includes('healthy'));",
        SEEN,
    );
    wait_host(&mut b, "alpha", "VIP", "here");
    wait_host(&mut b, "alpha", "mount /var/lib/mysql", "mounted from /dev/loop");
    b.screenshot(&dir.join("1-both-nodes.png"));

    // 2. A resync whose progress moves.
    c.stop(Beta);
    let fill =
        format!("dd if=/dev/urandom of={DATADIR}/fill bs=1M count=40 conv=fsync status=none");
    let out = c.run_on(Alpha, &fill);
    assert!(out.status.success(), "{out}");
    c.start(Beta);
    let first = b.wait(&progress_js(-1.0), SEEN).as_f64().unwrap_or_default();
    let later = b.wait(&progress_js(first), SEEN).as_f64().unwrap_or_default();
    b.screenshot(&dir.join("2-resync.png"));
    eprintln!("resync progress on the page: {first}% then {later}%");
    c.wait_in_sync(Duration::from_secs(120));

    // 3. Swap without the token: refused, nothing moves.
    let verdict = run_action(&mut b, "swap", SEEN);
    assert_eq!(verdict, "swap: refused (401)");
    let out = b.js("return document.getElementById('output').textContent;");
    assert!(out.as_str().unwrap_or_default().contains("refused: no access token"), "{out}");
    b.wait("return [...document.querySelectorAll('#events li')].some(l => l.textContent.includes('refused'));", SEEN);
    b.screenshot(&dir.join("3-refused.png"));
    assert_eq!(c.vol(Alpha)["role"], "Primary");
    assert!(Lan::holds_vip(c.netns(Alpha)), "the VIP stayed on alpha");

    // 4. Swap with the token through the page.
    let t = token(&c);
    b.type_into("#token", &t);
    b.type_into("#who", "console-test");
    let started = Instant::now();
    let verdict = run_action(&mut b, "swap", Duration::from_secs(180));
    let streamed = b.js("return document.getElementById('output').textContent;");
    let streamed = streamed.as_str().unwrap_or_default().to_string();
    assert_eq!(verdict, "swap: done", "output:\n{streamed}{}", c.diag(Beta));
    eprintln!("swap through the page: {:.1} s\n{streamed}", started.elapsed().as_secs_f64());
    assert!(
        streamed.starts_with("$ blockctl swap\n") && streamed.ends_with("exit 0\n"),
        "{streamed}"
    );
    assert_eq!(c.vol(Beta)["role"], "Primary");
    assert_eq!(c.vol(Alpha)["role"], "Secondary");
    assert!(Lan::holds_vip(c.netns(Beta)), "the VIP moved to beta");
    mariadb::wait_select_1(&c, Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rows(&c), "3", "every row is there after the swap");
    c.check_clean(Alpha, Duration::from_secs(3)).unwrap_or_else(|e| panic!("{e}"));
    wait_role(&mut b, "alpha", "Secondary");
    wait_role(&mut b, "beta", "Primary");
    b.wait("return [...document.querySelectorAll('#events li')].some(l => l.textContent.includes('asked by console-test') && l.textContent.includes('done'));", SEEN);
    wait_host(&mut b, "alpha", "VIP", "not here");
    wait_host(&mut b, "alpha", "mount", "not mounted");
    b.screenshot(&dir.join("4-swapped.png"));
    let log = c.log_text(Alpha);
    assert!(
        log.contains("asked by console-test from 10.99.0.10"),
        "the action is logged with who asked"
    );

    // 5. A failover: beta dies, alpha is promoted; alpha's page shows it with its duration.
    let killed = Instant::now();
    c.kill_node(Beta);
    c.wait_for(Alpha, "peer gone", Duration::from_secs(30), |v| v["peer_role"].is_null());
    c.promote(Alpha, &["--force"]);
    mariadb::wait_select_1(&c, Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rows(&c), "3");
    let js = "const f = [...document.querySelectorAll('#events li[data-kind=failover]')][0]; \
              return f && f.textContent;";
    let failover = b.wait(js, SEEN);
    wait_host(&mut b, "alpha", "service mariadb", "healthy");
    wait_host(&mut b, "alpha", "VIP", "here");
    let text = failover.as_str().unwrap_or_default();
    assert!(
        text.contains("failover: alpha took over from beta") && text.contains("took "),
        "{text}"
    );
    b.screenshot(&dir.join("5-failover.png"));
    let events: Vec<String> = c
        .log_text(Alpha)
        .lines()
        .filter(|l| l.contains("console event"))
        .map(String::from)
        .collect();
    eprintln!("page: {text}\nalpha's console events:\n{}", events.join("\n"));
    let ms = events
        .iter()
        .find(|l| l.contains("kind=\"failover\""))
        .and_then(|l| l.split("duration_ms=Some(").nth(1)?.split(')').next()?.parse::<u64>().ok())
        .expect("the failover event is logged with its duration");
    // From the last poll that saw beta Primary and connected to the one that saw alpha
    // Primary: at least one poll (500 ms), at most the time since the kill.
    let most = u64::try_from(killed.elapsed().as_millis()).unwrap_or(u64::MAX) + 500;
    assert!((400..=most).contains(&ms), "failover took {ms} ms; {most} ms since the kill");
}

fn monitoring(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/monitoring").join(file)
}

/// `promtool check rules` and `promtool test rules`: every alert rule fires on its input and
/// stays quiet on the rest (the test file has a firing and a quiet case per rule).
#[test]
fn alert_rules_pass_their_promtool_unit_tests() {
    blockd_tests::require("promtool");
    let rules = monitoring("blockd-alerts.yml");
    let out = blockd_tests::run_timeout(
        std::process::Command::new("promtool").arg("check").arg("rules").arg(&rules),
        Duration::from_secs(60),
    );
    assert!(out.stdout.contains("SUCCESS: 10 rules found"), "{out}");
    let tests = monitoring("blockd-alerts.test.yml");
    let text = std::fs::read_to_string(&tests).expect("read the rule tests");
    for alert in alert_names(&std::fs::read_to_string(&rules).expect("read the rules")) {
        assert!(text.contains(&format!("alertname: {alert}\n")), "no unit test of {alert}");
    }
    let dir = tests.parent().expect("docs/monitoring").to_path_buf();
    let out = blockd_tests::run_timeout(
        std::process::Command::new("promtool").current_dir(dir).args(["test", "rules"]).arg(&tests),
        Duration::from_secs(60),
    );
    assert!(out.stdout.contains("SUCCESS"), "{out}");
}

fn alert_names(rules: &str) -> Vec<String> {
    rules.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")).map(str::to_string).collect()
}

/// Every `blockd_*` name in `text` (identifier characters after the prefix).
fn metric_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("blockd_") {
        let tail = &rest[i..];
        let end =
            tail.find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_')).unwrap_or(tail.len());
        names.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// The families a running blockd exports (with an agent.json beside it, so the agent's
/// families are there too), histograms with their `_bucket`, `_sum` and `_count`.
fn exported_families() -> std::collections::BTreeSet<String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let extra = format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n[console]\nlisten = \"off\"\n");
    let node = blockd_tests::Node::new("console-metrics", &[("vol", "4MiB")], &extra);
    let agent = r#"{"pid":1,"decision":"wait","detail":"","since":"","restarts":{"mount vol":1},"swaps":{"failback":1}}"#;
    std::fs::write(node.dir().path().join("run/agent.json"), agent).expect("agent.json");
    let mut node = node;
    node.start();
    let out = blockd_tests::run_timeout(
        std::process::Command::new("curl")
            .args(["-sS", &format!("http://127.0.0.1:{port}/metrics")]),
        Duration::from_secs(20),
    );
    let mut families = std::collections::BTreeSet::new();
    for line in out.stdout.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else { continue };
        let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
        families.insert(name.to_string());
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                families.insert(format!("{name}{suffix}"));
            }
        }
    }
    assert!(families.contains("blockd_agent_restarts_total"), "agent families: {families:?}");
    families
}

/// The Grafana dashboard parses, its panels are well-formed, and every metric named by a
/// panel or an alert rule is one blockd exports.
#[test]
fn dashboard_and_alerts_name_only_metrics_blockd_exports() {
    blockd_tests::require("curl");
    let exported = exported_families();
    let text = std::fs::read_to_string(monitoring("grafana-dashboard.json")).expect("dashboard");
    let dash: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let panels = dash["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "{} panels", panels.len());
    let mut ids = std::collections::BTreeSet::new();
    let mut exprs = Vec::new();
    for p in panels {
        assert!(ids.insert(p["id"].as_u64().expect("panel id")), "duplicate id {}", p["id"]);
        assert!(p["title"].is_string() && p["gridPos"]["w"].is_u64(), "panel shape: {p}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
        exprs.extend(targets.iter().map(|t| t["expr"].as_str().expect("expr").to_string()));
    }
    let rules = std::fs::read_to_string(monitoring("blockd-alerts.yml")).expect("rules");
    let mut named = 0;
    for (what, source) in
        exprs.iter().map(|e| ("dashboard", e.as_str())).chain([("alerts", rules.as_str())])
    {
        let names = metric_names(source);
        assert!(!names.is_empty() || what == "dashboard", "{what}: no metric");
        for n in names {
            named += 1;
            assert!(
                exported.contains(&n),
                "{what} names {n}, which blockd does not export: {source}"
            );
        }
    }
    assert!(named > 30, "{named} metric names checked");
}
