//! Human output of `blockctl status`: one block per volume, aligned labels, sizes both human
//! and exact, then the failover state of this host (scripts should use `--json`).

use std::fmt::Write;

use blockd::control::{LeaseStatus, NodeStatus, VolumeStatus};

use crate::commands::{
    agent::AgentState,
    status::{AttachView, Failover},
};

/// The whole status as text, ending with a newline.
pub fn status(s: &NodeStatus) -> String {
    let mut out = String::new();
    let n = s.volumes.len();
    let _ = writeln!(
        out,
        "node {}, blockd {}, {n} volume{}",
        s.node,
        s.version,
        if n == 1 { "" } else { "s" }
    );
    for v in &s.volumes {
        out.push('\n');
        volume(&mut out, v);
    }
    out
}

fn volume(out: &mut String, v: &VolumeStatus) {
    let c = &v.counters;
    let io = if v.direct_io { "direct I/O" } else { "buffered I/O" };
    let mut rows: Vec<(&str, String)> = vec![
        ("size", format!("{} ({} bytes)", human(v.size), v.size)),
        ("role", format!("{:?}", v.role)),
        ("disk", disk(v)),
        ("conn", connection(v)),
    ];
    if v.peer.is_some() {
        rows.push(("out-sync", format!("{} ({} bytes)", human(v.out_of_sync), v.out_of_sync)));
    }
    if let Some(why) = &v.frozen {
        rows.push(("frozen", why.clone()));
    }
    if let Some(l) = &v.lease {
        rows.push(("lease", lease(l)));
    }
    if let Some(r) = &v.resync {
        let pct = if r.total == 0 { 100.0 } else { r.done as f64 * 100.0 / r.total as f64 };
        let eta = r
            .total
            .saturating_sub(r.done)
            .checked_div(r.rate)
            .map_or("?".into(), |s| format!("{s} s"));
        rows.push(("resync", format!("{pct:.1}% at {}/s, ETA {eta}", human(r.rate))));
    }
    rows.extend([
        ("gen", v.generation.clone()),
        ("clients", v.clients.to_string()),
        ("socket", v.socket.clone()),
        ("backing", v.backing.clone()),
        ("engine", format!("{}, {io}", v.engine)),
        ("reads", format!("{} ({})", c.reads, human(c.bytes_read))),
        ("writes", format!("{} ({})", c.writes, human(c.bytes_written))),
        ("flushes", c.flushes.to_string()),
        ("trims", c.trims.to_string()),
        ("zeroes", c.zeroes.to_string()),
        ("errors", c.errors.to_string()),
    ]);
    if v.peer.is_some() {
        rows.extend([
            ("mirrored", format!("{} ({})", c.peer_writes, human(c.peer_bytes))),
            ("degraded", c.degraded_writes.to_string()),
            ("resynced", human(c.resync_bytes)),
            ("connects", c.connects.to_string()),
        ]);
    }
    let _ = writeln!(out, "volume {}", v.name);
    for (label, value) in &rows {
        let _ = writeln!(out, "  {label:<9}{value}");
    }
}

/// "epoch 3 held by alpha, valid 2.7 s more (witness 10.0.0.3:7790)", or who holds it and why
/// this node does not.
fn lease(l: &LeaseStatus) -> String {
    let holder = l.holder.as_deref().unwrap_or("unknown");
    let mut s = match (l.epoch, l.valid_for_ms) {
        (Some(e), ms) if ms > 0 => {
            format!("epoch {e} held by {holder}, valid {:.1} s more", ms as f64 / 1000.0)
        }
        _ => format!("not held here (holder {holder})"),
    };
    if let Some(e) = l.lost {
        s.push_str(&format!("; epoch {e} LOST to the peer"));
    }
    if let Some(err) = &l.error {
        s.push_str(&format!("; {err}"));
    }
    s.push_str(&format!(" (witness {})", l.witness));
    s
}

/// "UpToDate", or "Failed: Input/output error (os error 5) on Write at offset 4096".
fn disk(v: &VolumeStatus) -> String {
    match &v.disk_failure {
        Some(f) => format!("{:?}: {f}", v.disk),
        None => format!("{:?}", v.disk),
    }
}

/// "Connected to beta (Secondary, UpToDate)", "Connecting to beta", "StandAlone: why".
fn connection(v: &VolumeStatus) -> String {
    let mut s = format!("{:?}", v.conn);
    if let Some(peer) = &v.peer {
        s.push_str(&format!(" to {peer}"));
        if let (Some(r), Some(d)) = (v.peer_role, v.peer_disk) {
            s.push_str(&format!(" ({r:?}, {d:?})"));
        }
    }
    if let Some(why) = &v.conn_reason {
        s.push_str(&format!(": {why}"));
    }
    // A later refusal replaces the reason; the split brain stays until a session comes up.
    if v.split_brain
        && !v.conn_reason.as_deref().is_some_and(|r| r.starts_with(blockd::role::SPLIT_BRAIN))
    {
        s.push_str(" (split brain unresolved)");
    }
    s
}

/// What failover put in place on this host, one line per item, ending with a newline.
pub fn failover(f: &Failover) -> String {
    let mut out = String::from("failover state here\n");
    let mut rows: Vec<(&str, String)> = Vec::new();
    for v in &f.volumes {
        rows.push(("attach", format!("{}: {}", v.name, attach(v.attach.as_ref()))));
        let mounted = match &v.mounted_from {
            Some(src) => format!("{} from {src}", v.mount),
            None => format!("{} not mounted", v.mount),
        };
        rows.push(("mount", format!("{}: {mounted}", v.name)));
    }
    for b in &f.binds {
        let state = if b.mounted { "bound" } else { "not bound" };
        rows.push(("bind", format!("{} ({}): {state}", b.target, b.source)));
    }
    if let Some(v) = &f.vip {
        let state = probe(v.here, v.error.as_deref(), "here", "not here");
        rows.push(("vip", format!("{} on {}: {state}", v.address, v.interface)));
    }
    for s in &f.services {
        let state = probe(s.healthy, s.error.as_deref(), "healthy", "down");
        rows.push(("service", format!("{}: {state}", s.name)));
    }
    if rows.is_empty() {
        out.push_str("  nothing configured (no mount, bind, vip or service)\n");
    }
    for (label, value) in &rows {
        let _ = writeln!(out, "  {label:<9}{value}");
    }
    out
}

/// The agent's line: "agent    wait: Secondary, peer connected (since ..., pid 7)", or that
/// none runs. Empty when no agent ever ran on this node.
pub fn agent(a: Option<&AgentState>) -> String {
    let Some(a) = a else { return String::new() };
    let run = if a.running { format!("pid {}", a.pid) } else { "NOT RUNNING".into() };
    let mut out =
        format!("  {:<9}{}: {} (since {}, {run})\n", "agent", a.decision, a.detail, a.since);
    for (label, counts) in [("restarts", &a.restarts), ("swaps", &a.swaps)] {
        if !counts.is_empty() {
            let list: Vec<String> = counts.iter().map(|(k, n)| format!("{k} × {n}")).collect();
            out.push_str(&format!("  {label:<9}{}\n", list.join(", ")));
        }
    }
    out
}

/// "fuse /dev/loop0, nbdfuse pid 42", "ERROR: fuse /dev/loop0, nbdfuse pid 42 is gone".
fn attach(a: Option<&AttachView>) -> String {
    let Some(a) = a else { return "not attached".into() };
    let dev = a.device.as_deref().unwrap_or("(no device yet)");
    let pid = a.pid.map(|p| format!(", nbdfuse pid {p}")).unwrap_or_default();
    if a.alive {
        format!("{} {dev}{pid}", a.mode)
    } else {
        format!("ERROR: {} {dev}{pid} is dead (I/O on the device fails)", a.mode)
    }
}

fn probe(state: Option<bool>, error: Option<&str>, yes: &str, no: &str) -> String {
    match (state, error) {
        (Some(true), _) => yes.into(),
        (Some(false), _) => no.into(),
        (None, e) => format!("unknown ({})", e.unwrap_or("no answer")),
    }
}

/// Bytes in the largest binary unit that keeps the number at or above 1, one decimal:
/// "512 B", "4.0 KiB", "20.0 GiB".
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use blockd::control::{ConnState, Counters, DiskState, Role};

    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human(0), "0 B");
        assert_eq!(human(1023), "1023 B");
        assert_eq!(human(4096), "4.0 KiB");
        assert_eq!(human(20 << 30), "20.0 GiB");
        assert_eq!(human(1536 << 20), "1.5 GiB");
        assert_eq!(human(u64::MAX), "16.0 EiB");
    }

    fn sample() -> VolumeStatus {
        VolumeStatus {
            name: "db".into(),
            size: 64 << 20,
            role: Role::Primary,
            disk: DiskState::Failed,
            disk_failure: Some(blockd::control::DiskFailure {
                op: blockd::control::DiskOp::Write,
                errno: 28,
                offset: 1 << 20,
            }),
            clients: 2,
            socket: "/run/blockd/db.sock".into(),
            backing: "/var/lib/blockd/db.img".into(),
            engine: "io_uring".into(),
            direct_io: true,
            conn: ConnState::StandAlone,
            conn_reason: Some("single-node configuration".into()),
            split_brain: false,
            peer: None,
            peer_role: None,
            peer_disk: None,
            out_of_sync: 0,
            resync: None,
            generation: "0000000000000001".into(),
            counters: Counters {
                reads: 11,
                writes: 22,
                bytes_read: 4096,
                bytes_written: 8192,
                flushes: 33,
                trims: 44,
                zeroes: 55,
                errors: 66,
                ..Counters::default()
            },
            frozen: None,
            lease: None,
            latency: Default::default(),
        }
    }

    #[test]
    fn status_shows_every_field() {
        let v = sample();
        let s = NodeStatus { node: "alpha".into(), version: "9.9".into(), volumes: vec![v] };
        let text = status(&s);
        for want in [
            "node alpha, blockd 9.9, 1 volume\n",
            "volume db\n",
            "size     64.0 MiB (67108864 bytes)",
            "role     Primary",
            "disk     Failed: No space left on device (os error 28) on Write at offset 1048576",
            "conn     StandAlone: single-node configuration",
            "gen      0000000000000001",
            "clients  2",
            "socket   /run/blockd/db.sock",
            "backing  /var/lib/blockd/db.img",
            "engine   io_uring, direct I/O",
            "reads    11 (4.0 KiB)",
            "writes   22 (8.0 KiB)",
            "flushes  33",
            "trims    44",
            "zeroes   55",
            "errors   66",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }

    #[test]
    fn failover_state_shows_each_item() {
        use crate::commands::status::{BindView, ServiceView, VipView, VolumeView};
        let vol = |name: &str, alive| VolumeView {
            name: name.into(),
            mount: format!("/srv/{name}"),
            attach: Some(AttachView {
                mode: "fuse".into(),
                device: Some("/dev/loop3".into()),
                pid: Some(42),
                alive,
            }),
            mounted_from: alive.then(|| "/dev/loop3".into()),
        };
        let f = Failover {
            volumes: vec![vol("db", true), vol("nfs", false)],
            binds: vec![BindView {
                source: "/srv/nfs/s".into(),
                target: "/var/lib/nfs".into(),
                mounted: true,
            }],
            vip: Some(VipView {
                address: "10.0.0.100/24".into(),
                interface: "eth0".into(),
                here: None,
                error: Some("no such interface".into()),
            }),
            services: vec![
                ServiceView { name: "mariadb".into(), healthy: Some(true), error: None },
                ServiceView { name: "nfs".into(), healthy: Some(false), error: None },
            ],
        };
        let text = failover(&f);
        for want in [
            "attach   db: fuse /dev/loop3, nbdfuse pid 42\n",
            "mount    db: /srv/db from /dev/loop3",
            "attach   nfs: ERROR: fuse /dev/loop3, nbdfuse pid 42 is dead",
            "mount    nfs: /srv/nfs not mounted",
            "bind     /var/lib/nfs (/srv/nfs/s): bound",
            "vip      10.0.0.100/24 on eth0: unknown (no such interface)",
            "service  mariadb: healthy",
            "service  nfs: down",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        assert!(failover(&Failover::default()).contains("nothing configured"));
    }

    #[test]
    fn two_node_status_shows_peer_and_resync() {
        let mut v = sample();
        v.conn = ConnState::SyncSource;
        v.conn_reason = None;
        v.peer = Some("beta".into());
        v.peer_role = Some(Role::Secondary);
        v.peer_disk = Some(DiskState::Inconsistent);
        v.out_of_sync = 3 << 20;
        v.resync =
            Some(blockd::control::ResyncProgress { total: 4 << 20, done: 1 << 20, rate: 1 << 20 });
        v.counters.peer_writes = 7;
        let s = NodeStatus { node: "alpha".into(), version: "9.9".into(), volumes: vec![v] };
        let text = status(&s);
        for want in [
            "conn     SyncSource to beta (Secondary, Inconsistent)",
            "out-sync 3.0 MiB (3145728 bytes)",
            "resync   25.0% at 1.0 MiB/s, ETA 3 s",
            "mirrored 7 (0 B)",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        assert!(!text.contains("frozen") && !text.contains("lease"), "{text}");
    }

    #[test]
    fn agent_line_shows_decision_and_liveness() {
        assert_eq!(agent(None), "");
        let mut a = AgentState {
            pid: 7,
            decision: "wait".into(),
            detail: "Secondary, peer connected".into(),
            since: "2026-01-02T03:04:05.000Z".into(),
            running: true,
            ..AgentState::default()
        };
        assert_eq!(
            agent(Some(&a)),
            "  agent    wait: Secondary, peer connected (since 2026-01-02T03:04:05.000Z, pid 7)\n"
        );
        a.running = false;
        assert!(agent(Some(&a)).contains("NOT RUNNING"));
        a.restarts.insert("service mariadb".into(), 2);
        a.swaps.insert("health: service mariadb".into(), 1);
        let text = agent(Some(&a));
        assert!(text.contains("  restarts service mariadb × 2\n"), "{text}");
        assert!(text.contains("  swaps    health: service mariadb × 1\n"), "{text}");
    }

    #[test]
    fn frozen_volume_shows_why_and_the_lease() {
        let mut v = sample();
        v.peer = Some("beta".into());
        v.frozen = Some("no peer and no valid witness lease (x); 2 writes waiting".into());
        v.lease = Some(LeaseStatus {
            witness: "10.0.0.3:7790".into(),
            holder: Some("beta".into()),
            epoch: Some(4),
            valid_for_ms: 0,
            lost: Some(4),
            error: Some("lease epoch 4 lost to another node".into()),
        });
        let s =
            NodeStatus { node: "alpha".into(), version: "9.9".into(), volumes: vec![v.clone()] };
        let text = status(&s);
        for want in [
            "frozen   no peer and no valid witness lease (x); 2 writes waiting",
            "lease    not held here (holder beta); epoch 4 LOST to the peer; lease epoch 4 lost \
             to another node (witness 10.0.0.3:7790)",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        v.frozen = None;
        v.lease = Some(LeaseStatus {
            holder: Some("alpha".into()),
            valid_for_ms: 2700,
            lost: None,
            error: None,
            ..v.lease.unwrap()
        });
        let s = NodeStatus { node: "alpha".into(), version: "9.9".into(), volumes: vec![v] };
        let text = status(&s);
        let want = "lease    epoch 4 held by alpha, valid 2.7 s more (witness 10.0.0.3:7790)";
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
}
