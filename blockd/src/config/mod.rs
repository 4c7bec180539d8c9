//! The configuration: one TOML file, identical on both nodes (design.md §9), plus `BLOCKD_*`
//! environment overrides, read with figment and checked by [`Config::validate`].
//!
//! Environment overrides: `BLOCKD_` + the key path, `__` between levels, `_` for `-`:
//! `BLOCKD_CLUSTER__PEER_TIMEOUT=5s`, `BLOCKD_NODE__ALPHA__DATA_DIR=/x`,
//! `BLOCKD_NBD__MAX_CONNECTIONS=4`. Names are lower-cased, so a node section meant to be
//! overridden should have a lower-case name without `_`. Arrays of tables (`[[volume]]`,
//! `[[service]]`) are not reachable this way. `BLOCKD_LOG` is the log filter, not a key.
//!
//! Every struct denies unknown keys: a typo must stop the daemon, not silently fall back to a
//! default. Errors name the key and the value (`volume[0].size = "12XB": not a size ...`).

mod agent;
mod console;
mod failover;
mod metrics;
mod resync;
mod validate;
pub mod values;
mod witness;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use figment::{
    providers::{Env, Format, Toml},
    Figment,
};
use serde::Deserialize;

pub use agent::{AgentConfig, Failback};
pub use console::ConsoleConfig;
pub use failover::{AttachMode, BindConfig, FailoverConfig};
pub use metrics::MetricsConfig;
pub use resync::{ChecksumMode, ResyncConfig};
pub use validate::Problem;
pub use values::{ByteSize, HealthCheck, IpCidr};
pub use witness::LeaseConfig;

use crate::{
    nbd::Limits,
    storage::{Allocate, DirectIo, EngineKind},
};

/// Where `blockd` and `blockctl` look for the file when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/blockd/blockd.toml";

/// Prefix of the environment overrides.
pub const ENV_PREFIX: &str = "BLOCKD_";

/// Variables under [`ENV_PREFIX`] that are not configuration keys (lower-cased, prefix cut).
const ENV_NOT_KEYS: &[&str] = &["log"];

/// Errors loading the configuration or picking this node in it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid configuration {}:{}", path.display(), validate::List(problems))]
    Invalid { path: PathBuf, problems: Vec<Problem> },
    #[error("node {name:?} ({how}) is not in {}; its nodes are: {}", path.display(), nodes.join(", "))]
    UnknownNode { name: String, how: &'static str, path: PathBuf, nodes: Vec<String> },
    #[error("cannot read this host's name (pass --node NAME)")]
    Hostname(#[source] std::io::Error),
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// Settings both nodes share; optional for a single-node file.
    #[serde(default)]
    pub cluster: ClusterConfig,
    /// One section per node, keyed by hostname (or by `--node`); at most two.
    #[serde(default)]
    pub node: BTreeMap<String, NodeConfig>,
    /// The volumes, each served on every node that has the file.
    #[serde(default)]
    pub volume: Vec<VolumeConfig>,
    /// How backing files are accessed.
    #[serde(default)]
    pub storage: StorageConfig,
    /// Limits of the NBD server.
    #[serde(default)]
    pub nbd: NbdConfig,
    /// Process-wide settings of the daemon.
    #[serde(default)]
    pub daemon: DaemonConfig,
    /// The dirty bitmap, the activity log, and resync's use of the link.
    #[serde(default)]
    pub resync: ResyncConfig,
    /// How this node uses the lease witness of `cluster.witness`.
    #[serde(default)]
    pub lease: LeaseConfig,
    /// What `blockctl agent` does besides failing over (failback).
    #[serde(default)]
    pub agent: AgentConfig,
    /// The virtual IP that follows the primary (used by `blockctl promote`/`demote`).
    #[serde(default)]
    pub vip: Option<VipConfig>,
    /// How `blockctl promote`/`demote` attach volumes, bound steps and announce the VIP.
    #[serde(default)]
    pub failover: FailoverConfig,
    /// Bind mounts made after the volumes are mounted (state that must live on the mirror,
    /// such as `/var/lib/nfs`), in this order; unmounted in reverse.
    #[serde(default)]
    pub bind: Vec<BindConfig>,
    /// Services started on the primary after the mounts and the VIP, in this order.
    #[serde(default)]
    pub service: Vec<ServiceConfig>,
    /// The Prometheus endpoint (`GET /metrics`).
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// The web console (`[console] listen`, token).
    #[serde(default)]
    pub console: ConsoleConfig,
    /// The file this was read from, for messages.
    #[serde(skip)]
    pub source: PathBuf,
}

/// `[cluster]`: what both nodes must agree on.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ClusterConfig {
    /// Shared secret of the replication link (mode 0600); required when there are two nodes.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// During a rotation, the secret being replaced (mode 0600): accepted from the peer as
    /// well as `secret-file`, never dialed with. A missing file is skipped. Read at every
    /// handshake, like `secret-file`.
    #[serde(default)]
    pub previous_secret_file: Option<PathBuf>,
    /// "on": every frame of the link (and of the witness protocol) encrypted and
    /// authenticated; "off": authenticated only, data in clear, for links already protected.
    #[serde(default)]
    pub encryption: Encryption,
    /// A peer silent this long is declared gone (design.md §6).
    #[serde(default = "default_peer_timeout", deserialize_with = "values::duration")]
    pub peer_timeout: Duration,
    /// Lease witness "ADDR:PORT" (design.md §7); absent means no automatic promotion.
    #[serde(default)]
    pub witness: Option<SocketAddr>,
    /// Payload bytes of the peer's requests this node holds at once (writes being applied);
    /// beyond it the link stops reading and the peer waits. At least 32MiB.
    #[serde(default = "default_in_flight_bytes")]
    pub max_in_flight_bytes: ByteSize,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            secret_file: None,
            previous_secret_file: None,
            encryption: Encryption::On,
            peer_timeout: default_peer_timeout(),
            witness: None,
            max_in_flight_bytes: default_in_flight_bytes(),
        }
    }
}

/// See [`ClusterConfig::encryption`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Encryption {
    #[default]
    On,
    Off,
}

impl Encryption {
    /// What the link's records do.
    pub fn protection(self) -> crate::replication::record::Protection {
        match self {
            Encryption::On => crate::replication::record::Protection::Encrypt,
            Encryption::Off => crate::replication::record::Protection::AuthOnly,
        }
    }
}

fn default_in_flight_bytes() -> ByteSize {
    ByteSize(128 << 20)
}

fn default_peer_timeout() -> Duration {
    Duration::from_secs(2)
}

/// `[node.NAME]`: where one node keeps its files and listens.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NodeConfig {
    /// "ADDR:PORT" this node listens on for its peer; required when there are two nodes.
    #[serde(default)]
    pub replication: Option<SocketAddr>,
    /// Holds `<volume>.img` (the default backing, created sparse) and `<volume>.meta`.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Holds `<volume>.sock` (NBD) and `control.sock`.
    #[serde(default = "default_run_dir")]
    pub run_dir: PathBuf,
    /// Also serve NBD over TCP on "ADDR:PORT" (all volumes, no TLS: keep it on a trusted net).
    #[serde(default)]
    pub nbd_tcp: Option<SocketAddr>,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/blockd")
}

fn default_run_dir() -> PathBuf {
    PathBuf::from("/run/blockd")
}

/// `[[volume]]`: one mirrored block device.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct VolumeConfig {
    /// The NBD export name and the stem of its files; letters, digits, `.`, `_`, `-`.
    pub name: String,
    /// Size in bytes ("20GiB", "512MiB", 4096); a multiple of 512.
    pub size: ByteSize,
    /// A disk or file to use instead of `<data-dir>/<name>.img`.
    #[serde(default)]
    pub backing: Option<PathBuf>,
    /// The filesystem on the volume, for fsck and mount on promotion.
    #[serde(default)]
    pub filesystem: Option<Filesystem>,
    /// Where the primary mounts the filesystem.
    #[serde(default)]
    pub mount: Option<PathBuf>,
    /// Options passed to mount with `-o`, e.g. "noatime".
    #[serde(default)]
    pub mount_options: Option<String>,
}

/// Filesystems `blockctl promote` knows how to check and mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Filesystem {
    /// Checked with `e2fsck -p` before mounting.
    Ext4,
    /// Not checked: mounting replays the log.
    Xfs,
}

/// `[storage]`: how the backing is accessed.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct StorageConfig {
    /// "auto" (io_uring, else sync), "io-uring" or "sync".
    #[serde(default)]
    pub engine: EngineKind,
    /// "auto" (direct unless the backing cannot), "on" or "off".
    #[serde(default)]
    pub direct_io: DirectIo,
    /// How a missing backing file is created: "full" (fallocate, the default) or "sparse".
    #[serde(default)]
    pub allocate: Allocate,
}

/// `[nbd]`: limits of the NBD server, so that no client can exhaust the daemon.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NbdConfig {
    /// NBD clients per volume in the transmission phase.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Time a client has to finish the handshake.
    #[serde(default = "default_handshake_timeout", deserialize_with = "values::duration")]
    pub handshake_timeout: Duration,
    /// Largest READ/WRITE payload; at least 32MiB, which the Linux client sends.
    #[serde(default = "default_max_request")]
    pub max_request: ByteSize,
    /// Requests one connection may have in flight before the server stops reading.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: u32,
    /// Payload bytes one connection may have in flight before the server stops reading (a
    /// request larger than this still runs, alone).
    #[serde(default = "default_in_flight_bytes")]
    pub max_in_flight_bytes: ByteSize,
}

impl Default for NbdConfig {
    fn default() -> Self {
        NbdConfig {
            max_connections: default_max_connections(),
            handshake_timeout: default_handshake_timeout(),
            max_request: default_max_request(),
            max_in_flight: default_max_in_flight(),
            max_in_flight_bytes: default_in_flight_bytes(),
        }
    }
}

fn default_max_connections() -> u32 {
    16
}
fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_request() -> ByteSize {
    ByteSize(32 << 20)
}
fn default_max_in_flight() -> u32 {
    256
}

impl NbdConfig {
    /// The server's limits. `validate()` has checked that `max-request` fits in 32 bits.
    pub fn limits(&self) -> Limits {
        Limits {
            max_request: u32::try_from(self.max_request.bytes()).unwrap_or(u32::MAX),
            max_connections: self.max_connections,
            handshake_timeout: self.handshake_timeout,
            max_in_flight: self.max_in_flight as usize,
            max_in_flight_bytes: usize::try_from(self.max_in_flight_bytes.bytes())
                .unwrap_or(usize::MAX),
        }
    }
}

/// `[daemon]`: defences against the same-host memory-pressure deadlock (design.md §3).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DaemonConfig {
    /// `mlockall(MCL_CURRENT|MCL_FUTURE)`: never page out the daemon.
    #[serde(default = "yes")]
    pub mlock: bool,
    /// `prctl(PR_SET_IO_FLUSHER)`: allocations may not recurse into I/O reclaim.
    #[serde(default = "yes")]
    pub io_flusher: bool,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig { mlock: true, io_flusher: true }
    }
}

fn yes() -> bool {
    true
}

/// `[vip]`: the address clients use, held by the primary.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct VipConfig {
    /// Address and prefix length, "10.0.0.100/24".
    pub address: IpCidr,
    /// The interface that carries it, "eth0".
    pub interface: String,
}

/// `[[service]]`: started on promotion, stopped on demotion, in reverse order.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServiceConfig {
    /// A short name for logs and status.
    pub name: String,
    /// A systemd unit, "mariadb.service"; or give `start` and `stop` instead.
    #[serde(default)]
    pub unit: Option<String>,
    /// Shell command that starts the service, where there is no systemd.
    #[serde(default)]
    pub start: Option<String>,
    /// Shell command that stops the service.
    #[serde(default)]
    pub stop: Option<String>,
    /// "tcp://HOST:PORT" or "exec:COMMAND": healthy once it succeeds.
    #[serde(default)]
    pub check: Option<HealthCheck>,
    /// The service's main process: a stop that does not end it within `timeout` escalates to
    /// SIGTERM then SIGKILL of this pid, so a hung daemon cannot keep the mount busy.
    #[serde(default)]
    pub pidfile: Option<PathBuf>,
    /// Deadline of the start (until `check` passes) and of the stop; absent means
    /// `[failover] step-timeout`. Use [`ServiceConfig::deadline`].
    #[serde(default, deserialize_with = "values::duration_opt")]
    pub timeout: Option<Duration>,
    /// Wait for `check` after starting (default true). False is for services that block until
    /// something else answers (k3s waits for its datastore): started, not waited on.
    #[serde(default = "yes")]
    pub wait: bool,
}

impl ServiceConfig {
    /// The start and stop deadline: `timeout`, else the failover step timeout.
    pub fn deadline(&self, failover: &FailoverConfig) -> Duration {
        self.timeout.unwrap_or(failover.step_timeout)
    }
}

impl Config {
    /// Reads `path`, applies `BLOCKD_*` overrides and validates the result.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_with_env(path, ENV_PREFIX)
    }

    /// [`Config::load`] with another environment prefix, so tests do not race each other.
    fn load_with_env(path: &Path, prefix: &str) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        let env = Env::prefixed(prefix)
            .ignore(ENV_NOT_KEYS)
            .split("__")
            .map(|k| k.as_str().replace('_', "-").into());
        let figment = Figment::new().merge(Toml::string(&text)).merge(env);
        let mut config: Config = figment.extract().map_err(|e| ConfigError::Invalid {
            path: path.to_path_buf(),
            problems: validate::from_figment(e, &figment),
        })?;
        config.source = path.to_path_buf();
        config.validate()?;
        Ok(config)
    }

    /// True when the file has one node section: no peer, this node is always Primary.
    pub fn is_single_node(&self) -> bool {
        self.node.len() == 1
    }

    /// This node: `name` if given, else this host's name (full, then up to the first dot).
    /// A file with a single node section needs neither: that node is this one.
    pub fn local_node(&self, name: Option<&str>) -> Result<LocalNode, ConfigError> {
        let unknown = |name: &str, how| ConfigError::UnknownNode {
            name: name.to_string(),
            how,
            path: self.source.clone(),
            nodes: self.node.keys().cloned().collect(),
        };
        if let Some(name) = name {
            return self.node_named(name).ok_or_else(|| unknown(name, "from --node"));
        }
        let host = hostname().map_err(ConfigError::Hostname)?;
        let short = host.split('.').next().unwrap_or(&host);
        if let Some(node) = self.node_named(&host).or_else(|| self.node_named(short)) {
            return Ok(node);
        }
        match self.node.iter().next() {
            Some((only, settings)) if self.is_single_node() => {
                Ok(LocalNode { name: only.clone(), settings: settings.clone() })
            }
            _ => Err(unknown(&host, "this host's name; pass --node NAME")),
        }
    }

    fn node_named(&self, name: &str) -> Option<LocalNode> {
        self.node
            .get(name)
            .map(|settings| LocalNode { name: name.to_string(), settings: settings.clone() })
    }

    /// The volume called `name`.
    pub fn volume(&self, name: &str) -> Option<&VolumeConfig> {
        self.volume.iter().find(|v| v.name == name)
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            replication: None,
            data_dir: default_data_dir(),
            run_dir: default_run_dir(),
            nbd_tcp: None,
        }
    }
}

/// The node this process runs as, and the paths derived from its section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalNode {
    pub name: String,
    pub settings: NodeConfig,
}

impl LocalNode {
    /// The volume's backing: `backing` if given, else `<data-dir>/<name>.img`.
    pub fn backing(&self, volume: &VolumeConfig) -> PathBuf {
        volume.backing.clone().unwrap_or_else(|| backing_in(&self.settings, &volume.name))
    }

    /// The NBD unix socket of a volume: `<run-dir>/<name>.sock`.
    pub fn nbd_socket(&self, volume: &str) -> PathBuf {
        nbd_socket_in(&self.settings, volume)
    }

    /// The control socket: `<run-dir>/control.sock`.
    pub fn control_socket(&self) -> PathBuf {
        control_socket_in(&self.settings)
    }
}

fn backing_in(node: &NodeConfig, volume: &str) -> PathBuf {
    node.data_dir.join(format!("{volume}.img"))
}

fn nbd_socket_in(node: &NodeConfig, volume: &str) -> PathBuf {
    node.run_dir.join(format!("{volume}.sock"))
}

fn control_socket_in(node: &NodeConfig) -> PathBuf {
    node.run_dir.join("control.sock")
}

/// This host's name as the kernel has it (`uname -n`).
fn hostname() -> std::io::Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")?;
    Ok(name.trim().to_string())
}

#[cfg(test)]
mod tests {
    use std::{fs, io::Write};

    use super::*;

    pub(super) const SINGLE: &str = r#"
        [node.alpha]
        data-dir = "/srv/data"
        run-dir = "/srv/run"

        [[volume]]
        name = "vol"
        size = "64MiB"
    "#;

    /// Writes `text` to a temp file and loads it, with an environment prefix nobody sets.
    pub(super) fn load(text: &str) -> Result<Config, ConfigError> {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        Config::load_with_env(f.path(), "BLOCKDTEST_UNSET_")
    }

    #[test]
    fn single_node_defaults_and_derived_paths() {
        let c = load(SINGLE).unwrap();
        assert!(c.is_single_node());
        assert_eq!(c.cluster.peer_timeout, Duration::from_secs(2));
        assert_eq!(c.nbd.limits().max_request, 32 << 20);
        assert_eq!(c.nbd.limits().max_connections, 16);
        assert_eq!(c.nbd.limits().max_in_flight, 256);
        assert_eq!(c.nbd.handshake_timeout, Duration::from_secs(10));
        assert!(c.daemon.mlock && c.daemon.io_flusher);
        assert_eq!(c.storage.engine, EngineKind::Auto);
        let node = c.local_node(Some("alpha")).unwrap();
        let vol = c.volume("vol").unwrap();
        assert_eq!(vol.size, ByteSize(64 << 20));
        assert_eq!(node.backing(vol), Path::new("/srv/data/vol.img"));
        assert_eq!(node.nbd_socket("vol"), Path::new("/srv/run/vol.sock"));
        assert_eq!(node.control_socket(), Path::new("/srv/run/control.sock"));
    }

    #[test]
    fn encryption_defaults_on_and_takes_off_and_previous_secret() {
        let c = load(SINGLE).unwrap();
        assert_eq!(c.cluster.encryption, Encryption::On);
        assert_eq!(c.cluster.previous_secret_file, None);
        let text = format!(
            "[cluster]\nencryption = \"off\"\nprevious-secret-file = \"/etc/blockd/old\"\n{SINGLE}"
        );
        let c = load(&text).unwrap();
        assert_eq!(
            c.cluster.encryption.protection(),
            crate::replication::record::Protection::AuthOnly
        );
        assert_eq!(c.cluster.previous_secret_file.as_deref(), Some(Path::new("/etc/blockd/old")));
        let err = load(&format!("[cluster]\nencryption = \"maybe\"\n{SINGLE}")).unwrap_err();
        assert!(err.to_string().contains("encryption"), "{err}");
    }

    #[test]
    fn single_node_file_needs_no_node_name() {
        let c = load(SINGLE).unwrap();
        assert_eq!(c.local_node(None).unwrap().name, "alpha");
    }

    #[test]
    fn explicit_backing_wins() {
        let c = load(&format!("{SINGLE}\nbacking = \"/dev/vdb\"")).unwrap();
        let node = c.local_node(None).unwrap();
        assert_eq!(node.backing(&c.volume[0]), Path::new("/dev/vdb"));
    }

    #[test]
    fn missing_file_names_the_path() {
        let path = Path::new("/nonexistent/blockd-test/blockd.toml");
        let err = Config::load(path).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }));
        assert!(err.to_string().contains("/nonexistent/blockd-test/blockd.toml"), "{err}");
    }

    #[test]
    fn unknown_node_lists_the_nodes() {
        let c = load(SINGLE).unwrap();
        let err = c.local_node(Some("gamma")).unwrap_err().to_string();
        assert!(err.contains("\"gamma\"") && err.contains("alpha"), "{err}");
    }

    #[test]
    fn env_overrides_nested_keys() {
        // A prefix of its own: the environment is shared by every test thread.
        let prefix = "BLOCKDTEST_ENV_";
        std::env::set_var(format!("{prefix}CLUSTER__PEER_TIMEOUT"), "5s");
        std::env::set_var(format!("{prefix}NODE__ALPHA__DATA_DIR"), "/x");
        std::env::set_var(format!("{prefix}NBD__MAX_CONNECTIONS"), "4");
        std::env::set_var(format!("{prefix}DAEMON__MLOCK"), "false");
        std::env::set_var(format!("{prefix}LOG"), "debug");
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(SINGLE.as_bytes()).unwrap();
        let c = Config::load_with_env(f.path(), prefix).unwrap();
        assert_eq!(c.cluster.peer_timeout, Duration::from_secs(5));
        assert_eq!(c.node["alpha"].data_dir, Path::new("/x"));
        assert_eq!(c.node["alpha"].run_dir, Path::new("/srv/run"), "untouched keys stay");
        assert_eq!(c.nbd.max_connections, 4);
        assert!(!c.daemon.mlock);
    }

    #[test]
    fn env_override_is_validated_too() {
        let prefix = "BLOCKDTEST_ENVBAD_";
        std::env::set_var(format!("{prefix}CLUSTER__PEER_TIMEOUT"), "soon");
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(SINGLE.as_bytes()).unwrap();
        let err = Config::load_with_env(f.path(), prefix).unwrap_err().to_string();
        assert!(err.contains("cluster.peer-timeout") && err.contains("\"soon\""), "{err}");
        assert!(err.contains("BLOCKDTEST_ENVBAD_"), "says it came from the environment: {err}");
    }

    #[test]
    fn stray_env_variable_is_named() {
        let prefix = "BLOCKDTEST_STRAY_";
        std::env::set_var(format!("{prefix}BINARY"), "/usr/bin/x");
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(SINGLE.as_bytes()).unwrap();
        let err = Config::load_with_env(f.path(), prefix).unwrap_err().to_string();
        assert!(err.contains("binary = \"/usr/bin/x\": unknown key"), "{err}");
        assert!(err.contains("BLOCKDTEST_STRAY_"), "{err}");
    }

    #[test]
    fn example_file_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/blockd.toml.example");
        let c = Config::load_with_env(&path, "BLOCKDTEST_UNSET_").unwrap();
        assert_eq!(c.node.len(), 2);
        assert_eq!(c.volume.len(), 2);
        assert_eq!(c.volume[0].size, ByteSize(20 << 30));
        assert_eq!(c.volume[1].filesystem, Some(Filesystem::Xfs));
        assert_eq!(c.vip.as_ref().map(|v| v.address.prefix), Some(24));
        assert_eq!(c.service.len(), 2);
        assert_eq!(c.failover, FailoverConfig::default(), "the example shows the defaults");
        assert_eq!(c.bind.len(), 1);
        assert_eq!(c.service[0].deadline(&c.failover), Duration::from_secs(60));
        assert!(c.service[0].pidfile.is_some() && c.service[0].wait);
        let beta = c.local_node(Some("beta")).unwrap();
        assert_eq!(beta.control_socket(), Path::new("/run/blockd/control.sock"));
        assert!(!fs::read_to_string(&path).unwrap().is_empty());
    }
}
