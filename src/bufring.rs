//! The provided-buffer ring: its memory, registration, and handing buffers back to the kernel.

use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;

use crate::shm::Mapping;
use crate::uring::Uring;

/// Kernel limit on provided-buffer ring entries.
pub const MAX_BUFS: u32 = 32768;

/// Where each buffer is: lent to the kernel, or handed to the caller by a completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holder {
    Kernel,
    Caller,
}

pub struct BufRing {
    entries: Mapping,
    buffers: Mapping,
    n_bufs: u32,
    buf_size: u32,
    group: u16,
    /// Our copy of the ring tail; the kernel reads the shared one.
    tail: u16,
    holders: Vec<Holder>,
    held: u32,
    registered: bool,
}

// SAFETY: the mappings are owned by this struct alone; every access goes through &self or
// &mut self, so moving it between threads cannot create a data race with another owner.
unsafe impl Send for BufRing {}
// SAFETY: shared references only read buffer contents the caller holds; mutation needs &mut.
unsafe impl Sync for BufRing {}

fn page_round(len: usize) -> usize {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    len.div_ceil(page) * page
}

impl BufRing {
    /// Maps `n_bufs` buffers of `buf_size` bytes and a ring with every buffer published.
    /// Sizes are validated by the caller (powers of two, within kernel limits).
    pub fn new(n_bufs: u32, buf_size: u32, group: u16) -> io::Result<BufRing> {
        let ring_len = page_round(n_bufs as usize * std::mem::size_of::<BufRingEntry>());
        let entries = Mapping::private(ring_len)?;
        let buffers = Mapping::private(page_round(n_bufs as usize * buf_size as usize))?;
        let mut ring = BufRing {
            entries,
            buffers,
            n_bufs,
            buf_size,
            group,
            tail: 0,
            holders: vec![Holder::Caller; n_bufs as usize],
            held: n_bufs,
            registered: false,
        };
        for bid in 0..n_bufs as u16 {
            ring.lend(bid);
        }
        ring.publish();
        Ok(ring)
    }

    pub fn group(&self) -> u16 {
        self.group
    }

    pub fn buf_size(&self) -> u32 {
        self.buf_size
    }

    pub fn n_bufs(&self) -> u32 {
        self.n_bufs
    }

    /// Buffers the kernel can still fill.
    pub fn available(&self) -> u32 {
        self.n_bufs - self.held
    }

    pub fn register(&mut self, uring: &Uring) -> io::Result<()> {
        let addr = self.entries.as_ptr() as u64;
        // SAFETY: the entry ring lives in self.entries, which stays mapped until unregister()
        // or, if that is never reached, is leaked rather than unmapped (see leak()).
        unsafe {
            uring.ring()?.submitter().register_buf_ring_with_flags(
                addr,
                self.n_bufs as u16,
                self.group,
                0,
            )?;
        }
        self.registered = true;
        Ok(())
    }

    pub fn unregister(&mut self, uring: &Uring) -> io::Result<()> {
        if self.registered {
            uring.ring()?.submitter().unregister_buf_ring(self.group)?;
            self.registered = false;
        }
        Ok(())
    }

    /// Records that a completion handed `bid` to the caller. False if the kernel named a buffer
    /// it did not have, which means our bookkeeping and the kernel's disagree.
    pub fn take_from_kernel(&mut self, bid: u16) -> bool {
        match self.holders.get_mut(bid as usize) {
            Some(h @ Holder::Kernel) => {
                *h = Holder::Caller;
                self.held += 1;
                true
            }
            _ => false,
        }
    }

    fn check_held(&self, bid: u32) -> Result<(), String> {
        match self.holders.get(bid as usize) {
            None => Err(format!(
                "buffer id {bid} is out of range (the pool has {} buffers)",
                self.n_bufs
            )),
            Some(Holder::Kernel) => Err(format!(
                "buffer id {bid} is not held by the caller (already released, or never delivered)"
            )),
            Some(Holder::Caller) => Ok(()),
        }
    }

    /// The first `len` bytes of a buffer the caller holds.
    pub fn bytes(&self, bid: u32, len: usize) -> Result<&[u8], String> {
        self.check_held(bid)?;
        if len > self.buf_size as usize {
            return Err(format!(
                "length {len} exceeds the buffer size {}",
                self.buf_size
            ));
        }
        let offset = bid as usize * self.buf_size as usize;
        // SAFETY: bid < n_bufs and len <= buf_size keep the slice inside the buffers mapping;
        // the buffer is held by the caller, so the kernel is not writing into it.
        Ok(unsafe { std::slice::from_raw_parts(self.buffers.as_ptr().add(offset), len) })
    }

    /// Gives a held buffer back to the kernel.
    pub fn release(&mut self, bid: u32) -> Result<(), String> {
        self.check_held(bid)?;
        self.lend(bid as u16);
        self.publish();
        Ok(())
    }

    /// Writes an entry for `bid` at our tail; the kernel sees it only after publish().
    fn lend(&mut self, bid: u16) {
        let mask = self.n_bufs as u16 - 1;
        let slot = (self.tail & mask) as usize;
        let base = self.entries.as_ptr().cast::<BufRingEntry>();
        // SAFETY: slot < n_bufs, inside the entries mapping. The kernel only reads entries
        // between its head and the published tail, and this slot is past the published tail.
        let entry = unsafe { &mut *base.add(slot) };
        let addr = self.buffers.as_ptr() as u64 + bid as u64 * self.buf_size as u64;
        entry.set_addr(addr);
        entry.set_len(self.buf_size);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
        self.holders[bid as usize] = Holder::Kernel;
        self.held -= 1;
    }

    /// Makes every lent entry visible to the kernel.
    fn publish(&self) {
        let base = self.entries.as_ptr().cast::<BufRingEntry>();
        // SAFETY: the tail field overlays the first entry's reserved bytes and is u16-aligned;
        // the kernel reads it with acquire ordering, so a release store orders the entries
        // written above before the new tail.
        unsafe {
            let tail = BufRingEntry::tail(base).cast::<AtomicU16>();
            (*tail).store(self.tail, Ordering::Release);
        }
    }

    /// Abandons the memory without unmapping it: used when the kernel may still touch it
    /// (teardown could not be confirmed) or in a forked child (where it is not mapped).
    pub fn leak(self) {
        std::mem::forget(self);
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        debug_assert!(!self.registered, "buffer ring dropped while registered");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_buffers_start_with_the_kernel() {
        let ring = BufRing::new(4, 256, 0).unwrap();
        assert_eq!(ring.available(), 4);
        assert!(ring.bytes(0, 1).is_err());
    }

    #[test]
    fn take_then_release_round_trips() {
        let mut ring = BufRing::new(4, 256, 0).unwrap();
        assert!(ring.take_from_kernel(2));
        assert!(
            !ring.take_from_kernel(2),
            "a buffer cannot be delivered twice"
        );
        assert_eq!(ring.available(), 3);
        assert_eq!(ring.bytes(2, 256).unwrap().len(), 256);
        assert!(ring.bytes(2, 257).is_err());
        ring.release(2).unwrap();
        assert!(ring.release(2).is_err(), "double release is refused");
        assert!(ring.release(9).is_err(), "out of range is refused");
        assert_eq!(ring.available(), 4);
    }

    #[test]
    fn registers_with_a_ring() {
        let uring = Uring::new(8, None, 8).unwrap();
        let mut ring = BufRing::new(8, 1024, 3).unwrap();
        ring.register(&uring).unwrap();
        ring.unregister(&uring).unwrap();
    }
}
