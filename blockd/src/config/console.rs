//! `[console]`: the web console blockd serves (module `console`).
//!
//! ```toml
//! [console]
//! listen = "127.0.0.1:9796"   # default; "" or "off" disables the console
//! # token-file = "/var/lib/blockd/console.token"   # default: <data-dir>/console.token
//! # blockctl = "/usr/sbin/blockctl"                # default: next to blockd, else PATH
//! ```
//!
//! On by default, on localhost only, like `[metrics]`: anyone who can reach it reads the
//! cluster's state; actions (swap, promote, demote, verify, resolve) need the access token
//! in `token-file` (mode 0600, created at start; `blockctl console token` prints or rotates
//! it). Open it to the LAN on purpose, with `listen = "10.0.0.1:9796"`.

use std::{net::SocketAddr, path::PathBuf};

use serde::Deserialize;

use super::{
    validate::{quote, Problems},
    values, Config, LocalNode,
};

/// The console's default address (9796: next to the metrics endpoint's 9795).
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9796);

/// `[console]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ConsoleConfig {
    /// "ADDR:PORT" of the console; `None` ("" or "off") serves none.
    #[serde(default = "default_listen", deserialize_with = "values::listen_addr")]
    pub listen: Option<SocketAddr>,
    /// The access token's file; default `<data-dir>/console.token`.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// The `blockctl` the console runs for actions; default: beside the running `blockd`,
    /// else `blockctl` from PATH.
    #[serde(default)]
    pub blockctl: Option<PathBuf>,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        ConsoleConfig { listen: default_listen(), token_file: None, blockctl: None }
    }
}

impl ConsoleConfig {
    /// Where this node's token lives.
    pub fn token_path(&self, node: &LocalNode) -> PathBuf {
        self.token_file.clone().unwrap_or_else(|| node.settings.data_dir.join("console.token"))
    }
}

fn default_listen() -> Option<SocketAddr> {
    Some(DEFAULT_LISTEN)
}

impl Config {
    /// The console must not take an address the daemon already listens on.
    pub(super) fn check_console(&self, p: &mut Problems) {
        let Some(addr) = self.console.listen else { return };
        if self.metrics.listen == Some(addr) {
            p.add("console.listen", Some(quote(addr)), "same address as metrics.listen");
        }
        self.check_listen_clash("console.listen", addr, p);
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{load, SINGLE};
    use super::*;

    #[test]
    fn default_is_localhost_9796() {
        let c = load(SINGLE).unwrap();
        assert_eq!(c.console, ConsoleConfig::default());
        assert_eq!(c.console.listen, Some("127.0.0.1:9796".parse().unwrap()));
        let node = c.local_node(Some("alpha")).unwrap();
        assert_eq!(c.console.token_path(&node), node.settings.data_dir.join("console.token"));
    }

    #[test]
    fn off_disables_and_keys_are_read() {
        let text = format!(
            "{SINGLE}\n[console]\nlisten = \"off\"\ntoken-file = \"/etc/t\"\nblockctl = \"/b\"\n"
        );
        let c = load(&text).unwrap();
        assert_eq!(c.console.listen, None);
        assert_eq!(c.console.token_file, Some(PathBuf::from("/etc/t")));
        assert_eq!(c.console.blockctl, Some(PathBuf::from("/b")));
    }

    #[test]
    fn bad_address_and_clash_name_the_key() {
        let err = load(&format!("{SINGLE}\n[console]\nlisten = \"x\"\n")).unwrap_err().to_string();
        assert!(err.contains("console.listen = \"x\": not an address"), "{err}");
        let text = format!("{SINGLE}\n[console]\nlisten = \"127.0.0.1:9795\"\n");
        let err = load(&text).unwrap_err().to_string();
        assert!(err.contains("same address as metrics.listen"), "{err}");
    }
}
