//! `attach <vol>`: the volume's NBD export as a block device this host can fsck and mount.
//!
//! - `fuse`: `nbdfuse` presents the export as the file `<run-dir>/attach/<vol>/nbd`, then
//!   `losetup --direct-io=on` makes a loop device of it (direct I/O: no second page cache
//!   between the filesystem and the mirror, so a flush reaches blockd).
//! - `kernel`: blockd connects `/dev/nbdN` itself over the kernel's nbd netlink family (the
//!   control request `attach`; `detach` disconnects), serving one end of a socketpair, so a
//!   restarted blockd takes the same device back (blockd `kernel` module).
//! - `nbd-client`: `nbd-client -unix SOCK -N <vol> /dev/nbdN`, the fallback.
//!
//! The kernel modes run in the VM tier (tests/tests/vm.rs): this host's kernel has no nbd.
//!
//! What was attached is recorded in `<run-dir>/attach/<vol>.json` ([`AttachState`]): the
//! later steps find the device there, `undo` finds the pid to stop, `blockctl status` reports
//! a dead nbdfuse. The record is written as soon as nbdfuse is started, so an undo after a
//! half-finished apply still knows what to stop.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Child,
    thread,
    time::{Duration, Instant},
};

use blockd::{
    config::AttachMode,
    control::{Client, Reply, Request},
};
use serde::{Deserialize, Serialize};

use super::{cmd::log_tail, cmd::Cmd, mkdir, proc::Proc, run_dir, volume};
use crate::step::{Ctx, Step, StepError};

/// How the device was attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Fuse,
    Kernel,
    NbdClient,
}

/// The record of one attached volume, `<run-dir>/attach/<vol>.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachState {
    pub mode: Mode,
    /// `/dev/loopN` or `/dev/nbdN`; `None` while nbdfuse runs but the loop is not set up yet.
    pub device: Option<PathBuf>,
    /// The nbdfuse process (fuse mode).
    pub process: Option<Proc>,
    /// The file nbdfuse presents (fuse mode).
    pub file: Option<PathBuf>,
    /// Computed when read, not stored: the attaching process still runs (fuse) or the nbd
    /// device is still connected (kernel). False means the device is dead: I/O on it fails.
    #[serde(default, skip_deserializing)]
    pub alive: bool,
}

impl AttachState {
    /// The nbdfuse pid, for status.
    pub fn pid(&self) -> Option<u32> {
        self.process.map(|p| p.pid)
    }

    fn is_alive(&self) -> bool {
        match self.mode {
            Mode::Fuse => self.process.is_some_and(|p| p.alive()),
            Mode::Kernel | Mode::NbdClient => self.device.as_deref().is_some_and(nbd_connected),
        }
    }
}

/// The block device attached for `volume`, if any.
pub fn device(ctx: &Ctx, volume: &str) -> Option<PathBuf> {
    state(ctx, volume).and_then(|s| s.device)
}

/// What is recorded for `volume`, with `alive` computed now; `None` when nothing is attached.
pub fn state(ctx: &Ctx, volume: &str) -> Option<AttachState> {
    let text = fs::read_to_string(state_file(ctx, volume)).ok()?;
    let mut s: AttachState = serde_json::from_str(&text).ok()?;
    s.alive = s.is_alive();
    Some(s)
}

fn attach_dir(ctx: &Ctx) -> PathBuf {
    run_dir(ctx).join("attach")
}

fn state_file(ctx: &Ctx, volume: &str) -> PathBuf {
    attach_dir(ctx).join(format!("{volume}.json"))
}

/// Writes the record atomically (temporary file, then rename): a reader never sees half.
fn save(ctx: &Ctx, volume: &str, s: &AttachState) -> Result<(), StepError> {
    let path = state_file(ctx, volume);
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_string_pretty(s).unwrap_or_default();
    fs::write(&tmp, text)
        .and_then(|()| fs::rename(&tmp, &path))
        .map_err(|e| StepError::Other(format!("cannot write {}: {e}", path.display())))
}

/// `attach <vol>`.
#[derive(Debug)]
pub struct Attach {
    volume: String,
}

impl Attach {
    pub fn new(volume: impl Into<String>) -> Attach {
        Attach { volume: volume.into() }
    }

    fn mode(ctx: &Ctx) -> Mode {
        match ctx.config.failover.attach.resolve() {
            AttachMode::Kernel => Mode::Kernel,
            AttachMode::NbdClient => Mode::NbdClient,
            _ => Mode::Fuse,
        }
    }

    fn uri(&self, ctx: &Ctx) -> String {
        let sock = ctx.node.nbd_socket(&self.volume);
        format!("nbd+unix:///{}?socket={}", self.volume, sock.display())
    }

    fn fuse_dir(&self, ctx: &Ctx) -> PathBuf {
        attach_dir(ctx).join(&self.volume)
    }

    fn log(&self, ctx: &Ctx) -> PathBuf {
        attach_dir(ctx).join(format!("{}.log", self.volume))
    }

    fn deadline(&self, ctx: &Ctx) -> Duration {
        ctx.config.failover.step_timeout
    }

    fn apply_fuse(&self, ctx: &Ctx) -> Result<(), StepError> {
        let dir = self.fuse_dir(ctx);
        mkdir(&dir)?;
        let file = dir.join("nbd");
        let nbdfuse = Cmd::new("nbdfuse").arg(&dir).arg(self.uri(ctx));
        let mut child = nbdfuse.spawn_detached(ctx, &self.log(ctx))?;
        let process = Proc::of(child.id());
        let mut s = AttachState {
            mode: Mode::Fuse,
            device: None,
            process: Some(process),
            file: Some(file.clone()),
            alive: true,
        };
        save(ctx, &self.volume, &s)?;
        self.wait_for_file(ctx, &mut child, &file)?;
        let losetup = Cmd::new("losetup")
            .args(["--find", "--show", "--direct-io=on"])
            .arg(&file)
            .deadline(self.deadline(ctx));
        let out = losetup.run(ctx)?;
        let dev = PathBuf::from(out.stdout.trim());
        if !dev.starts_with("/dev") {
            return Err(StepError::Command { what: losetup.to_string(), detail: out.message() });
        }
        ctx.say(format_args!("{} attached as {}", self.volume, dev.display()));
        s.device = Some(dev);
        save(ctx, &self.volume, &s)
    }

    /// Waits until nbdfuse has mounted its file (it has the export's size then), failing
    /// early with its log when it exits instead.
    fn wait_for_file(&self, ctx: &Ctx, child: &mut Child, file: &Path) -> Result<(), StepError> {
        let after = self.deadline(ctx);
        let end = Instant::now() + after;
        loop {
            if fs::metadata(file).is_ok_and(|m| m.is_file() && m.len() > 0) {
                return Ok(());
            }
            if let Ok(Some(status)) = child.try_wait() {
                let log = log_tail(&self.log(ctx), 2000);
                let detail = format!("exited ({status}) before {} appeared: {log}", file.display());
                return Err(StepError::Command { what: "nbdfuse".into(), detail });
            }
            if Instant::now() >= end {
                return Err(StepError::Timeout {
                    what: format!("nbdfuse: {}", file.display()),
                    after,
                });
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Asks blockd to connect the kernel (netlink); the record names the device it chose.
    fn apply_kernel(&self, ctx: &Ctx) -> Result<(), StepError> {
        let request = Request::Attach { volume: self.volume.clone() };
        let dev = match control(ctx, &request)? {
            Reply::Attached { device } => device,
            other => {
                return Err(StepError::Other(format!("blockd answered attach with {other:?}")))
            }
        };
        ctx.say(format_args!("{} attached as {} (netlink)", self.volume, dev.display()));
        let s = AttachState {
            mode: Mode::Kernel,
            device: Some(dev),
            process: None,
            file: None,
            alive: true,
        };
        save(ctx, &self.volume, &s)
    }

    fn apply_nbd_client(&self, ctx: &Ctx) -> Result<(), StepError> {
        let dev = free_nbd_device().ok_or_else(|| {
            StepError::Other("no free /dev/nbdN (is the nbd module loaded?)".into())
        })?;
        let sock = ctx.node.nbd_socket(&self.volume);
        Cmd::new("nbd-client")
            .arg("-unix")
            .arg(&sock)
            .args(["-N", &self.volume])
            .arg(&dev)
            .deadline(self.deadline(ctx))
            .run(ctx)?;
        let s = AttachState {
            mode: Mode::NbdClient,
            device: Some(dev),
            process: None,
            file: None,
            alive: true,
        };
        save(ctx, &self.volume, &s)
    }

    /// Detaches the loop device, unmounts the FUSE file, stops nbdfuse: each only if present.
    fn undo_fuse(&self, ctx: &Ctx, s: &AttachState) -> Result<(), StepError> {
        if let (Some(dev), Some(file)) = (&s.device, &s.file) {
            if loop_backing(dev).is_some_and(|b| b == *file) {
                Cmd::new("losetup").arg("-d").arg(dev).deadline(self.deadline(ctx)).run(ctx)?;
            }
        }
        let dir = self.fuse_dir(ctx);
        if super::mount::is_mount_point(&dir) {
            let fusermount = Cmd::new("fusermount3").arg("-u").arg(&dir).output(ctx)?;
            if !fusermount.status.success() {
                ctx.say(format_args!(
                    "fusermount3 failed ({}), lazy unmount",
                    fusermount.message()
                ));
                Cmd::new("umount").arg("-l").arg(&dir).run(ctx)?;
            }
        }
        if let Some(p) = s.process {
            // Unmounting ends nbdfuse by itself; the signals are for one that hangs.
            if !p.wait_gone(Duration::from_secs(2)) && p.alive() {
                ctx.say(format_args!("stopping nbdfuse (pid {})", p.pid));
                if !p.terminate(Duration::from_secs(3)) {
                    return Err(StepError::Other(format!("nbdfuse pid {} does not exit", p.pid)));
                }
            }
        }
        let _ = fs::remove_dir(&dir);
        Ok(())
    }
}

impl Step for Attach {
    fn name(&self) -> String {
        format!("attach {}", self.volume)
    }

    fn describe(&self, ctx: &Ctx) -> String {
        match Self::mode(ctx) {
            Mode::Fuse => format!(
                "nbdfuse {} {}; losetup --find --show --direct-io=on {}/nbd",
                self.fuse_dir(ctx).display(),
                self.uri(ctx),
                self.fuse_dir(ctx).display()
            ),
            Mode::Kernel => format!("blockd: NBD_CMD_CONNECT of {} over netlink", self.volume),
            Mode::NbdClient => format!(
                "nbd-client -unix {} -N {} /dev/nbdN",
                ctx.node.nbd_socket(&self.volume).display(),
                self.volume
            ),
        }
    }

    fn check(&self, ctx: &Ctx) -> Result<bool, StepError> {
        volume(ctx, &self.volume)?;
        let Some(s) = state(ctx, &self.volume) else { return Ok(false) };
        let attached = match (s.mode, &s.device, &s.file) {
            (Mode::Fuse, Some(dev), Some(file)) => loop_backing(dev).is_some_and(|b| b == *file),
            (Mode::Kernel | Mode::NbdClient, Some(dev), _) => nbd_connected(dev),
            _ => false,
        };
        Ok(attached && s.alive)
    }

    fn apply(&self, ctx: &Ctx) -> Result<(), StepError> {
        volume(ctx, &self.volume)?;
        mkdir(&attach_dir(ctx))?;
        if state(ctx, &self.volume).is_some() {
            // Left over from a failed or dead attach: clear it before attaching anew.
            self.undo(ctx)?;
        }
        let result = match Self::mode(ctx) {
            Mode::Fuse => self.apply_fuse(ctx),
            Mode::Kernel => self.apply_kernel(ctx),
            Mode::NbdClient => self.apply_nbd_client(ctx),
        };
        if result.is_err() {
            // The plan does not undo a step whose apply failed: leave nothing behind.
            let _ = self.undo(ctx);
        }
        result
    }

    fn undo(&self, ctx: &Ctx) -> Result<(), StepError> {
        let Some(s) = state(ctx, &self.volume) else {
            // No record: nothing this tool attached, except a FUSE mount whose record was lost.
            let empty = AttachState {
                mode: Mode::Fuse,
                device: None,
                process: None,
                file: None,
                alive: false,
            };
            return self.undo_fuse(ctx, &empty);
        };
        match s.mode {
            Mode::Fuse => self.undo_fuse(ctx, &s)?,
            Mode::Kernel => {
                control(ctx, &Request::Detach { volume: self.volume.clone() })?;
            }
            Mode::NbdClient => {
                if let Some(dev) = s.device.as_ref().filter(|d| nbd_connected(d)) {
                    Cmd::new("nbd-client").arg("-d").arg(dev).run(ctx)?;
                }
            }
        }
        let path = state_file(ctx, &self.volume);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(StepError::Other(format!("cannot remove {}: {e}", path.display())))
            }
            _ => Ok(()),
        }
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(60)
    }
}

/// One request to this node's blockd.
fn control(ctx: &Ctx, request: &Request) -> Result<Reply, StepError> {
    let timeout = ctx.config.failover.step_timeout;
    Client::connect(&ctx.node.control_socket(), timeout)
        .and_then(|mut c| c.call(request))
        .map_err(|e| crate::commands::node::control_error(&e))
}

/// The file behind `/dev/loopN` (`/sys/block/loopN/loop/backing_file`), if it is attached.
fn loop_backing(dev: &Path) -> Option<PathBuf> {
    let name = dev.file_name()?.to_str()?;
    let text = fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
    Some(PathBuf::from(text.trim_end_matches('\n')))
}

/// True when `/dev/nbdN` is connected (the kernel shows the client's pid then).
fn nbd_connected(dev: &Path) -> bool {
    dev.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| Path::new(&format!("/sys/block/{n}/pid")).exists())
}

/// The first `/dev/nbdN` that no client uses.
fn free_nbd_device() -> Option<PathBuf> {
    (0..128)
        .map(|i| PathBuf::from(format!("/dev/nbd{i}")))
        .take_while(|d| d.exists())
        .find(|d| !nbd_connected(d))
}
