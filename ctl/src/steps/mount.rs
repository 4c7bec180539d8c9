//! `mount <vol>` (the volume's filesystem on its mount point) and `bind <target>` (a
//! directory of the mirror over a local path, `[[bind]]`), with their unmounts.
//!
//! Unmounting a volume escalates, since demote must not leave a filesystem mounted on a node
//! about to become Secondary (its writes would fail, and the peer cannot promote while we
//! hold the data): `umount`; if busy, SIGTERM every process holding a file, directory or
//! mapping on that filesystem (found by device number in `/proc`, this process excepted),
//! wait, `umount`; then SIGKILL, wait, `umount`. Then the copies of the filesystem that other
//! mount namespaces still hold are unmounted too, and the step fails while anything still
//! claims the device ([`super::elsewhere`]): detaching under a live filesystem loses its
//! unwritten data. A bind mount that is busy is detached lazily
//! instead: its holders are holders of the volume below it, which the volume's unmount (the
//! next undo) finds and stops.

use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use blockd::config::{BindConfig, Filesystem};
use nix::sys::signal::Signal;

use super::{attach, cmd::Cmd, elsewhere, mkdir, mount_point, proc::Proc, volume};
use crate::step::{Ctx, Step, StepError};

/// How long holders get after each signal before the next `umount`.
const HOLDER_GRACE: Duration = Duration::from_secs(5);

/// One line of `/proc/self/mountinfo` (proc(5)), the fields the steps use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// `major:minor` of the mounted filesystem.
    pub dev: (u32, u32),
    pub point: PathBuf,
    pub fstype: String,
    pub source: String,
}

/// Parses one mountinfo line: `ID PARENT MAJ:MIN ROOT POINT OPTS [OPTIONAL...] - FSTYPE
/// SOURCE SUPEROPTS`. Paths are octal-escaped (`\040` for a space).
pub(super) fn parse_mountinfo_line(line: &str) -> Option<MountEntry> {
    let mut fields = line.split(' ');
    let (_, _, dev) = (fields.next()?, fields.next()?, fields.next()?);
    let (maj, min) = dev.split_once(':')?;
    let point = unescape(fields.nth(1)?);
    let mut after = fields.skip_while(|f| *f != "-").skip(1);
    let fstype = after.next()?.to_string();
    let source = unescape(after.next()?);
    Some(MountEntry {
        dev: (maj.parse().ok()?, min.parse().ok()?),
        point: PathBuf::from(point),
        fstype,
        source,
    })
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let code = b.get(i + 1..i + 4).and_then(|o| std::str::from_utf8(o).ok());
        match code.and_then(|o| u8::from_str_radix(o, 8).ok()) {
            Some(c) if b[i] == b'\\' => {
                out.push(c);
                i += 4;
            }
            _ => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mounts of this process's mount namespace.
pub fn mounts() -> Vec<MountEntry> {
    fs::read_to_string("/proc/self/mountinfo")
        .map(|t| t.lines().filter_map(parse_mountinfo_line).collect())
        .unwrap_or_default()
}

/// `p` with its parent canonicalized but not `p` itself: stat of a dead FUSE mount point
/// fails, and it must still be found in mountinfo to be unmounted.
fn canon(p: &Path) -> PathBuf {
    match (p.parent().and_then(|d| d.canonicalize().ok()), p.file_name()) {
        (Some(dir), Some(name)) => dir.join(name),
        _ => p.to_path_buf(),
    }
}

/// The topmost mount at `p`, if `p` is a mount point.
pub fn mount_at(p: &Path) -> Option<MountEntry> {
    let p = canon(p);
    mounts().into_iter().rev().find(|m| m.point == p)
}

pub fn is_mount_point(p: &Path) -> bool {
    mount_at(p).is_some()
}

/// True when `dev` (`/dev/loop0`) is mounted anywhere in this namespace.
pub fn mounted_from(dev: &Path) -> bool {
    let dev = dev.to_string_lossy();
    mounts().iter().any(|m| m.source == dev)
}

/// Pids (other than this one) with a cwd, root, executable, open file or mapping on the
/// filesystem `dev`.
pub fn holders(dev: (u32, u32)) -> Vec<u32> {
    let me = std::process::id();
    let Ok(dir) = fs::read_dir("/proc") else { return Vec::new() };
    let mut pids: Vec<u32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&pid| pid != me && holds(pid, dev))
        .collect();
    pids.sort_unstable();
    pids
}

fn holds(pid: u32, dev: (u32, u32)) -> bool {
    let base = PathBuf::from(format!("/proc/{pid}"));
    let on_dev = |p: &Path| fs::metadata(p).is_ok_and(|m| split_dev(m.dev()) == dev);
    let fds = fs::read_dir(base.join("fd")).into_iter().flatten().flatten();
    ["cwd", "root", "exe"].iter().any(|l| on_dev(&base.join(l)))
        || fds.map(|e| e.path()).any(|p| on_dev(&p))
        || maps_dev(&base, dev)
}

/// A mapping of a file on `dev` in `/proc/PID/maps` (its 4th field, hex `MAJ:MIN`).
fn maps_dev(base: &Path, dev: (u32, u32)) -> bool {
    let want = format!("{:02x}:{:02x}", dev.0, dev.1);
    fs::read_to_string(base.join("maps"))
        .is_ok_and(|t| t.lines().any(|l| l.split_whitespace().nth(3) == Some(want.as_str())))
}

/// `major:minor` of the block device node `p`.
fn block_dev(p: &Path) -> Option<(u32, u32)> {
    use std::os::unix::fs::FileTypeExt;
    let m = fs::metadata(p).ok().filter(|m| m.file_type().is_block_device())?;
    Some(split_dev(m.rdev()))
}

fn split_dev(d: u64) -> (u32, u32) {
    (libc::major(d), libc::minor(d))
}

/// Unmounts `point` (mounted from `dev`), escalating to SIGTERM then SIGKILL of its holders.
fn unmount_escalating(ctx: &Ctx, point: &Path, dev: (u32, u32)) -> Result<(), StepError> {
    escalate(ctx, &Cmd::new("umount").arg(point), point, || !is_mount_point(point), dev)
}

/// Runs `umount` (an unmount of `point`) until `gone()`: again after SIGTERM, then SIGKILL, of
/// every process holding something on the filesystem `dev`, in whatever namespace.
pub(super) fn escalate(
    ctx: &Ctx,
    umount: &Cmd,
    point: &Path,
    gone: impl Fn() -> bool,
    dev: (u32, u32),
) -> Result<(), StepError> {
    let mut last = umount.output(ctx)?;
    for sig in [Signal::SIGTERM, Signal::SIGKILL] {
        if last.status.success() || gone() {
            return Ok(());
        }
        let pids = holders(dev);
        let names: Vec<String> =
            pids.iter().map(|p| format!("{p} ({})", super::proc::comm(*p))).collect();
        ctx.say(format_args!(
            "{} busy ({}); {sig} to holders: {}",
            point.display(),
            last.message(),
            names.join(", ")
        ));
        let procs: Vec<Proc> = pids.iter().map(|p| Proc::of(*p)).collect();
        procs.iter().for_each(|p| p.signal(sig));
        let end = Instant::now() + HOLDER_GRACE;
        while procs.iter().any(Proc::alive) && Instant::now() < end {
            thread::sleep(Duration::from_millis(50));
        }
        last = umount.output(ctx)?;
    }
    if last.status.success() || gone() {
        return Ok(());
    }
    Err(StepError::Command {
        what: umount.to_string(),
        detail: format!("{} (after SIGKILL of holders)", last.message()),
    })
}

/// `mount <vol>`.
#[derive(Debug)]
pub struct Mount {
    volume: String,
}

impl Mount {
    pub fn new(volume: impl Into<String>) -> Mount {
        Mount { volume: volume.into() }
    }

    fn fstype(&self, ctx: &Ctx) -> Result<&'static str, StepError> {
        match volume(ctx, &self.volume)?.filesystem {
            Some(Filesystem::Ext4) => Ok("ext4"),
            Some(Filesystem::Xfs) => Ok("xfs"),
            None => Err(StepError::Other(format!("volume {} has no filesystem", self.volume))),
        }
    }

    fn command(&self, ctx: &Ctx, dev: &Path) -> Result<Cmd, StepError> {
        let mut c = Cmd::new("mount").args(["-t", self.fstype(ctx)?]);
        if let Some(opts) = &volume(ctx, &self.volume)?.mount_options {
            c = c.args(["-o", opts]);
        }
        // Bounded by step-timeout: mounting replays the journal, which takes as long as it has
        // to (xfs under qemu TCG: over 60 s).
        Ok(c.arg(dev).arg(mount_point(ctx, &self.volume)?))
    }
}

impl Step for Mount {
    fn name(&self) -> String {
        format!("mount {}", self.volume)
    }

    fn describe(&self, ctx: &Ctx) -> String {
        let dev = attach::device(ctx, &self.volume).unwrap_or_else(|| PathBuf::from("<device>"));
        match self.command(ctx, &dev) {
            Ok(c) => c.to_string(),
            Err(e) => e.to_string(),
        }
    }

    fn check(&self, ctx: &Ctx) -> Result<bool, StepError> {
        let point = mount_point(ctx, &self.volume)?;
        let Some(dev) = attach::device(ctx, &self.volume) else { return Ok(false) };
        Ok(mount_at(&point).is_some_and(|m| Path::new(&m.source) == dev))
    }

    fn apply(&self, ctx: &Ctx) -> Result<(), StepError> {
        let point = mount_point(ctx, &self.volume)?;
        let dev = attach::device(ctx, &self.volume)
            .ok_or_else(|| StepError::Other(format!("volume {} is not attached", self.volume)))?;
        if let Some(m) = mount_at(&point) {
            let what = format!("{} is mounted on {} already", m.source, point.display());
            return Err(StepError::Other(what));
        }
        mkdir(&point)?;
        self.command(ctx, &dev)?.run(ctx).map(drop)
    }

    /// Unmounts what this step mounted: the attached device, or (when the attach record is
    /// gone) a mount of the configured filesystem type. Anything else there is left alone.
    fn undo(&self, ctx: &Ctx) -> Result<(), StepError> {
        let point = mount_point(ctx, &self.volume)?;
        let device = attach::device(ctx, &self.volume);
        if let Some(m) = mount_at(&point) {
            let ours = match &device {
                Some(dev) => Path::new(&m.source) == dev,
                None => m.fstype == self.fstype(ctx)?,
            };
            if ours {
                unmount_escalating(ctx, &point, m.dev)?;
                return elsewhere::release(ctx, Path::new(&m.source), m.dev);
            }
            ctx.say(format_args!(
                "{} is mounted from {}, not ours: left alone",
                point.display(),
                m.source
            ));
        }
        // Not mounted here (any more; an earlier undo may have stopped at a copy elsewhere):
        // the attached device must still be free before the detach that follows.
        match device.and_then(|d| Some((block_dev(&d)?, d))) {
            Some((dev, path)) => elsewhere::release(ctx, &path, dev),
            None => Ok(()),
        }
    }

    /// Room for the TERM and KILL rounds of an escalating unmount.
    fn timeout(&self) -> Duration {
        Duration::from_secs(60)
    }
}

/// `bind <target>`: `[[bind]]` entry `index`.
#[derive(Debug)]
pub struct Bind {
    index: usize,
    /// For `name()`, which has no configuration to look the target up in.
    label: String,
}

impl Bind {
    /// Named "bind INDEX" until [`Bind::named`] gives it its target.
    pub fn new(index: usize) -> Bind {
        Bind { index, label: index.to_string() }
    }

    /// Names the step after its target ("bind /var/lib/nfs"), for `--until` and the log.
    pub fn named(mut self, target: &Path) -> Bind {
        self.label = target.display().to_string();
        self
    }

    fn spec<'a>(&self, ctx: &'a Ctx) -> Result<&'a BindConfig, StepError> {
        ctx.config.bind.get(self.index).ok_or_else(|| {
            StepError::Other(format!("no bind[{}] in the configuration", self.index))
        })
    }
}

/// Same inode on the same device: `target` shows `source`.
fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

impl Step for Bind {
    fn name(&self) -> String {
        format!("bind {}", self.label)
    }

    fn describe(&self, ctx: &Ctx) -> String {
        match self.spec(ctx) {
            Ok(b) => format!(
                "mkdir -p {0} {1}; mount --bind {0} {1}",
                b.source.display(),
                b.target.display()
            ),
            Err(e) => e.to_string(),
        }
    }

    fn check(&self, ctx: &Ctx) -> Result<bool, StepError> {
        let b = self.spec(ctx)?;
        Ok(is_mount_point(&b.target) && same_file(&b.source, &b.target))
    }

    fn apply(&self, ctx: &Ctx) -> Result<(), StepError> {
        let b = self.spec(ctx)?;
        mkdir(&b.source)?;
        mkdir(&b.target)?;
        Cmd::new("mount").arg("--bind").arg(&b.source).arg(&b.target).run(ctx).map(drop)
    }

    fn undo(&self, ctx: &Ctx) -> Result<(), StepError> {
        let b = self.spec(ctx)?;
        if !(is_mount_point(&b.target) && same_file(&b.source, &b.target)) {
            return Ok(());
        }
        let out = Cmd::new("umount").arg(&b.target).output(ctx)?;
        if !out.status.success() {
            ctx.say(format_args!(
                "{} busy ({}): detaching lazily",
                b.target.display(),
                out.message()
            ));
            Cmd::new("umount").arg("-l").arg(&b.target).run(ctx)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::process::{Child, Command};

    use super::*;
    use crate::steps::{
        attach::{self, Attach},
        elsewhere,
        fsck::Fsck,
        testutil::{bin, ctx_for, require_root, sh},
    };

    #[test]
    fn mountinfo_lines_parse() {
        let line = "36 35 7:3 / /srv/my\\040db rw,noatime shared:1 master:2 - ext4 /dev/loop3 rw";
        let m = parse_mountinfo_line(line).unwrap();
        assert_eq!(m.dev, (7, 3));
        assert_eq!(m.point, Path::new("/srv/my db"));
        assert_eq!((m.fstype.as_str(), m.source.as_str()), ("ext4", "/dev/loop3"));
        assert!(parse_mountinfo_line("36 35 7:3 / /x rw").is_none());
    }

    /// A single-node blockd serving `vol` (ext4, mounted at `<dir>/mnt`, attached with
    /// nbdfuse), and on drop: every step undone, blockd killed by pid.
    struct Rig {
        ctx: Ctx,
        blockd: Child,
        mnt: PathBuf,
        dir: tempfile::TempDir,
    }

    impl Rig {
        fn new() -> Rig {
            require_root();
            // Under /var/tmp: /tmp may be tmpfs, where blockd cannot use direct I/O.
            let dir =
                tempfile::Builder::new().prefix("blockctl-steps-").tempdir_in("/var/tmp").unwrap();
            let (data, run, mnt) =
                (dir.path().join("data"), dir.path().join("run"), dir.path().join("mnt"));
            fs::create_dir_all(&data).unwrap();
            fs::create_dir_all(&run).unwrap();
            let toml = format!(
                "[node.a]\ndata-dir = \"{}\"\nrun-dir = \"{}\"\n[failover]\nattach = \"fuse\"\n\
                 [[volume]]\nname = \"vol\"\nsize = \"64MiB\"\nfilesystem = \"ext4\"\nmount = \"{}\"\n\
                 mount-options = \"noatime\"\n",
                data.display(),
                run.display(),
                mnt.display()
            );
            let config = dir.path().join("blockd.toml");
            fs::write(&config, &toml).unwrap();
            let log = fs::File::create(dir.path().join("blockd.log")).unwrap();
            let blockd = Command::new(bin("blockd"))
                .arg("--config")
                .arg(&config)
                .args(["--node", "a"])
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap();
            let rig = Rig { ctx: ctx_for(&toml), blockd, mnt, dir };
            let sock = run.join("vol.sock");
            let end = Instant::now() + Duration::from_secs(20);
            while !sock.exists() {
                assert!(Instant::now() < end, "blockd did not come up: {}", rig.log());
                thread::sleep(Duration::from_millis(50));
            }
            rig
        }

        fn log(&self) -> String {
            fs::read_to_string(self.dir.path().join("blockd.log")).unwrap_or_default()
        }
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            let _ = Mount::new("vol").undo(&self.ctx);
            let _ = Attach::new("vol").undo(&self.ctx);
            let _ = self.blockd.kill();
            let _ = self.blockd.wait();
        }
    }

    /// Processes holding the mount, killed by pid (with start time) on drop if the
    /// escalation under test has not ended them.
    struct Holders(Vec<Proc>, Vec<Child>);

    impl Drop for Holders {
        fn drop(&mut self) {
            self.0.iter().for_each(|p| p.signal(Signal::SIGKILL));
            // Reaped already by `Proc::alive` (ECHILD) unless the test failed first.
            self.1.iter_mut().for_each(|c| drop(c.wait()));
        }
    }

    /// A process with its cwd on the filesystem, and one that holds a file and ignores SIGTERM.
    fn holders_on(mnt: &Path) -> Holders {
        let polite = Command::new("sleep").arg("1000").current_dir(mnt).spawn().unwrap();
        let stubborn = Command::new("sh")
            .args(["-c", "trap '' TERM; exec 3<file; while :; do sleep 1; done"])
            .current_dir(mnt)
            .spawn()
            .unwrap();
        Holders(vec![Proc::of(polite.id()), Proc::of(stubborn.id())], vec![polite, stubborn])
    }

    #[test]
    fn attach_fsck_mount_and_escalating_undo() {
        let rig = Rig::new();
        let ctx = &rig.ctx;
        let (attach, fsck, mount) = (Attach::new("vol"), Fsck::new("vol"), Mount::new("vol"));
        assert!(!attach.check(ctx).unwrap());
        attach.apply(ctx).unwrap();
        assert!(attach.check(ctx).unwrap(), "attached: {:?}", attach::state(ctx, "vol"));
        let st = attach::state(ctx, "vol").unwrap();
        let dev = attach::device(ctx, "vol").unwrap();
        assert!(
            st.alive && st.pid().is_some() && dev.to_string_lossy().starts_with("/dev/loop"),
            "{st:?}"
        );

        // A blank device: e2fsck exits 8 (≥ 4), the promotion must stop.
        let err = fsck.apply(ctx).unwrap_err().to_string();
        assert!(err.contains("exit 8"), "{err}");
        sh(&format!("mkfs.ext4 -q {}", dev.display()));
        assert!(!fsck.check(ctx).unwrap());
        fsck.apply(ctx).unwrap();

        assert!(!mount.check(ctx).unwrap());
        mount.apply(ctx).unwrap();
        assert!(mount.check(ctx).unwrap() && fsck.check(ctx).unwrap(), "mounted, so fsck is done");
        assert!(mount_at(&rig.mnt).is_some_and(|m| m.fstype == "ext4"));
        fs::write(rig.mnt.join("file"), b"kept").unwrap();

        let holders_guard = holders_on(&rig.mnt);
        let (polite_p, stubborn_p) = (holders_guard.0[0], holders_guard.0[1]);
        thread::sleep(Duration::from_millis(200)); // the trap is set, the fd open
        let dev_id = mount_at(&rig.mnt).unwrap().dev;
        let found = holders(dev_id);
        assert!(found.contains(&polite_p.pid) && found.contains(&stubborn_p.pid), "{found:?}");
        mount.undo(ctx).unwrap();
        assert!(!is_mount_point(&rig.mnt) && !mount.check(ctx).unwrap());
        // (Proc::alive reaps them: their exit statuses are gone, their pids too.)
        assert!(!polite_p.alive(), "SIGTERM ends the polite holder");
        assert!(!stubborn_p.alive(), "SIGKILL ends the one that ignores SIGTERM");
        mount.undo(ctx).unwrap(); // nothing mounted: fine

        let nbdfuse = st.process.unwrap();
        attach.undo(ctx).unwrap();
        assert!(
            !nbdfuse.alive() && attach::state(ctx, "vol").is_none() && !attach.check(ctx).unwrap()
        );
        // The kernel releases the loop device when its last opener closes (udev may still
        // be probing it): give it a moment. Another test may attach the freed device to its
        // own file at once, so only our file counts.
        let backing = PathBuf::from(format!(
            "/sys/block/{}/loop/backing_file",
            dev.file_name().unwrap().to_string_lossy()
        ));
        let end = Instant::now() + Duration::from_secs(5);
        let ours = st.file.clone().unwrap();
        let still_ours =
            || fs::read_to_string(&backing).is_ok_and(|b| Path::new(b.trim_end()) == ours);
        while still_ours() && Instant::now() < end {
            thread::sleep(Duration::from_millis(50));
        }
        assert!(!still_ours(), "{} still attached", dev.display());
        attach.undo(ctx).unwrap(); // nothing attached: fine

        // Attached again, the data written before is there: the mirror kept it.
        attach.apply(ctx).unwrap();
        mount.apply(ctx).unwrap();
        assert_eq!(fs::read(rig.mnt.join("file")).unwrap(), b"kept");
    }

    /// The filesystem's st_dev while mounted at `mnt`.
    fn fs_dev(mnt: &Path) -> (u32, u32) {
        mount_at(mnt).expect("mounted").dev
    }

    /// Attached, formatted, mounted, with "kept" in `file` (in the page cache only: ext4
    /// allocates and writes it later).
    fn mounted_with_a_file(rig: &Rig) -> (Attach, Mount, PathBuf) {
        let ctx = &rig.ctx;
        let (attach, mount) = (Attach::new("vol"), Mount::new("vol"));
        attach.apply(ctx).unwrap();
        let dev = attach::device(ctx, "vol").unwrap();
        sh(&format!("mkfs.ext4 -q {}", dev.display()));
        mount.apply(ctx).unwrap();
        fs::write(rig.mnt.join("file"), b"kept").unwrap();
        (attach, mount, dev)
    }

    /// Detached, attached and mounted again: the file must be whole.
    fn assert_kept_after_reattach(rig: &Rig, attach: &Attach, mount: &Mount) {
        attach.undo(&rig.ctx).unwrap();
        attach.apply(&rig.ctx).unwrap();
        mount.apply(&rig.ctx).unwrap();
        assert_eq!(fs::read(rig.mnt.join("file")).unwrap(), b"kept", "data lost on the detach");
    }

    /// A process in a mount namespace created while the volume was mounted holds a private
    /// copy of the mount: our umount succeeds, the filesystem lives on there with the file's
    /// data unwritten. The undo unmounts that copy too (through the process), the device is
    /// free before the detach, and the file is there after attaching again.
    #[test]
    fn a_copy_in_another_mount_namespace_is_unmounted_before_the_detach() {
        let rig = Rig::new();
        let (attach, mount, dev) = mounted_with_a_file(&rig);
        let fsdev = fs_dev(&rig.mnt);
        let mut unshare = Command::new("unshare");
        let copy = unshare.args(["--mount", "--propagation", "private", "sleep", "1000"]);
        let copy = copy.spawn().unwrap();
        let pid = copy.id();
        let _guard = Holders(vec![Proc::of(pid)], vec![copy]);
        let end = Instant::now() + Duration::from_secs(10);
        while !elsewhere::mounts_elsewhere(fsdev).contains_key(&pid) {
            assert!(Instant::now() < end, "the copy never showed in /proc/{pid}/mountinfo");
            thread::sleep(Duration::from_millis(20));
        }
        mount.undo(&rig.ctx).unwrap();
        assert!(!elsewhere::mounts_elsewhere(fsdev).contains_key(&pid), "the copy is mounted");
        assert!(!elsewhere::claimed(&dev), "{} still claimed after the undo", dev.display());
        assert_kept_after_reattach(&rig, &attach, &mount);
    }

    /// A mount namespace no process runs in (kept by a bind-mounted namespace file, as test
    /// harnesses and `ip netns`-style tools do) holds a copy that /proc cannot show: the undo
    /// fails, also when repeated, and nothing is detached; once the copy is unmounted there,
    /// the undo passes and the file survives the detach.
    #[test]
    fn a_copy_no_process_runs_in_stops_the_undo_before_the_detach() {
        let rig = Rig::new();
        let (attach, mount, dev) = mounted_with_a_file(&rig);
        let pin = rig.dir.path().join("pin");
        fs::create_dir(&pin).unwrap();
        sh(&format!(
            "mount --bind {0} {0} && mount --make-private {0} && touch {0}/ns && \
             unshare --mount={0}/ns --propagation private true",
            pin.display()
        ));
        let _pinned = Pinned(pin.clone(), rig.mnt.clone());
        for _ in 0..2 {
            let err = mount.undo(&rig.ctx).unwrap_err().to_string();
            assert!(err.contains("still in use after its unmount"), "{err}");
            assert!(attach.check(&rig.ctx).unwrap() && elsewhere::claimed(&dev));
        }
        sh(&format!("nsenter --mount={}/ns umount {}", pin.display(), rig.mnt.display()));
        mount.undo(&rig.ctx).unwrap();
        assert_kept_after_reattach(&rig, &attach, &mount);
    }

    /// A namespace pinned at `<dir>/ns` with a copy of the mount at `.1`: released on drop.
    struct Pinned(PathBuf, PathBuf);

    impl Drop for Pinned {
        fn drop(&mut self) {
            let (d, m) = (self.0.display(), self.1.display());
            let _ = Command::new("sh")
                .arg("-c")
                .arg(format!("nsenter --mount={d}/ns umount -l {m}; umount {d}/ns; umount -l {d}"))
                .status();
        }
    }

    #[test]
    fn bind_mounts_and_unmounts() {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        let (src, tgt) = (dir.path().join("mirror/state"), dir.path().join("var/lib/nfs"));
        let toml = format!(
            "[node.a]\n[[volume]]\nname = \"v\"\nsize = \"1MiB\"\nfilesystem = \"ext4\"\n\
             mount = \"{}\"\n\
             [[bind]]\nsource = \"{}\"\ntarget = \"{}\"\n",
            dir.path().join("mirror").display(),
            src.display(),
            tgt.display()
        );
        let ctx = ctx_for(&toml);
        let bind = Bind::new(0).named(&tgt);
        assert_eq!(bind.name(), format!("bind {}", tgt.display()));
        assert!(!bind.check(&ctx).unwrap());
        bind.apply(&ctx).unwrap();
        let guard = scopeguard(&tgt);
        assert!(bind.check(&ctx).unwrap());
        fs::write(tgt.join("x"), b"1").unwrap();
        assert_eq!(fs::read(src.join("x")).unwrap(), b"1", "the target shows the source");
        bind.undo(&ctx).unwrap();
        assert!(!bind.check(&ctx).unwrap() && !is_mount_point(&tgt));
        bind.undo(&ctx).unwrap();
        drop(guard);
    }

    /// Lazily unmounts `p` on drop if still mounted (a failed assertion mid-test).
    fn scopeguard(p: &Path) -> impl Drop + '_ {
        struct G<'a>(&'a Path);
        impl Drop for G<'_> {
            fn drop(&mut self) {
                if is_mount_point(self.0) {
                    let _ = Command::new("umount").arg("-l").arg(self.0).status();
                }
            }
        }
        G(p)
    }
}
