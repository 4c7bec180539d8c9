//! `GET /api/state`: what the page shows, as one JSON object.
//!
//! ```text
//!  { node, peer, version, now_ms,
//!    nodes:   [ this node: volumes (role, disk, conn, reason, frozen), lease, host view
//!               (mounts, VIP, services with checks, agent) ;
//!               the peer:  volumes (its role and disk as the link tells), lease holder ],
//!    vip_owner, lease: { holder, valid_for_ms, ... },
//!    volumes: [ { name, size, out_of_sync, resync: { total, done, rate, percent, eta_s } } ],
//!    series:  [ { t_ms, write_iops, read_iops, write_p50_us, write_p99_us } ],
//!    events:  [ { at_ms, kind, volume, text, duration_ms, cause } ] }
//! ```

use serde_json::{json, Value};

use super::{history, lock, Console};
use crate::control::{NodeStatus, VolumeStatus};

/// The whole state; also marks the page as polling (the host view is refreshed for it).
pub fn state(c: &Console) -> Value {
    *lock(&c.polled) = Some(std::time::Instant::now());
    let status = (c.status)();
    let host = lock(&c.host).clone();
    let peer = status.volumes.iter().find_map(|v| v.peer.clone());
    let lease = status.volumes.iter().find_map(|v| v.lease.clone());
    json!({
        "node": status.node,
        "peer": peer,
        "version": status.version,
        "now_ms": history::now_ms(),
        "nodes": nodes(&status, peer.as_deref(), host.as_ref()),
        "vip_owner": vip_owner(&status, peer.as_deref(), host.as_ref()),
        "lease": lease,
        "volumes": status.volumes.iter().map(volume).collect::<Vec<_>>(),
        "series": lock(&c.series).points(),
        "events": lock(&c.history).events(),
    })
}

fn nodes(status: &NodeStatus, peer: Option<&str>, host: Option<&Value>) -> Vec<Value> {
    let here = json!({
        "name": status.node,
        "here": true,
        "volumes": status.volumes.iter().map(|v| json!({
            "name": v.name, "role": v.role, "disk": v.disk, "conn": v.conn,
            "reason": v.conn_reason, "frozen": v.frozen, "failure": v.disk_failure,
            "clients": v.clients,
        })).collect::<Vec<_>>(),
        "host": host,
    });
    let Some(peer) = peer else { return vec![here] };
    let there = json!({
        "name": peer,
        "here": false,
        "volumes": status.volumes.iter().map(|v| json!({
            "name": v.name, "role": v.peer_role, "disk": v.peer_disk, "conn": v.conn,
        })).collect::<Vec<_>>(),
        "host": Value::Null,
    });
    vec![here, there]
}

/// Who holds the VIP: this node when its address check says so; else the peer when the link
/// says it is Primary (inferred: this node cannot see the peer's interfaces).
fn vip_owner(status: &NodeStatus, peer: Option<&str>, host: Option<&Value>) -> Value {
    let vip = host.and_then(|h| h.pointer("/failover/vip"));
    let Some(vip) = vip.filter(|v| !v.is_null()) else { return Value::Null };
    let address = vip.get("address").cloned().unwrap_or(Value::Null);
    if vip.get("here") == Some(&Value::Bool(true)) {
        return json!({ "node": status.node, "address": address, "seen": "here" });
    }
    let peer_primary =
        status.volumes.iter().any(|v| v.peer_role == Some(crate::control::Role::Primary));
    match peer {
        Some(p) if peer_primary => json!({ "node": p, "address": address, "seen": "inferred" }),
        _ => json!({ "node": Value::Null, "address": address, "seen": "nobody" }),
    }
}

fn volume(v: &VolumeStatus) -> Value {
    let resync = v.resync.as_ref().map(|r| {
        let left = r.total.saturating_sub(r.done);
        let percent = if r.total == 0 { 100.0 } else { r.done as f64 * 100.0 / r.total as f64 };
        let eta = (r.rate > 0).then(|| left.div_ceil(r.rate));
        json!({ "total": r.total, "done": r.done, "rate": r.rate, "percent": percent, "eta_s": eta })
    });
    json!({ "name": v.name, "size": v.size, "out_of_sync": v.out_of_sync, "resync": resync })
}
