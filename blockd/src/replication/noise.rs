//! The cryptographic core of the link handshake: Noise `NNpsk0` (snow) with the cluster secret
//! as pre-shared key. Pure: messages in, messages and keys out; no I/O. Public so that tests
//! can play a peer that knows the secret.
//!
//! ```text
//!   prologue = "blockd-link-v3" ‖ version ‖ encrypt ‖ initiator (name, instance)
//!                               ‖ responder (name, instance)
//!   initiator → responder:  psk, e          (48 bytes)
//!   responder → initiator:  e, ee           (48 bytes)
//!   Split() → key initiator→responder, key responder→initiator   (record.rs)
//! ```
//!
//! The prologue is what each side saw in the two clear HELLOs, ordered by direction: if anyone
//! changed a HELLO, relayed it from another connection, or turned the direction around, the two
//! sides mix different prologues and no message after it verifies. The PSK is mixed before the
//! first message, so message 1 already proves the secret, and message 2 (which depends on the
//! responder's fresh ephemeral key) proves it freshly to the initiator. Message 1 alone can be
//! replayed (NNpsk0 is 0-RTT for the initiator): the responder counts the initiator as
//! authenticated only once the first record under the new keys opens (`handshake.rs`), and a
//! replayer cannot produce that record without the secret and the responder's fresh key.
//! Ephemeral Diffie-Hellman gives forward secrecy: a recording of the link cannot be decrypted
//! later even with the secret.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use snow::{Builder, HandshakeState};

use super::record::{Channel, Protection};

/// The Noise protocol name: pattern, DH, cipher, hash.
pub const PARAMS: &str = "Noise_NNpsk0_25519_AESGCM_SHA256";
/// Domain separation of the prologue.
const CONTEXT: &[u8] = b"blockd-link-v3";
/// Domain separation of the PSK derived from the secret file.
const PSK_CONTEXT: &[u8] = b"blockd-link-psk-v1";

/// Why a handshake message did not verify, or snow refused to run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoiseError {
    /// Wrong secret, changed message, changed HELLO (prologue), or a replay.
    #[error("failed authentication")]
    Auth,
    #[error("noise: {0}")]
    Internal(String),
}

/// One side as its HELLO named it.
#[derive(Debug, Clone, Copy)]
pub struct Side<'a> {
    pub node: &'a str,
    pub instance: u64,
}

/// The prologue both sides must agree on (see the module doc).
pub fn prologue(version: u16, encrypt: bool, initiator: Side, responder: Side) -> Vec<u8> {
    let mut p = Vec::with_capacity(CONTEXT.len() + 3 + 2 * (1 + 255 + 8));
    p.extend_from_slice(CONTEXT);
    p.extend_from_slice(&version.to_be_bytes());
    p.push(u8::from(encrypt));
    for side in [initiator, responder] {
        let name = &side.node.as_bytes()[..side.node.len().min(255)];
        p.push(name.len() as u8);
        p.extend_from_slice(name);
        p.extend_from_slice(&side.instance.to_be_bytes());
    }
    p
}

/// The 32-byte PSK of a secret file's content (any length).
pub fn psk(secret: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(PSK_CONTEXT);
    h.update(secret);
    h.finalize().into()
}

fn internal(e: snow::Error) -> NoiseError {
    NoiseError::Internal(e.to_string())
}

fn state(secret: &[u8], prologue: &[u8], initiator: bool) -> Result<HandshakeState, NoiseError> {
    let params = PARAMS.parse().map_err(internal)?;
    let key = psk(secret);
    let b = Builder::new(params).prologue(prologue).map_err(internal)?;
    let b = b.psk(0, &key).map_err(internal)?;
    if initiator { b.build_initiator() } else { b.build_responder() }.map_err(internal)
}

/// Split() of a finished handshake: (initiator→responder, responder→initiator).
fn keys(hs: &mut HandshakeState) -> ([u8; 32], [u8; 32]) {
    hs.dangerously_get_raw_split()
}

/// The initiator between its message 1 and the responder's message 2.
pub struct Initiator(HandshakeState);

impl Initiator {
    /// Message 1, under `secret` (the current one).
    pub fn start(secret: &[u8], prologue: &[u8]) -> Result<(Initiator, Vec<u8>), NoiseError> {
        let mut hs = state(secret, prologue, true)?;
        let mut m = vec![0u8; 128];
        let n = hs.write_message(&[], &mut m).map_err(internal)?;
        m.truncate(n);
        Ok((Initiator(hs), m))
    }

    /// Checks message 2: the responder knows the secret and answered this very message 1.
    pub fn finish(mut self, msg2: &[u8], protection: Protection) -> Result<Channel, NoiseError> {
        let mut payload = [0u8; 64];
        self.0.read_message(msg2, &mut payload).map_err(|_| NoiseError::Auth)?;
        if !self.0.is_handshake_finished() {
            return Err(NoiseError::Internal("handshake not finished after message 2".into()));
        }
        let (i2r, r2i) = keys(&mut self.0);
        Ok(Channel::new(&i2r, &r2i, protection))
    }
}

/// The responder's answer to message 1: tries each accepted secret (current, then previous);
/// returns message 2, the channel, and the index of the secret that verified.
pub fn respond(
    secrets: &[Arc<[u8]>],
    prologue: &[u8],
    msg1: &[u8],
    protection: Protection,
) -> Result<(Vec<u8>, Channel, usize), NoiseError> {
    let mut payload = [0u8; 64];
    for (i, secret) in secrets.iter().enumerate() {
        let mut hs = state(secret, prologue, false)?;
        if hs.read_message(msg1, &mut payload).is_err() {
            continue;
        }
        let mut m = vec![0u8; 128];
        let n = hs.write_message(&[], &mut m).map_err(internal)?;
        m.truncate(n);
        let (i2r, r2i) = keys(&mut hs);
        return Ok((m, Channel::new(&r2i, &i2r, protection), i));
    }
    Err(NoiseError::Auth)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::wire::{Frame, Message};
    use bytes::BytesMut;

    fn sides() -> Vec<u8> {
        let a = Side { node: "alpha", instance: 1 };
        let b = Side { node: "beta", instance: 2 };
        prologue(3, true, a, b)
    }

    fn ping() -> Frame {
        Frame { volume: 0, id: 7, reply: false, msg: Message::Ping }
    }

    /// Whether a record from `from` opens at `to`.
    fn talks(from: &mut Channel, to: &mut Channel) -> bool {
        let mut buf = BytesMut::from(&from.tx.seal(&ping()).unwrap()[..]);
        matches!(to.rx.open(&mut buf, 1024), Ok(Some(f)) if f == ping())
    }

    #[test]
    fn same_secret_and_prologue_give_matching_keys_both_ways() {
        let s: Arc<[u8]> = Arc::from(&b"secret"[..]);
        let (i, m1) = Initiator::start(&s, &sides()).unwrap();
        let (m2, mut r, which) =
            respond(std::slice::from_ref(&s), &sides(), &m1, Protection::Encrypt).unwrap();
        let mut i = i.finish(&m2, Protection::Encrypt).unwrap();
        assert_eq!((which, m1.len(), m2.len()), (0, 48, 48));
        assert!(talks(&mut i, &mut r) && talks(&mut r, &mut i));
    }

    #[test]
    fn wrong_secret_or_other_prologue_fails_and_previous_secret_is_accepted() {
        let (old, new): (Arc<[u8]>, Arc<[u8]>) = (Arc::from(&b"old"[..]), Arc::from(&b"new"[..]));
        let (_, m1) = Initiator::start(&old, &sides()).unwrap();
        let r = respond(std::slice::from_ref(&new), &sides(), &m1, Protection::Encrypt);
        assert_eq!(r.err(), Some(NoiseError::Auth));
        // During a rotation the responder accepts the previous secret as well.
        let r = respond(&[new.clone(), old.clone()], &sides(), &m1, Protection::Encrypt);
        assert_eq!(r.map(|(_, _, which)| which).ok(), Some(1));
        // The direction or an instance turned around: another prologue.
        let a = Side { node: "alpha", instance: 1 };
        let b = Side { node: "beta", instance: 2 };
        for other in [
            prologue(3, true, b, a),
            prologue(3, false, a, b),
            prologue(3, true, a, Side { instance: 3, ..b }),
        ] {
            let r = respond(std::slice::from_ref(&old), &other, &m1, Protection::Encrypt);
            assert_eq!(r.err(), Some(NoiseError::Auth));
        }
    }

    /// A recorded message 1 replayed gets a fresh message 2, but the replayer's recorded
    /// first record (under the old session's keys) does not open under the new ones.
    #[test]
    fn replayed_message_1_does_not_give_the_old_session_keys() {
        let s: Arc<[u8]> = Arc::from(&b"secret"[..]);
        let (i, m1) = Initiator::start(&s, &sides()).unwrap();
        let (m2, _r, _) =
            respond(std::slice::from_ref(&s), &sides(), &m1, Protection::Encrypt).unwrap();
        let mut old = i.finish(&m2, Protection::Encrypt).unwrap();
        let recorded = old.tx.seal(&ping()).unwrap();
        let (m2b, mut replayed, _) =
            respond(std::slice::from_ref(&s), &sides(), &m1, Protection::Encrypt).unwrap();
        assert_ne!(m2, m2b, "the responder's ephemeral key is fresh");
        let mut buf = BytesMut::from(&recorded[..]);
        assert!(replayed.rx.open(&mut buf, 1024).is_err());
    }
}
