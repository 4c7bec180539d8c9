//! Test helpers: a real volume on a temp file, `serve` over `tokio::io::duplex`, and a small
//! raw-bytes NBD client to drive it. Only compiled for tests.

use std::{path::PathBuf, sync::Arc, time::Duration};

use bytes::BufMut;
use tempfile::TempDir;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, DuplexStream},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

use super::{codec, proto, serve, Exports, Limits};
use crate::{
    meta::MetaFile,
    role::Role,
    storage::{fault::FaultEngine, Store, StoreOptions},
    volume::{Volume, VolumeInfo},
};

/// Replies must arrive within this; a hang fails the test instead of stalling it.
pub const WAIT: Duration = Duration::from_secs(10);

/// A volume on a sparse temp file (sync engine, buffered I/O).
pub fn volume(dir: &TempDir, name: &str, size: u64, role: Role) -> Arc<Volume> {
    let path = dir.path().join(format!("{name}.img"));
    let opts = StoreOptions::sparse_sync(path.clone(), size);
    let store = Store::open(&opts).expect("open store");
    let info = VolumeInfo {
        name: name.into(),
        node: "alpha".into(),
        socket: PathBuf::from(format!("/nonexistent/{name}.sock")),
        backing: path,
        index: 0,
        // A volume with a peer starts Secondary, one without is Primary at once.
        peer: (role == Role::Secondary).then(|| "beta".to_string()),
    };
    build(dir, name, size, info, store)
}

/// A volume whose engine fails the ops the returned [`FaultEngine`] is told to fail.
pub fn faulty_volume(dir: &TempDir, name: &str, size: u64) -> (Arc<Volume>, Arc<FaultEngine>) {
    let path = dir.path().join(format!("{name}.img"));
    let opts = StoreOptions::sparse_sync(path.clone(), size);
    let mut fault = None;
    let store = Store::open(&opts).expect("open store").map_engine(|inner| {
        let f = Arc::new(FaultEngine::new(inner));
        fault = Some(Arc::clone(&f));
        f
    });
    let info = VolumeInfo {
        name: name.into(),
        node: "alpha".into(),
        socket: PathBuf::from(format!("/nonexistent/{name}.sock")),
        backing: path,
        index: 0,
        peer: None,
    };
    (build(dir, name, size, info, store), fault.expect("map_engine calls its closure"))
}

/// The volume with fresh metadata next to its backing file.
fn build(dir: &TempDir, name: &str, size: u64, info: VolumeInfo, store: Store) -> Arc<Volume> {
    let meta = dir.path().join(format!("{name}.meta"));
    let (file, meta) =
        MetaFile::open_or_create(&meta, size, "alpha", store.created()).expect("metadata");
    Arc::new(Volume::open(info, store, meta, file, Default::default()).expect("tracking"))
}

/// One served connection.
pub struct Conn {
    pub c: Client,
    pub task: JoinHandle<()>,
    pub shutdown: CancellationToken,
}

/// Starts `serve` on one end of a duplex pipe; the client gets the other end.
pub fn connect(exports: &Arc<Exports>, limits: Limits) -> Conn {
    let (client, server) = tokio::io::duplex(4 << 20);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(serve(server, Arc::clone(exports), limits, shutdown.clone()));
    Conn { c: Client { s: client }, task, shutdown }
}

impl Conn {
    /// Waits for `serve` to return.
    pub async fn finished(self) {
        tokio::time::timeout(WAIT, self.task).await.expect("serve returned").expect("no panic");
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptReply {
    pub option: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub payload: Vec<u8>,
}

pub struct Client {
    pub s: DuplexStream,
}

impl Client {
    pub async fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0; n];
        tokio::time::timeout(WAIT, self.s.read_exact(&mut b))
            .await
            .expect("reply in time")
            .expect("read");
        b
    }

    pub async fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.bytes(2).await.try_into().unwrap())
    }

    pub async fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.bytes(4).await.try_into().unwrap())
    }

    pub async fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.bytes(8).await.try_into().unwrap())
    }

    pub async fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).await.expect("send");
    }

    /// Reads the greeting, returns the handshake flags.
    pub async fn greeting(&mut self) -> u16 {
        assert_eq!(self.u64().await, proto::NBDMAGIC);
        assert_eq!(self.u64().await, proto::IHAVEOPT);
        self.u16().await
    }

    /// Greeting, then client flags.
    pub async fn start(&mut self, client_flags: u32) {
        self.greeting().await;
        self.send(&client_flags.to_be_bytes()).await;
    }

    pub async fn option(&mut self, option: u32, data: &[u8]) {
        let mut b = Vec::new();
        b.put_u64(proto::IHAVEOPT);
        b.put_u32(option);
        b.put_u32(data.len() as u32);
        b.put_slice(data);
        self.send(&b).await;
    }

    pub async fn reply(&mut self) -> OptReply {
        assert_eq!(self.u64().await, proto::REPLY_MAGIC);
        let (option, kind, len) = (self.u32().await, self.u32().await, self.u32().await);
        OptReply { option, kind, data: self.bytes(len as usize).await }
    }

    /// Replies up to and including the final one (anything but INFO and SERVER).
    pub async fn replies(&mut self) -> Vec<OptReply> {
        let mut all = Vec::new();
        loop {
            let r = self.reply().await;
            let last = !matches!(r.kind, proto::rep::INFO | proto::rep::SERVER);
            all.push(r);
            if last {
                return all;
            }
        }
    }

    /// Sends INFO/GO for `name`, returns every reply.
    pub async fn info(&mut self, option: u32, name: &str, infos: &[u16]) -> Vec<OptReply> {
        self.option(option, &info_data(name.as_bytes(), infos)).await;
        self.replies().await
    }

    /// Full handshake with GO, optionally asking for structured replies first.
    pub async fn go(&mut self, name: &str, structured: bool) -> Vec<OptReply> {
        self.start(proto::cflag::FIXED_NEWSTYLE | proto::cflag::NO_ZEROES).await;
        if structured {
            self.option(proto::opt::STRUCTURED_REPLY, &[]).await;
            assert_eq!(self.reply().await.kind, proto::rep::ACK);
        }
        let r = self.info(proto::opt::GO, name, &[]).await;
        assert_eq!(r.last().unwrap().kind, proto::rep::ACK, "GO failed: {r:?}");
        r
    }

    /// GO for `name` on a connection past the client flags; asserts success.
    pub async fn go_after_start(&mut self, name: &str) -> Vec<OptReply> {
        let r = self.info(proto::opt::GO, name, &[]).await;
        assert_eq!(r.last().unwrap().kind, proto::rep::ACK, "GO failed: {r:?}");
        r
    }

    pub async fn request(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) {
        let mut b = Vec::new();
        let r = codec::Request { flags, kind, cookie, offset, length: len };
        codec::encode_request(&mut b, &r);
        self.send(&b).await;
    }

    pub async fn write(&mut self, cookie: u64, offset: u64, data: &[u8]) {
        self.request(proto::cmd::WRITE, 0, cookie, offset, data.len() as u32).await;
        self.send(data).await;
    }

    /// A simple reply: (error, cookie).
    pub async fn simple(&mut self) -> (u32, u64) {
        assert_eq!(self.u32().await, proto::SIMPLE_REPLY_MAGIC, "expected a simple reply");
        (self.u32().await, self.u64().await)
    }

    pub async fn chunk(&mut self) -> Chunk {
        assert_eq!(self.u32().await, proto::STRUCTURED_REPLY_MAGIC, "expected a chunk");
        let (flags, kind, cookie) = (self.u16().await, self.u16().await, self.u64().await);
        let len = self.u32().await as usize;
        Chunk { flags, kind, cookie, payload: self.bytes(len).await }
    }

    /// Simple READ: returns the error and, on success, the data.
    pub async fn read(&mut self, cookie: u64, offset: u64, len: u32) -> (u32, Vec<u8>) {
        self.request(proto::cmd::READ, 0, cookie, offset, len).await;
        let (err, c) = self.simple().await;
        assert_eq!(c, cookie);
        let data = if err == 0 { self.bytes(len as usize).await } else { Vec::new() };
        (err, data)
    }

    /// The server closed the connection (EOF) without sending anything more.
    pub async fn expect_eof(&mut self) {
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(WAIT, self.s.read(&mut b)).await.expect("EOF in time");
        assert!(matches!(n, Ok(0) | Err(_)), "expected EOF, got a byte {:?}", b);
    }
}

pub fn info_data(name: &[u8], infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    d.put_u32(name.len() as u32);
    d.put_slice(name);
    d.put_u16(infos.len() as u16);
    for i in infos {
        d.put_u16(*i);
    }
    d
}

/// A deterministic, position-dependent pattern so misplaced bytes show.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (seed.wrapping_mul(31).wrapping_add(i as u64 * 7) % 251) as u8).collect()
}
