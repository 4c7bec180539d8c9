//! `[metrics]`: where the daemon serves its Prometheus endpoint (`GET /metrics`).
//!
//! ```toml
//! [metrics]
//! listen = "127.0.0.1:9795"   # default; "" or "off" disables the endpoint
//! ```
//!
//! Localhost by default: the endpoint has no authentication, and what it shows (roles, sizes,
//! traffic) is for the host's own scraper or an operator's tunnel unless opened on purpose.

use std::net::SocketAddr;

use serde::Deserialize;

use super::{
    validate::{quote, Problems},
    values, Config,
};

/// The endpoint's default address (9795: unassigned, next to nothing blockd uses).
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9795);

/// `[metrics]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct MetricsConfig {
    /// "ADDR:PORT" of the HTTP endpoint; `None` ("" or "off") serves none.
    #[serde(default = "default_listen", deserialize_with = "values::listen_addr")]
    pub listen: Option<SocketAddr>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { listen: default_listen() }
    }
}

fn default_listen() -> Option<SocketAddr> {
    Some(DEFAULT_LISTEN)
}

impl Config {
    /// The endpoint must not take an address the daemon already listens on.
    pub(super) fn check_metrics(&self, p: &mut Problems) {
        let Some(addr) = self.metrics.listen else { return };
        self.check_listen_clash("metrics.listen", addr, p);
    }

    /// `key`'s `addr` must not be a node's replication or NBD TCP address.
    pub(super) fn check_listen_clash(&self, key: &str, addr: SocketAddr, p: &mut Problems) {
        for (name, node) in &self.node {
            let clash = [("replication", node.replication), ("nbd-tcp", node.nbd_tcp)]
                .into_iter()
                .find(|(_, a)| *a == Some(addr));
            if let Some((other, _)) = clash {
                let why = format!("same address as node.{name}.{other}");
                p.add(key, Some(quote(addr)), why);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{load, SINGLE};
    use super::*;

    #[test]
    fn default_is_localhost_9795() {
        let c = load(SINGLE).unwrap();
        assert_eq!(c.metrics.listen, Some("127.0.0.1:9795".parse().unwrap()));
        assert_eq!(c.metrics, MetricsConfig::default());
        assert_eq!(c.metrics.listen, Some(DEFAULT_LISTEN));
    }

    #[test]
    fn example_file_shows_the_default() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/blockd.toml.example");
        let text = std::fs::read_to_string(path).unwrap();
        assert!(text.contains("[metrics]\nlisten = \"127.0.0.1:9795\"\n"), "documented");
        assert_eq!(load(&text).unwrap().metrics, MetricsConfig::default());
    }

    #[test]
    fn off_and_empty_disable_it() {
        for off in ["off", ""] {
            let c = load(&format!("{SINGLE}\n[metrics]\nlisten = \"{off}\"\n")).unwrap();
            assert_eq!(c.metrics.listen, None, "{off:?}");
        }
        let c = load(&format!("{SINGLE}\n[metrics]\nlisten = \"[::1]:9100\"\n")).unwrap();
        assert_eq!(c.metrics.listen, Some("[::1]:9100".parse().unwrap()));
    }

    #[test]
    fn bad_address_names_key_and_value() {
        let err = load(&format!("{SINGLE}\n[metrics]\nlisten = \"localhost\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("metrics.listen = \"localhost\": not an address"), "{err}");
        let err = load(&format!("{SINGLE}\n[metrics]\nport = 1\n")).unwrap_err().to_string();
        assert!(err.contains("metrics.port") && err.contains("unknown key"), "{err}");
    }

    #[test]
    fn clash_with_nbd_tcp_is_refused() {
        let text = SINGLE.replace(
            "run-dir = \"/srv/run\"",
            "run-dir = \"/srv/run\"\nnbd-tcp = \"127.0.0.1:9795\"",
        );
        let err = load(&text).unwrap_err().to_string();
        assert!(
            err.contains("metrics.listen = \"127.0.0.1:9795\": same address as node.alpha.nbd-tcp"),
            "{err}"
        );
    }
}
