//! The kernel's `nbd` generic netlink family (NBD-NOTES §3.2), over a raw `NETLINK_GENERIC`
//! socket: just the few messages blockd sends, built and parsed as plain bytes (pure, tested
//! below), and one blocking request/acknowledge exchange per call.

use std::{io, os::fd::AsRawFd, os::fd::FromRawFd, os::fd::OwnedFd};

/// `<linux/netlink.h>`, `<linux/genetlink.h>`, `<linux/nbd-netlink.h>`.
mod uapi {
    pub const NLMSG_ERROR: u16 = 2;
    pub const NLM_F_REQUEST: u16 = 1;
    pub const NLM_F_ACK: u16 = 4;
    pub const NLA_F_NESTED: u16 = 1 << 15;
    pub const GENL_ID_CTRL: u16 = 0x10;
    pub const CTRL_CMD_GETFAMILY: u8 = 3;
    pub const CTRL_ATTR_FAMILY_ID: u16 = 1;
    pub const CTRL_ATTR_FAMILY_NAME: u16 = 2;
    pub const NBD_GENL_VERSION: u8 = 1;
}

/// `NBD_CMD_*` of the nbd family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum NbdCmd {
    Connect = 1,
    Disconnect = 2,
    Reconfigure = 3,
}

/// `NBD_ATTR_*` and the nested socket attributes.
pub mod attr {
    pub const INDEX: u16 = 1;
    pub const SIZE_BYTES: u16 = 2;
    pub const BLOCK_SIZE_BYTES: u16 = 3;
    pub const TIMEOUT: u16 = 4;
    pub const SERVER_FLAGS: u16 = 5;
    pub const SOCKETS: u16 = 7;
    pub const DEAD_CONN_TIMEOUT: u16 = 8;
    pub const BACKEND_IDENTIFIER: u16 = 10;
    pub const SOCK_ITEM: u16 = 1;
    pub const SOCK_FD: u16 = 1;
}

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink socket")]
    Io(#[from] io::Error),
    #[error("the kernel refused {what}")]
    Refused {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the nbd generic netlink family is missing (is the nbd module loaded?)")]
    NoFamily,
    #[error("malformed netlink reply")]
    Malformed,
}

/// One generic netlink request under construction: header, then attributes.
#[derive(Debug)]
pub struct Message {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

impl Message {
    pub fn new(family: u16, cmd: u8, version: u8) -> Message {
        let mut buf = vec![0u8; 16];
        buf[4..6].copy_from_slice(&family.to_ne_bytes());
        let flags = uapi::NLM_F_REQUEST | uapi::NLM_F_ACK;
        buf[6..8].copy_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&[cmd, version, 0, 0]);
        Message { buf, nests: Vec::new() }
    }

    fn attr(mut self, kind: u16, payload: &[u8]) -> Message {
        let len = u16::try_from(4 + payload.len()).unwrap_or(u16::MAX);
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.buf.resize(self.buf.len().next_multiple_of(4), 0);
        self
    }

    pub fn u32(self, kind: u16, v: u32) -> Message {
        self.attr(kind, &v.to_ne_bytes())
    }

    pub fn u64(self, kind: u16, v: u64) -> Message {
        self.attr(kind, &v.to_ne_bytes())
    }

    /// A NUL-terminated string, as the kernel's NLA_STRING/NLA_NUL_STRING policies accept.
    pub fn string(self, kind: u16, s: &str) -> Message {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        self.attr(kind, &v)
    }

    /// Opens a nested attribute; [`Message::end`] closes it and fixes its length.
    pub fn nest(mut self, kind: u16) -> Message {
        self.nests.push(self.buf.len());
        self.attr(kind | uapi::NLA_F_NESTED, &[])
    }

    pub fn end(mut self) -> Message {
        if let Some(at) = self.nests.pop() {
            let len = u16::try_from(self.buf.len() - at).unwrap_or(u16::MAX);
            self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
        }
        self
    }

    /// The finished bytes with length and sequence number filled in.
    pub fn bytes(mut self, seq: u32) -> Vec<u8> {
        let len = u32::try_from(self.buf.len()).unwrap_or(u32::MAX);
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.buf
    }
}

/// What one reply datagram said: the attributes of a data message (if any) and the errno of
/// the acknowledgement (if it came; 0 = success).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Answer {
    pub attrs: Vec<(u16, Vec<u8>)>,
    pub ack: Option<i32>,
}

/// Parses the netlink messages of one datagram.
pub fn parse(mut data: &[u8], answer: &mut Answer) -> Result<(), NetlinkError> {
    while data.len() >= 16 {
        let len = u32::from_ne_bytes(data[0..4].try_into().map_err(|_| NetlinkError::Malformed)?);
        let len = usize::try_from(len).map_err(|_| NetlinkError::Malformed)?;
        if len < 16 || len > data.len() {
            return Err(NetlinkError::Malformed);
        }
        let kind = u16::from_ne_bytes([data[4], data[5]]);
        let body = &data[16..len];
        if kind == uapi::NLMSG_ERROR {
            let code = body.get(0..4).ok_or(NetlinkError::Malformed)?;
            answer.ack =
                Some(-i32::from_ne_bytes(code.try_into().map_err(|_| NetlinkError::Malformed)?));
        } else {
            answer.attrs.extend(attrs(body.get(4..).ok_or(NetlinkError::Malformed)?)?);
        }
        data = &data[len.next_multiple_of(4).min(data.len())..];
    }
    Ok(())
}

fn attrs(mut data: &[u8]) -> Result<Vec<(u16, Vec<u8>)>, NetlinkError> {
    let mut out = Vec::new();
    while data.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([data[0], data[1]]));
        let kind = u16::from_ne_bytes([data[2], data[3]]) & !uapi::NLA_F_NESTED;
        if len < 4 || len > data.len() {
            return Err(NetlinkError::Malformed);
        }
        out.push((kind, data[4..len].to_vec()));
        data = &data[len.next_multiple_of(4).min(data.len())..];
    }
    Ok(out)
}

/// A `NETLINK_GENERIC` socket with the nbd family resolved.
#[derive(Debug)]
pub struct NbdNetlink {
    fd: OwnedFd,
    family: u16,
    seq: u32,
}

impl NbdNetlink {
    /// The socket, in this process's network namespace or else in the initial one: the
    /// nbd family of kernels before 6.2 (Debian 12's 6.1 among them) is registered without
    /// `netnsok`, so it exists only in the initial network namespace, and a daemon in
    /// another one (the test cluster's nodes, a container) must reach it there. The devices
    /// are global either way; CONNECT needs CAP_SYS_ADMIN in the initial namespace both ways.
    pub fn open() -> Result<NbdNetlink, NetlinkError> {
        match Self::resolve(generic_socket()?) {
            Err(NetlinkError::NoFamily) if !in_initial_netns() => {
                Self::resolve(generic_socket_in_initial_netns()?)
            }
            other => other,
        }
    }

    fn resolve(fd: OwnedFd) -> Result<NbdNetlink, NetlinkError> {
        let mut nl = NbdNetlink { fd, family: uapi::GENL_ID_CTRL, seq: 0 };
        let msg = Message::new(uapi::GENL_ID_CTRL, uapi::CTRL_CMD_GETFAMILY, 2)
            .string(uapi::CTRL_ATTR_FAMILY_NAME, "nbd");
        let answer = nl.call(msg, "family lookup").map_err(|e| match e {
            NetlinkError::Refused { .. } => NetlinkError::NoFamily,
            e => e,
        })?;
        let id = find(&answer, uapi::CTRL_ATTR_FAMILY_ID).ok_or(NetlinkError::NoFamily)?;
        nl.family = u16::from_ne_bytes(
            id.get(0..2)
                .ok_or(NetlinkError::Malformed)?
                .try_into()
                .map_err(|_| NetlinkError::Malformed)?,
        );
        Ok(nl)
    }

    /// A request of the nbd family.
    pub fn message(&self, cmd: NbdCmd) -> Message {
        Message::new(self.family, cmd as u8, uapi::NBD_GENL_VERSION)
    }

    /// Sends `msg` and reads until the kernel's acknowledgement; an errno in it is `Refused`.
    pub fn call(&mut self, msg: Message, what: &'static str) -> Result<Answer, NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let bytes = msg.bytes(self.seq);
        // SAFETY: `bytes` is a live buffer of the given length; the fd is open.
        let sent =
            unsafe { libc::send(self.fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error().into());
        }
        let mut answer = Answer::default();
        let mut buf = vec![0u8; 64 << 10];
        while answer.ack.is_none() {
            // SAFETY: `buf` is a live, writable buffer of the given length; the fd is open.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
            parse(&buf[..n], &mut answer)?;
        }
        match answer.ack {
            Some(0) => Ok(answer),
            Some(errno) => {
                Err(NetlinkError::Refused { what, source: io::Error::from_raw_os_error(errno) })
            }
            None => Err(NetlinkError::Malformed),
        }
    }
}

/// A fresh `NETLINK_GENERIC` socket in the calling thread's network namespace.
fn generic_socket() -> Result<OwnedFd, NetlinkError> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let raw = unsafe {
        libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_GENERIC)
    };
    if raw < 0 {
        return Err(io::Error::last_os_error().into());
    }
    // SAFETY: `raw` is a fresh descriptor owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Whether this process shares the network namespace of PID 1 (unknown counts as yes: then
/// there is nothing else to try).
fn in_initial_netns() -> bool {
    use std::os::unix::fs::MetadataExt;
    let ino = |p: &str| std::fs::metadata(p).map(|m| (m.dev(), m.ino()));
    match (ino("/proc/self/ns/net"), ino("/proc/1/ns/net")) {
        (Ok(own), Ok(init)) => own == init,
        _ => true,
    }
}

/// A `NETLINK_GENERIC` socket bound to the initial network namespace: made by a short-lived
/// thread that first enters that namespace (setns affects only the calling thread), so no
/// thread of the daemon is left in another namespace. The socket keeps its namespace.
fn generic_socket_in_initial_netns() -> Result<OwnedFd, NetlinkError> {
    let worker = std::thread::spawn(|| -> Result<OwnedFd, NetlinkError> {
        let ns = std::fs::File::open("/proc/1/ns/net")?;
        // SAFETY: setns(2) on a descriptor this closure owns; it changes only this thread,
        // which ends right after making the socket.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error().into());
        }
        generic_socket()
    });
    worker.join().map_err(|_| NetlinkError::Malformed)?
}

/// The first attribute of `kind` in `answer`.
pub fn find(answer: &Answer, kind: u16) -> Option<&[u8]> {
    answer.attrs.iter().find(|(k, _)| *k == kind).map(|(_, v)| v.as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_layout_matches_the_uapi() {
        let bytes = Message::new(0x22, 1, 1)
            .u32(attr::INDEX, 7)
            .nest(attr::SOCKETS)
            .nest(attr::SOCK_ITEM)
            .u32(attr::SOCK_FD, 5)
            .end()
            .end()
            .bytes(9);
        assert_eq!(u32::from_ne_bytes(bytes[0..4].try_into().unwrap()) as usize, bytes.len());
        assert_eq!(u16::from_ne_bytes([bytes[4], bytes[5]]), 0x22);
        assert_eq!(u16::from_ne_bytes([bytes[6], bytes[7]]), 5, "REQUEST | ACK");
        assert_eq!(u32::from_ne_bytes(bytes[8..12].try_into().unwrap()), 9);
        assert_eq!(&bytes[16..20], &[1, 1, 0, 0]);
        // INDEX: len 8, type 1, value 7.
        assert_eq!(&bytes[20..22], &8u16.to_ne_bytes());
        assert_eq!(u32::from_ne_bytes(bytes[24..28].try_into().unwrap()), 7);
        // SOCKETS nests SOCK_ITEM nests SOCK_FD: 4 + (4 + 8) bytes.
        assert_eq!(u16::from_ne_bytes([bytes[28], bytes[29]]), 16);
        assert_eq!(u16::from_ne_bytes([bytes[30], bytes[31]]), attr::SOCKETS | (1 << 15));
        assert_eq!(u16::from_ne_bytes([bytes[32], bytes[33]]), 12);
        assert_eq!(bytes.len(), 44);
    }

    #[test]
    fn strings_are_nul_terminated_and_padded() {
        let bytes = Message::new(0x10, 3, 2).string(2, "nbd").bytes(1);
        assert_eq!(&bytes[20..28], &[8, 0, 2, 0, b'n', b'b', b'd', 0][..]);
        let bytes = Message::new(0x10, 3, 2).string(2, "nbd0").bytes(1);
        assert_eq!(bytes.len(), 20 + 12, "9 bytes of attribute padded to 12");
    }

    fn reply(kind: u16, body: &[u8]) -> Vec<u8> {
        let mut v = ((16 + body.len()) as u32).to_ne_bytes().to_vec();
        v.extend_from_slice(&kind.to_ne_bytes());
        v.extend_from_slice(&[0; 10]);
        v.extend_from_slice(body);
        v.resize(v.len().next_multiple_of(4), 0);
        v
    }

    #[test]
    fn parses_data_then_ack_and_errors() {
        let mut body = vec![1, 1, 0, 0];
        body.extend_from_slice(&8u16.to_ne_bytes());
        body.extend_from_slice(&attr::INDEX.to_ne_bytes());
        body.extend_from_slice(&3u32.to_ne_bytes());
        let mut datagram = reply(0x22, &body);
        datagram.extend(reply(uapi::NLMSG_ERROR, &[0; 20]));
        let mut a = Answer::default();
        parse(&datagram, &mut a).unwrap();
        assert_eq!(find(&a, attr::INDEX), Some(&3u32.to_ne_bytes()[..]));
        assert_eq!(a.ack, Some(0));

        let mut a = Answer::default();
        parse(&reply(uapi::NLMSG_ERROR, &(-22i32).to_ne_bytes()), &mut a).unwrap();
        assert_eq!(a.ack, Some(22));
        let mut short = reply(0x22, &body);
        short[0] = 200;
        assert!(matches!(parse(&short, &mut Answer::default()), Err(NetlinkError::Malformed)));
    }
}
