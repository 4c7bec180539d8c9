//! The replication link between the two nodes (design.md §6).
//!
//! - [`wire`]: the frame format. Pure: bytes in, values out; no I/O, no tokio.
//! - [`auth`]: the shared secret files (and the HMAC the witness protocol uses). No sockets.
//! - [`noise`]: the Noise NNpsk0 handshake with the secret as PSK (snow). Pure.
//! - [`record`]: every frame after the handshake as an AEAD record, numbered. Pure.
//! - [`handshake`]: HELLO / NOISE / PARAMS / READY on a fresh connection; public so that
//!   integration tests can play a fake peer against a real daemon.
//! - [`link`]: the actor: listens and dials, keeps exactly one session, reconnects with backoff.
//!   The node (`node.rs`) sees only [`LinkEvent`]s and cloneable [`Session`] handles.
//! - `session` (private): one connection's reader task, request/reply matching, heartbeats.
//! - [`stream`]: what a session needs from its connection (TCP, or the simulation's pipes).
//! - `writer` (private): the send side: write-through when the socket is free, else a writer
//!   task batching frames into `writev`.
//!
//! Nothing here touches storage or volumes: requests go to the node as events, and the node
//! answers them.

pub mod auth;
pub mod handshake;
pub mod link;
pub mod noise;
pub mod record;
pub(crate) mod session;
pub mod stream;
pub mod wire;
mod writer;

pub use auth::{load_secret, AuthError, Secrets};
pub use link::{spawn, LinkConfig, LinkError, LinkEvent, Responder, Session, Tuning};
pub use wire::{Frame, Message, WireError, PROTOCOL_VERSION};
