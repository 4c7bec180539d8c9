//! The part of `blockctl status` the daemon does not know: what the failover plan put in place
//! on this host (attached devices, mounts, binds, the VIP, services), read from the host
//! itself with the steps' own checks, so status and promote agree on what "up" means.

use std::{sync::Arc, time::Duration};

use serde::Serialize;

use crate::{
    plan::{check_within, StepRef},
    step::Ctx,
    steps::{attach, mount, services::Service, vip::Vip},
};

/// One probe (VIP lookup, a service's health check) may take this long before status gives
/// up on it and says "unknown": status must stay quick when a service hangs.
const PROBE_LIMIT: Duration = Duration::from_secs(6);

/// This host's failover state. JSON: the `failover` object of `status --json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Failover {
    pub volumes: Vec<VolumeView>,
    pub binds: Vec<BindView>,
    /// Absent when the configuration has no `[vip]`.
    pub vip: Option<VipView>,
    pub services: Vec<ServiceView>,
}

/// A volume with a mount point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VolumeView {
    pub name: String,
    pub mount: String,
    /// What attach recorded; `None` when the volume is not attached here.
    pub attach: Option<AttachView>,
    /// The source of the mount at `mount` (`/dev/loop0`), when something is mounted there.
    pub mounted_from: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AttachView {
    /// "fuse", "kernel" or "nbd-client".
    pub mode: String,
    pub device: Option<String>,
    /// The nbdfuse process (fuse mode).
    pub pid: Option<u32>,
    /// False: the attaching process died (or the nbd device disconnected); I/O on the device
    /// fails. An error to act on.
    pub alive: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BindView {
    pub source: String,
    pub target: String,
    pub mounted: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VipView {
    pub address: String,
    pub interface: String,
    /// The address is on the interface here; `None` when that could not be read.
    pub here: Option<bool>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceView {
    pub name: String,
    /// The service's check passes now; `None` when the probe failed or hung.
    pub healthy: Option<bool>,
    pub error: Option<String>,
}

/// Reads everything; never fails (what cannot be read is shown as unknown).
pub fn gather(ctx: &Arc<Ctx>) -> Failover {
    let c = &ctx.config;
    let volumes = c
        .volume
        .iter()
        .filter_map(|v| Some((v, v.mount.as_ref()?)))
        .map(|(v, m)| VolumeView {
            name: v.name.clone(),
            mount: m.display().to_string(),
            attach: attach::state(ctx, &v.name).map(|s| AttachView {
                mode: serde_json::to_value(s.mode)
                    .ok()
                    .and_then(|m| m.as_str().map(str::to_string))
                    .unwrap_or_default(),
                device: s.device.as_ref().map(|d| d.display().to_string()),
                pid: s.pid(),
                alive: s.alive,
            }),
            mounted_from: mount::mount_at(m).map(|e| e.source),
        })
        .collect();
    let binds = c
        .bind
        .iter()
        .map(|b| BindView {
            source: b.source.display().to_string(),
            target: b.target.display().to_string(),
            mounted: mount::is_mount_point(&b.target),
        })
        .collect();
    let vip = c.vip.as_ref().map(|v| {
        let (here, error) = probe(ctx, Arc::new(Vip::new()));
        VipView { address: v.address.to_string(), interface: v.interface.clone(), here, error }
    });
    let services = c
        .service
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let (healthy, error) = probe(ctx, Arc::new(Service::new(i).named(&s.name)));
            ServiceView { name: s.name.clone(), healthy, error }
        })
        .collect();
    Failover { volumes, binds, vip, services }
}

/// A step's check as (result, error), bounded by [`PROBE_LIMIT`].
fn probe(ctx: &Arc<Ctx>, step: StepRef) -> (Option<bool>, Option<String>) {
    match check_within(&step, ctx, PROBE_LIMIT) {
        Ok(up) => (Some(up), None),
        Err(e) => (None, Some(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::steps::testutil::ctx_for;

    #[test]
    fn nothing_attached_nothing_mounted() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().display();
        let ctx = Arc::new(ctx_for(&format!(
            "[node.a]\nrun-dir = \"{run}\"\n[[volume]]\nname = \"v\"\nsize = 4096\n\
             filesystem = \"ext4\"\nmount = \"{run}/mnt\"\n\
             [[service]]\nname = \"s\"\nstart = \"true\"\nstop = \"true\"\ncheck = \"exec:false\"\n"
        )));
        let f = gather(&ctx);
        assert_eq!(f.volumes.len(), 1);
        assert_eq!(f.volumes[0].attach, None);
        assert_eq!(f.volumes[0].mounted_from, None);
        assert_eq!(f.vip, None);
        assert_eq!(f.services[0].healthy, Some(false), "exec:false is a failing check");
    }
}
