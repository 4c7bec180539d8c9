//! Telling the segment that the VIP moved: gratuitous ARP for IPv4 (RFC 5227 §2.4 ARP
//! announcement: an ARP request whose sender and target IP are both the VIP, sender MAC this
//! interface's, broadcast) and an unsolicited neighbour advertisement for IPv6 (RFC 4861
//! §7.2.6: to ff02::1, override flag set, target link-layer address option). Neighbours that
//! cached the old primary's MAC replace it at once instead of after their cache times out.
//!
//! Before adding an IPv4 VIP, an ARP probe (RFC 5227 §2.1.1) asks whether another host holds
//! it already: two holders would split the clients between two primaries.
//!
//! The only `unsafe` of the steps lives here: the link-layer address of the AF_PACKET socket,
//! and the fork of the child that sends the delayed second burst.

use std::{
    io::{self, Read},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6},
    os::fd::AsRawFd,
    thread,
    time::Duration,
};

use socket2::{Domain, Protocol, SockAddr, SockAddrStorage, Socket, Type};

use super::proc::Proc;

/// An interface as the announcements need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub mac: [u8; 6],
}

/// A socket and a ready packet: sending needs no allocation, so the forked child may send.
pub struct Announcer {
    sock: Socket,
    packet: Vec<u8>,
    dest: SockAddr,
}

const BROADCAST: [u8; 6] = [0xff; 6];

/// An AF_PACKET address: interface `index`, protocol ARP, hardware address `mac`.
fn link_addr(index: u32, mac: [u8; 6]) -> io::Result<SockAddr> {
    let mut storage = SockAddrStorage::zeroed();
    // SAFETY: sockaddr_ll is an AF_PACKET address type of this platform, and it fits in
    // sockaddr_storage (view_as asserts it); the storage is zeroed, a valid sockaddr_ll.
    let ll = unsafe { storage.view_as::<libc::sockaddr_ll>() };
    ll.sll_family = libc::AF_PACKET as u16;
    ll.sll_protocol = (libc::ETH_P_ARP as u16).to_be();
    ll.sll_ifindex = i32::try_from(index).map_err(|_| io::ErrorKind::InvalidInput)?;
    ll.sll_halen = 6;
    ll.sll_addr[..6].copy_from_slice(&mac);
    let len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    // SAFETY: the storage holds a fully initialised sockaddr_ll of `len` bytes.
    Ok(unsafe { SockAddr::new(storage, len) })
}

/// A packet socket for ARP on `link` only (SOCK_DGRAM: the kernel adds and strips the
/// Ethernet header).
fn arp_socket(link: Link) -> io::Result<Socket> {
    let proto = i32::from((libc::ETH_P_ARP as u16).to_be());
    let sock = Socket::new(Domain::PACKET, Type::DGRAM, Some(Protocol::from(proto)))?;
    sock.bind(&link_addr(link.index, [0; 6])?)?;
    Ok(sock)
}

/// An ARP probe (RFC 5227 §2.1.1): "who has `ip`?", sender IP 0.0.0.0 so that no neighbour
/// caches anything from it.
pub fn arp_probe(mac: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    let mut p = arp_announcement(mac, ip);
    p[14..18].copy_from_slice(&[0; 4]);
    p
}

/// The sender MAC of an ARP packet from `ip` that is not from `ours`: another host claims
/// the address (a reply to our probe, or its own announcement or request).
pub fn claim_by_other(packet: &[u8], ours: [u8; 6], ip: Ipv4Addr) -> Option<[u8; 6]> {
    if packet.len() < 28 || packet[..6] != [0, 1, 8, 0, 6, 4] {
        return None;
    }
    let mac = <[u8; 6]>::try_from(&packet[8..14]).ok()?;
    (packet[14..18] == ip.octets() && mac != ours).then_some(mac)
}

/// Asks the segment whether another host holds `ip` (RFC 5227 probe: `count` probes
/// `interval` apart, then as long again for late answers). Returns the holder's MAC.
pub fn arp_holder(
    link: Link,
    ip: Ipv4Addr,
    count: u32,
    interval: Duration,
) -> io::Result<Option<[u8; 6]>> {
    let sock = arp_socket(link)?;
    let dest = link_addr(link.index, BROADCAST)?;
    let probe = arp_probe(link.mac, ip);
    let mut buf = [0u8; 128];
    for _ in 0..count {
        sock.send_to(&probe, &dest)?;
        let end = std::time::Instant::now() + interval;
        while let Some(left) =
            end.checked_duration_since(std::time::Instant::now()).filter(|d| !d.is_zero())
        {
            sock.set_read_timeout(Some(left))?;
            let n = match (&sock).read(&mut buf) {
                Ok(n) => n,
                Err(e)
                    if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) =>
                {
                    break
                }
                Err(e) => return Err(e),
            };
            if let Some(mac) = claim_by_other(&buf[..n], link.mac, ip) {
                return Ok(Some(mac));
            }
        }
    }
    Ok(None)
}

/// The ARP payload (RFC 826) of an announcement of `ip` at `mac`; the kernel adds the
/// Ethernet header (SOCK_DGRAM packet socket), addressed to the broadcast MAC of `dest`.
pub fn arp_announcement(mac: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    let mut p = Vec::with_capacity(28);
    p.extend_from_slice(&1u16.to_be_bytes()); // hardware type: Ethernet
    p.extend_from_slice(&0x0800u16.to_be_bytes()); // protocol type: IPv4
    p.extend_from_slice(&[6, 4]); // address lengths
    p.extend_from_slice(&1u16.to_be_bytes()); // operation: request
    p.extend_from_slice(&mac);
    p.extend_from_slice(&ip.octets());
    p.extend_from_slice(&[0; 6]); // target MAC: unknown, per RFC 5227
    p.extend_from_slice(&ip.octets());
    p
}

/// ICMPv6 neighbour advertisement of `ip` at `mac`, override flag set, solicited flag clear
/// (it answers no solicitation). The checksum is left 0: the kernel computes it for raw
/// ICMPv6 sockets (RFC 3542 §3.1).
pub fn neighbour_advertisement(mac: [u8; 6], ip: Ipv6Addr) -> Vec<u8> {
    let mut p = Vec::with_capacity(32);
    p.extend_from_slice(&[136, 0, 0, 0]); // type NA, code 0, checksum
    p.extend_from_slice(&0x2000_0000u32.to_be_bytes()); // flags: O (override)
    p.extend_from_slice(&ip.octets());
    p.extend_from_slice(&[2, 1]); // option: target link-layer address, 8 bytes
    p.extend_from_slice(&mac);
    p
}

/// What [`Announcer::burst_later`] sends: `first` announcements `interval` apart (starting
/// one interval from now: the rest of a burst whose first packet the caller sent), then
/// `delay` later `second` more, `interval` apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Later {
    pub first: u32,
    pub second: u32,
    pub interval: Duration,
    pub delay: Duration,
}

impl Announcer {
    /// Opens the socket for announcing `ip` on `link`.
    pub fn new(link: Link, ip: IpAddr) -> io::Result<Announcer> {
        match ip {
            IpAddr::V4(v4) => Self::arp(link, v4),
            IpAddr::V6(v6) => Self::ndp(link, v6),
        }
    }

    fn arp(link: Link, ip: Ipv4Addr) -> io::Result<Announcer> {
        let sock = arp_socket(link)?;
        let dest = link_addr(link.index, BROADCAST)?;
        Ok(Announcer { sock, packet: arp_announcement(link.mac, ip), dest })
    }

    fn ndp(link: Link, ip: Ipv6Addr) -> io::Result<Announcer> {
        let sock = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))?;
        // Hop limit 255: receivers drop neighbour discovery that crossed a router.
        sock.set_multicast_hops_v6(255)?;
        sock.set_multicast_if_v6(link.index)?;
        // Source = the VIP (freebind: even while the address is still tentative).
        sock.set_freebind_v6(true)?;
        sock.bind(&SockAddr::from(SocketAddrV6::new(ip, 0, 0, link.index)))?;
        let all_nodes =
            SocketAddrV6::new(Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1), 0, 0, link.index);
        let dest = SockAddr::from(SocketAddr::V6(all_nodes));
        Ok(Announcer { sock, packet: neighbour_advertisement(link.mac, ip), dest })
    }

    pub fn send(&self) -> io::Result<()> {
        self.sock.send_to(&self.packet, &self.dest).map(drop)
    }

    /// `count` announcements, `interval` apart. Stops at the first send error.
    pub fn burst(&self, count: u32, interval: Duration) -> io::Result<()> {
        for i in 0..count {
            if i > 0 {
                thread::sleep(interval);
            }
            self.send()?;
        }
        Ok(())
    }

    /// Sends `later`'s announcements from a forked child in a session of its own, so the
    /// caller (promote) need not wait and may exit. Returns the child.
    pub fn burst_later(&self, later: Later) -> io::Result<Proc> {
        let devnull = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null")?;
        // SAFETY: the child of a (possibly multithreaded) process may only make
        // async-signal-safe calls: it calls setsid, dup2, nanosleep (thread::sleep), sendto on
        // the socket and the packet prepared above (no allocation, no lock), and _exit. It
        // never returns into Rust code that could run destructors or touch locks.
        match unsafe { nix::unistd::fork() }.map_err(io::Error::from)? {
            nix::unistd::ForkResult::Parent { child } => {
                Ok(Proc::of(u32::try_from(child.as_raw()).unwrap_or_default()))
            }
            nix::unistd::ForkResult::Child => self.child(devnull.as_raw_fd(), later),
        }
    }

    /// The forked child: detach from the terminal and the caller's output (a caller that
    /// reads blockctl's stdout to its end must not wait for us), wait, send, exit.
    fn child(&self, devnull: i32, later: Later) -> ! {
        // SAFETY: plain syscalls on descriptors this process owns; see burst_later.
        unsafe {
            libc::setsid();
            for fd in 0..3 {
                libc::dup2(devnull, fd);
            }
        }
        let mut failed = false;
        if later.first > 0 {
            thread::sleep(later.interval);
            failed |= self.burst(later.first, later.interval).is_err();
        }
        if later.second > 0 {
            thread::sleep(later.delay);
            failed |= self.burst(later.second, later.interval).is_err();
        }
        let code = i32::from(failed);
        // SAFETY: _exit ends the child without running the parent's atexit handlers or
        // flushing buffers it shares with the parent.
        unsafe { libc::_exit(code) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arp_announcement_layout() {
        let p = arp_announcement([2, 0, 0, 0, 0, 9], Ipv4Addr::new(10, 97, 0, 100));
        assert_eq!(p.len(), 28);
        assert_eq!(&p[..8], &[0, 1, 8, 0, 6, 4, 0, 1]); // Ethernet, IPv4, 6/4, request
        assert_eq!(&p[8..14], &[2, 0, 0, 0, 0, 9]);
        assert_eq!(&p[14..18], &[10, 97, 0, 100]);
        assert_eq!(&p[24..28], &[10, 97, 0, 100], "target IP = sender IP (RFC 5227 §2.4)");
    }

    #[test]
    fn probe_and_claims() {
        let (ours, other) = ([2, 0, 0, 0, 0, 9], [2, 0, 0, 0, 0, 7]);
        let vip = Ipv4Addr::new(10, 97, 0, 100);
        let probe = arp_probe(ours, vip);
        assert_eq!(&probe[14..18], &[0; 4], "probe sender IP is 0.0.0.0");
        assert_eq!(claim_by_other(&probe, ours, vip), None, "our own probe");
        assert_eq!(
            claim_by_other(&arp_announcement(ours, vip), ours, vip),
            None,
            "our announcement"
        );
        let mut reply = arp_announcement(other, vip);
        reply[7] = 2; // an ARP reply from the holder
        assert_eq!(claim_by_other(&reply, ours, vip), Some(other));
        let elsewhere = arp_announcement(other, Ipv4Addr::new(10, 97, 0, 5));
        assert_eq!(claim_by_other(&elsewhere, ours, vip), None, "another address");
        assert_eq!(claim_by_other(&reply[..20], ours, vip), None, "short packet");
    }

    #[test]
    fn neighbour_advertisement_layout() {
        let ip: Ipv6Addr = "fd97::100".parse().unwrap();
        let p = neighbour_advertisement([2, 0, 0, 0, 0, 9], ip);
        assert_eq!(p.len(), 32);
        assert_eq!(p[0], 136, "RFC 4861 §4.4 type");
        assert_eq!(p[4], 0x20, "override set, router and solicited clear");
        assert_eq!(&p[8..24], &ip.octets());
        assert_eq!(&p[24..32], &[2, 1, 2, 0, 0, 0, 0, 9]);
    }
}
