//! NFS on the mirror: nfs-ganesha (userspace NFSv4, VFS FSAL; this kernel has no nfsd)
//! exporting a directory of the mirrored ext4 with a fixed fsid, its recovery state on the
//! mirror through `[[bind]]`, and the client side through libnfs's `nfs-cp`.
//!
//! Ganesha's config lives on the mirrored filesystem itself, so both nodes start the same
//! server without a file of their own; its log and pid file go to the node's /run/ganesha.

use std::{fs, time::Duration};

use super::{lan::VIP, mariadb::failover_toml, Alpha, Cluster, Spec};

pub const MOUNT: &str = "/srv/nfs";
pub const VOLUME: &str = "nfs";
pub const SIZE: &str = "64MiB";
/// The exported directory and its NFSv4 pseudo path.
pub const EXPORT_DIR: &str = "/srv/nfs/export";
pub const PSEUDO: &str = "/export";
/// Ganesha's recovery state: on the mirror, bound to where ganesha looks for it.
pub const STATE_SOURCE: &str = "/srv/nfs/.nfs-state";
pub const STATE_TARGET: &str = "/var/lib/nfs";
const CONF: &str = "/srv/nfs/ganesha.conf";

/// NFSv4 only, no rpcbind/NLM/rquota; short lease and grace so a failover test does not
/// wait 90 s; `Filesystem_id` fixed, so handles stay valid on the other node.
const GANESHA_CONF: &str = r#"NFS_CORE_PARAM { Protocols = 4; NFS_Port = 2049; Enable_NLM = false; Enable_RQUOTA = false; }
NFSV4 { RecoveryBackend = fs; Lease_Lifetime = 5; Grace_Period = 5; }
NFS_KRB5 { Active_krb5 = false; }
EXPORT {
    Export_Id = 1; Path = /srv/nfs/export; Pseudo = /export;
    Access_Type = RW; Squash = No_Root_Squash; Protocols = 4; Transports = TCP;
    SecType = sys; Filesystem_id = 100.1;
    FSAL { Name = VFS; }
}
"#;

/// The shared config of the NFS test: volume "nfs" (ext4 on /srv/nfs), the state bind,
/// ganesha as the service.
pub fn configure(spec: &mut Spec) {
    spec.volume = VOLUME.to_string();
    spec.size = SIZE.to_string();
    spec.volume_toml = format!("filesystem = \"ext4\"\nmount = \"{MOUNT}\"\n");
    spec.extra_toml = failover_toml()
        + &format!(
            "[[bind]]\nsource = \"{STATE_SOURCE}\"\ntarget = \"{STATE_TARGET}\"\n\n\
             [[service]]\nname = \"nfs\"\n\
             start = \"ganesha.nfsd -f {CONF} -L /run/ganesha/ganesha.log \
             -p /run/ganesha/ganesha.pid -N NIV_EVENT </dev/null >/dev/null 2>&1\"\n\
             stop = \"kill -TERM $(cat /run/ganesha/ganesha.pid)\"\n\
             pidfile = \"/run/ganesha/ganesha.pid\"\ncheck = \"tcp://127.0.0.1:2049\"\n\
             timeout = \"60s\"\n\n"
        );
}

/// A started, in-sync cluster (both Secondary) whose volume holds the export directory,
/// the state directory and ganesha's config.
pub fn cluster(test: &str) -> Cluster {
    for tool in ["ganesha.nfsd", "nfs-cp", "nbdfuse", "mkfs.ext4"] {
        crate::require(tool);
    }
    let mut c = Cluster::with_lan(test, SIZE, configure);
    c.start(Alpha);
    c.start(super::Beta);
    let conf = GANESHA_CONF.replace('\'', "'\\''");
    let body = format!("mkdir -p {EXPORT_DIR} {STATE_SOURCE}\nprintf '%s' '{conf}' > {CONF}");
    c.prepare_filesystem(Alpha, MOUNT, &body);
    c
}

/// `nfs://VIP/export/<name>?version=4`.
pub fn url(name: &str) -> String {
    format!("nfs://{VIP}{PSEUDO}/{name}?version=4")
}

/// Copies `data` to `name` on the export through the VIP with `nfs-cp` from the client,
/// retrying for up to `timeout` (a server in its grace period refuses OPEN); Err with the
/// last output.
pub fn put(c: &Cluster, name: &str, data: &[u8], timeout: Duration) -> Result<(), String> {
    let local = c.dir().join(format!("nfs-put-{name}"));
    fs::write(&local, data).expect("write local file");
    retry(timeout, || {
        let out = c.client(&format!("nfs-cp '{}' '{}'", local.display(), url(name)));
        out.status.success().then_some(()).ok_or_else(|| format!("{out}"))
    })
}

/// Reads `name` from the export through the VIP with `nfs-cp`, retrying like [`put`].
pub fn get(c: &Cluster, name: &str, timeout: Duration) -> Result<Vec<u8>, String> {
    let local = c.dir().join(format!("nfs-get-{name}"));
    retry(timeout, || {
        let _ = fs::remove_file(&local);
        let out = c.client(&format!("nfs-cp '{}' '{}'", url(name), local.display()));
        match out.status.success() {
            true => fs::read(&local).map_err(|e| format!("{e}")),
            false => Err(format!("{out}")),
        }
    })
}

fn retry<T>(timeout: Duration, mut f: impl FnMut() -> Result<T, String>) -> Result<T, String> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if std::time::Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}
