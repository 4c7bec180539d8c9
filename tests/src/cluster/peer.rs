//! Playing the other end of the replication link by hand, with blockd's own wire format
//! (`blockd::replication::wire`) and authentication (`blockd::replication::auth`):
//!
//! - [`Wire`]: a blocking frame reader/writer over one TCP stream, for a fake peer that sends
//!   what no honest node sends (another protocol version, data before authentication).
//! - [`Proxy`]: a man in the middle between the two real nodes that forwards every frame
//!   unchanged until armed, then does one [`Fault`] to the next large record (a data frame:
//!   4 KiB or more) — flips a byte in its body, drops it, sends it twice, or sends it after the
//!   record that follows — as a faulty NIC or switch (or an attacker) would, and refuses
//!   further connections until released. It knows the stream's shape (two clear frames each
//!   way, HELLO and NOISE, then records), not the keys.
//!
//! Sockets are created inside a node's namespace (see [`Netns::enter`]/[`Netns::spawn`]) and
//! are used from the test's threads afterwards.

use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use blockd::replication::record::{self, Channel};
use blockd::replication::wire::{self, Decoded, Frame, Message};

use super::Netns;

/// A fake peer's end of one replication connection.
pub struct Wire {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Wire {
    /// Waits up to `timeout` for a connection on `listener` (created in a namespace).
    pub fn accept(listener: &TcpListener, timeout: Duration) -> Wire {
        listener.set_nonblocking(true).expect("nonblocking listener");
        let end = Instant::now() + timeout;
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false).expect("blocking stream");
                    return Wire { stream, buf: Vec::new() };
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < end => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("no replication connection within {timeout:?}: {e}"),
            }
        }
    }

    /// Wraps a connected stream (e.g. one dialed from inside a namespace).
    pub fn from_stream(stream: TcpStream) -> Wire {
        Wire { stream, buf: Vec::new() }
    }

    pub fn send(&mut self, frame: &Frame) {
        self.send_raw(&wire::encode(frame));
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send to the node");
    }

    /// Sends bytes the node may refuse halfway (it closes the connection).
    pub fn try_send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Seals `frame` into the next record of `ch` and sends it.
    pub fn send_sealed(&mut self, ch: &mut Channel, frame: &Frame) {
        let rec = ch.tx.seal(frame).expect("seal");
        self.send_raw(&rec);
    }

    /// The next frame in clear; Err says why there is none: "closed", a decode error, or a
    /// timeout.
    pub fn recv(&mut self, timeout: Duration) -> Result<Frame, String> {
        self.recv_with(timeout, |buf| match wire::decode(buf) {
            Ok(Decoded::Frame(frame, used)) => {
                buf.drain(..used);
                Ok(Some(frame))
            }
            Ok(Decoded::NeedMore(_)) => Ok(None),
            Err(e) => Err(format!("bad frame from the node: {e}")),
        })
    }

    /// The next record of `ch`, opened.
    pub fn recv_sealed(&mut self, ch: &mut Channel, timeout: Duration) -> Result<Frame, String> {
        self.recv_with(timeout, |buf| {
            let mut b = bytes::BytesMut::from(&buf[..]);
            let r = ch.rx.open(&mut b, record::MAX_BODY).map_err(|e| format!("bad record: {e}"));
            let used = buf.len() - b.len();
            buf.drain(..used);
            r
        })
    }

    fn recv_with(
        &mut self,
        timeout: Duration,
        mut decode: impl FnMut(&mut Vec<u8>) -> Result<Option<Frame>, String>,
    ) -> Result<Frame, String> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(frame) = decode(&mut self.buf)? {
                return Ok(frame);
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("no frame within {timeout:?}"));
            }
            self.stream.set_read_timeout(Some(left)).expect("read timeout");
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err("closed".into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return Err("closed".into()),
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }

    /// The next frame other than PING/PONG, or why there is none.
    pub fn recv_no_ping(&mut self, timeout: Duration) -> Result<Frame, String> {
        let end = Instant::now() + timeout;
        loop {
            let frame = self.recv(end.saturating_duration_since(Instant::now()))?;
            if !matches!(frame.msg, Message::Ping | Message::Pong) {
                return Ok(frame);
            }
        }
    }

    /// Whether the node closes the connection within `timeout` (frames it sends are skipped).
    pub fn closed_within(&mut self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        loop {
            match self.recv(end.saturating_duration_since(Instant::now())) {
                Ok(_) => continue,
                Err(e) => return e == "closed",
            }
        }
    }
}

/// A link-level frame (volume 0, id 0, not a reply).
pub fn frame(msg: Message) -> Frame {
    Frame { volume: 0, id: 0, reply: false, msg }
}

/// How much of a connection a [`Proxy`] records.
const RECORD_MAX: usize = 8 << 20;

/// State shared by a [`Proxy`]'s threads.
#[derive(Default)]
struct ProxyState {
    stop: AtomicBool,
    armed: AtomicBool,
    blocked: AtomicBool,
    /// What the armed proxy does.
    fault: Mutex<Fault>,
    /// A record held back by [`Fault::Reorder`] until the next one has gone.
    held: Mutex<Option<Vec<u8>>>,
    /// Length of the record that was tampered with.
    corrupted: Mutex<Option<usize>>,
    /// What the dialer sent on the latest connection (the first [`RECORD_MAX`] bytes).
    recorded: Mutex<Vec<u8>>,
    /// Every stream, to shut them down on drop.
    streams: Mutex<Vec<TcpStream>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// What an armed [`Proxy`] does to the next large record from the dialing node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Fault {
    /// One bit of its body flipped.
    #[default]
    Flip,
    /// Never forwarded.
    Drop,
    /// Forwarded twice.
    Duplicate,
    /// Held back and forwarded after the record that follows it.
    Reorder,
}

/// A TCP proxy inside one namespace; see the module doc. Stops everything on drop.
pub struct Proxy {
    state: Arc<ProxyState>,
    accept: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Listens on `listen` inside `ns` and forwards each connection to `target`, dialed from
    /// inside `ns` too.
    pub fn start(ns: &Netns, listen: SocketAddr, target: SocketAddr) -> Proxy {
        let listener = ns.enter(|| TcpListener::bind(listen));
        let listener = listener.unwrap_or_else(|e| panic!("proxy bind {listen}: {e}"));
        listener.set_nonblocking(true).expect("nonblocking listener");
        let state = Arc::new(ProxyState::default());
        let st = Arc::clone(&state);
        let accept = ns.spawn(move || accept_loop(&listener, target, &st));
        Proxy { state, accept: Some(accept) }
    }

    /// Corrupts the next large record from the dialing node; after that, refuses new
    /// connections.
    pub fn arm(&self) {
        self.arm_with(Fault::Flip);
    }

    /// Does `fault` to the next large record from the dialing node; after that, refuses new
    /// connections.
    pub fn arm_with(&self, fault: Fault) {
        *self.state.fault.lock().unwrap_or_else(|p| p.into_inner()) = fault;
        *self.state.corrupted.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.state.armed.store(true, Ordering::SeqCst);
    }

    /// The length of the record that was tampered with since the latest arm, once one was.
    pub fn corrupted(&self) -> Option<usize> {
        *self.state.corrupted.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The bytes the dialing node sent on the latest connection, as they went over the wire
    /// (for replaying them, or looking for plaintext).
    pub fn recorded(&self) -> Vec<u8> {
        self.state.recorded.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Accepts and forwards connections again.
    pub fn release(&self) {
        self.state.blocked.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        for s in self.state.streams.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let threads =
            std::mem::take(&mut *self.state.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, target: SocketAddr, st: &Arc<ProxyState>) {
    while !st.stop.load(Ordering::SeqCst) {
        let client = match listener.accept() {
            Ok((client, _)) => client,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(e) => {
                eprintln!("proxy: accept: {e}");
                return;
            }
        };
        if st.blocked.load(Ordering::SeqCst) {
            continue; // dropped: the dialing node sees the connection closed
        }
        // This thread is inside the namespace, so the dial is too.
        let Ok(server) = TcpStream::connect_timeout(&target, Duration::from_secs(2)) else {
            continue;
        };
        let _ = client.set_nonblocking(false);
        for s in [&client, &server] {
            if let Ok(clone) = s.try_clone() {
                st.streams.lock().unwrap_or_else(|p| p.into_inner()).push(clone);
            }
        }
        let (c2, s2) = (client.try_clone().expect("clone"), server.try_clone().expect("clone"));
        let (st1, st2) = (Arc::clone(st), Arc::clone(st));
        let forward = std::thread::spawn(move || forward_frames(client, server, &st1));
        let back = std::thread::spawn(move || copy_back(s2, c2, &st2));
        st.threads.lock().unwrap_or_else(|p| p.into_inner()).extend([forward, back]);
    }
}

/// Dialer → target: the two clear frames, then record by record, tampering with the first
/// large record after `arm`.
fn forward_frames(mut from: TcpStream, mut to: TcpStream, st: &ProxyState) {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    let mut clear = 2;
    st.recorded.lock().unwrap_or_else(|p| p.into_inner()).clear();
    // A record held back on an earlier connection belongs to that connection's keys.
    *st.held.lock().unwrap_or_else(|p| p.into_inner()) = None;
    while let Ok(n @ 1..) = from.read(&mut chunk) {
        buf.extend_from_slice(&chunk[..n]);
        let mut rec = st.recorded.lock().unwrap_or_else(|p| p.into_inner());
        let room = RECORD_MAX.saturating_sub(rec.len()).min(n);
        rec.extend_from_slice(&chunk[..room]);
        drop(rec);
        while let Some(used) = unit_len(&buf, clear) {
            if buf.len() < used {
                break;
            }
            let units = if clear > 0 {
                clear -= 1;
                vec![buf[..used].to_vec()]
            } else {
                tamper(&buf[..used], st)
            };
            if units.iter().any(|u| to.write_all(u).is_err()) {
                return close(&from, &to);
            }
            buf.drain(..used);
        }
    }
    close(&from, &to);
}

/// Length of the next unit at the front of `buf`: a clear frame while `clear` > 0 (None if
/// its header is not there yet), else a record.
fn unit_len(buf: &[u8], clear: usize) -> Option<usize> {
    if clear == 0 {
        return record::record_len(buf);
    }
    let h = wire::decode_header(buf).ok()??;
    Some(wire::HEADER_LEN + h.payload_len as usize + wire::TRAILER_LEN)
}

/// What goes on for `rec` (one whole record): itself, unless it is the first large record
/// since `arm` (then the armed [`Fault`] decides, and new connections are blocked), or it
/// follows a record held back by [`Fault::Reorder`] (then it goes first, the held one after).
fn tamper(rec: &[u8], st: &ProxyState) -> Vec<Vec<u8>> {
    if let Some(first) = st.held.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return vec![rec.to_vec(), first];
    }
    if rec.len() < 4096 || !st.armed.swap(false, Ordering::SeqCst) {
        return vec![rec.to_vec()];
    }
    st.blocked.store(true, Ordering::SeqCst);
    *st.corrupted.lock().unwrap_or_else(|p| p.into_inner()) = Some(rec.len());
    match *st.fault.lock().unwrap_or_else(|p| p.into_inner()) {
        Fault::Flip => {
            let mut r = rec.to_vec();
            r[rec.len() / 2] ^= 0x01;
            vec![r]
        }
        Fault::Drop => vec![],
        Fault::Duplicate => vec![rec.to_vec(), rec.to_vec()],
        Fault::Reorder => {
            *st.held.lock().unwrap_or_else(|p| p.into_inner()) = Some(rec.to_vec());
            vec![]
        }
    }
}

/// Target → dialer: bytes as they come.
fn copy_back(mut from: TcpStream, mut to: TcpStream, _st: &ProxyState) {
    let _ = std::io::copy(&mut from, &mut to);
    close(&from, &to);
}

fn close(a: &TcpStream, b: &TcpStream) {
    let _ = a.shutdown(Shutdown::Both);
    let _ = b.shutdown(Shutdown::Both);
}
