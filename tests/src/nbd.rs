//! A raw NBD client for the cases real clients never produce: bad magics, unknown options and
//! commands, out-of-range and oversized requests, torn payloads. Numbers follow NBD-NOTES §1.
//!
//! Every read has a timeout, so a server that hangs instead of answering fails the test
//! instead of hanging it.

use std::{
    io::{ErrorKind, Read, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const FLAG_FIXED_NEWSTYLE: u32 = 1;
pub const FLAG_NO_ZEROES: u32 = 2;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

pub const CHUNK_NONE: u16 = 0;
pub const CHUNK_OFFSET_DATA: u16 = 1;
pub const CHUNK_OFFSET_HOLE: u16 = 2;
pub const CHUNK_ERROR: u16 = 0x8001;
pub const CHUNK_ERROR_OFFSET: u16 = 0x8002;
pub const REPLY_FLAG_DONE: u16 = 1;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;

/// How long the client waits for any byte the server owes it.
const REPLY_TIMEOUT: Duration = Duration::from_secs(15);

/// One option reply: `typ` is ACK/INFO/SERVER or an error (bit 31 set).
#[derive(Debug, Clone)]
pub struct OptReply {
    pub option: u32,
    pub typ: u32,
    pub data: Vec<u8>,
}

/// What GO/INFO reported about an export.
#[derive(Debug, Clone, Default)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    /// (minimum, preferred, maximum payload), when the server sent NBD_INFO_BLOCK_SIZE.
    pub block_size: Option<(u32, u32, u32)>,
}

/// A transmission-phase reply.
#[derive(Debug, Clone)]
pub enum Reply {
    /// `data` only when `error == 0` and the request was a READ.
    Simple { error: u32, cookie: u64, data: Vec<u8> },
    /// Every chunk up to and including the one with DONE.
    Structured(Vec<Chunk>),
}

#[derive(Debug, Clone)]
pub struct Chunk {
    pub flags: u16,
    pub typ: u16,
    pub cookie: u64,
    pub payload: Vec<u8>,
}

impl Reply {
    /// The NBD error of the reply (0 on success); for structured replies the first ERROR chunk.
    pub fn error(&self) -> u32 {
        match self {
            Reply::Simple { error, .. } => *error,
            Reply::Structured(chunks) => chunks
                .iter()
                .find(|c| c.typ & 0x8000 != 0)
                .map(|c| u32::from_be_bytes(c.payload[0..4].try_into().expect("4 bytes")))
                .unwrap_or(0),
        }
    }

    pub fn cookie(&self) -> u64 {
        match self {
            Reply::Simple { cookie, .. } => *cookie,
            Reply::Structured(chunks) => chunks[0].cookie,
        }
    }
}

/// The 28-byte compact request header.
pub fn request_header(flags: u16, typ: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(28);
    b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&typ.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b
}

/// An option header plus data.
pub fn option_bytes(magic: u64, option: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&magic.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&u32::try_from(data.len()).expect("small option").to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// GO/INFO data: name length, name, the requested info types.
pub fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&u32::try_from(name.len()).expect("short name").to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(&u16::try_from(infos.len()).expect("few infos").to_be_bytes());
    for i in infos {
        b.extend_from_slice(&i.to_be_bytes());
    }
    b
}

pub struct RawClient {
    s: UnixStream,
    next_cookie: u64,
    /// Whether STRUCTURED_REPLY was acknowledged on this connection.
    pub structured: bool,
}

impl RawClient {
    /// Connects and reads the greeting; checks the magics and FIXED_NEWSTYLE.
    pub fn connect(socket: &Path) -> RawClient {
        let s = UnixStream::connect(socket)
            .unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
        s.set_read_timeout(Some(REPLY_TIMEOUT)).expect("set timeout");
        s.set_write_timeout(Some(REPLY_TIMEOUT)).expect("set timeout");
        let mut c = RawClient { s, next_cookie: 1, structured: false };
        let greeting = c.read_n(18);
        assert_eq!(u64::from_be_bytes(greeting[0..8].try_into().unwrap()), NBDMAGIC, "NBDMAGIC");
        assert_eq!(u64::from_be_bytes(greeting[8..16].try_into().unwrap()), IHAVEOPT, "IHAVEOPT");
        let hflags = u16::from_be_bytes(greeting[16..18].try_into().unwrap());
        assert!(hflags & 1 != 0, "FIXED_NEWSTYLE not offered (flags {hflags:#x})");
        c
    }

    /// Connects and sends client flags FIXED_NEWSTYLE | NO_ZEROES: ready for options.
    pub fn negotiating(socket: &Path) -> RawClient {
        let mut c = RawClient::connect(socket);
        c.send(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        c
    }

    /// A connection in the transmission phase on export `name`, via GO.
    pub fn transmission(socket: &Path, name: &str) -> (RawClient, ExportInfo) {
        let mut c = RawClient::negotiating(socket);
        let info = c.go(name, &[]).unwrap_or_else(|r| panic!("GO {name:?} refused: {r:?}"));
        (c, info)
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).unwrap_or_else(|e| panic!("send {} bytes: {e}", bytes.len()));
    }

    /// Like [`RawClient::send`] but tolerates the server having closed already.
    pub fn send_lenient(&mut self, bytes: &[u8]) {
        let _ = self.s.write_all(bytes);
    }

    pub fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        match self.s.read_exact(&mut buf) {
            Ok(()) => buf,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("server sent nothing for {REPLY_TIMEOUT:?} (wanted {n} bytes)")
            }
            Err(e) => panic!("reading {n} bytes: {e} (server closed the connection?)"),
        }
    }

    /// True if the server closes the connection (EOF or reset) within the reply timeout.
    /// Bytes still arriving before the close are discarded.
    pub fn closed_by_server(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        loop {
            match self.s.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }

    pub fn send_option(&mut self, option: u32, data: &[u8]) {
        self.send(&option_bytes(IHAVEOPT, option, data));
    }

    pub fn read_option_reply(&mut self) -> OptReply {
        let h = self.read_n(20);
        let magic = u64::from_be_bytes(h[0..8].try_into().unwrap());
        assert_eq!(magic, OPT_REPLY_MAGIC, "option reply magic, header {h:02x?}");
        let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        assert!(len < 1 << 20, "absurd option reply length {len}");
        OptReply { option, typ, data: self.read_n(len) }
    }

    /// Sends GO (or INFO) and collects replies until ACK (Ok) or an error (Err).
    pub fn go_or_info(
        &mut self,
        opt: u32,
        name: &str,
        infos: &[u16],
    ) -> Result<ExportInfo, OptReply> {
        self.send_option(opt, &go_data(name, infos));
        let mut info = ExportInfo::default();
        let mut saw_export = false;
        loop {
            let r = self.read_option_reply();
            assert_eq!(r.option, opt, "reply to the wrong option: {r:?}");
            match r.typ {
                REP_ACK => break,
                REP_INFO => saw_export |= parse_info(&r.data, &mut info),
                t if t & 0x8000_0000 != 0 => return Err(r),
                t => panic!("unexpected reply type {t:#x} to GO/INFO: {r:?}"),
            }
        }
        assert!(saw_export, "GO/INFO ACKed without NBD_INFO_EXPORT (NBD-NOTES §2.2)");
        Ok(info)
    }

    pub fn go(&mut self, name: &str, infos: &[u16]) -> Result<ExportInfo, OptReply> {
        self.go_or_info(OPT_GO, name, infos)
    }

    /// Sends a request header plus `payload`, returns its cookie.
    pub fn request(&mut self, flags: u16, typ: u16, offset: u64, len: u32, payload: &[u8]) -> u64 {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut b = request_header(flags, typ, cookie, offset, len);
        b.extend_from_slice(payload);
        self.send(&b);
        cookie
    }

    /// Reads one reply. `read_len` is the data length a successful simple READ reply carries
    /// (0 for other commands).
    pub fn read_reply(&mut self, read_len: usize) -> Reply {
        let magic = u32::from_be_bytes(self.read_n(4).try_into().unwrap());
        self.reply_after_magic(magic, read_len)
    }

    /// Like [`RawClient::read_reply`], but `None` if the server hangs up before the reply.
    pub fn read_reply_or_close(&mut self, read_len: usize) -> Option<Reply> {
        let mut magic = [0u8; 4];
        match self.s.read_exact(&mut magic) {
            Ok(()) => Some(self.reply_after_magic(u32::from_be_bytes(magic), read_len)),
            Err(e) if matches!(e.kind(), ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset) => {
                None
            }
            Err(e) => panic!("waiting for a reply: {e}"),
        }
    }

    fn reply_after_magic(&mut self, magic: u32, read_len: usize) -> Reply {
        match magic {
            SIMPLE_REPLY_MAGIC => {
                let h = self.read_n(12);
                let error = u32::from_be_bytes(h[0..4].try_into().unwrap());
                let cookie = u64::from_be_bytes(h[4..12].try_into().unwrap());
                let data = if error == 0 { self.read_n(read_len) } else { Vec::new() };
                Reply::Simple { error, cookie, data }
            }
            STRUCTURED_REPLY_MAGIC => Reply::Structured(self.read_chunks()),
            m => panic!("bad reply magic {m:#x}"),
        }
    }

    fn read_chunks(&mut self) -> Vec<Chunk> {
        let mut chunks = Vec::new();
        loop {
            let h = self.read_n(16);
            let flags = u16::from_be_bytes(h[0..2].try_into().unwrap());
            let typ = u16::from_be_bytes(h[2..4].try_into().unwrap());
            let cookie = u64::from_be_bytes(h[4..12].try_into().unwrap());
            let len = u32::from_be_bytes(h[12..16].try_into().unwrap()) as usize;
            assert!(len <= (64 << 20) + 8, "absurd chunk length {len}");
            chunks.push(Chunk { flags, typ, cookie, payload: self.read_n(len) });
            if flags & REPLY_FLAG_DONE != 0 {
                return chunks;
            }
            let magic = u32::from_be_bytes(self.read_n(4).try_into().unwrap());
            assert_eq!(magic, STRUCTURED_REPLY_MAGIC, "chunk without DONE followed by {magic:#x}");
        }
    }

    /// One command with its reply; panics if the reply's cookie is not ours.
    pub fn call(&mut self, flags: u16, typ: u16, offset: u64, len: u32, payload: &[u8]) -> Reply {
        let cookie = self.request(flags, typ, offset, len, payload);
        let read_len = if typ == CMD_READ { len as usize } else { 0 };
        let reply = self.read_reply(read_len);
        assert_eq!(reply.cookie(), cookie, "reply cookie must echo the request (§2.5)");
        reply
    }

    /// WRITE; returns the NBD error (0 = success).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> u32 {
        let len = u32::try_from(data.len()).expect("write fits u32");
        self.call(0, CMD_WRITE, offset, len, data).error()
    }

    /// READ; the data, or the NBD error.
    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        match self.call(0, CMD_READ, offset, len, &[]) {
            Reply::Simple { error: 0, data, .. } => Ok(data),
            Reply::Simple { error, .. } => Err(error),
            Reply::Structured(chunks) => assemble_read(&chunks, offset, len),
        }
    }

    pub fn flush(&mut self) -> u32 {
        self.call(0, CMD_FLUSH, 0, 0, &[]).error()
    }
}

/// Fills INFO fields from one NBD_REP_INFO payload; true if it was INFO_EXPORT.
fn parse_info(d: &[u8], info: &mut ExportInfo) -> bool {
    let typ = u16::from_be_bytes(d[0..2].try_into().expect("info type"));
    match typ {
        INFO_EXPORT => {
            assert_eq!(d.len(), 12, "INFO_EXPORT must be exactly 12 bytes (§2.2)");
            info.size = u64::from_be_bytes(d[2..10].try_into().unwrap());
            info.flags = u16::from_be_bytes(d[10..12].try_into().unwrap());
            true
        }
        INFO_BLOCK_SIZE => {
            assert_eq!(d.len(), 14, "INFO_BLOCK_SIZE must be exactly 14 bytes (§1)");
            let u = |i: usize| u32::from_be_bytes(d[i..i + 4].try_into().unwrap());
            info.block_size = Some((u(2), u(6), u(10)));
            false
        }
        _ => false,
    }
}

/// Puts OFFSET_DATA / OFFSET_HOLE chunks together into the read's bytes, checking the
/// structured-reply rules of NBD-NOTES §2.5 (inside the request, no overlap, full cover).
pub fn assemble_read(chunks: &[Chunk], offset: u64, len: u32) -> Result<Vec<u8>, u32> {
    let mut buf = vec![0u8; len as usize];
    let mut covered = vec![false; len as usize];
    for c in chunks {
        let at = |p: &[u8]| u64::from_be_bytes(p[0..8].try_into().expect("chunk offset"));
        let (start, n, data) = match c.typ {
            CHUNK_OFFSET_DATA => (at(&c.payload), c.payload.len() - 8, Some(&c.payload[8..])),
            CHUNK_OFFSET_HOLE => (
                at(&c.payload),
                u32::from_be_bytes(c.payload[8..12].try_into().unwrap()) as usize,
                None,
            ),
            CHUNK_NONE => continue,
            t if t & 0x8000 != 0 => {
                return Err(u32::from_be_bytes(c.payload[0..4].try_into().expect("error")))
            }
            t => panic!("unexpected chunk type {t:#x} in a READ reply"),
        };
        assert!(
            start >= offset && start + n as u64 <= offset + u64::from(len),
            "chunk outside read"
        );
        let rel = (start - offset) as usize;
        assert!(covered[rel..rel + n].iter().all(|c| !c), "overlapping chunks (§2.5)");
        covered[rel..rel + n].iter_mut().for_each(|c| *c = true);
        if let Some(d) = data {
            buf[rel..rel + n].copy_from_slice(d);
        }
    }
    assert!(covered.iter().all(|c| *c), "successful structured READ must cover the request");
    Ok(buf)
}
