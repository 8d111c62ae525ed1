//! A block of atomic u64 counters in anonymous shared memory: mapped before the workers are
//! forked, so each of them and the master see the same cells without a syscall or a lock.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;

/// `len` counters, zeroed, shared with every process forked after it was made.
pub struct SharedCounters {
    cells: NonNull<AtomicU64>,
    len: usize,
}

// SAFETY: the memory is only ever reached as `&[AtomicU64]`, which is Sync: every access is
// atomic, from any thread or process, and the mapping lives as long as the value.
unsafe impl Send for SharedCounters {}
// SAFETY: as above; `&SharedCounters` hands out only shared references to atomics.
unsafe impl Sync for SharedCounters {}

impl SharedCounters {
    pub fn new(len: usize) -> io::Result<Self> {
        let bytes = len
            .checked_mul(std::mem::size_of::<AtomicU64>())
            .filter(|&b| b > 0)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: a fresh anonymous mapping at an address the kernel picks: it aliases no
        // Rust object. MAP_SHARED keeps it shared (not copy-on-write) across fork.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let cells = NonNull::new(ptr.cast::<AtomicU64>())
            .ok_or_else(|| io::Error::from(io::ErrorKind::AddrNotAvailable))?;
        Ok(SharedCounters { cells, len })
    }

    /// Every counter; the kernel zeroed them, and a page is aligned for AtomicU64.
    pub fn cells(&self) -> &[AtomicU64] {
        // SAFETY: `cells` points to `len` page-aligned, zero-initialised u64s mapped for as
        // long as `self` lives; AtomicU64 has u64's layout, and all access is atomic.
        unsafe { std::slice::from_raw_parts(self.cells.as_ptr(), self.len) }
    }
}

impl Drop for SharedCounters {
    fn drop(&mut self) {
        let bytes = self.len * std::mem::size_of::<AtomicU64>();
        // SAFETY: the mapping made in `new`, unmapped once; no reference from `cells()` can
        // outlive `self`.
        unsafe {
            libc::munmap(self.cells.as_ptr().cast(), bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn cells_start_at_zero_and_are_shared_with_a_forked_child() {
        let block = SharedCounters::new(1024).unwrap();
        assert!(block.cells().iter().all(|c| c.load(Ordering::Relaxed) == 0));
        // SAFETY (test): the child only touches the shared atomics and then _exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            block.cells()[1000].fetch_add(7, Ordering::Relaxed);
            // SAFETY (test): ends the child at once, running no destructor twice.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY (test): waits for the child forked above.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert_eq!(block.cells()[1000].load(Ordering::Relaxed), 7);
    }

    #[test]
    fn empty_blocks_are_refused() {
        assert!(SharedCounters::new(0).is_err());
    }
}
