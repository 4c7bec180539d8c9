//! Fuzz tests of the three parsers that read bytes from the network: the NBD codec, the
//! replication wire format (and the record layer around it) and the witness protocol. They run
//! on the stable toolchain inside `cargo test`, for a bounded number of iterations.
//!
//! Each target starts from valid frames (every kind the encoder produces), mutates them under a
//! seeded PRNG (bit flips, interesting values in length fields, inserted, deleted and
//! duplicated bytes, truncation, two frames spliced) and, for the wire format, re-seals the
//! crcs half of the time so that the mutations reach the payload checks behind them. Then it
//! checks properties, not outputs:
//! - no panic, whatever the bytes;
//! - a decoded frame used no more bytes than were there, and encoding it gives back exactly
//!   those bytes (decode ∘ encode round trip, and the encoding is canonical);
//! - "need more bytes" never asks for more than the protocol's largest frame;
//! - no single allocation made while decoding is larger than a small multiple of the input
//!   (a counting global allocator, per thread): a length field cannot make the parser reserve
//!   memory the peer never sent;
//! - a record whose bytes were changed never opens (the record layer's tag).
//!
//! `FUZZ_ITERS` (per target, default 100000) and `FUZZ_SEED` make longer or other runs:
//! `FUZZ_ITERS=5000000 cargo test -p blockd --test fuzz --release`. A failure prints the seed,
//! the iteration and the input in hex; rerun with that seed to replay it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::Duration;

use bytes::{Bytes, BytesMut};

use blockd::control::{DiskState, Role};
use blockd::nbd::codec::{self, Decoded as NbdDecoded, ExportView, HaggleState, Request};
use blockd::replication::record::{Channel, Protection};
use blockd::replication::wire::{self, Decoded, Frame, Message, VolumeParams};
use blockd::witness::proto::{self, Reply};
use blockd::{meta::Generations, resync::Resolve};

// ---------------------------------------------------------------------------------------------
// Allocation accounting
// ---------------------------------------------------------------------------------------------

thread_local! {
    /// The largest single allocation on this thread since the last [`largest_alloc`] reset.
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

struct Counting;

// SAFETY: every call is forwarded unchanged to the system allocator; the only addition is a
// const-initialised thread-local Cell, which neither allocates nor can be re-entered.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.with(|l| l.set(l.get().max(layout.size())));
        // SAFETY: the caller upholds `alloc`'s contract, passed on unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout (every allocation does).
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.with(|l| l.set(l.get().max(new_size)));
        // SAFETY: as for `dealloc`; the caller upholds `realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns its result with the largest single allocation it made.
fn largest_alloc<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    let out = f();
    (out, LARGEST.with(Cell::get))
}

// ---------------------------------------------------------------------------------------------
// The mutator
// ---------------------------------------------------------------------------------------------

/// splitmix64: small, seedable, the same sequence everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn iterations() -> u64 {
    std::env::var("FUZZ_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000)
}

fn seed(target: u64) -> u64 {
    let base = std::env::var("FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5EED);
    base ^ target.wrapping_mul(0x1000_0000_01B3)
}

const INTERESTING: [u64; 9] =
    [0, 1, 0x7f, 0xff, 0xffff, 0x7fff_ffff, 0xffff_ffff, 0x8000_0000_0000_0000, u64::MAX];

/// One to four mutations of `input`, with `other` available for splicing.
fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut b = input.to_vec();
    for _ in 0..=rng.below(4) {
        let at = rng.below(b.len() + 1);
        let last = at.min(b.len().saturating_sub(1));
        match rng.below(8) {
            0 if !b.is_empty() => b[last] ^= 1 << rng.below(8),
            1 if !b.is_empty() => b[last] = rng.next() as u8,
            2 => {
                // An interesting value, big-endian, of 1, 2, 4 or 8 bytes, over what is there.
                let width = 1 << rng.below(4);
                let v = INTERESTING[rng.below(INTERESTING.len())].to_be_bytes();
                for (k, byte) in v[8 - width..].iter().enumerate() {
                    if let Some(slot) = b.get_mut(at + k) {
                        *slot = *byte;
                    }
                }
            }
            3 => b.insert(at, rng.next() as u8),
            4 if at + 8 <= b.len() && rng.below(2) == 0 => {
                // Arithmetic on a big-endian u16/u32/u64 field: off-by-one boundaries.
                let width = 2 << rng.below(3);
                let delta = rng.below(33) as u64;
                let field = &mut b[at..at + width];
                let mut v = field.iter().fold(0u64, |v, x| (v << 8) | u64::from(*x));
                v = if rng.below(2) == 0 { v.wrapping_add(delta) } else { v.wrapping_sub(delta) };
                field.copy_from_slice(&v.to_be_bytes()[8 - width..]);
            }
            4 if !b.is_empty() => {
                let n = rng.below(16).min(b.len() - at.min(b.len()));
                b.drain(at.min(b.len())..at.min(b.len()) + n);
            }
            5 => b.truncate(at),
            6 => {
                let from = rng.below(other.len() + 1);
                b.truncate(at);
                b.extend_from_slice(&other[from..]);
            }
            _ => {
                let n = rng.below(32).min(b.len() - at.min(b.len()));
                let copy = b[at.min(b.len())..at.min(b.len()) + n].to_vec();
                b.splice(at..at, copy);
            }
        }
    }
    b
}

/// Runs `check` on `iters` mutants of the corpus; a failure names the seed, the iteration
/// and the input.
fn fuzz(name: &str, target: u64, corpus: &[Vec<u8>], mut check: impl FnMut(&mut Rng, &[u8])) {
    let seed = seed(target);
    let mut rng = Rng(seed);
    // The corpus itself first: valid frames must pass every property too.
    for c in corpus {
        check(&mut rng, c);
    }
    for i in 0..iterations() {
        let a = &corpus[rng.below(corpus.len())];
        let b = &corpus[rng.below(corpus.len())];
        let input = mutate(&mut rng, a, b);
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            check(&mut rng, &input);
        }));
        if let Err(e) = run {
            panic!(
                "fuzz {name}: FUZZ_SEED base gives target seed {seed:#x}, iteration {i}, input \
                 ({} bytes) {}: {}",
                input.len(),
                hex(&input),
                e.downcast_ref::<String>().map_or("(panic)", String::as_str)
            );
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().take(256).map(|x| format!("{x:02x}")).collect()
}

// ---------------------------------------------------------------------------------------------
// NBD
// ---------------------------------------------------------------------------------------------

/// The export size the NBD target validates against; the corpus has requests at its end.
const NBD_SIZE: u64 = 1 << 30;

fn nbd_corpus() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for kind in 0..10u16 {
        for (flags, offset, length) in [
            (0, 0, 4096),
            (1, 1 << 20, 512),
            (2, u64::MAX, 0),
            (0, NBD_SIZE - 4096, 4096),
            (1, NBD_SIZE, 0),
            (0, NBD_SIZE - 1, 1),
        ] {
            let mut b = BytesMut::new();
            codec::encode_request(&mut b, &Request { flags, kind, cookie: 7, offset, length });
            out.push(b.to_vec());
        }
    }
    // An option header followed by GO data: name "vol", two info requests.
    let mut go = Vec::new();
    go.extend_from_slice(&0x4948_4156_454F_5054u64.to_be_bytes());
    go.extend_from_slice(&7u32.to_be_bytes());
    go.extend_from_slice(&13u32.to_be_bytes());
    go.extend_from_slice(&3u32.to_be_bytes());
    go.extend_from_slice(b"vol");
    go.extend_from_slice(&[0, 2, 0, 1, 0, 3]);
    out.push(go);
    out.push(vec![0, 0, 0, 3]);
    out
}

/// The NBD codec: headers decode to values that encode back to the same bytes, and
/// `validate` never lets a command past the end of the export.
#[test]
fn fuzz_nbd_codec() {
    let view = ExportView { size: NBD_SIZE, max_request: 32 << 20 };
    fuzz("nbd", 1, &nbd_corpus(), |_, input| {
        let (req, big) = largest_alloc(|| codec::decode_request(input));
        assert!(big <= 64, "decode_request allocated {big} bytes");
        if let Ok(NbdDecoded::Frame(r)) = req {
            let mut back = BytesMut::new();
            codec::encode_request(&mut back, &r);
            assert_eq!(&back[..], &input[..back.len()], "request header round trip");
            check_verdict(&r, &view);
        }
        let _ = codec::decode_client_flags(input);
        if let Ok(NbdDecoded::Frame(h)) = codec::decode_option_header(input) {
            assert!(h.length <= codec::MAX_OPTION_DATA, "option length {} accepted", h.length);
            let data = input.get(16..).unwrap_or_default();
            let data = &data[..data.len().min(h.length as usize)];
            let (_, big) = largest_alloc(|| {
                for st in [HaggleState::default(), haggled()] {
                    let _ = codec::classify_option(h.option, data, &st);
                }
            });
            assert!(big <= 2 * data.len() + 64, "option parsing allocated {big} bytes");
        }
        let _ = codec::parse_info_request(input);
    });
}

fn haggled() -> HaggleState {
    let mut st = HaggleState { structured: true, ..HaggleState::default() };
    st.client.fixed_newstyle = true;
    st
}

fn check_verdict(r: &Request, v: &ExportView) {
    use codec::{Command, Verdict};
    let end = |offset: u64, len: u64| offset.checked_add(len).is_some_and(|e| e <= v.size);
    match codec::validate(r, v) {
        Verdict::Run(Command::Read { offset, len })
        | Verdict::Run(Command::Write { offset, len, .. }) => {
            assert!(end(offset, u64::from(len)), "{r:?} runs past the end");
            assert!(len <= v.max_request, "{r:?} larger than the maximum payload");
        }
        Verdict::Run(Command::Trim { offset, len, .. })
        | Verdict::Run(Command::WriteZeroes { offset, len, .. }) => {
            assert!(end(offset, len) && len > 0, "{r:?} runs past the end");
        }
        Verdict::Reject(rej) => assert!(rej.discard == 0 || r.kind == 1, "{r:?}: discard"),
        Verdict::Run(_) | Verdict::Disconnect(_) => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Replication wire format and records
// ---------------------------------------------------------------------------------------------

fn frames() -> Vec<Frame> {
    let gens = Generations { current: 11, bitmap: 7, history: [5, 3] };
    let data = Bytes::from(vec![0xA5; 4096]);
    let vol = VolumeParams {
        name: "db".into(),
        size: 1 << 30,
        granularity: 4096,
        al_extent_size: 4 << 20,
        al_extents: 512,
    };
    let msgs = vec![
        (
            false,
            Message::Hello {
                version: wire::PROTOCOL_VERSION,
                node: "alpha".into(),
                instance: 9,
                encrypt: true,
            },
        ),
        (false, Message::Noise { msg: Bytes::from(vec![1; 48]) }),
        (
            false,
            Message::Params {
                volumes: vec![vol.clone(), VolumeParams { name: "nfs".into(), ..vol }],
            },
        ),
        (false, Message::Ready { epoch: 3 }),
        (false, Message::Goodbye { reason: "bye".into() }),
        (false, Message::Ping),
        (true, Message::Pong),
        (
            false,
            Message::State {
                role: Role::Primary,
                disk: DiskState::UpToDate,
                gens,
                primary_when_stopped: true,
                dirty: 8192,
                resolve: Resolve::DiscardLocal,
            },
        ),
        (false, Message::AskPromote),
        (false, Message::RoleChanged(Role::Secondary)),
        (true, Message::PromoteAnswer { granted: true }),
        (false, Message::Write { offset: 8192, data: data.clone() }),
        (false, Message::WriteFua { offset: 0, data: data.clone() }),
        (false, Message::WriteZeroes { offset: 4096, len: 1 << 20, punch: true }),
        (false, Message::Trim { offset: 0, len: 4096 }),
        (false, Message::Flush),
        (false, Message::Read { offset: 4096, len: 4096 }),
        (true, Message::ReadData { data: data.clone() }),
        (false, Message::ResyncData { offset: 1 << 20, data }),
        (false, Message::ResyncZero { offset: 0, len: 1 << 20 }),
        (false, Message::ResyncDone { gens }),
        (false, Message::GetBitmap { offset: 0 }),
        (true, Message::BitmapPart { offset: 0, data: Bytes::from(vec![0xff; 64]) }),
        (false, Message::GetSums { offset: 0, len: 8192 }),
        (true, Message::Sums { data: Bytes::from(vec![3; 16]) }),
        (false, Message::RunPromote),
        (true, Message::PromoteResult { code: 0, output: "ok".into() }),
        (true, Message::Ack { error: 5 }),
    ];
    msgs.into_iter()
        .enumerate()
        .map(|(i, (reply, msg))| Frame { volume: (i % 3) as u16, id: i as u64 + 1, reply, msg })
        .collect()
}

/// Makes the header crc and the trailer right again for whatever the header now says.
fn reseal(b: &mut [u8]) {
    if b.len() < wire::HEADER_LEN {
        return;
    }
    let crc = crc32fast::hash(&b[..wire::HEADER_LEN - 4]);
    b[wire::HEADER_LEN - 4..wire::HEADER_LEN].copy_from_slice(&crc.to_be_bytes());
    let payload = u32::from_be_bytes([b[36], b[37], b[38], b[39]]) as usize;
    let end = wire::HEADER_LEN + payload;
    if b.len() >= end + wire::TRAILER_LEN {
        let t = wire::trailer(&b[..wire::HEADER_LEN], &b[wire::HEADER_LEN..end]);
        b[end..end + wire::TRAILER_LEN].copy_from_slice(&t);
    }
}

/// The largest frame a reader may ever be asked to wait for.
const MAX_WIRE_FRAME: usize = wire::HEADER_LEN + wire::MAX_DATA + wire::TRAILER_LEN;

fn check_wire(input: &[u8]) {
    let (decoded, big) = largest_alloc(|| wire::decode(input));
    assert!(big <= 16 * input.len() + 4096, "decode allocated {big} bytes for {}", input.len());
    match decoded {
        Ok(Decoded::Frame(f, used)) => {
            assert!(used <= input.len(), "frame used {used} of {} bytes", input.len());
            let back = wire::encode(&f);
            assert_eq!(&back[..], &input[..used], "encode(decode(x)) is not x for {f:?}");
            let mut buf = BytesMut::from(input);
            let again = wire::decode_buf(&mut buf).expect("decode_buf refused what decode took");
            assert_eq!(again.as_ref(), Some(&f), "decode_buf and decode disagree");
            assert_eq!(buf.len(), input.len() - used, "decode_buf consumed another length");
        }
        Ok(Decoded::NeedMore(n)) => {
            assert!(
                n > input.len() && n <= MAX_WIRE_FRAME,
                "NeedMore({n}) for {} bytes",
                input.len()
            );
        }
        Err(_) => {}
    }
}

/// The replication wire format: every frame round-trips, and nothing read from the peer can
/// make the decoder panic, over-allocate or wait for more than the largest frame.
#[test]
fn fuzz_replication_wire() {
    let corpus: Vec<Vec<u8>> = frames().iter().map(|f| wire::encode(f).to_vec()).collect();
    fuzz("wire", 2, &corpus, |rng, input| {
        let mut b = input.to_vec();
        if rng.below(2) == 0 {
            reseal(&mut b);
        }
        check_wire(&b);
    });
}

/// The record layer: a sealed record opens to its frame; the same record with any byte
/// changed, cut or extended never opens to a frame (nor panics, nor reserves what the length
/// prefix claims beyond the limit).
#[test]
fn fuzz_replication_records() {
    let frames = frames();
    let corpus: Vec<Vec<u8>> = frames.iter().map(|f| wire::encode(f).to_vec()).collect();
    let (k1, k2) = ([1u8; 32], [2u8; 32]);
    fuzz("record", 3, &corpus, |rng, _| {
        let f = &frames[rng.below(frames.len())];
        let protection = if rng.below(2) == 0 { Protection::Encrypt } else { Protection::AuthOnly };
        let mut tx = Channel::new(&k1, &k2, protection).tx;
        let mut rx = Channel::new(&k2, &k1, protection).rx;
        let rec = tx.seal(f).expect("seal").to_vec();
        let mutant = mutate(rng, &rec, &rec);
        let mut buf = BytesMut::from(&mutant[..]);
        let (opened, big) = largest_alloc(|| rx.open(&mut buf, 64 << 10));
        assert!(big <= 4 * mutant.len() + (64 << 10) + 4096, "open reserved {big} bytes");
        if let Ok(Some(g)) = opened {
            assert_eq!(&g, f, "a changed record opened to another frame");
            assert_eq!(mutant.get(..rec.len()), Some(&rec[..]), "a changed record opened");
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Witness protocol
// ---------------------------------------------------------------------------------------------

fn witness_corpus() -> Vec<Vec<u8>> {
    let ms = Duration::from_millis;
    let msgs = vec![
        proto::Message::Hello { node: "alpha".into(), nonce: [7; 32] },
        proto::Message::Challenge { nonce: [8; 32] },
        proto::Message::Request { proof: [9; 32], degraded: None },
        proto::Message::Request { proof: [9; 32], degraded: Some(true) },
        proto::Message::Answer {
            reply: Reply::Grant {
                holder: "beta".into(),
                epoch: 4,
                term: ms(10_000),
                expires_in: ms(9_000),
                prev_degraded: Some(false),
            },
            proof: [1; 32],
        },
        proto::Message::Answer {
            reply: Reply::Grant {
                holder: "beta".into(),
                epoch: 4,
                term: ms(10_000),
                expires_in: ms(10_000),
                prev_degraded: None,
            },
            proof: [1; 32],
        },
        proto::Message::Answer {
            reply: Reply::Refused {
                holder: Some("alpha".into()),
                epoch: 5,
                retry_after: ms(300),
                degraded: Some(true),
            },
            proof: [2; 32],
        },
        proto::Message::Answer {
            reply: Reply::Refused { holder: None, epoch: 0, retry_after: ms(1), degraded: None },
            proof: [2; 32],
        },
        proto::Message::Denied { reason: "bad proof".into() },
    ];
    msgs.iter().map(proto::encode).collect()
}

/// The witness protocol: frames round-trip byte for byte, and a hostile peer cannot make the
/// decoder panic, read past a frame or allocate more than a frame's worth.
#[test]
fn fuzz_witness_protocol() {
    fuzz("witness", 4, &witness_corpus(), |_, input| {
        let (decoded, big) = largest_alloc(|| proto::decode(input));
        assert!(big <= 2 * proto::MAX_FRAME, "decode allocated {big} bytes");
        match decoded {
            Ok(Some((m, used))) => {
                assert!(used <= input.len(), "message used {used} of {} bytes", input.len());
                assert_eq!(proto::encode(&m), &input[..used], "encode(decode(x)) is not x: {m:?}");
            }
            Ok(None) => {
                let claimed = input.get(..4).map(|l| u32::from_be_bytes([l[0], l[1], l[2], l[3]]));
                assert!(
                    claimed.map_or(true, |c| c as usize <= proto::MAX_FRAME),
                    "waits for {claimed:?}"
                );
            }
            Err(_) => {}
        }
    });
}
