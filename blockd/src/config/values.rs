//! Value types of the configuration file that are more than a string or a number: sizes,
//! durations, the VIP's address and health checks. Each parses from the text an operator writes
//! and says in its error what was expected, without repeating the value: the caller
//! (`validate`) puts the key and the value in front.

use std::{fmt, net::IpAddr, str::FromStr, time::Duration};

use serde::{de, Deserialize, Deserializer};

/// A size in bytes, written as a plain byte count (`4096` or `"4096"`) or with a unit:
/// binary `KiB`, `MiB`, `GiB`, `TiB`, `PiB` (also `K`, `M`, `G`, `T`, `P`, as qemu-img reads
/// them) or decimal `kB`, `MB`, `GB`, `TB`, `PB`. Units are case-insensitive; a space may stand
/// between number and unit. Fractions are not accepted: "1.5GiB" is ambiguous about rounding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub const fn bytes(self) -> u64 {
        self.0
    }
}

/// The units [`ByteSize`] accepts, lower-cased, with their factor.
const UNITS: &[(&str, u64)] = &[
    ("", 1),
    ("b", 1),
    ("k", 1 << 10),
    ("kib", 1 << 10),
    ("m", 1 << 20),
    ("mib", 1 << 20),
    ("g", 1 << 30),
    ("gib", 1 << 30),
    ("t", 1 << 40),
    ("tib", 1 << 40),
    ("p", 1 << 50),
    ("pib", 1 << 50),
    ("kb", 1_000),
    ("mb", 1_000_000),
    ("gb", 1_000_000_000),
    ("tb", 1_000_000_000_000),
    ("pb", 1_000_000_000_000_000),
];

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        if digits.is_empty() {
            return Err("not a size: expected a byte count or a number with a unit, such as \
                        \"20GiB\", \"512MiB\" or 4096"
                .into());
        }
        let unit = unit.trim_start();
        let lower = unit.to_ascii_lowercase();
        let Some(&(_, factor)) = UNITS.iter().find(|(u, _)| *u == lower) else {
            return Err(format!(
                "not a size: unknown unit {unit:?} (use B, KiB, MiB, GiB, TiB, PiB or kB, MB, \
                 GB, TB, PB)"
            ));
        };
        digits
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(factor))
            .map(ByteSize)
            .ok_or_else(|| "not a size: too large for 64 bits".to_string())
    }
}

impl fmt::Display for ByteSize {
    /// The largest binary unit that divides the size exactly, so the text parses back to the
    /// same number: `20GiB`, `1536MiB`, `4097`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: &[(&str, u64)] = &[
            ("PiB", 1 << 50),
            ("TiB", 1 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ];
        for &(unit, factor) in SHOWN {
            if self.0 != 0 && self.0 % factor == 0 {
                return write!(f, "{}{unit}", self.0 / factor);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"20GiB\", \"512MiB\" or 4096")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v).map(ByteSize).map_err(|_| E::custom("not a size: negative"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// Deserializes a duration written the humantime way: "3s", "500ms", "1m 30s". A bare number
/// is refused: "3" could be seconds or milliseconds, and a timeout off by 1000× is a bad day.
pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    struct Visitor;
    impl de::Visitor<'_> for Visitor {
        type Value = Duration;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration such as \"3s\" or \"500ms\"")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
            humantime::parse_duration(v).map_err(|e| {
                E::custom(format!("not a duration ({e}); write e.g. \"3s\" or \"500ms\""))
            })
        }
    }
    d.deserialize_str(Visitor)
}

/// Like [`duration`], for an optional key.
pub fn duration_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

/// An interface address with its prefix length, as `ip addr add` takes it: "10.0.0.100/24".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpCidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl FromStr for IpCidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) =
            s.split_once('/').ok_or("missing prefix length: write e.g. \"10.0.0.100/24\"")?;
        let addr: IpAddr = addr.parse().map_err(|_| format!("{addr:?} is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max)
            .ok_or(format!("prefix length must be a number from 0 to {max}"))?;
        Ok(IpCidr { addr, prefix })
    }
}

impl fmt::Display for IpCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// How to tell that a started service is healthy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthCheck {
    /// `tcp://HOST:PORT`: healthy once a TCP connection succeeds.
    Tcp { host: String, port: u16 },
    /// `exec:COMMAND`: healthy once `sh -c COMMAND` exits 0.
    Exec(String),
}

impl FromStr for HealthCheck {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        const EXPECTED: &str = "expected \"tcp://HOST:PORT\" or \"exec:COMMAND\"";
        if let Some(cmd) = s.strip_prefix("exec:") {
            return match cmd.trim() {
                "" => Err(format!("empty command; {EXPECTED}")),
                cmd => Ok(HealthCheck::Exec(cmd.to_string())),
            };
        }
        let rest = s.strip_prefix("tcp://").ok_or_else(|| EXPECTED.to_string())?;
        let (host, port) =
            rest.rsplit_once(':').ok_or_else(|| format!("missing port; {EXPECTED}"))?;
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{port:?} is not a port; {EXPECTED}"))?;
        if host.is_empty() || host.contains('/') {
            return Err(format!("{host:?} is not a host; {EXPECTED}"));
        }
        Ok(HealthCheck::Tcp { host: host.to_string(), port })
    }
}

impl fmt::Display for HealthCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HealthCheck::Tcp { host, port } => write!(f, "tcp://{host}:{port}"),
            HealthCheck::Exec(cmd) => write!(f, "exec:{cmd}"),
        }
    }
}

/// Deserializes any `FromStr` type whose error is a `String` from a TOML string.
macro_rules! deserialize_from_str {
    ($ty:ty, $expecting:literal) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct Visitor;
                impl de::Visitor<'_> for Visitor {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$ty, E> {
                        v.parse().map_err(E::custom)
                    }
                }
                d.deserialize_str(Visitor)
            }
        }
    };
}

deserialize_from_str!(IpCidr, "an address with prefix length such as \"10.0.0.100/24\"");
deserialize_from_str!(HealthCheck, "a check such as \"tcp://127.0.0.1:3306\"");

/// Deserializes a listen address: "ADDR:PORT", or "" / "off" for none.
pub fn listen_addr<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<std::net::SocketAddr>, D::Error> {
    let s = String::deserialize(d)?;
    match s.trim() {
        "" | "off" => Ok(None),
        addr => addr.parse().map(Some).map_err(|_| {
            de::Error::custom(
                "not an address: write \"ADDR:PORT\" (e.g. \"127.0.0.1:9795\") or \"off\"",
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_and_decimal_units() {
        let cases = [
            ("4096", 4096),
            ("20GiB", 20 << 30),
            ("512MiB", 512 << 20),
            ("512 mib", 512 << 20),
            ("1K", 1024),
            ("2T", 2 << 40),
            ("1GB", 1_000_000_000),
            ("7B", 7),
        ];
        for (text, want) in cases {
            assert_eq!(text.parse::<ByteSize>(), Ok(ByteSize(want)), "{text}");
        }
    }

    #[test]
    fn bad_sizes_are_refused_with_a_reason() {
        for text in ["12XB", "", "GiB", "1.5GiB", "-1", "99999999999PiB", "20 GiB extra"] {
            let err = text.parse::<ByteSize>().expect_err(text);
            assert!(err.starts_with("not a size"), "{text}: {err}");
        }
    }

    #[test]
    fn size_display_round_trips() {
        for n in [0, 1, 4096, 4097, 20 << 30, 1536 << 20, 3 << 50] {
            let shown = ByteSize(n).to_string();
            assert_eq!(shown.parse::<ByteSize>(), Ok(ByteSize(n)), "{shown}");
        }
        assert_eq!(ByteSize(20 << 30).to_string(), "20GiB");
    }

    #[test]
    fn cidr_parses_and_checks_the_prefix() {
        let c: IpCidr = "10.0.0.100/24".parse().unwrap();
        assert_eq!((c.addr.to_string(), c.prefix), ("10.0.0.100".to_string(), 24));
        assert!("fd00::1/64".parse::<IpCidr>().is_ok());
        for bad in ["10.0.0.100", "10.0.0.100/33", "10.0.0/24", "fd00::1/129", "x/1"] {
            assert!(bad.parse::<IpCidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn health_checks_parse() {
        assert_eq!(
            "tcp://127.0.0.1:3306".parse::<HealthCheck>(),
            Ok(HealthCheck::Tcp { host: "127.0.0.1".into(), port: 3306 })
        );
        assert_eq!(
            "exec:systemctl is-active x".parse::<HealthCheck>(),
            Ok(HealthCheck::Exec("systemctl is-active x".into()))
        );
        for bad in ["127.0.0.1:3306", "tcp://host", "tcp://:1", "tcp://h:0", "exec: ", "http://x:1"]
        {
            assert!(bad.parse::<HealthCheck>().is_err(), "{bad}");
        }
    }
}
