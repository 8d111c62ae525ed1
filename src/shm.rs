//! Anonymous memory mappings, and on them a block of atomic u64 counters in shared memory:
//! mapped before the workers are forked, so each of them and the master see the same cells
//! without a syscall or a lock.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;

/// An anonymous mapping, unmapped on drop (unless leaked with its owner).
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    /// Private, and excluded from fork() children: for memory the kernel may write into for
    /// this process (the provided buffers of a ring).
    pub fn private(len: usize) -> io::Result<Mapping> {
        let mapping = Mapping::new(len, libc::MAP_PRIVATE)?;
        // SAFETY: ptr..ptr+len is the mapping just created. DONTFORK keeps a forked child from
        // sharing pages the kernel may still write into for the parent.
        let rc = unsafe { libc::madvise(mapping.ptr.as_ptr().cast(), len, libc::MADV_DONTFORK) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(mapping)
    }

    /// Shared (not copy-on-write) with every process forked after it was made.
    pub fn shared(len: usize) -> io::Result<Mapping> {
        Mapping::new(len, libc::MAP_SHARED)
    }

    fn new(len: usize, share: libc::c_int) -> io::Result<Mapping> {
        // SAFETY: an anonymous mapping at an address of the kernel's choosing aliases nothing;
        // the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                share | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast())
            .ok_or_else(|| io::Error::from(io::ErrorKind::AddrNotAvailable))?;
        Ok(Mapping { ptr, len })
    }

    /// The start of the mapping: page-aligned, zero-filled when made.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours and unmapped once; an owner the kernel might still
        // write into (BufRing) leaks it instead of dropping it. No reference into it
        // outlives its owner.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// `len` counters, zeroed, shared with every process forked after it was made.
pub struct SharedCounters {
    map: Mapping,
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
        Ok(SharedCounters {
            map: Mapping::shared(bytes)?,
            len,
        })
    }

    /// Every counter; the kernel zeroed them, and a page is aligned for AtomicU64.
    pub fn cells(&self) -> &[AtomicU64] {
        // SAFETY: the mapping holds `len` page-aligned, zero-initialised u64s and stays mapped
        // for as long as `self` lives; AtomicU64 has u64's layout, and all access is atomic.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().cast::<AtomicU64>(), self.len) }
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
