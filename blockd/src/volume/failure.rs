//! Disk errors, DRBD's `on-io-error=detach` as the model:
//!
//! ```text
//!  local error (EIO, ENOSPC, EDQUOT, EFBIG, anything) ─► counted ─► disk Failed (memory, then
//!      the superblock's flag: still Failed after a restart) ─► range marked ─► reply
//!  Failed Primary, peer in sync: writes go to the peer only (acknowledged once it has them),
//!      reads are the peer's (`Read`); no peer: the error goes to the client
//!  Failed Secondary: refuses every request of the Primary (which marks and goes on
//!      degraded) and every handshake, saying why
//!  operator repaired or replaced it: `blockctl resolve` ─► every byte marked, Inconsistent,
//!      flag cleared ─► target of a full resync at the next handshake
//! ```
//!
//! A Failed disk is never a resync source and never promoted (the role machine refuses both
//! for any disk that is not UpToDate).

use std::{io, sync::atomic::Ordering};

use super::{AlignedBuf, ReadBuf, Volume, VolumeError};
use crate::{
    meta::{DiskFailure, DiskOp},
    replication::{LinkError, Message, Session},
    role::{self, ConnState, DiskState, Event},
};

impl Volume {
    /// A local I/O error: the disk becomes `Failed` (logged once), in memory at once; the
    /// caller then runs [`persist_failure`](Self::persist_failure) unless it holds the
    /// metadata lock.
    pub(super) fn disk_failed(&self, failure: DiskFailure, err: &VolumeError) {
        let mut live = self.live();
        if live.machine.disk == DiskState::Failed {
            return;
        }
        let (after, _) = role::step(&live.machine, &Event::DiskFailed);
        live.machine = after;
        live.failure = Some(failure);
        tracing::error!(volume = %self.name(), error = %err, "disk state became Failed: {failure}");
    }

    /// The disk is `Failed` and this is a two-node volume: nothing is read from or written to
    /// the disk any more (the peer stands in). A single node has nothing else to use, so it
    /// goes on trying its disk, request by request, and reports each error.
    pub(super) fn detached(&self) -> bool {
        self.info.peer.is_some() && self.live().machine.disk == DiskState::Failed
    }

    /// Records the disk's failure in the superblock, so that it is still `Failed` after a
    /// restart (a failed disk's contents are unknown: never a source, never promoted).
    pub(super) async fn persist_failure(&self) {
        let Some(failure) = self.live().failure else { return };
        let mut p = self.lock_persisted().await;
        if p.meta.flags.failed.is_some() {
            return;
        }
        if let Err(e) = self.persist_with(&mut p, |m| m.flags.failed = Some(failure)).await {
            tracing::error!(volume = %self.name(), error = %e,
                "cannot record the disk failure in the metadata: it is Failed until the next start");
        }
    }

    /// The operator repaired or replaced a `Failed` disk (`blockctl resolve`): its contents are
    /// unknown, so every byte is marked out of sync and it becomes `Inconsistent`, the target
    /// of a full resync at the next handshake. The marks are on disk before the flag changes.
    pub(crate) async fn replace_disk(&self) -> Result<(), VolumeError> {
        let mut p = self.lock_persisted().await;
        if self.live().machine.disk != DiskState::Failed {
            return Ok(());
        }
        self.track.mark(0..self.size()).await.map_err(VolumeError::DirtyLog)?;
        self.track.flush().await.map_err(VolumeError::DirtyLog)?;
        self.persist_with(&mut p, |m| {
            m.flags.failed = None;
            m.flags.consistent = false;
        })
        .await?;
        let mut live = self.live();
        let before = live.machine;
        live.machine = role::step(&before, &Event::DiskReplaced).0;
        live.failure = None;
        drop(live);
        self.log_change(&before, &Event::DiskReplaced);
        Ok(())
    }

    /// The peer's copy of `offset..offset+len`, when this Primary is mirroring to it.
    pub(super) async fn read_from_peer(&self, offset: u64, len: u32) -> Option<ReadBuf> {
        // Only a peer in sync has every byte (a resync target does not, yet).
        let session = self.route().ok().flatten()?;
        if self.live().machine.conn != ConnState::Connected {
            return None;
        }
        match self.call_peer(&session, Message::Read { offset, len }).await {
            Ok(Message::ReadData { data }) if data.len() == len as usize => {
                Some(ReadBuf { buf: AlignedBuf::copy_from(&data), start: 0, len: data.len() })
            }
            other => {
                tracing::warn!(volume = %self.name(), offset, len, "the peer did not serve a read: {other:?}");
                None
            }
        }
    }

    /// What a request gets when the disk is `Failed` and the peer cannot stand in.
    pub(super) fn failed_error(&self) -> VolumeError {
        let why = self.live().failure.map_or_else(|| "Failed".to_string(), |f| f.to_string());
        VolumeError::Io(io::Error::other(format!(
            "the local disk is Failed ({why}) and the peer cannot serve the request"
        )))
    }

    /// A mirrored write the local disk did not take (it failed now, or had failed before):
    /// the range is marked out of sync before any reply, and the write succeeds if the peer
    /// has it (DRBD's detach); else the local error goes to the client.
    pub(super) async fn local_failed(
        &self,
        session: &Session,
        remote: Result<Message, LinkError>,
        range: std::ops::Range<u64>,
        bytes: u64,
        err: VolumeError,
    ) -> Result<(), VolumeError> {
        self.mark(range).await?;
        if !self.peer_done(session, remote).await? {
            return Err(err);
        }
        self.count_peer_write(bytes);
        Ok(())
    }

    /// Accounts a backing-store result: any error (EIO, ENOSPC, EDQUOT, EFBIG, ...) counts and
    /// makes the disk `Failed`, on disk too, before the caller replies: a disk that lost a
    /// write has contents nobody can vouch for (DRBD's `on-io-error=detach`).
    pub(super) async fn io<T>(
        &self,
        op: DiskOp,
        offset: u64,
        r: io::Result<T>,
    ) -> Result<T, VolumeError> {
        let e = match r {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        let errno = crate::errno::raw(&e);
        let err = VolumeError::Io(e);
        self.disk_failed(DiskFailure { op, errno, offset }, &err);
        self.persist_failure().await;
        Err(err)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::tests::{data, volume};
    use super::*;
    use crate::{
        meta::{AlConfig, MetaFile},
        storage::{
            fault::{Fault, FaultEngine, OpKind},
            Store, StoreOptions,
        },
        volume::VolumeInfo,
    };

    const SIZE: u64 = 1 << 20;

    /// `volume(dir, Some("beta"))`'s files, through an engine that fails on demand.
    fn faulty(dir: &tempfile::TempDir) -> (Volume, Arc<FaultEngine>) {
        let path = dir.path().join("v.img");
        let opts = StoreOptions::sparse_sync(path.clone(), SIZE);
        let mut fault = None;
        let store = Store::open(&opts).unwrap().map_engine(|inner| {
            let f = Arc::new(FaultEngine::new(inner));
            fault = Some(Arc::clone(&f));
            f
        });
        let meta = dir.path().join("v.meta");
        let (file, meta) = MetaFile::open_or_create(&meta, SIZE, "alpha", store.created()).unwrap();
        let info = VolumeInfo {
            name: "v".into(),
            index: 0,
            node: "alpha".into(),
            peer: Some("beta".into()),
            socket: dir.path().join("v.sock"),
            backing: path,
        };
        (Volume::open(info, store, meta, file, AlConfig::default()).unwrap(), fault.unwrap())
    }

    /// Issue 17: ENOSPC is a disk failure like any other. Without the peer the error goes to
    /// the client, the range is marked first, the disk is Failed with why, in the superblock
    /// (still Failed after a restart, never promoted), nothing more is written to it; the
    /// operator's replacement makes it Inconsistent with every byte marked.
    #[tokio::test]
    async fn a_write_error_fails_the_disk_on_disk_until_it_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let (v, fault) = faulty(&dir);
        v.mark_clean(false).await.unwrap();
        v.transition(Event::Promote { force: true }, None).await.unwrap();
        let enospc = Fault { kind: OpKind::Write, range: Some(8192..12288), errno: libc::ENOSPC };
        fault.fail(enospc);
        let err = v.write(8192, data(7, 4096), false).await.unwrap_err();
        assert!(err.is_no_space(), "{err:?}");
        let st = v.status();
        assert_eq!(st.disk, DiskState::Failed);
        let want = DiskFailure { op: DiskOp::Write, errno: 28, offset: 8192 };
        assert_eq!(st.disk_failure, Some(want));
        assert!(v.track.with(|d| d.bitmap().test(8192..12288)), "marked before the reply");
        fault.heal();
        assert!(v.write(0, data(9, 4096), false).await.is_err(), "no peer, no disk");
        assert!(v.read(0, 4096).await.is_err());
        let on_disk = std::fs::read(dir.path().join("v.img")).unwrap();
        assert!(on_disk.iter().all(|&b| b == 0), "nothing reaches a Failed disk");
        v.transition(Event::Demote, None).await.unwrap();
        drop(v);

        let v = volume(&dir, Some("beta"));
        assert_eq!(v.status().disk, DiskState::Failed, "Failed survives a restart");
        assert_eq!(v.status().disk_failure, Some(want));
        v.transition(Event::Promote { force: true }, None).await.unwrap();
        assert_eq!(v.machine().role, crate::role::Role::Secondary, "never promoted");
        v.replace_disk().await.unwrap();
        assert_eq!((v.machine().disk, v.dirty_bytes()), (DiskState::Inconsistent, SIZE));
        drop(v);
        let v = volume(&dir, Some("beta"));
        assert_eq!(v.machine().disk, DiskState::Inconsistent, "replaced: a full resync target");
        assert_eq!((v.status().disk_failure, v.dirty_bytes()), (None, SIZE));
    }
}
