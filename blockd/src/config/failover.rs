//! The keys `blockctl promote`/`demote` read (design.md §8): `[failover]` (attach mode, step
//! timeout, gratuitous ARP pacing), `[[bind]]` (bind mounts of state kept on the mirror) and
//! the failover keys of `[[service]]` (`pidfile`, `timeout`, `wait`). The daemon ignores them;
//! they live in the same file so both nodes run the same plan.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use super::{
    validate::{quote, quote_path, Problems},
    values, Config, ServiceConfig,
};

/// Where the kernel's nbd module shows itself once loaded.
const NBD_MODULE: &str = "/sys/module/nbd";

/// More gratuitous ARPs than this per burst is a flood, not an announcement.
const MAX_GARP_COUNT: u32 = 100;

/// A burst paced slower than this would leave clients on the old MAC for too long.
const MAX_GARP_INTERVAL: Duration = Duration::from_secs(10);

/// The second burst exists to catch switches and clients that missed the first: later than
/// this it no longer helps a failover.
const MAX_GARP_REPEAT: Duration = Duration::from_secs(300);

/// How the primary turns a volume's NBD export into a block device it can mount.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttachMode {
    /// `kernel` when the nbd module is loaded (`/sys/module/nbd` exists), else `fuse`.
    #[default]
    Auto,
    /// `/dev/nbdN` through the kernel's NBD client, connected by blockd itself over the nbd
    /// generic netlink family (a restarted blockd takes the device back).
    Kernel,
    /// `/dev/nbdN` connected by `nbd-client` (the fallback: the device dies with blockd).
    NbdClient,
    /// nbdfuse presents the export as a file, attached to a loop device.
    Fuse,
}

impl AttachMode {
    /// `Kernel` or `Fuse`: `Auto` decided by whether the nbd module is loaded now.
    pub fn resolve(self) -> AttachMode {
        self.resolve_with(Path::new(NBD_MODULE).exists())
    }

    /// [`AttachMode::resolve`] with the module's presence given (for tests).
    pub fn resolve_with(self, nbd_module: bool) -> AttachMode {
        match self {
            AttachMode::Auto if nbd_module => AttachMode::Kernel,
            AttachMode::Auto => AttachMode::Fuse,
            other => other,
        }
    }
}

/// `[failover]`: settings of the promote/demote plan.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FailoverConfig {
    /// "auto", "kernel", "nbd-client" or "fuse" (default "auto").
    #[serde(default)]
    pub attach: AttachMode,
    /// Deadline of the commands a step runs (nbdfuse, losetup, mount and its journal
    /// replay, umount, ...) and the least bound of each step's apply or undo (default
    /// "60s"): a hung command must fail the promotion, not stall it. Steps that need longer
    /// have their own (e2fsck at least 10 minutes; a service's `timeout`).
    #[serde(default = "default_step_timeout", deserialize_with = "values::duration")]
    pub step_timeout: Duration,
    /// Gratuitous ARPs (or unsolicited neighbour advertisements) per burst (default 5): one
    /// can be lost, five at `garp-interval` rarely all are.
    #[serde(default = "default_garp_count")]
    pub garp_count: u32,
    /// Pause between two announcements of a burst (default "200ms").
    #[serde(default = "default_garp_interval", deserialize_with = "values::duration")]
    pub garp_interval: Duration,
    /// A second burst this long after the first (default "5s"), sent by a detached child so
    /// promote does not wait; "0s" sends no second burst.
    #[serde(default = "default_garp_repeat", deserialize_with = "values::duration")]
    pub garp_repeat: Duration,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        FailoverConfig {
            attach: AttachMode::default(),
            step_timeout: default_step_timeout(),
            garp_count: default_garp_count(),
            garp_interval: default_garp_interval(),
            garp_repeat: default_garp_repeat(),
        }
    }
}

fn default_step_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_garp_count() -> u32 {
    5
}
fn default_garp_interval() -> Duration {
    Duration::from_millis(200)
}
fn default_garp_repeat() -> Duration {
    Duration::from_secs(5)
}

/// `[[bind]]`: a directory of a mirrored filesystem bound over a local path after the
/// volumes are mounted, so state that must follow the primary (`/var/lib/nfs`) does.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BindConfig {
    /// The directory on the mirror, inside some volume's `mount` (created if missing).
    pub source: PathBuf,
    /// Where it appears (created if missing), e.g. "/var/lib/nfs".
    pub target: PathBuf,
}

impl Config {
    pub(super) fn check_failover(&self, p: &mut Problems) {
        let f = &self.failover;
        if f.step_timeout.is_zero() {
            p.add("failover.step-timeout", Some("\"0s\"".into()), "must be more than 0");
        }
        if !(1..=MAX_GARP_COUNT).contains(&f.garp_count) {
            let why = format!("must be from 1 to {MAX_GARP_COUNT}");
            p.add("failover.garp-count", Some(f.garp_count.to_string()), why);
        }
        if f.garp_interval.is_zero() || f.garp_interval > MAX_GARP_INTERVAL {
            let why = format!("must be more than 0 and at most {MAX_GARP_INTERVAL:?}");
            p.add("failover.garp-interval", Some(show(f.garp_interval)), why);
        }
        if f.garp_repeat > MAX_GARP_REPEAT {
            let why = format!("at most {MAX_GARP_REPEAT:?} (\"0s\" = no second burst)");
            p.add("failover.garp-repeat", Some(show(f.garp_repeat)), why);
        }
    }

    /// Each bind's source must be on the mirror (else the state does not move with the
    /// primary) and each target bound once.
    pub(super) fn check_binds(&self, p: &mut Problems) {
        let mut targets = HashMap::new();
        for (i, b) in self.bind.iter().enumerate() {
            let key = |k: &str| format!("bind[{i}].{k}");
            p.absolute(&key("source"), &b.source);
            p.absolute(&key("target"), &b.target);
            let mounts: Vec<&PathBuf> =
                self.volume.iter().filter_map(|v| v.mount.as_ref()).collect();
            if b.source.is_absolute() && !mounts.iter().any(|m| b.source.starts_with(m)) {
                let why = "not inside any volume's mount: the state would not move with the \
                           primary";
                p.add(key("source"), Some(quote_path(&b.source)), why);
            }
            if let Some(j) = targets.insert(&b.target, i) {
                p.add(key("target"), Some(quote_path(&b.target)), format!("also bind[{j}]'s"));
            }
        }
    }
}

/// `pidfile` and `timeout` of `service[i]`.
pub(super) fn check_service_extras(p: &mut Problems, i: usize, s: &ServiceConfig) {
    if let Some(pf) = &s.pidfile {
        p.absolute(&format!("service[{i}].pidfile"), pf);
    }
    if s.timeout.is_some_and(|t| t.is_zero()) {
        p.add(format!("service[{i}].timeout"), Some("\"0s\"".into()), "must be more than 0");
    }
}

/// A duration as the operator would write it ("200ms", "5s").
fn show(d: Duration) -> String {
    quote(humantime::format_duration(d))
}

#[cfg(test)]
mod tests {
    use super::super::tests::{load, SINGLE};
    use super::*;

    const MOUNTED: &str = "filesystem = \"ext4\"\nmount = \"/srv/nfs\"\n";

    #[track_caller]
    fn refused(text: &str, key: &str, value: &str) {
        let err = load(text).expect_err("must be refused").to_string();
        assert!(err.contains(key) && err.contains(value), "want {key} = {value} in: {err}");
    }

    #[test]
    fn failover_defaults() {
        let c = load(SINGLE).unwrap();
        assert_eq!(c.failover, FailoverConfig::default());
        assert_eq!(c.failover.attach, AttachMode::Auto);
        assert_eq!(c.failover.step_timeout, Duration::from_secs(60));
        assert_eq!(c.failover.garp_count, 5);
        assert_eq!(c.failover.garp_interval, Duration::from_millis(200));
        assert_eq!(c.failover.garp_repeat, Duration::from_secs(5));
        assert!(c.bind.is_empty());
    }

    #[test]
    fn failover_keys_parse() {
        let text = format!(
            "[failover]\nattach = \"fuse\"\nstep-timeout = \"90s\"\ngarp-count = 3\n\
             garp-interval = \"100ms\"\ngarp-repeat = \"0s\"\n{SINGLE}"
        );
        let f = load(&text).unwrap().failover;
        assert_eq!(f.attach, AttachMode::Fuse);
        assert_eq!(f.step_timeout, Duration::from_secs(90));
        assert_eq!((f.garp_count, f.garp_interval), (3, Duration::from_millis(100)));
        assert!(f.garp_repeat.is_zero());
    }

    #[test]
    fn bad_failover_values_are_named() {
        refused(&format!("[failover]\nattach = \"usb\"\n{SINGLE}"), "failover.attach", "\"usb\"");
        let t = format!("[failover]\nstep-timeout = \"0s\"\n{SINGLE}");
        refused(&t, "failover.step-timeout", "\"0s\"");
        let t = format!("[failover]\nstep-timeout = 60\n{SINGLE}");
        refused(&t, "failover.step-timeout", "60");
        refused(&format!("[failover]\ngarp-count = 0\n{SINGLE}"), "failover.garp-count", "0");
        let t = format!("[failover]\ngarp-interval = \"1m\"\n{SINGLE}");
        refused(&t, "failover.garp-interval", "\"1m\"");
        let t = format!("[failover]\ngarp-repeat = \"1h\"\n{SINGLE}");
        refused(&t, "failover.garp-repeat", "\"1h\"");
        let t = format!("[failover]\ngarp-cnt = 1\n{SINGLE}");
        refused(&t, "failover.garp-cnt", "unknown key");
    }

    #[test]
    fn auto_attach_follows_the_module() {
        assert_eq!(AttachMode::Auto.resolve_with(true), AttachMode::Kernel);
        assert_eq!(AttachMode::Auto.resolve_with(false), AttachMode::Fuse);
        assert_eq!(AttachMode::Fuse.resolve_with(true), AttachMode::Fuse);
        assert_eq!(AttachMode::NbdClient.resolve_with(false), AttachMode::NbdClient);
        assert_eq!(AttachMode::Kernel.resolve_with(false), AttachMode::Kernel);
    }

    #[test]
    fn binds_parse_in_order() {
        let text = format!(
            "{SINGLE}{MOUNTED}[[bind]]\nsource = \"/srv/nfs/.state\"\ntarget = \"/var/lib/nfs\"\n\
             [[bind]]\nsource = \"/srv/nfs/b\"\ntarget = \"/b\""
        );
        let c = load(&text).unwrap();
        assert_eq!(c.bind.len(), 2);
        assert_eq!(c.bind[0].target, Path::new("/var/lib/nfs"));
        assert_eq!(c.bind[1].source, Path::new("/srv/nfs/b"));
    }

    #[test]
    fn bad_binds_are_named() {
        let bind = |s: &str, t: &str| format!("[[bind]]\nsource = \"{s}\"\ntarget = \"{t}\"\n");
        let t = format!("{SINGLE}{MOUNTED}{}", bind("/etc/x", "/var/lib/nfs"));
        refused(&t, "bind[0].source", "\"/etc/x\"");
        let t = format!("{SINGLE}{MOUNTED}{}", bind("/srv/nfs/a", "rel"));
        refused(&t, "bind[0].target", "\"rel\"");
        let t =
            format!("{SINGLE}{MOUNTED}{}{}", bind("/srv/nfs/a", "/x"), bind("/srv/nfs/b", "/x"));
        refused(&t, "bind[1].target", "\"/x\"");
        refused(
            &format!("{SINGLE}{MOUNTED}[[bind]]\nsource = \"/srv/nfs/a\""),
            "bind[0].target",
            "missing",
        );
    }

    #[test]
    fn service_failover_keys() {
        let svc = "[[service]]\nname = \"db\"\nstart = \"a\"\nstop = \"b\"\n";
        let c = load(&format!("{SINGLE}{svc}")).unwrap();
        let s = &c.service[0];
        assert!(s.wait && s.pidfile.is_none() && s.timeout.is_none());
        assert_eq!(s.deadline(&c.failover), Duration::from_secs(60));
        let extra = "pidfile = \"/run/db.pid\"\ntimeout = \"20s\"\nwait = false\n";
        let c = load(&format!("{SINGLE}{svc}{extra}")).unwrap();
        let s = &c.service[0];
        assert_eq!(s.pidfile.as_deref(), Some(Path::new("/run/db.pid")));
        assert_eq!(s.deadline(&c.failover), Duration::from_secs(20));
        assert!(!s.wait);
        refused(&format!("{SINGLE}{svc}pidfile = \"db.pid\""), "service[0].pidfile", "\"db.pid\"");
        refused(&format!("{SINGLE}{svc}timeout = \"0s\""), "service[0].timeout", "\"0s\"");
        refused(&format!("{SINGLE}{svc}timeout = \"soon\""), "service[0].timeout", "\"soon\"");
        refused(&format!("{SINGLE}{svc}wait = \"yes\""), "service[0].wait", "\"yes\"");
    }
}
