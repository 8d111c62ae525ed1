//! Which process and thread own a ring: rings are single-issuer and never cross fork().

use std::thread::{self, ThreadId};

use crate::errors::{RingError, RingResult};

#[derive(Debug, Clone, Copy)]
pub struct Owner {
    pid: u32,
    thread: ThreadId,
}

impl Owner {
    pub fn current() -> Self {
        Owner {
            pid: std::process::id(),
            thread: thread::current().id(),
        }
    }

    /// True in a child forked after the ring was created: the ring's memory is the parent's.
    pub fn is_forked_child(&self) -> bool {
        std::process::id() != self.pid
    }

    pub fn is_owner_thread(&self) -> bool {
        !self.is_forked_child() && thread::current().id() == self.thread
    }

    pub fn check(&self) -> RingResult<()> {
        if self.is_forked_child() {
            return Err(RingError::Forked {
                owner_pid: self.pid,
            });
        }
        if thread::current().id() != self.thread {
            return Err(RingError::WrongThread);
        }
        Ok(())
    }
}
