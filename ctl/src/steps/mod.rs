//! The steps of `blockctl promote`/`demote` (design.md §8) that change this host: attach a
//! volume's export as a block device, fsck it, mount it, bind state directories, hold the
//! VIP, run the services. The plan (plan.rs) orders them; each implements [`Step`].
//!
//! ```text
//!   attach ──► fsck ──► mount ──► bind ──► vip ──► service…      (promote: apply)
//!   detach ◄──  –   ◄── umount ◄── umount ◄── del ◄── stop…      (demote: undo, reversed)
//! ```
//!
//! - `cmd`: runs external commands, printed first, bounded by a deadline.
//! - `proc`: pids recorded with their start time; SIGTERM → SIGKILL escalation.
//! - `attach`: nbdfuse + loop device (or kernel nbd); its state file is what `status` reads.
//! - `fsck`, `mount` (volumes and `[[bind]]`s), `vip` (rtnetlink, raw sockets), `services`.
//!
//! Every `check` and `undo` is idempotent: the plan may run either any number of times, after
//! any partial failure, and on a host where nothing was ever applied.
//!
//! [`Step`]: crate::step::Step

pub mod announce;
pub mod attach;
pub mod cmd;
pub mod elsewhere;
pub mod fsck;
pub mod mount;
pub mod proc;
pub mod services;
pub mod vip;

#[cfg(test)]
pub(crate) mod testutil;

use std::path::{Path, PathBuf};

use blockd::config::VolumeConfig;

use crate::step::{Ctx, StepError};

/// The volume called `name`, or an error naming it.
fn volume<'a>(ctx: &'a Ctx, name: &str) -> Result<&'a VolumeConfig, StepError> {
    ctx.config.volume(name).ok_or_else(|| {
        StepError::Other(format!("no volume {name:?} in {}", ctx.config.source.display()))
    })
}

/// This node's run directory (`[node.NAME] run-dir`).
fn run_dir(ctx: &Ctx) -> &Path {
    &ctx.node.settings.run_dir
}

/// `mkdir -p`, as a step error naming the directory.
fn mkdir(dir: &Path) -> Result<(), StepError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| StepError::Other(format!("cannot create {}: {e}", dir.display())))
}

/// A volume's mount point, or an error: the plan only builds mount steps for volumes with one.
fn mount_point(ctx: &Ctx, name: &str) -> Result<PathBuf, StepError> {
    volume(ctx, name)?
        .mount
        .clone()
        .ok_or_else(|| StepError::Other(format!("volume {name:?} has no mount point")))
}
