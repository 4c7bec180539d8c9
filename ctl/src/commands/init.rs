//! `blockctl init`: does this node have what blockd and the failover plan need? Read-only:
//! it changes nothing, it says what is there and what to do about what is not.
//!
//! One line per check, in this order:
//!
//! | check          | required when                        | looks at                                  |
//! |----------------|--------------------------------------|-------------------------------------------|
//! | attach         | a volume has a mount                 | `/sys/module/nbd` (kernel), + nbd-client  |
//! |                |                                      | (nbd-client), `/dev/fuse` + nbdfuse,      |
//! |                |                                      | fusermount3 (fuse)                        |
//! | tools          | per use                              | losetup, mount, umount, e2fsck (ext4),    |
//! |                |                                      | xfs_repair (xfs, warn), systemctl, ip     |
//! | control socket | always                               | answers (blockd running) or free          |
//! | ports          | replication, nbd-tcp                 | free, or held by a process named blockd   |
//! | secret         | two nodes                            | exists, not empty, mode 0600              |
//! | data-dir       | always                               | writable, room for the backings (allocate)|
//! | backing        | a volume names one                   | exists                                    |
//! | service        | each `[[service]]`                   | unit installed / start command on PATH;   |
//! |                |                                      | a unit also kept from starting at boot    |
//! | io_uring       | `[storage] engine`                   | `io_uring_setup(2)` succeeds              |
//!
//! Levels: `ok`; `warn` (works, but not as it should in production: the FUSE path, a unit
//! that starts at boot by itself, io_uring falling back to sync); `missing` (blockd or
//! promote will fail): exit code 1 when there is at least one.

use std::{
    fmt, fs, io,
    net::{SocketAddr, TcpListener},
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    time::Duration,
};

use blockd::{
    config::{AttachMode, Filesystem},
    control::{Client, ClientError},
    storage::Allocate,
};

use crate::step::Ctx;

/// Where the kernel shows a loaded nbd module.
const NBD_MODULE: &str = "/sys/module/nbd";

/// Unit directories, highest precedence first (systemd.unit(5)).
const UNIT_DIRS: [&str; 4] = [
    "/etc/systemd/system",
    "/run/systemd/system",
    "/lib/systemd/system",
    "/usr/lib/systemd/system",
];

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Ok,
    Warn,
    Missing,
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Check {
    pub level: Level,
    pub what: String,
    /// What was found, and for warn/missing what to do.
    pub detail: String,
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.level {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Missing => "missing",
        };
        write!(f, "{level:<8}{}: {}", self.what, self.detail)
    }
}

fn check(level: Level, what: impl Into<String>, detail: impl Into<String>) -> Check {
    Check { level, what: what.into(), detail: detail.into() }
}

/// `blockctl init`: prints every check; true when nothing required is missing.
pub fn init(ctx: &Ctx) -> bool {
    let checks = run(ctx);
    for c in &checks {
        println!("{c}");
    }
    let missing = checks.iter().filter(|c| c.level == Level::Missing).count();
    let warned = checks.iter().filter(|c| c.level == Level::Warn).count();
    println!("{} checks: {missing} missing, {warned} warnings", checks.len());
    missing == 0
}

/// Every check, in report order.
pub fn run(ctx: &Ctx) -> Vec<Check> {
    let mut checks = attach(ctx);
    checks.extend(tools(ctx));
    checks.extend(ports(ctx));
    checks.extend(secret(ctx));
    checks.extend(data_dir(ctx));
    for s in &ctx.config.service {
        checks.extend(service(&s.name, s.unit.as_deref(), s.start.as_deref()));
    }
    checks.push(io_uring(ctx));
    checks
}

/// Whether `tool` is an executable on PATH (plus the sbin directories a root login has).
pub fn which(tool: &str) -> Option<PathBuf> {
    if tool.contains('/') {
        return is_executable(Path::new(tool)).then(|| PathBuf::from(tool));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from);
    std::env::split_paths(&path).chain(extra).map(|d| d.join(tool)).find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn tool(name: &str, why: &str, package: &str, level_if_absent: Level) -> Check {
    match which(name) {
        Some(p) => check(Level::Ok, name, format!("{} ({why})", p.display())),
        None => {
            check(level_if_absent, name, format!("not found ({why}): apt-get install {package}"))
        }
    }
}

/// The attach path the plan will take, and what it needs. Nothing when no volume is mounted.
fn attach(ctx: &Ctx) -> Vec<Check> {
    if !ctx.config.volume.iter().any(|v| v.mount.is_some()) {
        return vec![];
    }
    let module = Path::new(NBD_MODULE).exists();
    let mode = ctx.config.failover.attach;
    let mut out = Vec::new();
    match (mode, module) {
        (_, true) => {
            out.push(check(Level::Ok, "kernel nbd", format!("module loaded ({NBD_MODULE})")))
        }
        (AttachMode::Kernel | AttachMode::NbdClient, false) => out.push(check(
            Level::Missing,
            "kernel nbd",
            "module not loaded and [failover] attach needs it: modprobe nbd, and add nbd to \
             /etc/modules-load.d/nbd.conf",
        )),
        (_, false) => out.push(check(
            Level::Warn,
            "kernel nbd",
            "module not loaded: attach = \"auto\" uses FUSE (nbdfuse + loop); on a server, \
             modprobe nbd and add nbd to /etc/modules-load.d/nbd.conf",
        )),
    }
    match mode.resolve_with(module) {
        // blockd attaches the device itself over netlink: no tool needed.
        AttachMode::Kernel => return out,
        AttachMode::NbdClient => {
            out.push(tool("nbd-client", "kernel attach", "nbd-client", Level::Missing));
            return out;
        }
        _ => {}
    }
    out.push(if Path::new("/dev/fuse").exists() {
        check(Level::Ok, "fuse", "/dev/fuse")
    } else {
        check(Level::Missing, "fuse", "/dev/fuse missing: modprobe fuse")
    });
    out.push(tool("nbdfuse", "FUSE attach", "libnbd-bin", Level::Missing));
    out.push(tool("fusermount3", "FUSE detach", "fuse3", Level::Missing));
    out.push(tool("losetup", "loop device on the nbdfuse file", "util-linux", Level::Missing));
    out
}

/// The programs promote runs, each once, by what the configuration uses.
fn tools(ctx: &Ctx) -> Vec<Check> {
    let c = &ctx.config;
    let fs_of =
        |f: Filesystem| c.volume.iter().any(|v| v.mount.is_some() && v.filesystem == Some(f));
    let mut out = Vec::new();
    if c.volume.iter().any(|v| v.mount.is_some()) {
        out.push(tool("mount", "promote", "mount", Level::Missing));
        out.push(tool("umount", "demote", "mount", Level::Missing));
    }
    if fs_of(Filesystem::Ext4) {
        out.push(tool("e2fsck", "fsck of ext4 volumes", "e2fsprogs", Level::Missing));
    }
    if fs_of(Filesystem::Xfs) {
        out.push(tool("xfs_repair", "repairs an xfs volume by hand", "xfsprogs", Level::Warn));
    }
    if c.service.iter().any(|s| s.unit.is_some()) {
        out.push(tool("systemctl", "[[service]] units", "systemd", Level::Missing));
    }
    if c.vip.is_some() {
        out.push(tool(
            "ip",
            "to inspect the VIP; blockctl sets it over netlink",
            "iproute2",
            Level::Warn,
        ));
    }
    out
}

/// The control socket, then every TCP port blockd listens on.
fn ports(ctx: &Ctx) -> Vec<Check> {
    let sock = ctx.node.control_socket();
    let running = match Client::connect(&sock, Duration::from_secs(2)) {
        Ok(_) => true,
        Err(ClientError::NotRunning { .. }) => false,
        Err(e) => {
            return vec![check(
                Level::Missing,
                "control socket",
                format!("{}: {e}", sock.display()),
            )]
        }
    };
    let mut out = vec![check(
        Level::Ok,
        "control socket",
        if running {
            format!("{}: blockd is running", sock.display())
        } else {
            format!("{}: free (blockd not running)", sock.display())
        },
    )];
    let settings = &ctx.node.settings;
    if !ctx.config.is_single_node() {
        if let Some(addr) = settings.replication {
            out.push(port("replication", addr));
        }
    }
    if let Some(addr) = settings.nbd_tcp {
        out.push(port("nbd-tcp", addr));
    }
    out
}

/// `addr` can be bound, or is held by a process named blockd.
fn port(what: &str, addr: SocketAddr) -> Check {
    let what = format!("{what} {addr}");
    match TcpListener::bind(addr) {
        Ok(_) => check(Level::Ok, what, "free"),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => match listener_owner(addr.port()) {
            Some((pid, comm)) if comm == "blockd" => {
                check(Level::Ok, what, format!("held by blockd (pid {pid})"))
            }
            Some((pid, comm)) => check(
                Level::Missing,
                what,
                format!("in use by {comm} (pid {pid}): stop it or choose another port"),
            ),
            None => check(Level::Missing, what, "in use by another process: ss -ltnp"),
        },
        Err(e) if e.kind() == io::ErrorKind::AddrNotAvailable => check(
            Level::Missing,
            what,
            format!(
                "{} is not an address of this host: check [node.NAME] and the interface",
                addr.ip()
            ),
        ),
        Err(e) => check(Level::Missing, what, format!("cannot bind: {e}")),
    }
}

/// The process listening on TCP `port`: /proc/net/tcp{,6} give the socket's inode, the
/// /proc/PID/fd links give its owner.
fn listener_owner(port: u16) -> Option<(u32, String)> {
    let inode = ["/proc/net/tcp", "/proc/net/tcp6"].iter().find_map(|f| {
        let text = fs::read_to_string(f).ok()?;
        text.lines().skip(1).find_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            let local_port = cols.get(1)?.rsplit(':').next()?;
            let listening = cols.get(3) == Some(&"0A");
            (listening && u16::from_str_radix(local_port, 16).ok()? == port)
                .then(|| cols.get(9).map(|s| s.to_string()))?
        })
    })?;
    let target = format!("socket:[{inode}]");
    fs::read_dir("/proc").ok()?.flatten().find_map(|p| {
        let pid: u32 = p.file_name().to_str()?.parse().ok()?;
        let holds = fs::read_dir(p.path().join("fd"))
            .ok()?
            .flatten()
            .any(|fd| fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target.as_str()));
        holds.then(|| {
            let comm = fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            (pid, comm.trim().to_string())
        })
    })
}

/// The shared secret of a two-node setup: there, not empty, mode 0600.
fn secret(ctx: &Ctx) -> Vec<Check> {
    if ctx.config.is_single_node() {
        return vec![];
    }
    let Some(path) = ctx.config.cluster.secret_file.as_ref() else {
        return vec![check(Level::Missing, "secret", "[cluster] secret-file is not set")];
    };
    let what = format!("secret {}", path.display());
    let c = match fs::metadata(path) {
        Err(e) => check(
            Level::Missing,
            what,
            format!(
                "{e}: create it with the same bytes on both nodes (head -c 32 /dev/urandom \
                     | base64 > FILE; chmod 600 FILE)"
            ),
        ),
        Ok(m) if m.mode() & 0o777 != 0o600 => check(
            Level::Missing,
            what,
            format!("mode {:04o}, must be 0600: chmod 600", m.mode() & 0o777),
        ),
        Ok(m) if m.len() == 0 => check(Level::Missing, what, "empty"),
        Ok(_) => check(Level::Ok, what, "mode 0600"),
    };
    vec![c]
}

/// The data directory is writable and has room for the backing files it will hold; a
/// configured backing exists.
fn data_dir(ctx: &Ctx) -> Vec<Check> {
    let dir = &ctx.node.settings.data_dir;
    let what = format!("data-dir {}", dir.display());
    let existing = dir.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    let probe = existing.join(format!(".blockctl-init-{}", std::process::id()));
    let writable = fs::write(&probe, b"").and_then(|()| fs::remove_file(&probe));
    let mut out = Vec::new();
    if let Err(e) = writable {
        out.push(check(
            Level::Missing,
            what,
            format!("{} is not writable: {e}", existing.display()),
        ));
        return out;
    }
    // Backing files blockd creates in full take their size at once; sparse ones (existing, or
    // created with `allocate = "sparse"`) grow up to it.
    let full = ctx.config.storage.allocate == Allocate::Full;
    let (mut create, mut grow) = (0u64, 0u64);
    for v in &ctx.config.volume {
        let backing = ctx.node.backing(v);
        match &v.backing {
            Some(b) if !b.exists() => out.push(check(
                Level::Missing,
                format!("backing {}", b.display()),
                format!("volume {}: not found", v.name),
            )),
            Some(b) => out.push(check(
                Level::Ok,
                format!("backing {}", b.display()),
                format!("volume {}", v.name),
            )),
            None if full && !backing.exists() => create += v.size.bytes(),
            None => {
                let used = fs::metadata(&backing).map(|m| m.blocks() * 512).unwrap_or(0);
                grow += v.size.bytes().saturating_sub(used);
            }
        }
    }
    let free = nix::sys::statvfs::statvfs(existing)
        .map(|s| s.blocks_available() * s.fragment_size())
        .unwrap_or(0);
    out.insert(0, space_check(what, free, create, grow));
    out
}

/// Room for `create` bytes of backing files allocated in full now and `grow` bytes that
/// sparse ones may still take, in `free` bytes.
fn space_check(what: String, free: u64, create: u64, grow: u64) -> Check {
    let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
    let detail = format!(
        "writable, {:.1} GiB free, {:.1} GiB to allocate, sparse backing files may grow by \
         {:.1} GiB",
        gib(free),
        gib(create),
        gib(grow)
    );
    if free < create {
        let why = "blockd cannot create the backing files (allocate = \"full\")";
        return check(Level::Missing, what, format!("{detail}: {why}"));
    }
    if free - create < grow {
        let why = "a write that finds the filesystem full fails the disk (Failed; the \
                   Primary serves through its peer, a Secondary stops mirroring)";
        return check(Level::Warn, what, format!("{detail}: {why}"));
    }
    check(Level::Ok, what, detail)
}

/// A `[[service]]`: its unit installed and kept from starting at boot, or its start
/// command's program on PATH.
fn service(name: &str, unit: Option<&str>, start: Option<&str>) -> Vec<Check> {
    let what = format!("service {name}");
    if let Some(unit) = unit {
        let Some(file) = unit_file(unit) else {
            return vec![check(Level::Missing, what, format!("unit {unit} is not installed"))];
        };
        let mut out = vec![check(Level::Ok, what.clone(), format!("{}", file.display()))];
        out.push(match boot_guard(unit) {
            Some(conf) => check(
                Level::Ok,
                format!("{what} at boot"),
                format!("only on a mounted mirror ({})", conf.display()),
            ),
            None => check(
                Level::Warn,
                format!("{what} at boot"),
                format!(
                    "{unit} may start by itself on this node: install blockd's drop-in \
                         (systemd/dropins/{unit}.d) or systemctl disable {unit}"
                ),
            ),
        });
        return out;
    }
    let program = start.and_then(|s| s.split_whitespace().next()).unwrap_or("");
    match which(program) {
        Some(p) => vec![check(Level::Ok, what, format!("start command runs {}", p.display()))],
        None => vec![check(
            Level::Missing,
            what,
            format!("start command's program {program:?} not found"),
        )],
    }
}

/// The unit file of `unit`, from the first unit directory that has it.
fn unit_file(unit: &str) -> Option<PathBuf> {
    UNIT_DIRS.iter().map(|d| Path::new(d).join(unit)).find(|p| p.exists())
}

/// A drop-in of `unit` with a `ConditionPathIsMountPoint=`, which keeps it from starting
/// anywhere but on the primary (systemd/dropins/).
fn boot_guard(unit: &str) -> Option<PathBuf> {
    UNIT_DIRS.iter().find_map(|d| {
        let dir = Path::new(d).join(format!("{unit}.d"));
        fs::read_dir(dir).ok()?.flatten().map(|e| e.path()).find(|p| {
            p.extension().is_some_and(|x| x == "conf")
                && fs::read_to_string(p).is_ok_and(|t| {
                    t.lines().any(|l| l.trim_start().starts_with("ConditionPathIsMountPoint="))
                })
        })
    })
}

/// io_uring: what `[storage] engine` asks of it.
fn io_uring(ctx: &Ctx) -> Check {
    use blockd::storage::EngineKind;
    let engine = ctx.config.storage.engine;
    if engine == EngineKind::Sync {
        return check(Level::Ok, "io_uring", "not used ([storage] engine = \"sync\")");
    }
    match io_uring_works() {
        Ok(()) => check(Level::Ok, "io_uring", "available"),
        Err(e) if engine == EngineKind::IoUring => check(
            Level::Missing,
            "io_uring",
            format!(
                "{e}, and [storage] engine = \"io-uring\": use \"auto\", or allow io_uring \
                     (sysctl kernel.io_uring_disabled=0, seccomp)"
            ),
        ),
        Err(e) => check(
            Level::Warn,
            "io_uring",
            format!("{e}: blockd falls back to the slower sync engine"),
        ),
    }
}

/// Sets up (and closes) a one-entry ring, as the io_uring engine would.
fn io_uring_works() -> io::Result<()> {
    // struct io_uring_params is 120 bytes; zeroed means "no flags".
    let mut params = [0u8; 120];
    // SAFETY: io_uring_setup(2) reads and writes the 120-byte params buffer, which we own and
    // which outlives the call; it returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is the ring we just created and nothing else refers to it.
    unsafe { libc::close(fd as libc::c_int) };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::steps::testutil::ctx_for;

    #[test]
    fn lines_have_one_level_word_each() {
        let c = check(Level::Missing, "secret /x", "mode 0644");
        assert_eq!(c.to_string(), "missing secret /x: mode 0644");
        assert_eq!(check(Level::Ok, "a", "b").to_string(), "ok      a: b");
    }

    #[test]
    fn sync_engine_needs_no_io_uring() {
        let ctx = ctx_for(
            "[node.a]\n[storage]\nengine = \"sync\"\n[[volume]]\nname = \"v\"\nsize = 4096\n",
        );
        assert_eq!(io_uring(&ctx).level, Level::Ok);
        assert!(attach(&ctx).is_empty(), "no mounted volume: no attach check");
    }

    /// Issue 17: a sparse backing the free space cannot fill is a warning (the disk would
    /// fail at the write that finds the filesystem full); one blockd cannot allocate in full
    /// is missing.
    #[test]
    fn backing_space_is_checked_against_the_allocation_mode() {
        let gib = 1u64 << 30;
        let c = space_check("d".into(), 2 * gib, 0, 3 * gib);
        assert_eq!(c.level, Level::Warn);
        assert!(c.detail.contains("fails the disk"), "{}", c.detail);
        assert_eq!(space_check("d".into(), 2 * gib, 3 * gib, 0).level, Level::Missing);
        assert_eq!(space_check("d".into(), 4 * gib, 3 * gib, gib).level, Level::Ok);
        assert_eq!(space_check("d".into(), 4 * gib, 3 * gib, 2 * gib).level, Level::Warn);
    }

    #[test]
    fn a_missing_unit_is_missing() {
        let c = service("db", Some("no-such-unit-for-blockctl.service"), None);
        assert_eq!((c.len(), c[0].level), (1, Level::Missing));
        let c = service("db", None, Some("no-such-program-for-blockctl --flag &"));
        assert_eq!(c[0].level, Level::Missing);
        let c = service("db", None, Some("sh -c true"));
        assert_eq!(c[0].level, Level::Ok);
    }
}
