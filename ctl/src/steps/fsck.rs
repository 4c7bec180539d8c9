//! `fsck <vol>`: ext4 gets `e2fsck -p` before it is mounted; xfs needs none (mounting replays
//! its log). The e2fsck exit code decides (e2fsck(8)): 0 clean, 1 errors corrected, 2
//! corrected and the system should reboot (meant for the root filesystem, not ours), ≥ 4
//! errors left uncorrected, an operational error or worse: the promotion stops there, since
//! mounting a damaged filesystem read-write can spread the damage.

use std::time::Duration;

use blockd::config::Filesystem;

use super::{attach, cmd::Cmd, mount, volume};
use crate::step::{Ctx, Step, StepError};

/// Exit codes of e2fsck from this one up abort the promotion.
const E2FSCK_UNCORRECTED: i32 = 4;

/// `fsck <vol>`.
#[derive(Debug)]
pub struct Fsck {
    volume: String,
}

impl Fsck {
    pub fn new(volume: impl Into<String>) -> Fsck {
        Fsck { volume: volume.into() }
    }

    fn is_ext4(&self, ctx: &Ctx) -> Result<bool, StepError> {
        Ok(volume(ctx, &self.volume)?.filesystem == Some(Filesystem::Ext4))
    }
}

impl Step for Fsck {
    fn name(&self) -> String {
        format!("fsck {}", self.volume)
    }

    fn describe(&self, ctx: &Ctx) -> String {
        match self.is_ext4(ctx) {
            Ok(true) => format!("e2fsck -p <device of {}> (exit ≥ 4 aborts)", self.volume),
            _ => "nothing (no ext4: xfs replays its log on mount)".to_string(),
        }
    }

    /// Done when there is nothing to check (not ext4) or the filesystem is mounted already:
    /// a second promote must not fsck a mounted filesystem (e2fsck refuses, rightly).
    fn check(&self, ctx: &Ctx) -> Result<bool, StepError> {
        if !self.is_ext4(ctx)? {
            return Ok(true);
        }
        Ok(attach::device(ctx, &self.volume).is_some_and(|dev| mount::mounted_from(&dev)))
    }

    fn apply(&self, ctx: &Ctx) -> Result<(), StepError> {
        if !self.is_ext4(ctx)? {
            return Ok(());
        }
        let dev = attach::device(ctx, &self.volume)
            .ok_or_else(|| StepError::Other(format!("volume {} is not attached", self.volume)))?;
        let deadline = self.timeout().max(ctx.config.failover.step_timeout);
        let e2fsck = Cmd::new("e2fsck").arg("-p").arg(&dev).deadline(deadline);
        let out = e2fsck.output(ctx)?;
        match out.code() {
            Some(0) => Ok(()),
            Some(c) if c < E2FSCK_UNCORRECTED => {
                ctx.say(format_args!(
                    "e2fsck corrected errors on {}: {}",
                    dev.display(),
                    out.stdout.trim()
                ));
                Ok(())
            }
            _ => Err(StepError::Command { what: e2fsck.to_string(), detail: out.message() }),
        }
    }

    /// A check changes nothing to undo.
    fn undo(&self, _ctx: &Ctx) -> Result<(), StepError> {
        Ok(())
    }

    /// A full check of a large ext4 takes minutes; `-p` on a clean journal, a second.
    fn timeout(&self) -> Duration {
        Duration::from_secs(600)
    }
}
