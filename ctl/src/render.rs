//! Human output of `blockctl status`: one block per volume, aligned labels, sizes both human
//! and exact (scripts should use `--json`).

use std::fmt::Write;

use blockd::control::{NodeStatus, VolumeStatus};

/// The whole status as text, ending with a newline.
pub fn status(s: &NodeStatus) -> String {
    let mut out = String::new();
    let n = s.volumes.len();
    let _ = writeln!(
        out,
        "node {}, blockd {}, {n} volume{}",
        s.node,
        s.version,
        if n == 1 { "" } else { "s" }
    );
    for v in &s.volumes {
        out.push('\n');
        volume(&mut out, v);
    }
    out
}

fn volume(out: &mut String, v: &VolumeStatus) {
    let c = &v.counters;
    let io = if v.direct_io { "direct I/O" } else { "buffered I/O" };
    let rows: [(&str, String); 13] = [
        ("size", format!("{} ({} bytes)", human(v.size), v.size)),
        ("role", format!("{:?}", v.role)),
        ("disk", format!("{:?}", v.disk)),
        ("clients", v.clients.to_string()),
        ("socket", v.socket.clone()),
        ("backing", v.backing.clone()),
        ("engine", format!("{}, {io}", v.engine)),
        ("reads", format!("{} ({})", c.reads, human(c.bytes_read))),
        ("writes", format!("{} ({})", c.writes, human(c.bytes_written))),
        ("flushes", c.flushes.to_string()),
        ("trims", c.trims.to_string()),
        ("zeroes", c.zeroes.to_string()),
        ("errors", c.errors.to_string()),
    ];
    let _ = writeln!(out, "volume {}", v.name);
    for (label, value) in &rows {
        let _ = writeln!(out, "  {label:<9}{value}");
    }
}

/// Bytes in the largest binary unit that keeps the number at or above 1, one decimal:
/// "512 B", "4.0 KiB", "20.0 GiB".
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use blockd::control::{Counters, DiskState, Role};

    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human(0), "0 B");
        assert_eq!(human(1023), "1023 B");
        assert_eq!(human(4096), "4.0 KiB");
        assert_eq!(human(20 << 30), "20.0 GiB");
        assert_eq!(human(1536 << 20), "1.5 GiB");
        assert_eq!(human(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn status_shows_every_field() {
        let v = VolumeStatus {
            name: "db".into(),
            size: 64 << 20,
            role: Role::Primary,
            disk: DiskState::Failed,
            clients: 2,
            socket: "/run/blockd/db.sock".into(),
            backing: "/var/lib/blockd/db.img".into(),
            engine: "io_uring".into(),
            direct_io: true,
            counters: Counters {
                reads: 11,
                writes: 22,
                bytes_read: 4096,
                bytes_written: 8192,
                flushes: 33,
                trims: 44,
                zeroes: 55,
                errors: 66,
            },
        };
        let s = NodeStatus { node: "alpha".into(), version: "9.9".into(), volumes: vec![v] };
        let text = status(&s);
        for want in [
            "node alpha, blockd 9.9, 1 volume\n",
            "volume db\n",
            "size     64.0 MiB (67108864 bytes)",
            "role     Primary",
            "disk     Failed",
            "clients  2",
            "socket   /run/blockd/db.sock",
            "backing  /var/lib/blockd/db.img",
            "engine   io_uring, direct I/O",
            "reads    11 (4.0 KiB)",
            "writes   22 (8.0 KiB)",
            "flushes  33",
            "trims    44",
            "zeroes   55",
            "errors   66",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }
}
