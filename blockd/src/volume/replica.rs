//! What a resync sees of a volume: [`crate::resync::Replica`], implemented over the volume's
//! fields. Each method is one that already existed here, or one line over a field; the
//! resync's rules themselves are in `crate::resync`.

use std::{ops::Range, path::Path, sync::atomic::Ordering, time::Duration};

use bytes::Bytes;

use super::{locks::RangeGuard, Transition, Volume, VolumeError};
use crate::{
    meta::{Bitmap, DirtyError, DiskOp, Generations},
    replication::Session,
    resync::{Progress, Replica, Tally},
    storage::ReadBuf,
};

impl Replica for Volume {
    fn name(&self) -> &str {
        Volume::name(self)
    }

    fn index(&self) -> u16 {
        Volume::index(self)
    }

    fn size(&self) -> u64 {
        Volume::size(self)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        Volume::check_range(self, offset, len)
    }

    fn backing(&self) -> &Path {
        self.store.path()
    }

    async fn lock(&self, offset: u64, len: u64) -> RangeGuard<'_> {
        self.locks.lock(self.store.lock_span(offset, len)).await
    }

    async fn read_local(&self, offset: u64, len: u32) -> Result<ReadBuf, VolumeError> {
        self.io(DiskOp::Read, offset, self.store.read(offset, len).await).await
    }

    async fn flush_local(&self) -> Result<(), VolumeError> {
        self.io(DiskOp::Flush, 0, self.store.flush().await).await
    }

    async fn write_from_peer(
        &self,
        session: &Session,
        offset: u64,
        data: Bytes,
    ) -> Result<(), VolumeError> {
        self.apply_data(session, offset, data, false).await
    }

    async fn zero_from_peer(
        &self,
        session: &Session,
        offset: u64,
        len: u64,
    ) -> Result<(), VolumeError> {
        self.apply_zeroes(session, offset, len, true).await
    }

    fn bitmap(&self) -> Bitmap {
        self.track.with(|d| d.bitmap().clone())
    }

    fn bitmap_part(&self, offset: u64, max: usize) -> Vec<u8> {
        self.track.with(|d| d.bitmap().bytes_at(offset, max))
    }

    fn next_dirty(&self, offset: u64) -> Option<Range<u64>> {
        self.track.with(|d| d.ranges_from(offset).next())
    }

    fn union(&self, peer: &Bitmap) -> Result<(), DirtyError> {
        self.track.with(|d| d.union(peer))
    }

    fn crash_ranges(&self) -> Vec<Range<u64>> {
        self.track.crash_ranges()
    }

    fn forget_crash(&self) {
        self.track.forget_crash();
    }

    fn marks(&self) -> u64 {
        self.track.marks()
    }

    fn clear(&self, range: Range<u64>) {
        self.track.clear(range);
    }

    fn dirty_bytes(&self) -> u64 {
        Volume::dirty_bytes(self)
    }

    async fn mark(&self, range: Range<u64>) -> Result<(), VolumeError> {
        Volume::mark(self, range).await
    }

    async fn flush_bitmap(&self) -> Result<(), VolumeError> {
        Volume::flush_bitmap(self).await
    }

    fn app_busy(&self, window: Duration) -> bool {
        Volume::app_busy(self, window)
    }

    fn mirror_session(&self) -> Option<Session> {
        self.route().ok().flatten()
    }

    fn progress(&self, f: impl FnOnce(&mut Progress)) {
        if let Some(p) = self.live().resync.as_mut() {
            f(p);
        }
    }

    fn resyncing(&self) -> bool {
        self.live().resync.is_some()
    }

    fn count(&self, tally: Tally, bytes: u64) {
        let c = &self.counters;
        let counter = match tally {
            Tally::ResyncData => &c.resync_bytes,
            Tally::ResyncZero => &c.resync_zero_bytes,
            Tally::ResyncSame => &c.resync_same_bytes,
            Tally::VerifyDiffered => &c.verify_differed,
        };
        counter.fetch_add(bytes, Ordering::Relaxed);
    }

    fn target_ready(&self) -> tokio::sync::watch::Receiver<u64> {
        self.target_ready.subscribe()
    }

    async fn generations(&self) -> Generations {
        self.lock_persisted().await.meta.gens
    }

    async fn finish_source(&self) -> Result<Transition, VolumeError> {
        self.finish_resync_source().await
    }

    async fn finish_target(&self, source: &Generations) -> Result<Transition, VolumeError> {
        self.finish_resync_target(source).await
    }
}
