//! Checks of a parsed [`Config`] that serde cannot express, and the rendering of every problem
//! (ours and figment's) as `key = value: reason`, so the operator can find the line to fix.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    path::Path,
};

use figment::{error::Kind, value::Value, Figment};

use super::{
    backing_in, control_socket_in, nbd_socket_in, ByteSize, Config, ConfigError, NodeConfig,
    ServiceConfig, VolumeConfig,
};

/// One thing wrong with the configuration: the key (`volume[0].size`), the value as written
/// (when there is one) and why it is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub value: Option<String>,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.key.is_empty(), &self.value) {
            (true, _) => write!(f, "{}", self.reason),
            (false, Some(v)) => write!(f, "{} = {v}: {}", self.key, self.reason),
            (false, None) => write!(f, "{}: {}", self.key, self.reason),
        }
    }
}

/// Displays problems after a colon: inline when there is one, one per line otherwise.
pub(super) struct List<'a>(pub &'a [Problem]);

impl fmt::Display for List<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            [one] => write!(f, " {one}"),
            many => many.iter().try_for_each(|p| write!(f, "\n  {p}")),
        }
    }
}

/// Longest path a unix socket address holds (`sun_path` is 108 bytes with the final NUL).
const MAX_SOCKET_PATH: usize = 107;

/// The Linux client sends READ and WRITE requests of up to 32 MiB (NBD-NOTES §1); a smaller
/// limit would fail them.
const MIN_MAX_REQUEST: u64 = 32 << 20;

/// One request's buffer is allocated whole: cap it so one client cannot ask for gigabytes.
const MAX_MAX_REQUEST: u64 = 1 << 30;

/// The replication link's budget holds at least one maximal frame, and more than the resync's
/// window (8 MiB): resync blocks waiting for the target's decision must not fill it while the
/// reply that decides sits unread behind them.
const MIN_LINK_IN_FLIGHT: u64 = crate::replication::wire::MAX_DATA as u64;

/// The largest payload of a replication frame.
const WIRE_MAX_DATA: u64 = crate::replication::wire::MAX_DATA as u64;

/// Smallest per-connection NBD budget.
const MIN_NBD_IN_FLIGHT: u64 = 1 << 20;

/// Interface names are at most IFNAMSIZ - 1 bytes.
const MAX_IFNAME: usize = 15;

/// Volume names that would collide with the daemon's own files in run-dir.
const RESERVED_NAMES: &[&str] = &["control"];

impl Config {
    /// Checks what serde cannot: relations between keys, ranges, paths. Every problem is
    /// reported, not just the first.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let problems = self.problems();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid { path: self.source.clone(), problems })
        }
    }

    fn problems(&self) -> Vec<Problem> {
        let mut p = Problems::default();
        self.check_nodes(&mut p);
        self.check_cluster(&mut p);
        self.check_volumes(&mut p);
        self.check_nbd(&mut p);
        self.resync.check(&mut p);
        self.check_vip(&mut p);
        self.check_services(&mut p);
        self.check_failover(&mut p);
        self.check_binds(&mut p);
        self.check_metrics(&mut p);
        self.check_console(&mut p);
        self.check_lease(&mut p);
        self.check_agent(&mut p);
        p.0
    }

    fn check_nodes(&self, p: &mut Problems) {
        let names: Vec<&str> = self.node.keys().map(String::as_str).collect();
        match names.len() {
            0 => p.add("node", None, "no [node.NAME] section: add one per server"),
            1 | 2 => {}
            n => p.add("node", Some(names.join(", ")), format!("{n} nodes; blockd mirrors two")),
        }
        let mut seen = HashMap::new();
        for (name, node) in &self.node {
            let key = |k: &str| format!("node.{name}.{k}");
            if let Err(why) = safe_name(name) {
                p.add(format!("node.{name}"), Some(quote(name)), why);
            }
            match node.replication {
                None if names.len() == 2 => {
                    p.add(key("replication"), None, "required when the file has two nodes")
                }
                Some(addr) => {
                    if let Some(other) = seen.insert(addr, name) {
                        p.add(
                            key("replication"),
                            Some(quote(addr)),
                            format!("also node {other}'s"),
                        );
                    }
                    if node.nbd_tcp == Some(addr) {
                        p.add(key("nbd-tcp"), Some(quote(addr)), "same address as replication");
                    }
                }
                None => {}
            }
            p.absolute(&key("data-dir"), &node.data_dir);
            p.absolute(&key("run-dir"), &node.run_dir);
            self.check_socket_paths(p, name, node);
        }
    }

    /// Unix socket paths are silently unusable beyond 107 bytes: refuse them here.
    fn check_socket_paths(&self, p: &mut Problems, name: &str, node: &NodeConfig) {
        let longest = self
            .volume
            .iter()
            .map(|v| nbd_socket_in(node, &v.name))
            .chain([control_socket_in(node)])
            .max_by_key(|s| s.as_os_str().len());
        if let Some(sock) = longest.filter(|s| s.as_os_str().len() > MAX_SOCKET_PATH) {
            let why = format!(
                "socket {} is {} bytes, more than a unix socket address holds ({MAX_SOCKET_PATH})",
                sock.display(),
                sock.as_os_str().len()
            );
            p.add(format!("node.{name}.run-dir"), Some(quote_path(&node.run_dir)), why);
        }
    }

    fn check_cluster(&self, p: &mut Problems) {
        let c = &self.cluster;
        if c.peer_timeout.is_zero() {
            p.add("cluster.peer-timeout", Some("\"0s\"".into()), "must be more than 0");
        }
        at_least(p, "cluster.max-in-flight-bytes", c.max_in_flight_bytes, MIN_LINK_IN_FLIGHT);
        match &c.secret_file {
            Some(f) => p.absolute("cluster.secret-file", f),
            None if self.node.len() == 2 => {
                p.add("cluster.secret-file", None, "required when the file has two nodes")
            }
            None => {}
        }
    }

    fn check_volumes(&self, p: &mut Problems) {
        if self.volume.is_empty() {
            p.add("volume", None, "no [[volume]] section: nothing to serve");
        }
        let mut names = HashMap::new();
        let mut mounts = HashMap::new();
        for (i, v) in self.volume.iter().enumerate() {
            let key = |k: &str| format!("volume[{i}].{k}");
            if let Err(why) = volume_name(&v.name) {
                p.add(key("name"), Some(quote(&v.name)), why);
            }
            if let Some(j) = names.insert(v.name.as_str(), i) {
                p.add(key("name"), Some(quote(&v.name)), format!("also the name of volume[{j}]"));
            }
            check_size(p, &key("size"), v.size);
            if let Some(b) = &v.backing {
                p.absolute(&key("backing"), b);
            }
            check_mount(p, i, v);
            if let Some(j) = v.mount.as_ref().and_then(|m| mounts.insert(m, i)) {
                p.add(
                    key("mount"),
                    v.mount.as_deref().map(quote_path),
                    format!("also volume[{j}]'s"),
                );
            }
        }
        for node in self.node.values() {
            self.check_backings_distinct(p, node);
        }
    }

    /// Two volumes on one backing would overwrite each other's data.
    fn check_backings_distinct(&self, p: &mut Problems, node: &NodeConfig) {
        let mut seen = BTreeMap::new();
        for (i, v) in self.volume.iter().enumerate() {
            let path = v.backing.clone().unwrap_or_else(|| backing_in(node, &v.name));
            if let Some(j) = seen.insert(path.clone(), i) {
                if self.volume[j].name == v.name {
                    continue; // A duplicate name, reported as such.
                }
                let why = format!("volume[{j}] uses the same backing");
                let problem = Problem {
                    key: format!("volume[{i}].backing"),
                    value: Some(quote_path(&path)),
                    reason: why,
                };
                if !p.0.contains(&problem) {
                    p.0.push(problem);
                }
            }
        }
    }

    fn check_nbd(&self, p: &mut Problems) {
        let n = &self.nbd;
        if n.max_connections == 0 {
            p.add("nbd.max-connections", Some("0".into()), "must be at least 1");
        }
        if n.max_in_flight == 0 {
            p.add("nbd.max-in-flight", Some("0".into()), "must be at least 1");
        }
        if n.handshake_timeout.is_zero() {
            p.add("nbd.handshake-timeout", Some("\"0s\"".into()), "must be more than 0");
        }
        at_least(p, "nbd.max-in-flight-bytes", n.max_in_flight_bytes, MIN_NBD_IN_FLIGHT);
        let req = n.max_request.bytes();
        if !(MIN_MAX_REQUEST..=MAX_MAX_REQUEST).contains(&req) {
            let why = format!(
                "must be from {} (what the Linux client sends) to {}",
                ByteSize(MIN_MAX_REQUEST),
                ByteSize(MAX_MAX_REQUEST)
            );
            p.add("nbd.max-request", Some(show_size(n.max_request)), why);
        } else if self.node.len() == 2 && req > WIRE_MAX_DATA {
            // A larger WRITE could not be mirrored: the link would drop it (and the peer).
            let why = format!(
                "must be at most {}, the largest write the replication link carries, with two nodes",
                ByteSize(WIRE_MAX_DATA)
            );
            p.add("nbd.max-request", Some(show_size(n.max_request)), why);
        }
    }

    fn check_vip(&self, p: &mut Problems) {
        let Some(vip) = &self.vip else { return };
        let i = &vip.interface;
        if i.is_empty() || i.len() > MAX_IFNAME || i.contains(['/', ' ', '\t', '\n', ':']) {
            let why =
                format!("not an interface name (1 to {MAX_IFNAME} bytes, no '/', ':' or spaces)");
            p.add("vip.interface", Some(quote(i)), why);
        }
    }

    fn check_services(&self, p: &mut Problems) {
        let mut names = HashMap::new();
        for (i, s) in self.service.iter().enumerate() {
            let key = format!("service[{i}].name");
            if let Err(why) = safe_name(&s.name) {
                p.add(&key, Some(quote(&s.name)), why);
            }
            if let Some(j) = names.insert(s.name.as_str(), i) {
                p.add(&key, Some(quote(&s.name)), format!("also the name of service[{j}]"));
            }
            check_service_commands(p, i, s);
            super::failover::check_service_extras(p, i, s);
        }
    }
}

/// A service is either a systemd unit or a start/stop pair, never both, never neither.
fn check_service_commands(p: &mut Problems, i: usize, s: &ServiceConfig) {
    let key = |k: &str| format!("service[{i}].{k}");
    for (k, v) in [("unit", &s.unit), ("start", &s.start), ("stop", &s.stop)] {
        if v.as_deref().is_some_and(|v| v.trim().is_empty()) {
            p.add(key(k), Some("\"\"".into()), "must not be empty");
        }
    }
    match (&s.unit, &s.start, &s.stop) {
        (Some(u), Some(_), _) | (Some(u), _, Some(_)) => {
            p.add(key("unit"), Some(quote(u)), "give either unit or start and stop, not both")
        }
        (None, None, None) => p.add(key("unit"), None, "missing: give unit, or start and stop"),
        (None, Some(_), None) => p.add(key("stop"), None, "missing: start needs a stop command"),
        (None, None, Some(_)) => p.add(key("start"), None, "missing: stop needs a start command"),
        _ => {}
    }
}

fn check_size(p: &mut Problems, key: &str, size: ByteSize) {
    if size.bytes() == 0 {
        p.add(key, Some(show_size(size)), "must be more than 0");
    } else if size.bytes() % 512 != 0 {
        p.add(key, Some(show_size(size)), "must be a multiple of 512 bytes");
    }
}

fn check_mount(p: &mut Problems, i: usize, v: &VolumeConfig) {
    let key = |k: &str| format!("volume[{i}].{k}");
    if let Some(m) = &v.mount {
        p.absolute(&key("mount"), m);
        if v.filesystem.is_none() {
            p.add(key("mount"), Some(quote_path(m)), "needs filesystem = \"ext4\" or \"xfs\"");
        }
    }
    if let Some(o) = &v.mount_options {
        if v.mount.is_none() {
            p.add(key("mount-options"), Some(quote(o)), "given without mount");
        } else if o.trim().is_empty() || o.contains(char::is_whitespace) {
            p.add(key("mount-options"), Some(quote(o)), "expected comma-separated options");
        }
    }
}

/// File names the daemon derives from a volume's name must stay inside their directory.
fn volume_name(name: &str) -> Result<(), String> {
    safe_name(name)?;
    if RESERVED_NAMES.contains(&name) {
        return Err(format!("reserved: run-dir already has {name}.sock"));
    }
    Ok(())
}

/// 1 to 64 of letters, digits, `.`, `_`, `-`, starting with a letter or digit: safe as a file
/// name, an NBD export name and a log field.
fn safe_name(name: &str) -> Result<(), String> {
    let ok_start = name.starts_with(|c: char| c.is_ascii_alphanumeric());
    let ok_chars = name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if name.len() > 64 || !ok_start || !ok_chars {
        return Err("not a safe name: 1 to 64 letters, digits, '.', '_' or '-', starting with \
                    a letter or digit"
            .into());
    }
    Ok(())
}

#[derive(Default)]
pub(super) struct Problems(pub(super) Vec<Problem>);

impl Problems {
    pub(super) fn add(
        &mut self,
        key: impl Into<String>,
        value: Option<String>,
        reason: impl Into<String>,
    ) {
        self.0.push(Problem { key: key.into(), value, reason: reason.into() });
    }

    /// The daemon runs with `/` as its working directory: relative paths would surprise.
    pub(super) fn absolute(&mut self, key: &str, path: &Path) {
        if !path.is_absolute() {
            self.add(key, Some(quote_path(path)), "must be an absolute path");
        }
    }
}

pub(super) fn quote(v: impl fmt::Display) -> String {
    format!("{:?}", v.to_string())
}

pub(super) fn quote_path(p: &Path) -> String {
    quote(p.display())
}

/// A byte budget: from `min` to 4 GiB - 1 (a semaphore takes at most u32 permits at once).
fn at_least(p: &mut Problems, key: &str, value: ByteSize, min: u64) {
    let max = u64::from(u32::MAX);
    if !(min..=max).contains(&value.bytes()) {
        let why = format!("must be from {} to {}", ByteSize(min), ByteSize(max));
        p.add(key, Some(show_size(value)), why);
    }
}

fn show_size(s: ByteSize) -> String {
    match s.to_string() {
        plain if plain == s.bytes().to_string() => plain,
        unit => format!("{} ({unit})", s.bytes()),
    }
}

/// Turns figment's errors into problems: the key path as the operator wrote it, and the value
/// found there in the merged file + environment.
pub(super) fn from_figment(err: figment::Error, figment: &Figment) -> Vec<Problem> {
    let root: Option<Value> = figment.extract().ok();
    err.into_iter()
        .map(|e| {
            let mut path = e.path.clone();
            let reason = match &e.kind {
                Kind::Message(m) => m.clone(),
                Kind::UnknownField(_, expected) => {
                    format!("unknown key (expected {})", figment::error::OneOf(expected))
                }
                Kind::MissingField(field) => {
                    path.push(field.to_string());
                    "missing (required)".to_string()
                }
                other => other.to_string(),
            };
            // A stray BLOCKD_* variable is easy to miss: say where the key came from.
            let from = e.metadata.as_ref().filter(|m| m.name.contains("environment"));
            let reason = match from {
                Some(m) => format!("{reason} (from {})", m.name),
                None => reason,
            };
            let value = root.as_ref().and_then(|r| find(r, &path)).map(render);
            Problem { key: key_of(&path), value, reason }
        })
        .collect()
}

/// `["volume", "0", "size"]` → `volume[0].size`.
fn key_of(path: &[String]) -> String {
    let mut key = String::new();
    for part in path {
        if part.parse::<usize>().is_ok() && !key.is_empty() {
            key.push_str(&format!("[{part}]"));
        } else {
            if !key.is_empty() {
                key.push('.');
            }
            key.push_str(part);
        }
    }
    key
}

/// Like `Value::find_ref`, but also through arrays.
fn find<'v>(root: &'v Value, path: &[String]) -> Option<&'v Value> {
    path.iter().try_fold(root, |v, part| match v {
        Value::Dict(_, d) => d.get(part),
        Value::Array(_, a) => a.get(part.parse::<usize>().ok()?),
        _ => None,
    })
}

fn render(v: &Value) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "?".into())
}

#[cfg(test)]
mod tests {
    use super::super::tests::{load, SINGLE};
    use super::*;

    /// Loads `text`, expects it refused, and checks the message names `key` and `value`.
    #[track_caller]
    fn refused(text: &str, key: &str, value: &str) -> String {
        let err = load(text).expect_err("must be refused").to_string();
        assert!(err.contains(key), "message lacks the key {key}: {err}");
        assert!(err.contains(value), "message lacks the value {value}: {err}");
        err
    }

    fn with_volume(extra: &str) -> String {
        format!("[node.alpha]\n[[volume]]\n{extra}\n")
    }

    #[test]
    fn size_that_is_not_a_size() {
        let err =
            refused(&with_volume("name = \"v\"\nsize = \"12XB\""), "volume[0].size", "\"12XB\"");
        assert!(err.contains("volume[0].size = \"12XB\": not a size"), "{err}");
    }

    #[test]
    fn size_zero() {
        refused(
            &with_volume("name = \"v\"\nsize = 0"),
            "volume[0].size",
            "= 0: must be more than 0",
        );
    }

    #[test]
    fn size_not_multiple_of_512() {
        refused(&with_volume("name = \"v\"\nsize = \"1000\""), "volume[0].size", "1000");
    }

    #[test]
    fn duplicate_volume_names() {
        let text = format!("{SINGLE}\n[[volume]]\nname = \"vol\"\nsize = \"1MiB\"");
        refused(&text, "volume[1].name", "\"vol\"");
    }

    #[test]
    fn unsafe_volume_name() {
        refused(&with_volume("name = \"../etc\"\nsize = 4096"), "volume[0].name", "\"../etc\"");
        refused(&with_volume("name = \"control\"\nsize = 4096"), "volume[0].name", "\"control\"");
    }

    #[test]
    fn bad_duration() {
        let text = format!("[cluster]\npeer-timeout = \"3 parsecs\"\n{SINGLE}");
        refused(&text, "cluster.peer-timeout", "\"3 parsecs\"");
        let text = format!("[nbd]\nhandshake-timeout = 10\n{SINGLE}");
        refused(&text, "nbd.handshake-timeout", "10");
    }

    #[test]
    fn two_nodes_need_replication() {
        let text = format!(
            "[cluster]\nsecret-file = \"/etc/s\"\n{SINGLE}\n[node.beta]\nreplication = \"127.0.0.1:7789\""
        );
        let err = refused(&text, "node.alpha.replication", "required");
        assert!(!err.contains("node.beta"), "beta has it: {err}");
    }

    #[test]
    fn two_nodes_need_a_secret() {
        let text =
            "[node.a]\nreplication = \"127.0.0.1:1\"\n[node.b]\nreplication = \"127.0.0.2:1\"\n\
                    [[volume]]\nname = \"v\"\nsize = 4096";
        refused(text, "cluster.secret-file", "required");
    }

    #[test]
    fn three_nodes_are_refused() {
        let text = format!("{SINGLE}\n[node.b]\n[node.c]");
        refused(&text, "node", "alpha, b, c");
    }

    #[test]
    fn unknown_key_is_named() {
        let text = format!("[cluster]\npeer-timout = \"3s\"\n{SINGLE}");
        let err = refused(&text, "cluster.peer-timout", "\"3s\"");
        assert!(err.contains("unknown key"), "{err}");
        let err = refused(&format!("{SINGLE}\ncolour = \"red\""), "volume[0].colour", "\"red\"");
        assert!(err.contains("peer-timeout") || err.contains("mount-options"), "{err}");
    }

    #[test]
    fn missing_required_key_is_named() {
        refused(&with_volume("name = \"v\""), "volume[0].size", "missing");
    }

    #[test]
    fn bad_enum_value_is_named() {
        let text = format!("[storage]\nengine = \"fast\"\n{SINGLE}");
        refused(&text, "storage.engine", "\"fast\"");
    }

    #[test]
    fn relative_paths_are_refused() {
        let text = "[node.alpha]\ndata-dir = \"data\"\n[[volume]]\nname = \"v\"\nsize = 4096";
        refused(text, "node.alpha.data-dir", "\"data\"");
    }

    #[test]
    fn socket_path_too_long() {
        let long = format!("/{}", "d".repeat(100));
        let text =
            format!("[node.alpha]\nrun-dir = \"{long}\"\n[[volume]]\nname = \"v\"\nsize = 4096");
        refused(&text, "node.alpha.run-dir", &long);
    }

    #[test]
    fn shared_backing_is_refused() {
        let text = format!(
            "{SINGLE}\nbacking = \"/dev/vdb\"\n[[volume]]\nname = \"w\"\nsize = 4096\nbacking = \"/dev/vdb\""
        );
        refused(&text, "volume[1].backing", "\"/dev/vdb\"");
    }

    #[test]
    fn mount_needs_a_filesystem() {
        refused(&format!("{SINGLE}\nmount = \"/mnt/x\""), "volume[0].mount", "\"/mnt/x\"");
    }

    #[test]
    fn small_max_request_is_refused() {
        let text = format!("[nbd]\nmax-request = \"1MiB\"\n{SINGLE}");
        refused(&text, "nbd.max-request", "1MiB");
    }

    #[test]
    fn max_request_beyond_the_wire_is_refused_with_two_nodes() {
        let two = "[cluster]\nsecret-file = \"/etc/s\"\n\
                   [node.a]\nreplication = \"127.0.0.1:1\"\n[node.b]\nreplication = \"127.0.0.2:1\"\n\
                   [[volume]]\nname = \"v\"\nsize = 4096";
        let text = format!("[nbd]\nmax-request = \"64MiB\"\n{two}");
        let err = refused(&text, "nbd.max-request", "64MiB");
        assert!(err.contains("at most 32MiB"), "names the wire's limit: {err}");
        // One node mirrors nothing: up to 1 GiB stays allowed.
        load(&format!("[nbd]\nmax-request = \"64MiB\"\n{SINGLE}")).unwrap();
    }

    #[test]
    fn in_flight_budgets_are_checked() {
        let text = format!("[cluster]\nmax-in-flight-bytes = \"1MiB\"\n{SINGLE}");
        refused(&text, "cluster.max-in-flight-bytes", "1MiB");
        let text = format!("[nbd]\nmax-in-flight-bytes = 4096\n{SINGLE}");
        refused(&text, "nbd.max-in-flight-bytes", "4096");
    }

    #[test]
    fn zero_connections_are_refused() {
        refused(&format!("[nbd]\nmax-connections = 0\n{SINGLE}"), "nbd.max-connections", "0");
    }

    #[test]
    fn bad_vip_is_named() {
        let text = format!("{SINGLE}\n[vip]\naddress = \"10.0.0.100\"\ninterface = \"eth0\"");
        refused(&text, "vip.address", "\"10.0.0.100\"");
        let text = format!("{SINGLE}\n[vip]\naddress = \"10.0.0.100/24\"\ninterface = \"a/b\"");
        refused(&text, "vip.interface", "\"a/b\"");
    }

    #[test]
    fn service_needs_unit_or_commands() {
        refused(&format!("{SINGLE}\n[[service]]\nname = \"db\""), "service[0].unit", "missing");
        let text = format!("{SINGLE}\n[[service]]\nname = \"db\"\nstart = \"x\"");
        refused(&text, "service[0].stop", "missing");
        let text = format!("{SINGLE}\n[[service]]\nname = \"db\"\nunit = \"u\"\ncheck = \"ping\"");
        refused(&text, "service[0].check", "\"ping\"");
    }

    #[test]
    fn toml_syntax_error_is_reported() {
        let err = load("[node.alpha\n").unwrap_err().to_string();
        assert!(err.contains("invalid configuration") && err.contains("line 1"), "{err}");
    }

    #[test]
    fn every_problem_is_reported() {
        let text = "[node.alpha]\n[[volume]]\nname = \"a b\"\nsize = 0";
        let err = load(text).unwrap_err().to_string();
        assert!(err.contains("volume[0].name") && err.contains("volume[0].size"), "{err}");
    }

    #[test]
    fn key_paths_render_like_toml() {
        let path = |p: &[&str]| key_of(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(path(&["volume", "0", "size"]), "volume[0].size");
        assert_eq!(path(&["node", "alpha", "data-dir"]), "node.alpha.data-dir");
    }
}
