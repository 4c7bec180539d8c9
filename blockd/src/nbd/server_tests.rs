//! Transmission tests: `serve` over a duplex pipe with a real volume on a temp file.
//! Names cite NBD-NOTES sections.

use std::{collections::HashSet, sync::Arc};

use tempfile::TempDir;

use crate::{
    nbd::{
        proto::{chunk, cmd, cmdflag, errno},
        testkit::{connect, faulty_volume, pattern, volume, Conn},
        Exports, Limits,
    },
    role::Role,
    storage::fault::{Fault, OpKind},
    volume::Volume,
};

const SIZE: u64 = 64 << 20;
const MIB: u32 = 1 << 20;

struct Setup {
    _dir: TempDir,
    vol: Arc<Volume>,
    ex: Arc<Exports>,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let vol = volume(&dir, "vol", SIZE, Role::Primary);
    let ex = Arc::new(Exports::new(vec![Arc::clone(&vol)], Some("vol")));
    Setup { _dir: dir, vol, ex }
}

async fn open(s: &Setup, structured: bool, limits: Limits) -> Conn {
    let mut conn = connect(&s.ex, limits);
    conn.c.go("vol", structured).await;
    conn
}

async fn on_disk(vol: &Volume, offset: u64, len: u32) -> Vec<u8> {
    vol.read(offset, len).await.expect("read volume").to_vec()
}

#[tokio::test]
async fn s2_5_write_then_read_back_simple_replies() {
    let s = setup();
    let mut conn = open(&s, false, Limits::default()).await;
    let data = pattern(1, 10_000);
    conn.c.write(0x1122_3344_5566_7788, 4097, &data).await;
    assert_eq!(conn.c.simple().await, (0, 0x1122_3344_5566_7788), "cookie echoed");
    assert_eq!(conn.c.read(2, 4097, data.len() as u32).await, (0, data.clone()));
    assert_eq!(on_disk(&s.vol, 4097, data.len() as u32).await, data);
}

#[tokio::test]
async fn s2_5_structured_read_is_one_data_chunk_and_errors_are_error_chunks() {
    let s = setup();
    let mut conn = open(&s, true, Limits::default()).await;
    let data = pattern(2, 4096);
    conn.c.write(1, 8192, &data).await;
    assert_eq!(conn.c.simple().await, (0, 1), "non-READ replies may stay simple");
    conn.c.request(cmd::READ, 0, 2, 8192, 4096).await;
    let ch = conn.c.chunk().await;
    assert_eq!((ch.flags, ch.kind, ch.cookie), (chunk::FLAG_DONE, chunk::OFFSET_DATA, 2));
    assert_eq!(u64::from_be_bytes(ch.payload[..8].try_into().unwrap()), 8192);
    assert_eq!(&ch.payload[8..], &data[..]);
    // Early errors on READ are structured too [M], with a message.
    conn.c.request(cmd::READ, 0, 3, SIZE, 1).await;
    let ch = conn.c.chunk().await;
    assert_eq!((ch.flags, ch.kind, ch.cookie), (chunk::FLAG_DONE, chunk::ERROR, 3));
    assert_eq!(u32::from_be_bytes(ch.payload[..4].try_into().unwrap()), errno::EINVAL);
    let msg_len = u16::from_be_bytes([ch.payload[4], ch.payload[5]]) as usize;
    assert!(msg_len > 0 && ch.payload.len() == 6 + msg_len);
    conn.c.request(cmd::READ, cmdflag::DF, 4, 0, 512).await;
    assert_eq!(conn.c.chunk().await.kind, chunk::ERROR, "DF was not offered");
    // Zero-length READ: a NONE chunk with DONE.
    conn.c.request(cmd::READ, 0, 5, 0, 0).await;
    let ch = conn.c.chunk().await;
    assert_eq!(
        (ch.flags, ch.kind, ch.cookie, ch.payload.len()),
        (chunk::FLAG_DONE, chunk::NONE, 5, 0)
    );
}

#[tokio::test]
async fn s2_7_out_of_range_requests_are_refused_and_change_nothing() {
    let s = setup();
    let mut conn = open(&s, false, Limits::default()).await;
    let last = pattern(3, 4096);
    conn.c.write(1, SIZE - 4096, &last).await;
    assert_eq!(conn.c.simple().await, (0, 1));
    // A write straddling the end: ENOSPC, its payload consumed, the last block unchanged.
    conn.c.write(2, SIZE - 2048, &[0xee; 4096]).await;
    assert_eq!(conn.c.simple().await, (errno::ENOSPC, 2));
    conn.c.request(cmd::WRITE_ZEROES, 0, 3, SIZE - 4096, 8192).await;
    assert_eq!(conn.c.simple().await, (errno::ENOSPC, 3));
    conn.c.request(cmd::TRIM, 0, 4, SIZE - 4096, 8192).await;
    assert_eq!(conn.c.simple().await, (errno::EINVAL, 4));
    assert_eq!(conn.c.read(5, SIZE - 4096, 8192).await, (errno::EINVAL, vec![]));
    assert_eq!(conn.c.read(6, SIZE + 1, 0).await, (errno::EINVAL, vec![]));
    // §2.6: offset 2^64 - 512, length 1024 must not wrap around.
    let wrap = u64::MAX - 511;
    assert_eq!(conn.c.read(7, wrap, 1024).await, (errno::EINVAL, vec![]));
    conn.c.write(8, wrap, &[0xee; 1024]).await;
    assert_eq!(conn.c.simple().await, (errno::ENOSPC, 8));
    assert_eq!(conn.c.read(9, SIZE - 4096, 4096).await, (0, last.clone()));
    assert_eq!(on_disk(&s.vol, SIZE - 4096, 4096).await, last);
}

#[tokio::test]
async fn s2_5_unknown_commands_and_bad_flags_are_einval_and_stream_stays_in_sync() {
    let s = setup();
    let mut conn = open(&s, false, Limits::default()).await;
    let c = &mut conn.c;
    for (cookie, kind) in [(1, 9u16), (2, cmd::CACHE), (3, cmd::BLOCK_STATUS), (4, 0xffff)] {
        c.request(kind, 0, cookie, 0, 512).await;
        assert_eq!(c.simple().await, (errno::EINVAL, cookie));
    }
    // A rejected WRITE's payload is consumed: the next request is parsed correctly.
    c.request(cmd::WRITE, cmdflag::NO_HOLE, 5, 0, 4096).await;
    c.send(&[0xee; 4096]).await;
    assert_eq!(c.simple().await, (errno::EINVAL, 5));
    c.request(cmd::WRITE_ZEROES, cmdflag::FAST_ZERO, 6, 0, 4096).await;
    assert_eq!(c.simple().await, (errno::EINVAL, 6), "§2.9: FAST_ZERO never offered");
    c.request(cmd::READ, cmdflag::REQ_ONE, 7, 0, 512).await;
    assert_eq!(c.simple().await, (errno::EINVAL, 7));
    c.request(cmd::FLUSH, 1 << 9, 8, 0, 0).await;
    assert_eq!(c.simple().await, (errno::EINVAL, 8));
    assert_eq!(c.read(9, 0, 4096).await, (0, vec![0; 4096]));
    assert_eq!(on_disk(&s.vol, 0, 4096).await, vec![0; 4096]);
}

#[tokio::test]
async fn s2_3_write_over_max_payload_is_einval_with_payload_discarded() {
    let s = setup();
    let limits = Limits { max_request: MIB, ..Limits::default() };
    let mut conn = open(&s, false, limits).await;
    let c = &mut conn.c;
    c.request(cmd::WRITE, 0, 1, 0, 3 * MIB).await;
    c.send(&vec![0xee; 3 * MIB as usize]).await;
    assert_eq!(c.simple().await, (errno::EINVAL, 1));
    assert_eq!(c.read(2, 0, 2 * MIB).await, (errno::EINVAL, vec![]));
    assert_eq!(c.read(3, 0, MIB).await, (0, vec![0; MIB as usize]));
}

#[tokio::test]
async fn s2_3_32mib_read_and_write_work() {
    let s = setup();
    let mut conn = open(&s, false, Limits::default()).await;
    let data = pattern(4, 32 << 20);
    conn.c.write(1, 4096, &data).await;
    assert_eq!(conn.c.simple().await, (0, 1));
    let (err, back) = conn.c.read(2, 4096, 32 << 20).await;
    assert!(err == 0 && back == data);
}

#[tokio::test]
async fn s2_3_absurd_write_length_hangs_up() {
    let s = setup();
    let mut conn = open(&s, false, Limits::default()).await;
    conn.c.request(cmd::WRITE, 0, 1, 0, u32::MAX).await;
    conn.c.expect_eof().await;
    conn.finished().await;
}

#[tokio::test]
async fn s2_5_bad_request_magic_hangs_up() {
    let s = setup();
    let mut conn = open(&s, false, Limits::default()).await;
    conn.c.send(&[0x25, 0x60, 0x95, 0x14, 0, 0, 0, 0]).await;
    conn.c.send(&[0; 20]).await;
    conn.c.expect_eof().await;
    conn.finished().await;
}

#[tokio::test]
async fn s2_5_zero_length_requests_succeed() {
    let s = setup();
    let mut conn = open(&s, false, Limits::default()).await;
    let c = &mut conn.c;
    assert_eq!(c.read(1, 0, 0).await, (0, vec![]));
    for (cookie, kind) in [(2, cmd::WRITE), (3, cmd::TRIM), (4, cmd::WRITE_ZEROES)] {
        c.request(kind, 0, cookie, SIZE, 0).await;
        assert_eq!(c.simple().await, (0, cookie));
    }
    assert_eq!(c.read(5, 0, 8).await, (0, vec![0; 8]), "still in sync");
}

#[tokio::test]
async fn s2_6_flush_fua_trim_and_write_zeroes() {
    let s = setup();
    let mut conn = open(&s, false, Limits::default()).await;
    let c = &mut conn.c;
    let data = pattern(5, 3 * 4096);
    c.request(cmd::WRITE, cmdflag::FUA, 1, 0, data.len() as u32).await;
    c.send(&data).await;
    assert_eq!(c.simple().await, (0, 1));
    c.request(cmd::FLUSH, cmdflag::FUA, 2, 0, 0).await;
    assert_eq!(c.simple().await, (0, 2), "FUA accepted on FLUSH [M]");
    c.request(cmd::WRITE_ZEROES, cmdflag::NO_HOLE | cmdflag::FUA, 3, 100, 4000).await;
    assert_eq!(c.simple().await, (0, 3));
    c.request(cmd::WRITE_ZEROES, 0, 4, 4096, 4096).await;
    assert_eq!(c.simple().await, (0, 4));
    let mut want = data.clone();
    want[100..4100].fill(0);
    want[4096..8192].fill(0);
    assert_eq!(c.read(5, 0, want.len() as u32).await, (0, want));
    c.request(cmd::TRIM, cmdflag::FUA, 6, 0, 1 << 30).await;
    assert_eq!(c.simple().await, (errno::EINVAL, 6), "TRIM beyond the end");
    c.request(cmd::TRIM, 0, 7, 0, 8192).await;
    assert_eq!(c.simple().await, (0, 7));
    c.request(cmd::READ, cmdflag::FUA, 8, 8192, 4096).await;
    assert_eq!(c.simple().await, (0, 8), "FUA accepted on READ [M]");
    assert_eq!(c.bytes(4096).await, data[8192..]);
}

/// Sends `n` 4 KiB writes in one burst; returns their data by cookie.
async fn burst(conn: &mut Conn, n: u64) -> Vec<Vec<u8>> {
    let mut bytes = Vec::new();
    let mut datas = Vec::new();
    for i in 0..n {
        let data = pattern(100 + i, 4096);
        let r = crate::nbd::codec::Request {
            flags: 0,
            kind: cmd::WRITE,
            cookie: i,
            offset: i * 8192,
            length: 4096,
        };
        crate::nbd::codec::encode_request(&mut bytes, &r);
        bytes.extend_from_slice(&data);
        datas.push(data);
    }
    conn.c.send(&bytes).await;
    datas
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s2_5_sixty_four_pipelined_writes_all_answered_in_any_order() {
    let s = setup();
    let mut conn = open(&s, false, Limits::default()).await;
    let datas = burst(&mut conn, 64).await;
    let mut seen = HashSet::new();
    for _ in 0..64 {
        let (err, cookie) = conn.c.simple().await;
        assert_eq!(err, 0);
        assert!(cookie < 64 && seen.insert(cookie), "unknown or repeated cookie {cookie}");
    }
    for (i, data) in datas.iter().enumerate() {
        assert_eq!(&conn.c.read(1000, i as u64 * 8192, 4096).await.1, data);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s2_5_small_in_flight_limit_still_serves_a_long_pipeline() {
    let s = setup();
    let limits = Limits { max_in_flight: 2, ..Limits::default() };
    let mut conn = open(&s, true, limits).await;
    let mut bytes = Vec::new();
    for i in 0..200u64 {
        let r = crate::nbd::codec::Request {
            flags: 0,
            kind: cmd::READ,
            cookie: i,
            offset: i * 512,
            length: 512,
        };
        crate::nbd::codec::encode_request(&mut bytes, &r);
    }
    conn.c.send(&bytes).await;
    let mut seen = HashSet::new();
    for _ in 0..200 {
        let ch = conn.c.chunk().await;
        assert_eq!((ch.kind, ch.payload.len()), (chunk::OFFSET_DATA, 8 + 512));
        assert!(seen.insert(ch.cookie));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s2_8_disc_finishes_and_answers_everything_received_first() {
    let s = setup();
    let mut conn = open(&s, false, Limits::default()).await;
    let datas = burst(&mut conn, 64).await;
    conn.c.request(cmd::DISC, 0, 999, 0, 0).await;
    let mut seen = HashSet::new();
    for _ in 0..64 {
        let (err, cookie) = conn.c.simple().await;
        assert!(err == 0 && seen.insert(cookie));
    }
    conn.c.expect_eof().await;
    conn.finished().await;
    for (i, data) in datas.iter().enumerate() {
        assert_eq!(&on_disk(&s.vol, i as u64 * 8192, 4096).await, data, "write {i}");
    }
}

#[tokio::test]
async fn s2_8_torn_write_is_never_applied() {
    let s = setup();
    let mut conn = open(&s, false, Limits::default()).await;
    conn.c.write(1, 0, &pattern(6, 4096)).await;
    assert_eq!(conn.c.simple().await, (0, 1));
    conn.c.request(cmd::WRITE, 0, 2, 65536, 65536).await;
    conn.c.send(&[0xee; 30000]).await;
    drop(conn.c); // EOF in the middle of the payload
    tokio::time::timeout(super::super::testkit::WAIT, conn.task).await.unwrap().unwrap();
    assert_eq!(on_disk(&s.vol, 0, 4096).await, pattern(6, 4096));
    assert_eq!(on_disk(&s.vol, 65536, 65536).await, vec![0; 65536]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s2_8_hard_disconnect_with_requests_in_flight_leaves_server_usable() {
    let s = setup();
    let mut conn = open(&s, false, Limits::default()).await;
    burst(&mut conn, 32).await;
    drop(conn.c); // gone without reading a single reply
    tokio::time::timeout(super::super::testkit::WAIT, conn.task).await.unwrap().unwrap();
    let mut again = open(&s, false, Limits::default()).await;
    assert_eq!(again.c.read(1, 0, 4096).await.0, 0);
    // Whatever completed is whole: each 4 KiB block is either untouched or fully written.
    for i in 0..32u64 {
        let got = on_disk(&s.vol, i * 8192, 4096).await;
        assert!(got == vec![0; 4096] || got == pattern(100 + i, 4096), "block {i} is torn");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s2_8_shutdown_stops_reading_answers_in_flight_and_closes() {
    let s = setup();
    let mut conn = open(&s, false, Limits::default()).await;
    let datas = burst(&mut conn, 16).await;
    conn.shutdown.cancel();
    let mut answered = Vec::new();
    loop {
        let mut magic = [0u8; 4];
        use tokio::io::AsyncReadExt;
        match conn.c.s.read_exact(&mut magic).await {
            Ok(_) => {}
            Err(_) => break, // EOF: the server closed
        }
        let (err, cookie) = (conn.c.u32().await, conn.c.u64().await);
        assert_eq!(err, 0, "in-flight requests are executed, not failed");
        answered.push(cookie);
    }
    conn.finished().await;
    for cookie in answered {
        let i = cookie as usize;
        assert_eq!(on_disk(&s.vol, cookie * 8192, 4096).await, datas[i], "acknowledged write {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s2_4_multi_conn_flush_covers_writes_of_other_connections() {
    let s = setup();
    let mut a = open(&s, false, Limits::default()).await;
    let mut b = open(&s, true, Limits::default()).await;
    let data = pattern(7, 4096);
    a.c.write(1, 12288, &data).await;
    assert_eq!(a.c.simple().await, (0, 1));
    b.c.request(cmd::FLUSH, 0, 2, 0, 0).await;
    assert_eq!(b.c.simple().await, (0, 2));
    b.c.request(cmd::READ, 0, 3, 12288, 4096).await;
    assert_eq!(&b.c.chunk().await.payload[8..], &data[..]);
}

#[tokio::test]
async fn s2_5_read_error_sends_no_data_and_stream_stays_in_sync() {
    let dir = tempfile::tempdir().unwrap();
    let (vol, fault) = faulty_volume(&dir, "vol", SIZE);
    let ex = Arc::new(Exports::new(vec![vol], Some("vol")));
    fault.fail(Fault { kind: OpKind::Read, range: Some(0..4096), errno: libc::EIO });
    let mut simple = connect(&ex, Limits::default());
    simple.c.go("vol", false).await;
    assert_eq!(simple.c.read(1, 0, 4096).await, (errno::EIO, vec![]), "no data after an error [M]");
    assert_eq!(simple.c.read(2, 8192, 512).await, (0, vec![0; 512]));
    let mut structured = connect(&ex, Limits::default());
    structured.c.go("vol", true).await;
    structured.c.request(cmd::READ, 0, 3, 0, 4096).await;
    let ch = structured.c.chunk().await;
    assert_eq!((ch.flags, ch.kind, ch.cookie), (chunk::FLAG_DONE, chunk::ERROR, 3));
    assert_eq!(u32::from_be_bytes(ch.payload[..4].try_into().unwrap()), errno::EIO);
}

#[tokio::test]
async fn s1_backend_errors_become_nbd_values_eio_and_enospc() {
    let dir = tempfile::tempdir().unwrap();
    let (vol, fault) = faulty_volume(&dir, "vol", SIZE);
    let ex = Arc::new(Exports::new(vec![vol], Some("vol")));
    let mut conn = connect(&ex, Limits::default());
    conn.c.go("vol", false).await;
    fault.fail(Fault { kind: OpKind::Write, range: Some(0..4096), errno: libc::EDQUOT });
    fault.fail(Fault { kind: OpKind::Write, range: Some(8192..12288), errno: libc::EROFS });
    fault.fail(Fault::eio(OpKind::Flush));
    conn.c.write(1, 0, &[1; 4096]).await;
    assert_eq!(conn.c.simple().await, (errno::ENOSPC, 1), "EDQUOT is ENOSPC (§2.7)");
    conn.c.write(2, 8192, &[1; 4096]).await;
    assert_eq!(conn.c.simple().await, (errno::EIO, 2), "never the host's raw errno");
    conn.c.request(cmd::FLUSH, 0, 3, 0, 0).await;
    assert_eq!(conn.c.simple().await, (errno::EIO, 3));
    fault.heal();
    conn.c.write(4, 0, &[1; 4096]).await;
    assert_eq!(conn.c.simple().await, (0, 4));
}

/// A client that went away while its degraded write is frozen by the fence no longer counts
/// as connected (so `demote` is not kept waiting); the demotion then fails the write.
#[tokio::test]
async fn a_gone_client_with_a_frozen_write_does_not_hold_the_volume() {
    let dir = tempfile::tempdir().unwrap();
    let vol = volume(&dir, "vol", SIZE, Role::Secondary);
    let fence = Arc::new(crate::fence::Fence::new("127.0.0.1:7790".parse().unwrap()));
    vol.set_fence(Arc::clone(&fence));
    vol.transition(crate::role::Event::Promote { force: true }, None).await.unwrap();
    let ex = Arc::new(Exports::new(vec![Arc::clone(&vol)], Some("vol")));
    let mut conn = connect(&ex, Limits::default());
    conn.c.go("vol", false).await;
    conn.c.write(1, 0, &[1; 4096]).await;
    let frozen = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while fence.waiting() == 0 {
        assert!(tokio::time::Instant::now() < frozen, "the degraded write did not freeze");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(vol.clients(), 1);
    let crate::nbd::testkit::Conn { c, task, .. } = conn;
    drop(c); // the client is gone
    let gone = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while vol.clients() > 0 {
        assert!(tokio::time::Instant::now() < gone, "a gone client still counts");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(fence.waiting(), 1, "its write is still frozen");
    vol.transition(crate::role::Event::Demote, None).await.unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(5), task).await.unwrap().unwrap();
}
