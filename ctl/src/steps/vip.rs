//! `vip`: the `[vip]` address on its interface, added and removed over rtnetlink, then
//! announced (see `announce`) in a burst of `garp-count` every `garp-interval`, and once more
//! `garp-repeat` later (for switches and clients that missed the first). The step sends the
//! first announcement itself and returns: the rest of the burst and the repeat come from a
//! detached child, so the promote plan (and the failover) does not wait `garp-count` ×
//! `garp-interval` (0.8 s with the defaults) for repetitions only a lossy segment needs.
//!
//! Undo first stops a pending second burst (announcing an address we no longer hold would
//! pull clients back to us), then resets the connections to the VIP (`ss -K`, best effort:
//! clients get an RST and reconnect to the new primary at once instead of waiting for their
//! TCP timeouts), then deletes the address.

use std::{fs, net::IpAddr, path::PathBuf, time::Duration};

use blockd::config::{IpCidr, VipConfig};
use futures::TryStreamExt;
use rtnetlink::{
    packet_route::{address::AddressHeaderFlags, link::LinkAttribute},
    Handle,
};

use super::{
    announce::{self, Announcer, Later, Link},
    cmd::Cmd,
    mkdir,
    proc::Proc,
    run_dir,
};
use crate::step::{Ctx, Step, StepError};

/// ARP probes before taking an IPv4 VIP, and their spacing: a holder on the same segment
/// answers within milliseconds, so 3 × 100 ms costs the failover little and survives a lost
/// packet.
const PROBES: u32 = 3;
const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// How long the probe waits for another holder to release the address.
const RELEASE_WAIT: Duration = Duration::from_secs(5);

/// `vip`.
#[derive(Debug, Default)]
pub struct Vip;

impl Vip {
    pub fn new() -> Vip {
        Vip
    }
}

fn config(ctx: &Ctx) -> Result<&VipConfig, StepError> {
    ctx.config.vip.as_ref().ok_or_else(|| StepError::Other("no [vip] in the configuration".into()))
}

/// Where the pending second burst's pid is kept, so undo can stop it.
fn burst_file(ctx: &Ctx) -> PathBuf {
    run_dir(ctx).join("vip-announce.json")
}

fn net_err(what: &str, e: impl std::fmt::Display) -> StepError {
    StepError::Other(format!("{what}: {e}"))
}

/// True when the netlink error is `errno`.
fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -errno)
}

/// Runs `f` with a netlink handle on a current-thread runtime: the steps are blocking code.
fn netlink<T, F, Fut>(f: F) -> Result<T, StepError>
where
    F: FnOnce(Handle) -> Fut,
    Fut: std::future::Future<Output = Result<T, StepError>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| net_err("cannot start a runtime for netlink", e))?;
    rt.block_on(async {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|e| net_err("netlink socket", e))?;
        let task = tokio::spawn(conn);
        let result = f(handle).await;
        task.abort();
        result
    })
}

/// Index and MAC address of the interface `name`.
async fn link(h: &Handle, name: &str) -> Result<Link, StepError> {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    let msg = match links.try_next().await {
        Ok(Some(m)) => m,
        Ok(None) => return Err(StepError::Other(format!("no interface {name:?}"))),
        Err(e) if is_errno(&e, libc::ENODEV) => {
            return Err(StepError::Other(format!("no interface {name:?}")))
        }
        Err(e) => return Err(net_err(&format!("interface {name:?}"), e)),
    };
    let mac = msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(b) => <[u8; 6]>::try_from(b.as_slice()).ok(),
        _ => None,
    });
    let mac =
        mac.ok_or_else(|| StepError::Other(format!("interface {name:?} has no Ethernet address")))?;
    Ok(Link { index: msg.header.index, mac })
}

/// The address messages of `cidr` on interface `index` (empty when absent).
async fn find(
    h: &Handle,
    index: u32,
    cidr: IpCidr,
) -> Result<Vec<rtnetlink::packet_route::address::AddressMessage>, StepError> {
    h.address()
        .get()
        .set_link_index_filter(index)
        .set_address_filter(cidr.addr)
        .set_prefix_length_filter(cidr.prefix)
        .execute()
        .try_collect()
        .await
        .map_err(|e| net_err("list addresses", e))
}

async fn add(h: &Handle, index: u32, cidr: IpCidr) -> Result<(), StepError> {
    let mut req = h.address().add(index, cidr.addr, cidr.prefix);
    if cidr.addr.is_ipv6() {
        // No duplicate address detection: the address is usable (and announceable) at once.
        // The peer gave it up on demote, and DAD would only delay the failover by a second.
        req.message_mut().header.flags |= AddressHeaderFlags::Nodad;
    }
    match req.execute().await {
        Err(e) if is_errno(&e, libc::EEXIST) => Ok(()),
        r => r.map_err(|e| net_err(&format!("add {cidr}"), e)),
    }
}

async fn del(h: &Handle, index: u32, cidr: IpCidr) -> Result<(), StepError> {
    for msg in find(h, index, cidr).await? {
        match h.address().del(msg).execute().await {
            Err(e) if is_errno(&e, libc::EADDRNOTAVAIL) => {}
            r => r.map_err(|e| net_err(&format!("delete {cidr}"), e))?,
        }
    }
    Ok(())
}

impl Vip {
    /// Announces the address now, and leaves the rest of the burst and the second burst to a
    /// detached child.
    fn announce(&self, ctx: &Ctx, link: Link, addr: IpAddr) -> Result<(), StepError> {
        let f = &ctx.config.failover;
        let kind =
            if addr.is_ipv4() { "gratuitous ARP" } else { "unsolicited neighbour advertisement" };
        ctx.say(format_args!("{kind} for {addr}: {} × {:?}", f.garp_count, f.garp_interval));
        let ann = Announcer::new(link, addr).map_err(|e| net_err(&format!("{kind} socket"), e))?;
        ann.burst(f.garp_count.min(1), f.garp_interval).map_err(|e| net_err(kind, e))?;
        let rest = Later {
            first: f.garp_count.saturating_sub(1),
            second: if f.garp_repeat.is_zero() { 0 } else { f.garp_count },
            interval: f.garp_interval,
            delay: f.garp_repeat,
        };
        if rest.first == 0 && rest.second == 0 {
            return Ok(());
        }
        let child = ann.burst_later(rest).map_err(|e| net_err("announcement burst", e))?;
        ctx.say(format_args!(
            "{} more from pid {}, then {} in {:?}",
            rest.first, child.pid, rest.second, f.garp_repeat
        ));
        mkdir(run_dir(ctx))?;
        let text = serde_json::to_string(&child).unwrap_or_default();
        fs::write(burst_file(ctx), text).map_err(|e| net_err("record the second burst", e))
    }

    /// Fails when another host answers for `ip` (RFC 5227 probe) for [`RELEASE_WAIT`]: a
    /// failed primary whose agent is tearing down its stale stack releases it within that.
    fn probe(&self, ctx: &Ctx, link: Link, ip: std::net::Ipv4Addr) -> Result<(), StepError> {
        ctx.say(format_args!(
            "ARP probe: does another host hold {ip}? ({PROBES} × {PROBE_INTERVAL:?})"
        ));
        let deadline = std::time::Instant::now() + RELEASE_WAIT;
        let mut said = false;
        loop {
            let mac = match announce::arp_holder(link, ip, PROBES, PROBE_INTERVAL) {
                Ok(None) => return Ok(()),
                Ok(Some(mac)) => mac,
                Err(e) => return Err(net_err("ARP probe", e)),
            };
            let mac: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
            if std::time::Instant::now() >= deadline {
                return Err(StepError::Other(format!(
                    "{ip} is held by another host ({}): not taking it",
                    mac.join(":")
                )));
            }
            if !std::mem::replace(&mut said, true) {
                ctx.say(format_args!(
                    "{ip} is held by {}; probing again for up to {RELEASE_WAIT:?}",
                    mac.join(":")
                ));
            }
        }
    }

    /// Announces the VIP again when this node holds it (returns whether it did): neighbours
    /// may have cached the MAC of a returning old primary, which answers ARP for the address
    /// until its agent has torn its stale stack down (a thawed node, one back from a
    /// partition). The whole burst again, the first packet now, the rest from a child.
    pub fn reannounce(&self, ctx: &Ctx) -> Result<bool, StepError> {
        let Ok(v) = config(ctx).cloned() else { return Ok(false) };
        let (name, cidr) = (v.interface.clone(), v.address);
        let (l, present) = netlink(|h| async move {
            let l = link(&h, &name).await?;
            Ok((l, !find(&h, l.index, cidr).await?.is_empty()))
        })?;
        if !present {
            return Ok(false);
        }
        self.cancel_burst(ctx);
        self.announce(ctx, l, v.address.addr)?;
        Ok(true)
    }

    /// Stops the announcements not sent yet.
    fn cancel_burst(&self, ctx: &Ctx) {
        let file = burst_file(ctx);
        let pending =
            fs::read_to_string(&file).ok().and_then(|t| serde_json::from_str::<Proc>(&t).ok());
        if let Some(p) = pending.filter(Proc::alive) {
            ctx.say(format_args!("cancelling the second announcement burst (pid {})", p.pid));
            p.terminate(Duration::from_secs(1));
        }
        let _ = fs::remove_file(file);
    }

    /// `ss -K` of the connections to and from the VIP. Best effort: the kernel may lack
    /// CONFIG_INET_DIAG_DESTROY; the connections then time out on their own.
    fn reset_connections(&self, ctx: &Ctx, addr: IpAddr) {
        let host = match addr {
            IpAddr::V4(a) => a.to_string(),
            IpAddr::V6(a) => format!("[{a}]"),
        };
        for dir in ["dst", "src"] {
            let ss =
                Cmd::new("ss").args(["-K", "-t", dir, &host]).deadline(Duration::from_secs(10));
            match ss.output(ctx) {
                Ok(o) if o.status.success() => {}
                Ok(o) => ctx.say(format_args!("connections not reset ({})", o.message())),
                Err(e) => ctx.say(format_args!("connections not reset ({e})")),
            }
        }
    }
}

impl Step for Vip {
    fn name(&self) -> String {
        "vip".into()
    }

    fn describe(&self, ctx: &Ctx) -> String {
        match config(ctx) {
            Ok(v) => {
                let f = &ctx.config.failover;
                format!(
                    "ip address add {} dev {}; announce {} × {:?}, again after {:?}",
                    v.address, v.interface, f.garp_count, f.garp_interval, f.garp_repeat
                )
            }
            Err(e) => e.to_string(),
        }
    }

    fn check(&self, ctx: &Ctx) -> Result<bool, StepError> {
        let v = config(ctx)?.clone();
        netlink(|h| async move {
            let l = link(&h, &v.interface).await?;
            Ok(!find(&h, l.index, v.address).await?.is_empty())
        })
    }

    fn apply(&self, ctx: &Ctx) -> Result<(), StepError> {
        let v = config(ctx)?.clone();
        let (name, cidr) = (v.interface.clone(), v.address);
        let (l, present) = netlink(|h| async move {
            let l = link(&h, &name).await?;
            Ok((l, !find(&h, l.index, cidr).await?.is_empty()))
        })?;
        if let (IpAddr::V4(ip), false) = (v.address.addr, present) {
            self.probe(ctx, l, ip)?;
        }
        ctx.say(format_args!("netlink: add {} to {}", v.address, v.interface));
        netlink(|h| async move { add(&h, l.index, v.address).await })?;
        self.announce(ctx, l, v.address.addr)
    }

    fn undo(&self, ctx: &Ctx) -> Result<(), StepError> {
        let v = config(ctx)?.clone();
        self.cancel_burst(ctx);
        if !self.check(ctx)? {
            return Ok(());
        }
        self.reset_connections(ctx, v.address.addr);
        ctx.say(format_args!("netlink: delete {} from {}", v.address, v.interface));
        netlink(|h| async move {
            let l = link(&h, &v.interface).await?;
            del(&h, l.index, v.address).await
        })
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(30)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::Read,
        net::TcpListener,
        process::{Command, Stdio},
        thread,
        time::Instant,
    };

    use super::*;
    use crate::steps::testutil::{ctx_for, require_root, sh, NetNs};

    /// Two namespaces joined by a veth pair: `node` (interface `va`, where the step runs)
    /// and `peer` (interface `vb`, a client of the VIP).
    struct Segment {
        node: NetNs,
        peer: NetNs,
        mac: String,
        run: tempfile::TempDir,
    }

    impl Segment {
        fn new(tag: &str, node_addr: &str, peer_addr: &str) -> Segment {
            let (node, peer) = (NetNs::new(&format!("{tag}n")), NetNs::new(&format!("{tag}p")));
            node.ip(&format!("link add va type veth peer name vb netns {}", peer.name));
            node.ip(&format!("addr add {node_addr} dev va nodad"));
            peer.ip(&format!("addr add {peer_addr} dev vb nodad"));
            node.ip("link set va up");
            peer.ip("link set vb up");
            let link = node.ip("-o link show va");
            let mac = link
                .split("link/ether ")
                .nth(1)
                .and_then(|s| s.split(' ').next())
                .unwrap()
                .to_string();
            Segment { node, peer, mac, run: tempfile::tempdir().unwrap() }
        }

        fn ctx(&self, vip: &str) -> Ctx {
            ctx_for(&format!(
                "[node.a]\nrun-dir = \"{}\"\n[vip]\naddress = \"{vip}\"\ninterface = \"va\"\n\
                 [failover]\ngarp-count = 5\ngarp-interval = \"300ms\"\ngarp-repeat = \"1s\"\n",
                self.run.path().display()
            ))
        }

        /// The peer's neighbour entry for `ip`, as `ip neigh` prints it.
        fn neigh(&self, ip: &str) -> String {
            self.peer.ip(&format!("neigh show {ip} dev vb"))
        }

        /// Gives the peer a stale entry for `ip` at a MAC nobody has (the old primary's), old
        /// enough (> locktime, 1 s) for an announcement to override it.
        fn stale_entry(&self, ip: &str, verb: &str) {
            self.peer.ip(&format!("neigh {verb} {ip} lladdr 02:00:00:00:00:01 dev vb nud stale"));
            thread::sleep(Duration::from_millis(1100));
        }

        fn wait_neigh_is_ours(&self, ip: &str, within: Duration) {
            let end = Instant::now() + within;
            while !self.neigh(ip).contains(&self.mac) {
                assert!(
                    Instant::now() < end,
                    "peer's entry for {ip} is {:?}, want {}",
                    self.neigh(ip),
                    self.mac
                );
                thread::sleep(Duration::from_millis(50));
            }
        }
    }

    #[test]
    fn vip_v4_added_announced_and_removed() {
        require_root();
        let seg = Segment::new("v4", "10.97.0.1/24", "10.97.0.2/24");
        let ctx = seg.ctx("10.97.0.100/24");
        seg.stale_entry("10.97.0.100", "add");
        seg.node.enter();
        let vip = Vip::new();
        assert!(!vip.check(&ctx).unwrap());
        let t = Instant::now();
        vip.apply(&ctx).unwrap();
        // The step sends the first announcement and leaves the rest of the burst to a child.
        assert!(t.elapsed() < Duration::from_millis(1200), "apply waited {:?}", t.elapsed());
        assert!(vip.check(&ctx).unwrap());
        seg.wait_neigh_is_ours("10.97.0.100", Duration::from_millis(200));
        vip.apply(&ctx).unwrap(); // present already: fine

        // The second burst, ~1 s after the first, corrects an entry changed meanwhile.
        seg.stale_entry("10.97.0.100", "change");
        seg.wait_neigh_is_ours("10.97.0.100", Duration::from_secs(5));

        let listener = TcpListener::bind("10.97.0.100:7000").unwrap();
        let mut client = Command::new("ip")
            .args(["netns", "exec", &seg.peer.name, "python3", "-c"])
            .arg("import socket; s = socket.create_connection(('10.97.0.100', 7000)); s.recv(1)")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (_conn, _) = listener.accept().unwrap();
        vip.undo(&ctx).unwrap();
        let end = Instant::now() + Duration::from_secs(5);
        while client.try_wait().unwrap().is_none() && Instant::now() < end {
            thread::sleep(Duration::from_millis(50));
        }
        let status = client.try_wait().unwrap();
        let _ = client.kill();
        let _ = client.wait();
        let mut err = String::new();
        client.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        assert!(
            status.is_some_and(|s| !s.success()) && err.contains("ConnectionResetError"),
            "client not reset: {status:?} {err}"
        );
        assert!(!vip.check(&ctx).unwrap());
        assert!(!seg.node.ip("addr show dev va").contains("10.97.0.100"));
        vip.undo(&ctx).unwrap(); // absent already: fine
    }

    /// The agent's "peer back" announcement: nothing without the VIP here; with it, a
    /// neighbour whose entry for the VIP was taken by another MAC (a returning old primary's)
    /// is pointed back at this node.
    #[test]
    fn vip_announced_again_only_when_held() {
        require_root();
        let seg = Segment::new("v4r", "10.97.1.1/24", "10.97.1.2/24");
        let ctx = seg.ctx("10.97.1.100/24");
        seg.node.enter();
        let vip = Vip::new();
        assert!(!vip.reannounce(&ctx).unwrap(), "announced a VIP it does not hold");
        seg.stale_entry("10.97.1.100", "add"); // an announcement updates entries, makes none
        vip.apply(&ctx).unwrap();
        seg.wait_neigh_is_ours("10.97.1.100", Duration::from_secs(5));
        thread::sleep(Duration::from_millis(1500)); // the first burst's child is done
        seg.stale_entry("10.97.1.100", "change");
        assert!(vip.reannounce(&ctx).unwrap());
        seg.wait_neigh_is_ours("10.97.1.100", Duration::from_millis(200));
        vip.undo(&ctx).unwrap();
        assert!(!vip.reannounce(&ctx).unwrap());
    }

    #[test]
    fn vip_v6_announced_and_pending_burst_cancelled() {
        require_root();
        let seg = Segment::new("v6", "fd97::1/64", "fd97::2/64");
        let ctx = seg.ctx("fd97::100/64");
        seg.stale_entry("fd97::100", "add");
        seg.node.enter();
        let vip = Vip::new();
        vip.apply(&ctx).unwrap();
        assert!(vip.check(&ctx).unwrap());
        seg.wait_neigh_is_ours("fd97::100", Duration::from_secs(1));
        // The peer reaches the VIP (ping is not installed: a TCP connect instead).
        let _listener = TcpListener::bind("[fd97::100]:7001").unwrap();
        let connect = "import socket; socket.create_connection(('fd97::100', 7001), timeout=3)";
        sh(&format!("ip netns exec {} python3 -c \"{connect}\"", seg.peer.name));
        let burst: Proc =
            serde_json::from_str(&fs::read_to_string(burst_file(&ctx)).unwrap()).unwrap();
        assert!(burst.alive(), "second burst pending");
        vip.undo(&ctx).unwrap();
        assert!(!burst.alive(), "undo must cancel the pending burst");
        assert!(!vip.check(&ctx).unwrap());
    }

    #[test]
    fn vip_held_by_another_host_is_refused() {
        require_root();
        let seg = Segment::new("v4h", "10.97.0.1/24", "10.97.0.2/24");
        seg.peer.ip("addr add 10.97.0.100/24 dev vb");
        let ctx = seg.ctx("10.97.0.100/24");
        seg.node.enter();
        let err = Vip::new().apply(&ctx).unwrap_err().to_string();
        assert!(err.contains("held by another host"), "{err}");
        assert!(!Vip::new().check(&ctx).unwrap(), "not added");
        seg.peer.ip("addr del 10.97.0.100/24 dev vb");
        Vip::new().apply(&ctx).unwrap();
        Vip::new().undo(&ctx).unwrap();
    }

    #[test]
    fn missing_interface_is_an_error() {
        require_root();
        let ns = NetNs::new("vipx");
        let run = tempfile::tempdir().unwrap();
        let ctx = ctx_for(&format!(
            "[node.a]\nrun-dir = \"{}\"\n[vip]\naddress = \"10.97.0.100/24\"\ninterface = \"nosuch0\"\n",
            run.path().display()
        ));
        ns.enter();
        let err = Vip::new().apply(&ctx).unwrap_err().to_string();
        assert!(err.contains("no interface \"nosuch0\""), "{err}");
    }
}
