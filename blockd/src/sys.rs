//! Process-wide settings against the same-host memory-pressure deadlock (design.md §3,
//! NBD-NOTES §3.3 step 4).
//!
//! The deadlock: the NBD client (the kernel's `/dev/nbdN`, or nbdfuse + loop) sits on the same
//! host as this daemon. Under memory pressure the kernel reclaims pages by writing dirty page
//! cache back to that device, which means sending it to this daemon; if the daemon then needs
//! memory (a page fault on swapped-out code, a buffer allocation that enters direct reclaim),
//! it waits on reclaim, which waits on the daemon. Nothing moves again.
//!
//! Two defences, both best effort (a failure is a warning, because the daemon still works
//! without them, just not under extreme memory pressure):
//! - `prctl(PR_SET_IO_FLUSHER)`: the daemon's allocations behave as GFP_NOIO, so reclaim done
//!   on its behalf never issues I/O that could come back to it. Linux 5.6+, CAP_SYS_RESOURCE.
//!   The kernel added it for exactly this case, nbd among the named users.
//! - `mlockall(MCL_CURRENT | MCL_FUTURE)`: no page of the daemon (code, stacks, buffers) is
//!   ever paged out, so serving a request never faults on a page that needs I/O to come back.

use std::io;

use crate::{config::DaemonConfig, errno::host_name};

/// `PR_SET_IO_FLUSHER` from `<linux/prctl.h>` (not in the libc crate).
const PR_SET_IO_FLUSHER: libc::c_int = 57;

/// `CAP_IPC_LOCK` from `<linux/capability.h>`: lifts RLIMIT_MEMLOCK.
const CAP_IPC_LOCK: u32 = 14;

/// Applies the `[daemon]` settings, logging what worked and what did not.
pub fn apply(config: &DaemonConfig) {
    if config.io_flusher {
        match set_io_flusher() {
            Ok(()) => tracing::info!("PR_SET_IO_FLUSHER set"),
            Err(e) => tracing::warn!(
                errno = host_name(&e),
                "cannot set PR_SET_IO_FLUSHER ({e}); needs Linux 5.6+ and CAP_SYS_RESOURCE; \
                 serving a block device on this same host may deadlock under memory pressure"
            ),
        }
    }
    if config.mlock {
        match lock_memory() {
            Ok(()) => tracing::info!("memory locked (mlockall)"),
            Err(LockError::Limited(limit)) => tracing::warn!(
                limit,
                "not locking memory: RLIMIT_MEMLOCK is {limit} bytes and CAP_IPC_LOCK is \
                 missing, so later allocations would fail; set LimitMEMLOCK=infinity"
            ),
            Err(LockError::Failed(e)) => {
                tracing::warn!(errno = host_name(&e), "cannot lock memory: mlockall: {e}")
            }
        }
    }
}

/// Marks this process as an I/O flusher (see the module doc).
pub fn set_io_flusher() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only; no memory is passed to the kernel.
    let rc = unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Why memory was not locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// MCL_FUTURE under a finite RLIMIT_MEMLOCK makes every allocation past the limit fail,
    /// which in Rust aborts the process: refuse up front instead.
    #[error("RLIMIT_MEMLOCK is {0} bytes and CAP_IPC_LOCK is missing")]
    Limited(u64),
    #[error("mlockall failed")]
    Failed(#[source] io::Error),
}

/// Locks all current and future memory, unless that would make later allocations fail.
pub fn lock_memory() -> Result<(), LockError> {
    if let Some(limit) = memlock_limit().map_err(LockError::Failed)? {
        if !has_capability(CAP_IPC_LOCK) {
            return Err(LockError::Limited(limit));
        }
    }
    // SAFETY: mlockall takes flags only and affects page residency, not memory contents.
    let rc = unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) };
    if rc == 0 {
        Ok(())
    } else {
        Err(LockError::Failed(io::Error::last_os_error()))
    }
}

/// The soft RLIMIT_MEMLOCK in bytes, or `None` when unlimited.
fn memlock_limit() -> io::Result<Option<u64>> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `lim` is a valid, writable rlimit that outlives the call.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((lim.rlim_cur != libc::RLIM_INFINITY).then_some(lim.rlim_cur))
}

/// Whether `cap` is in this process's effective set (`CapEff` in /proc/self/status).
fn has_capability(cap: u32) -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else { return false };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|set| set & (1 << cap) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_set_is_read() {
        // Whatever we run as, the answer must match what the kernel reports for CapEff.
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("CapEff:")).unwrap();
        let set = u64::from_str_radix(line["CapEff:".len()..].trim(), 16).unwrap();
        assert_eq!(has_capability(CAP_IPC_LOCK), set & (1 << CAP_IPC_LOCK) != 0);
    }

    #[test]
    fn memlock_limit_matches_proc() {
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
        let line = limits.lines().find(|l| l.starts_with("Max locked memory")).unwrap();
        let soft = line.split_whitespace().nth(3).unwrap();
        let want = if soft == "unlimited" { None } else { Some(soft.parse().unwrap()) };
        assert_eq!(memlock_limit().unwrap(), want);
    }
}
