//! The client against the real server code over in-memory streams, with paused time and
//! injected delays: a lease this node holds always ends before the witness gives it to the
//! other node, however slow the request or the answer.

use std::net::{Ipv4Addr, SocketAddr};

use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::*;
use crate::witness::server::{serve, Shared};

const TERM: Duration = Duration::from_secs(10);
const MS: Duration = Duration::from_millis(1);
const ADDR: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 7790);

fn secret() -> Arc<[u8]> {
    b"s3cret".as_slice().into()
}

fn client(node: &str, settings: ClientSettings) -> LeaseClient {
    LeaseClient::new(ADDR, node, secret(), settings)
}

/// Copies `from` to `to`, each chunk `delay` late (a slow network, one direction).
fn relay(
    mut from: tokio::io::ReadHalf<DuplexStream>,
    mut to: tokio::io::WriteHalf<DuplexStream>,
    delay: Duration,
) {
    tokio::spawn(async move {
        let mut chunk = [0u8; 1024];
        while let Ok(n @ 1..) = from.read(&mut chunk).await {
            tokio::time::sleep(delay).await;
            if to.write_all(&chunk[..n]).await.is_err() {
                break;
            }
        }
    });
}

/// `c` asks the witness in `shared`; frames towards the witness arrive `up` late, answers
/// `down` late. The lease counts from the moment of the call.
async fn ask(
    c: &LeaseClient,
    shared: &Arc<Shared>,
    up: Duration,
    down: Duration,
) -> Result<Lease, WitnessError> {
    let sent = Instant::now();
    let (node_end, near) = duplex(4096);
    let (far, witness_end) = duplex(4096);
    let (near_r, near_w) = tokio::io::split(near);
    let (far_r, far_w) = tokio::io::split(far);
    relay(near_r, far_w, up);
    relay(far_r, near_w, down);
    let shared = Arc::clone(shared);
    tokio::spawn(async move { serve(&shared, witness_end, ADDR).await });
    c.ask_over(node_end, sent).await
}

fn witness(dir: &tempfile::TempDir, key: &[u8]) -> Arc<Shared> {
    Arc::new(
        Shared::open(&dir.path().join("state"), TERM, crate::replication::Secrets::fixed(key))
            .unwrap(),
    )
}

/// Asks as `c` every 10 ms until granted; returns when.
async fn first_grant(c: &LeaseClient, shared: &Arc<Shared>) -> (Instant, Lease) {
    loop {
        match ask(c, shared, Duration::ZERO, Duration::ZERO).await {
            Ok(l) => return (Instant::now(), l),
            Err(e) if e.is_refused() => tokio::time::sleep(10 * MS).await,
            Err(e) => panic!("{e}"),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn held_lease_ends_before_the_other_node_gets_one_even_when_slow() {
    for (up, down) in [(0, 0), (3000, 0), (0, 3000), (2000, 4000), (0, 20_000)] {
        let (up, down) = (up * MS, down * MS);
        let dir = tempfile::tempdir().unwrap();
        let shared = witness(&dir, &secret());
        let (alpha, beta) =
            (client("alpha", Default::default()), client("beta", Default::default()));
        let sent = Instant::now();
        let lease = ask(&alpha, &shared, up, down).await.unwrap();
        assert_eq!((lease.epoch, lease.term), (1, TERM));
        let answered = Instant::now();
        let margin = alpha.margin(TERM);
        assert_eq!(lease.valid_until, sent + TERM - margin, "counted from before the request");
        // The witness granted once HELLO and REQUEST (two frames up) and CHALLENGE (one down)
        // had crossed: beta's first grant comes a term after that, a margin plus the delays
        // after alpha's lease ended (or at once, if alpha's answer came later than that).
        let (at, beta_lease) = first_grant(&beta, &shared).await;
        assert_eq!(beta_lease.epoch, 2);
        assert!(at >= lease.valid_until + margin, "{up:?}/{down:?}: beta too early");
        let gap = at - lease.valid_until;
        let late = (margin + 2 * up + down).max(answered - lease.valid_until);
        assert!(gap <= late + 10 * MS, "{up:?}/{down:?}: gap {gap:?}");
        assert!(!lease.is_valid(at));
    }
}

#[tokio::test(start_paused = true)]
async fn answer_slower_than_the_lease_arrives_expired() {
    let dir = tempfile::tempdir().unwrap();
    let shared = witness(&dir, &secret());
    let alpha = client("alpha", Default::default());
    let lease = ask(&alpha, &shared, Duration::ZERO, TERM).await.unwrap();
    assert!(!lease.is_valid(Instant::now()), "held for {:?}", lease.remaining(Instant::now()));
    assert_eq!(lease.remaining(Instant::now()), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn validity_boundary_and_renewal() {
    let dir = tempfile::tempdir().unwrap();
    let shared = witness(&dir, &secret());
    let alpha = client("alpha", Default::default());
    let lease = ask(&alpha, &shared, Duration::ZERO, Duration::ZERO).await.unwrap();
    assert!(lease.is_valid(lease.valid_until - MS));
    assert!(!lease.is_valid(lease.valid_until));
    tokio::time::sleep(TERM / 2).await;
    let renewed = ask(&alpha, &shared, Duration::ZERO, Duration::ZERO).await.unwrap();
    assert_eq!(renewed.epoch, lease.epoch);
    assert_eq!(renewed.valid_until, lease.valid_until + TERM / 2);
}

#[test]
fn margin_absorbs_a_node_clock_slower_by_less_than_its_fraction() {
    let c = client("alpha", Default::default());
    let local = TERM - c.margin(TERM);
    // The node counts `local` on its clock; in real time that is local / (1 - slowness).
    let real = |slowness: f64| local.as_secs_f64() / (1.0 - slowness);
    assert!(real(0.0) < TERM.as_secs_f64());
    assert!(real(0.09) < TERM.as_secs_f64());
    assert!(real(0.11) > TERM.as_secs_f64(), "a larger drift needs a larger margin");
    let wide =
        client("alpha", ClientSettings { margin: Some(3 * TERM / 10), ..Default::default() });
    assert_eq!(wide.margin(TERM), 3 * TERM / 10);
    assert_eq!(wide.margin(TERM / 10), TERM / 10, "never more than the term");
}

#[tokio::test(start_paused = true)]
async fn configured_margin_shortens_the_lease() {
    let dir = tempfile::tempdir().unwrap();
    let shared = witness(&dir, &secret());
    let settings = ClientSettings { margin: Some(2 * TERM / 10), ..Default::default() };
    let sent = Instant::now();
    let lease = ask(&client("alpha", settings), &shared, MS, MS).await.unwrap();
    assert_eq!(lease.valid_until, sent + TERM - 2 * TERM / 10);
}

#[tokio::test(start_paused = true)]
async fn refusal_names_holder_and_retry() {
    let dir = tempfile::tempdir().unwrap();
    let shared = witness(&dir, &secret());
    ask(&client("alpha", Default::default()), &shared, MS, MS).await.unwrap();
    let e = ask(&client("beta", Default::default()), &shared, MS, MS).await.unwrap_err();
    let WitnessError::Refused { holder, epoch, retry_after, .. } = &e else { panic!("{e}") };
    assert_eq!((holder.as_deref(), *epoch), (Some("alpha"), 1));
    assert!(*retry_after <= TERM && *retry_after >= TERM - 10 * MS, "{retry_after:?}");
    assert!(e.to_string().contains("held by alpha"), "{e}");
}

#[tokio::test(start_paused = true)]
async fn witness_with_another_secret_fails_its_proof() {
    let dir = tempfile::tempdir().unwrap();
    // The witness accepts alpha's proof only with its own key, so it denies first; a witness
    // that answered anyway (an impostor) is caught by the proof of its answer.
    let impostor = witness(&dir, b"other");
    let e = ask(&client("alpha", Default::default()), &impostor, MS, MS).await.unwrap_err();
    assert!(matches!(e, WitnessError::Denied { .. }), "{e}");
    let e = impostor_answer().await;
    assert!(matches!(e, WitnessError::BadProof { .. }), "{e}");
}

/// A fake witness that grants without knowing the secret.
async fn impostor_answer() -> WitnessError {
    let (node_end, mut fake) = duplex(4096);
    tokio::spawn(async move {
        let mut buf = Vec::new();
        let _ = frames::recv(&mut fake, &mut buf).await;
        frames::send(&mut fake, &Message::Challenge { nonce: [1; 32] }).await.unwrap();
        let _ = frames::recv(&mut fake, &mut buf).await;
        let reply = Reply::Grant {
            holder: "alpha".into(),
            epoch: 1,
            term: TERM,
            expires_in: TERM,
            prev_degraded: Some(false),
        };
        frames::send(&mut fake, &Message::Answer { reply, proof: [0; 32] }).await.unwrap();
    });
    let c = client("alpha", Default::default());
    c.ask_over(node_end, Instant::now()).await.unwrap_err()
}

#[tokio::test(start_paused = true)]
async fn announced_term_must_match_the_configured_one() {
    let dir = tempfile::tempdir().unwrap();
    let shared = witness(&dir, &secret());
    let settings = ClientSettings { term: Some(2 * TERM), ..Default::default() };
    let e = ask(&client("alpha", settings), &shared, MS, MS).await.unwrap_err();
    assert!(matches!(e, WitnessError::TermMismatch { .. }), "{e}");
    assert!(e.to_string().contains("10s") && e.to_string().contains("20s"), "{e}");
}

#[tokio::test(start_paused = true)]
async fn renewal_after_another_holder_is_superseded() {
    let dir = tempfile::tempdir().unwrap();
    let shared = witness(&dir, &secret());
    let (alpha, beta) = (client("alpha", Default::default()), client("beta", Default::default()));
    let held = ask(&alpha, &shared, MS, MS).await.unwrap();
    let renewed = ask(&alpha, &shared, MS, MS).await.unwrap();
    assert_eq!(continues(&held, renewed).map(|l| l.epoch).ok(), Some(1));
    tokio::time::sleep(TERM).await;
    assert_eq!(ask(&beta, &shared, MS, MS).await.unwrap().epoch, 2);
    tokio::time::sleep(TERM).await;
    let again = ask(&alpha, &shared, MS, MS).await.unwrap();
    assert_eq!(again.epoch, 3);
    // renew() checks the epoch: beta held the lease in between.
    let e = continues(&held, again).unwrap_err();
    assert!(matches!(e, WitnessError::Superseded { had: 1, now: Lease { epoch: 3, .. } }), "{e}");
}

#[tokio::test]
async fn unreachable_witness_is_an_error_naming_it() {
    // A port nobody listens on (bound, then closed).
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let c = LeaseClient::new(addr, "alpha", secret(), Default::default());
    let e = c.acquire().await.unwrap_err();
    assert!(matches!(e, WitnessError::Connect { .. }), "{e}");
    assert!(e.to_string().contains(&addr.to_string()), "{e}");
}
