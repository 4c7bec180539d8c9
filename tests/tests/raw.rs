//! Raw bytes over the unix socket: the malformed and corner cases that well-behaved clients
//! never send. Each test names the NBD-NOTES section whose rule it checks.

use std::{os::unix::net::UnixStream, time::Duration};

use blockd_tests::{
    assert_bytes_eq, assert_read,
    nbd::{self, RawClient, Reply},
    pattern, Node,
};

const VOL: &str = "vol";

fn node(test: &str) -> Node {
    blockd_tests::require_root();
    Node::started(test, &[(VOL, "64MiB")], "")
}

/// A fresh client completes GO and reads and writes: the daemon still serves.
fn assert_served(node: &Node) {
    let (mut c, info) = RawClient::transmission(&node.socket(VOL), VOL);
    assert_eq!(info.size, node.size(VOL));
    let data = pattern(99, 4096);
    assert_eq!(c.write(8192, &data), 0, "write on a fresh connection");
    assert_read(c.read(8192, 4096), &data, "read back on a fresh connection");
}

/// §2.2 GO: INFO_EXPORT with the size and the flags of the contract; §2.3 BLOCK_SIZE
/// 1/4096/32 MiB when asked; §2.2 INFO and GO agree; the default export "" is the volume.
#[test]
fn go_reports_size_flags_and_block_size() {
    let node = node("raw-go");
    let mut c = RawClient::negotiating(&node.socket(VOL));
    let info = c.go_or_info(nbd::OPT_INFO, VOL, &[nbd::INFO_BLOCK_SIZE]).expect("INFO");
    let go = c.go(VOL, &[nbd::INFO_BLOCK_SIZE]).expect("GO");
    assert_eq!((info.size, info.flags), (go.size, go.flags), "INFO and GO must agree (§2.2)");
    assert_eq!(go.size, 64 << 20);
    let want = nbd::TF_HAS_FLAGS
        | nbd::TF_SEND_FLUSH
        | nbd::TF_SEND_FUA
        | nbd::TF_SEND_TRIM
        | nbd::TF_SEND_WRITE_ZEROES
        | nbd::TF_CAN_MULTI_CONN;
    assert_eq!(go.flags & want, want, "transmission flags {:#x} lack some of {want:#x}", go.flags);
    assert_eq!(go.flags & nbd::TF_READ_ONLY, 0, "read-write export advertised read-only");
    assert_eq!(go.block_size, Some((1, 4096, 32 << 20)), "BLOCK_SIZE (§2.3)");
    assert_eq!(c.read(0, 512).map(|d| d.len()), Ok(512), "transmission after GO (no padding)");

    let (_c2, default) = RawClient::transmission(&node.socket(VOL), "");
    assert_eq!((default.size, default.flags), (go.size, go.flags), "default export \"\"");
}

/// §2.2 GO: an unknown export gets ERR_UNKNOWN and the connection stays usable.
#[test]
fn unknown_export_is_refused_and_connection_stays() {
    let node = node("raw-unknown-export");
    let mut c = RawClient::negotiating(&node.socket(VOL));
    let err = c.go("no-such-volume", &[]).expect_err("GO on an unknown export must fail");
    assert_eq!(err.typ, nbd::REP_ERR_UNKNOWN, "{err:?}");
    c.go(VOL, &[]).expect("GO after ERR_UNKNOWN on the same connection");
    assert!(c.read(0, 4096).is_ok());
}

/// §2.2 EXPORT_NAME without NO_ZEROES: size, flags, then 124 zero bytes.
#[test]
fn export_name_without_no_zeroes_pads() {
    let node = node("raw-export-name");
    let mut c = RawClient::connect(&node.socket(VOL));
    c.send(&nbd::FLAG_FIXED_NEWSTYLE.to_be_bytes());
    c.send_option(nbd::OPT_EXPORT_NAME, VOL.as_bytes());
    let answer = c.read_n(8 + 2 + 124);
    assert_eq!(u64::from_be_bytes(answer[0..8].try_into().unwrap()), 64 << 20);
    assert!(answer[10..].iter().all(|b| *b == 0), "124 zero bytes expected");
    assert_eq!(c.read(0, 4096).map(|d| d.len()), Ok(4096));
}

/// §2.2 LIST: one SERVER reply naming the volume, then ACK.
#[test]
fn list_names_the_export() {
    let node = node("raw-list");
    let mut c = RawClient::negotiating(&node.socket(VOL));
    c.send_option(nbd::OPT_LIST, &[]);
    let mut names = Vec::new();
    loop {
        let r = c.read_option_reply();
        match r.typ {
            nbd::REP_SERVER => {
                let n = u32::from_be_bytes(r.data[0..4].try_into().unwrap()) as usize;
                names.push(String::from_utf8_lossy(&r.data[4..4 + n]).into_owned());
            }
            nbd::REP_ACK => break,
            t => panic!("unexpected LIST reply {t:#x}: {r:?}"),
        }
    }
    assert!(names.iter().any(|n| n == VOL), "LIST gave {names:?}");
}

/// §2.1: an option with a bad magic is a protocol violation: the server hangs up, and the
/// next client is served.
#[test]
fn bad_option_magic_closes_and_next_client_is_served() {
    let node = node("raw-bad-opt-magic");
    let mut c = RawClient::negotiating(&node.socket(VOL));
    c.send(&nbd::option_bytes(0x1122_3344_5566_7788, nbd::OPT_GO, &nbd::go_data(VOL, &[])));
    assert!(c.closed_by_server(), "server must close after a bad option magic");
    assert_served(&node);
}

/// §2.5: a request with a bad magic: the server cannot resynchronise and hangs up; the next
/// client is served.
#[test]
fn bad_request_magic_closes_and_next_client_is_served() {
    let node = node("raw-bad-req-magic");
    let (mut c, _) = RawClient::transmission(&node.socket(VOL), VOL);
    let mut req = nbd::request_header(0, nbd::CMD_READ, 7, 0, 4096);
    req[0..4].copy_from_slice(&0xdead_beef_u32.to_be_bytes());
    c.send(&req);
    assert!(c.closed_by_server(), "server must close after a bad request magic");
    assert_served(&node);
}

/// §2.1: an unknown option gets ERR_UNSUP (its data consumed) and haggling goes on.
#[test]
fn unknown_option_gets_err_unsup() {
    let node = node("raw-unknown-opt");
    let mut c = RawClient::negotiating(&node.socket(VOL));
    c.send_option(0x0000_4242, b"some option data");
    let r = c.read_option_reply();
    assert_eq!((r.option, r.typ), (0x4242, nbd::REP_ERR_UNSUP), "{r:?}");
    c.go(VOL, &[]).expect("GO after an unsupported option");
    assert!(c.read(0, 4096).is_ok(), "connection usable after ERR_UNSUP");
}

/// §2.5: an unknown command gets EINVAL and the connection stays usable.
#[test]
fn unknown_command_gets_einval() {
    let node = node("raw-unknown-cmd");
    let (mut c, _) = RawClient::transmission(&node.socket(VOL), VOL);
    assert_eq!(c.call(0, 0x42, 0, 4096, &[]).error(), nbd::EINVAL, "unknown command 0x42");
    assert!(c.read(0, 4096).is_ok(), "connection usable after an unknown command");
}

/// §2.5: unknown command flags, and known flags on commands they do not apply to, get EINVAL;
/// a rejected WRITE changes nothing (§2.7). FUA on READ and FLUSH is valid (§2.5, M).
#[test]
fn bad_command_flags_get_einval() {
    let node = node("raw-bad-flags");
    let (mut c, _) = RawClient::transmission(&node.socket(VOL), VOL);
    let before = pattern(5, 4096);
    assert_eq!(c.write(0, &before), 0);
    assert_eq!(c.call(1 << 10, nbd::CMD_READ, 0, 4096, &[]).error(), nbd::EINVAL, "flag bit 10");
    assert_eq!(c.call(nbd::CMD_FLAG_REQ_ONE, nbd::CMD_READ, 0, 512, &[]).error(), nbd::EINVAL);
    let other = pattern(6, 4096);
    let r = c.call(nbd::CMD_FLAG_NO_HOLE, nbd::CMD_WRITE, 0, 4096, &other);
    assert_eq!(r.error(), nbd::EINVAL, "NO_HOLE on WRITE");
    let r = c.call(1 << 12, nbd::CMD_WRITE, 0, 4096, &other);
    assert_eq!(r.error(), nbd::EINVAL, "unknown flag on WRITE");
    assert_read(c.read(0, 4096), &before, "rejected writes must change nothing (§2.7)");
    assert_eq!(c.call(nbd::CMD_FLAG_FUA, nbd::CMD_READ, 0, 512, &[]).error(), 0, "FUA on READ");
    assert_eq!(c.call(nbd::CMD_FLAG_FUA, nbd::CMD_FLUSH, 0, 0, &[]).error(), 0, "FUA on FLUSH");
}

/// §2.6/§2.7: READ beyond the end → EINVAL, WRITE beyond the end → ENOSPC, with
/// overflow-safe bounds (offset 2^64−512); a rejected write leaves the last block unchanged.
#[test]
fn requests_beyond_the_end() {
    let node = node("raw-beyond-end");
    let size = node.size(VOL);
    let (mut c, _) = RawClient::transmission(&node.socket(VOL), VOL);
    let last = pattern(7, 4096);
    assert_eq!(c.write(size - 4096, &last), 0, "write of the last block");
    for (offset, len) in
        [(size, 4096), (size - 512, 1024), (u64::MAX - 511, 1024), (size + 4096, 1)]
    {
        assert_eq!(c.read(offset, len), Err(nbd::EINVAL), "READ at {offset} len {len}");
    }
    let junk = pattern(8, 1024);
    for offset in [size - 512, u64::MAX - 511, size] {
        assert_eq!(c.write(offset, &junk), nbd::ENOSPC, "WRITE at {offset} len 1024");
    }
    let r = c.call(0, nbd::CMD_WRITE_ZEROES, size - 512, 1024, &[]);
    assert_eq!(r.error(), nbd::ENOSPC, "WRITE_ZEROES straddling the end");
    let r = c.call(0, nbd::CMD_TRIM, size - 512, 1024, &[]);
    assert_eq!(r.error(), nbd::EINVAL, "TRIM straddling the end");
    assert_read(c.read(size - 4096, 4096), &last, "last block after rejected requests");
}

/// §2.3: READ and WRITE of exactly 32 MiB work; above 32 MiB an error reply or a hang-up are
/// both allowed, and the daemon keeps serving.
#[test]
fn oversized_requests() {
    let node = node("raw-oversized");
    let (mut c, _) = RawClient::transmission(&node.socket(VOL), VOL);
    let big = pattern(9, 32 << 20);
    assert_eq!(c.write(0, &big), 0, "32 MiB WRITE must work (§2.3)");
    assert_read(c.read(0, 32 << 20), &big, "32 MiB READ must return what was written");
    let cookie = c.request(0, nbd::CMD_READ, 0, (32 << 20) + 4096, &[]);
    if let Some(reply) = c.read_reply_or_close(0) {
        assert_eq!(reply.cookie(), cookie);
        assert_ne!(reply.error(), 0, "READ over 32 MiB must fail or hang up (§2.3): {reply:?}");
        assert!(c.read(0, 4096).is_ok(), "connection must stay usable after an error reply");
    }
    drop(c);
    let (mut c, _) = RawClient::transmission(&node.socket(VOL), VOL);
    c.send(&nbd::request_header(0, nbd::CMD_WRITE, 77, 0, 64 << 20));
    c.send_lenient(&[0xee; 64 << 10]);
    drop(c);
    node.wait_no_clients(VOL);
    assert_served(&node);
    let mut c = RawClient::transmission(&node.socket(VOL), VOL).0;
    // assert_served wrote at 8 KiB; the torn 0xee payload would have landed from offset 0.
    assert_read(c.read(1 << 20, 1 << 20), &big[1 << 20..2 << 20], "torn 64 MiB write applied");
    assert_read(c.read(0, 4096), &big[..4096], "torn 64 MiB write applied");
}

/// §2.5: zero-length READ and WRITE: success or EINVAL, but no hang-up.
#[test]
fn zero_length_requests_do_not_hang_up() {
    let node = node("raw-zero-length");
    let (mut c, _) = RawClient::transmission(&node.socket(VOL), VOL);
    for typ in [nbd::CMD_READ, nbd::CMD_WRITE, nbd::CMD_WRITE_ZEROES, nbd::CMD_TRIM] {
        let e = c.call(0, typ, 4096, 0, &[]).error();
        assert!(e == 0 || e == nbd::EINVAL, "zero-length command {typ}: error {e}");
        assert!(c.read(0, 512).is_ok(), "connection usable after zero-length command {typ}");
    }
}

/// §2.8: a client sends 64 writes, the last with a cut-off payload, and disconnects without
/// reading a reply. The daemon survives, serves the next client, and applies no torn write.
#[test]
fn hard_disconnect_with_writes_in_flight() {
    let node = node("raw-hard-disconnect");
    const CHUNK: u64 = 64 << 10;
    let torn_at = 63 * CHUNK;
    let guard = pattern(10, CHUNK as usize);
    {
        let (mut c, _) = RawClient::transmission(&node.socket(VOL), VOL);
        assert_eq!(c.write(torn_at, &guard), 0);
    }
    let mut burst = Vec::new();
    for i in 0..63u64 {
        burst.extend(nbd::request_header(0, nbd::CMD_WRITE, 1000 + i, i * CHUNK, CHUNK as u32));
        burst.extend(pattern(100 + i, CHUNK as usize));
    }
    burst.extend(nbd::request_header(0, nbd::CMD_WRITE, 2000, torn_at, CHUNK as u32));
    burst.extend(vec![0xAB; 1000]);
    {
        let (mut c, _) = RawClient::transmission(&node.socket(VOL), VOL);
        c.send_lenient(&burst);
    }
    node.wait_no_clients(VOL);
    assert_served(&node);
    let (mut c, _) = RawClient::transmission(&node.socket(VOL), VOL);
    assert_read(c.read(torn_at, CHUNK as u32), &guard, "torn write was applied (§2.8)");
}

/// §2.5: after STRUCTURED_REPLY, READ gets structured chunks covering the request, and an
/// out-of-range READ an ERROR chunk; other commands may stay simple.
#[test]
fn structured_reply_read() {
    let node = node("raw-structured");
    let mut c = RawClient::negotiating(&node.socket(VOL));
    c.send_option(nbd::OPT_STRUCTURED_REPLY, &[]);
    let r = c.read_option_reply();
    assert_eq!((r.option, r.typ), (nbd::OPT_STRUCTURED_REPLY, nbd::REP_ACK), "{r:?}");
    c.go(VOL, &[]).expect("GO");
    let data = pattern(11, 12288);
    assert_eq!(c.write(4096, &data), 0);
    let reply = c.call(0, nbd::CMD_READ, 4096, 12288, &[]);
    let Reply::Structured(chunks) = &reply else { panic!("simple reply to READ: {reply:?}") };
    assert_read(nbd::assemble_read(chunks, 4096, 12288), &data, "structured READ");
    let reply = c.call(0, nbd::CMD_READ, node.size(VOL), 4096, &[]);
    assert!(matches!(reply, Reply::Structured(_)), "READ errors are structured too: {reply:?}");
    assert_eq!(reply.error(), nbd::EINVAL, "{reply:?}");
    assert_eq!(c.flush(), 0);
}

/// §2.8 ABORT gets an ACK; a client that then just closes is fine; the daemon still serves.
#[test]
fn abort_is_acknowledged() {
    let node = node("raw-abort");
    let mut c = RawClient::negotiating(&node.socket(VOL));
    c.send_option(nbd::OPT_ABORT, &[]);
    let r = c.read_option_reply();
    assert_eq!((r.option, r.typ), (nbd::OPT_ABORT, nbd::REP_ACK), "{r:?}");
    drop(c);
    drop(UnixStream::connect(node.socket(VOL)).expect("connect and leave at once"));
    std::thread::sleep(Duration::from_millis(100));
    assert_served(&node);
}

/// §2.8 soft disconnect: every request received before DISC is executed and answered, then
/// the server closes.
#[test]
fn disc_after_writes_executes_them_all() {
    let node = node("raw-disc");
    const CHUNK: u64 = 16 << 10;
    let mut c = RawClient::transmission(&node.socket(VOL), VOL).0;
    let mut burst = Vec::new();
    for i in 0..64u64 {
        burst.extend(nbd::request_header(0, nbd::CMD_WRITE, 500 + i, i * CHUNK, CHUNK as u32));
        burst.extend(pattern(300 + i, CHUNK as usize));
    }
    burst.extend(nbd::request_header(0, nbd::CMD_DISC, 9999, 0, 0));
    c.send(&burst);
    let mut cookies: Vec<u64> = (0..64)
        .map(|_| c.read_reply(0))
        .map(|r| {
            assert_eq!(r.error(), 0, "write before DISC must be executed: {r:?}");
            r.cookie()
        })
        .collect();
    cookies.sort_unstable();
    assert_eq!(cookies, (500..564).collect::<Vec<u64>>(), "each write answered exactly once");
    assert!(c.closed_by_server(), "server must close after DISC");
    let mut c = RawClient::transmission(&node.socket(VOL), VOL).0;
    for i in 0..64u64 {
        let want = pattern(300 + i, CHUNK as usize);
        assert_read(c.read(i * CHUNK, CHUNK as u32), &want, &format!("write {i} before DISC"));
    }
}

/// §2.5: many requests in flight on one connection (test clients send 256): every cookie is
/// answered exactly once, in any order, with the right data.
#[test]
fn pipelined_requests_are_all_answered() {
    let node = node("raw-pipeline");
    let mut c = RawClient::transmission(&node.socket(VOL), VOL).0;
    const N: u64 = 256;
    let mut burst = Vec::new();
    for i in 0..N {
        burst.extend(nbd::request_header(0, nbd::CMD_WRITE, i, i * 4096, 4096));
        burst.extend(pattern(1000 + i, 4096));
    }
    c.send(&burst);
    let mut seen = vec![false; N as usize];
    for _ in 0..N {
        let r = c.read_reply(0);
        assert_eq!(r.error(), 0, "{r:?}");
        let k = r.cookie() as usize;
        assert!(k < seen.len() && !seen[k], "cookie {k} unknown or answered twice");
        seen[k] = true;
    }
    let mut reads = Vec::new();
    for i in 0..N {
        reads.extend(nbd::request_header(0, nbd::CMD_READ, N + i, i * 4096, 4096));
    }
    c.send(&reads);
    for _ in 0..N {
        let Reply::Simple { error: 0, cookie, data } = c.read_reply(4096) else {
            panic!("READ failed or was not a simple reply")
        };
        let i = cookie.checked_sub(N).filter(|i| *i < N).expect("cookie of a READ");
        assert_bytes_eq(&data, &pattern(1000 + i, 4096), &format!("pipelined read {i}"));
    }
}

/// §2.6 WRITE_ZEROES: the range reads as zeroes, with and without NO_HOLE (NO_HOLE support is
/// mandatory); FAST_ZERO was not advertised, so it is refused (§2.5). §2.3: TRIM and
/// WRITE_ZEROES longer than the maximum payload do not make the server hang up.
#[test]
fn write_zeroes_and_long_trims() {
    let node = node("raw-zeroes");
    let (mut c, info) = RawClient::transmission(&node.socket(VOL), VOL);
    let data = pattern(12, 64 << 10);
    for (flags, what) in [(0, "WRITE_ZEROES"), (nbd::CMD_FLAG_NO_HOLE, "NO_HOLE")] {
        assert_eq!(c.write(0, &data), 0);
        assert_eq!(c.call(flags, nbd::CMD_WRITE_ZEROES, 4096, 8192, &[]).error(), 0, "{what}");
        let mut want = data.clone();
        want[4096..12288].fill(0);
        assert_read(c.read(0, 64 << 10), &want, what);
    }
    if info.flags & (1 << 11) == 0 {
        let r = c.call(1 << 4, nbd::CMD_WRITE_ZEROES, 0, 4096, &[]);
        assert_eq!(r.error(), nbd::EINVAL, "FAST_ZERO not advertised");
        assert_eq!(c.read(0, 4096).map(|d| d == data[..4096]), Ok(true), "FAST_ZERO changed data");
    }
    let size = u32::try_from(node.size(VOL)).expect("64 MiB");
    let e = c.call(0, nbd::CMD_TRIM, 0, size, &[]).error();
    assert!(e == 0 || e == nbd::EINVAL || e == nbd::EOVERFLOW, "64 MiB TRIM: error {e}");
    assert_eq!(c.call(0, nbd::CMD_WRITE_ZEROES, 0, size, &[]).error(), 0, "64 MiB WRITE_ZEROES");
    assert_read(c.read(32 << 20, 1 << 20), &vec![0u8; 1 << 20], "after a 64 MiB WRITE_ZEROES");
}

/// §2.1/§2.8: a client that connects and never finishes the handshake is dropped after
/// `[nbd] handshake-timeout`, and does not keep others from being served meanwhile.
#[test]
fn idle_handshake_is_dropped_after_timeout() {
    blockd_tests::require_root();
    let node = Node::started("raw-idle", &[(VOL, "64MiB")], "[nbd]\nhandshake-timeout = \"1s\"\n");
    let mut idle = RawClient::connect(&node.socket(VOL));
    assert_served(&node);
    let started = std::time::Instant::now();
    assert!(idle.closed_by_server(), "idle client still connected after the timeout");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "dropped only after {:?}",
        started.elapsed()
    );
    assert_served(&node);
}

/// §2.2 and design.md §3: each volume is its own export; the default export "" on a volume's
/// socket is that volume; writes to one never show in another.
#[test]
fn two_volumes_are_independent() {
    blockd_tests::require_root();
    let node = Node::started("raw-two-volumes", &[("a", "8MiB"), ("b", "16MiB")], "");
    let (mut a, ia) = RawClient::transmission(&node.socket("a"), "a");
    let (mut b, ib) = RawClient::transmission(&node.socket("b"), "");
    assert_eq!((ia.size, ib.size), (8 << 20, 16 << 20), "sizes of a and of b's default export");
    let (pa, pb) = (pattern(21, 65536), pattern(22, 65536));
    assert_eq!(a.write(0, &pa), 0);
    assert_eq!(b.write(0, &pb), 0);
    assert_read(a.read(0, 65536), &pa, "volume a");
    assert_read(b.read(0, 65536), &pb, "volume b");
    assert_eq!(a.write(8 << 20, &pa[..4096]), nbd::ENOSPC, "a ends at 8 MiB");
    assert_eq!(b.write(8 << 20, &pb[..4096]), 0, "b goes on past 8 MiB");
}
