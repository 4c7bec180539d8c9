//! blockd: one synchronously mirrored block device for two servers, served over NBD.
//!
//! The contract this code keeps (when a write is acknowledged, the metadata invariant, the
//! generations, the link protocol, fencing, the failover order) is `docs/design.md`; comments
//! cite its sections as "design.md §N".
//!
//! Module map (what each owns, and what it must not do):
//!
//! - [`accept`]: the one accept loop of every listener (NBD, control, replication, witness,
//!   metrics, console), each with its small [`accept::Policy`] (bound, backoff, cancellation).
//! - [`agent`]: the decision table of `blockctl agent` (automatic failover): pure, time as
//!   arguments; `blockctl` polls, asks the witness and acts, the simulator drives it too.
//! - [`config`]: the TOML file plus `BLOCKD_*` overrides, parsed with figment and checked by
//!   `validate()`. Pure data; no I/O beyond reading the file.
//! - [`storage`]: the backing file or disk behind one [`storage::Engine`] trait (io_uring and sync
//!   engines, one completion path) and [`storage::Store`], which adds alignment handling for
//!   direct I/O. Knows nothing of NBD or peers.
//! - [`meta`]: the on-disk metadata of a volume (design.md §4, §5): superblock slots, flags,
//!   generations, the dirty bitmap and the activity log ([`meta::Dirty`] keeps the invariant by
//!   telling the write path what to persist first). Blocking file I/O only; no sockets, no
//!   tokio.
//! - [`nbd`]: the NBD protocol. `codec` is pure (bytes in, values out); `handshake` and `server`
//!   drive one connection. Never touches storage directly: every request goes through [`volume`].
//! - [`volume`]: the write path (design.md §3). Interval ordering of overlapping writes,
//!   mirroring, the transfer log, degraded mode, counters, error accounting; where the decision
//!   "when is a write acknowledged" lives. Also the peer's side (applying what the Primary
//!   sends), and the [`resync::Replica`] handle a resync works through.
//! - [`resync`]: the resync whole (design.md §5): the pure decision table ([`resync::decide`],
//!   [`resync::plan`]), the source's copy, the target's answers, `verify`. Reaches a volume only
//!   through [`resync::Replica`], never its fields.
//! - [`replication`]: the link to the peer (design.md §6): the pure wire format and record
//!   layer, the Noise handshake, and the link actor that keeps one authenticated session. Never
//!   touches storage or volumes: requests reach the node as events.
//! - [`fence`]: the witness lease as the write path sees it: a Primary without its peer
//!   acknowledges degraded writes only while it holds the lease; the task that keeps it.
//! - [`node`]: the node's volumes and its peer link: link events and operator requests become
//!   role-machine events; the state exchange lives here and calls [`resync`]'s entry points.
//! - [`swap`]: the far end of `blockctl swap`'s relay: runs this node's `blockctl promote` when
//!   the peer asks over the link (design.md §8); the promote steps stay in `blockctl`.
//! - [`role`]: the pure role machine (design.md §7): `step(state, event) -> (state, actions)`; no
//!   I/O, no tokio: the node performs the actions. Owns the domain types [`role::Role`],
//!   [`role::DiskState`], [`role::ConnState`].
//! - [`control`]: the control socket (JSON lines) and the types `blockctl` shares (the role
//!   types re-exported from [`role`]). Error kinds, not strings: `SplitBrain`, `NotPrimary`, ...
//! - [`kernel`]: `/dev/nbdN` attached by blockd itself over the `nbd` generic netlink family,
//!   one end of a socketpair served by the NBD server (design.md §8 step 3).
//! - [`metrics`]: latency histograms (lock-free, recorded by [`volume`]) and the Prometheus
//!   text endpoint, rendered from the same status the control socket answers.
//! - [`console`]: the web console (one page in the binary, `/api/state`, token-guarded actions
//!   that run `blockctl`); reads status like the control socket does, never the write path.
//! - [`daemon`]: wiring: config → volumes → listeners, signals, orderly shutdown.
//! - [`witness`]: the lease witness (design.md §7): the pure lease table, its protocol, the
//!   `blockd witness` server and the [`witness::LeaseClient`] nodes use. Holds no data; never
//!   touches storage or the peer link.
//! - [`notify`]: systemd readiness (`READY=1`, `STOPPING=1`) and watchdog pings; no-ops
//!   without `NOTIFY_SOCKET`.
//! - [`sys`]: process-wide settings against the same-host memory-pressure deadlock
//!   (`PR_SET_IO_FLUSHER`, `mlockall`).
//! - [`errno`]: the one table of error values NBD replies and the link's `Ack` carry, and how
//!   host and volume errors map onto it. Pure.
//! - `sim` (tests only): the deterministic simulation of two nodes in one process (design.md
//!   §10).
//! - `be` (private): big-endian integers at fixed offsets, for the pure codecs.

pub mod accept;
pub mod agent;
mod be;
pub mod config;
pub mod console;
pub mod control;
pub mod daemon;
pub mod errno;
pub mod fence;
pub mod kernel;
pub mod meta;
pub mod metrics;
pub mod nbd;
pub mod node;
pub mod notify;
pub mod replication;
pub mod resync;
pub mod role;
#[cfg(test)]
mod sim;
pub mod storage;
pub mod swap;
pub mod sys;
pub mod volume;
pub mod witness;
