//! The volume's filesystem still mounted in other mount namespaces after our `umount`.
//!
//! A mount namespace created while the volume was mounted (`unshare --mount`, a container
//! runtime, a service with `PrivateTmp=`) starts with a copy of every mount, ours included,
//! and with private propagation our `umount` does not reach that copy: `umount` succeeds, yet
//! the filesystem stays alive there, dirty pages and journal included. Detaching the device
//! then makes every write it still has fail: the data written before the demote is lost, with
//! nothing but kernel log lines ("Delayed block allocation failed ... Data will be lost").
//!
//! So after the unmount, [`release`] asks the kernel whether anything still claims the device
//! (an exclusive open fails with `EBUSY` while a filesystem on it is mounted anywhere), unmounts
//! the copies it can find (one process per other namespace, from `/proc/PID/mountinfo`, with
//! `nsenter -t PID -m umount`), and fails the step if the device is still claimed: a namespace
//! that no process runs in (one kept by a bind-mounted `/proc/PID/ns/mnt` file) cannot be
//! found this way, and detaching under it would lose data.

use std::{
    collections::BTreeMap,
    fs,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use super::{cmd::Cmd, mount::parse_mountinfo_line, proc::comm};
use crate::step::{Ctx, StepError};

/// The mount points of filesystem `dev` in each mount namespace other than ours, keyed by one
/// process that runs in it (the lowest pid), deepest mount last.
pub fn mounts_elsewhere(dev: (u32, u32)) -> BTreeMap<u32, Vec<PathBuf>> {
    let ours = fs::read_link("/proc/self/ns/mnt").ok();
    let mut seen = std::collections::BTreeSet::new();
    let mut found = BTreeMap::new();
    let Ok(dir) = fs::read_dir("/proc") else { return found };
    let mut pids: Vec<u32> =
        dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
    pids.sort_unstable();
    for pid in pids {
        let Ok(ns) = fs::read_link(format!("/proc/{pid}/ns/mnt")) else { continue };
        if ours.as_ref() == Some(&ns) || !seen.insert(ns) {
            continue;
        }
        let Ok(text) = fs::read_to_string(format!("/proc/{pid}/mountinfo")) else { continue };
        let points: Vec<PathBuf> = text
            .lines()
            .filter_map(parse_mountinfo_line)
            .filter(|m| m.dev == dev)
            .map(|m| m.point)
            .collect();
        if !points.is_empty() {
            found.insert(pid, points);
        }
    }
    found
}

/// True while the kernel has block device `dev` claimed: a filesystem on it mounted in some
/// namespace, or another exclusive user.
pub fn claimed(dev: &Path) -> bool {
    let open = fs::OpenOptions::new().read(true).custom_flags(libc::O_EXCL).open(dev);
    open.is_err_and(|e| e.raw_os_error() == Some(libc::EBUSY))
}

/// After our unmount of the filesystem `dev` (the device node `source`): unmounts its copies
/// in other namespaces, then fails if the device is still claimed (see the module doc).
pub fn release(ctx: &Ctx, source: &Path, dev: (u32, u32)) -> Result<(), StepError> {
    if !source.starts_with("/dev/") || !claimed(source) {
        return Ok(());
    }
    for (pid, points) in mounts_elsewhere(dev) {
        for point in points.iter().rev() {
            ctx.say(format_args!(
                "{} is still mounted at {} in the mount namespace of pid {pid} ({}): \
                 unmounting it there",
                source.display(),
                point.display(),
                comm(pid)
            ));
            let umount = Cmd::new("nsenter").arg("-t").arg(pid.to_string()).arg("-m");
            let umount = umount.arg("umount").arg(point);
            let gone = || !mounts_elsewhere(dev).get(&pid).is_some_and(|p| p.contains(point));
            if let Err(e) = super::mount::escalate(ctx, &umount, point, gone, dev) {
                ctx.say(format_args!("  not unmounted: {e}"));
            }
        }
    }
    if claimed(source) {
        return Err(StepError::Other(format!(
            "{} is still in use after its unmount (mounted in another mount namespace, or held \
             by another exclusive user): detaching it now would lose what that filesystem has \
             not written back; unmount it there (findmnt -N PID, nsenter -m umount) and undo again",
            source.display()
        )));
    }
    Ok(())
}
