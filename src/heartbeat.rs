//! Worker heartbeats (`--timeout`): one shared counter per worker that its serve loop bumps
//! about once an interval, read by the master to find a worker whose loop stopped moving.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pyo3::prelude::*;

use crate::errors::HeartbeatError;
use crate::shm::SharedCounters;

/// A counter per worker slot, mapped before the fork. The master hands out the slots (in
/// Python) and only reads them; each worker only bumps its own. A counter, not a time: the
/// master times the silence itself, so no clock needs to agree between the processes.
#[pyclass(module = "uringserve._uringserve", frozen)]
pub struct Heartbeats {
    cells: Arc<SharedCounters>,
}

#[pymethods]
impl Heartbeats {
    #[new]
    fn py_new(capacity: usize) -> PyResult<Self> {
        Ok(Heartbeats::new(capacity)?)
    }

    #[getter]
    fn capacity(&self) -> usize {
        self.cells.cells().len()
    }

    /// The beats slot `index` has counted so far (it only grows while its worker lives).
    fn count(&self, index: usize) -> PyResult<u64> {
        Ok(self.counted(index)?)
    }

    /// The handle a worker's loops beat with, at least once per `interval` seconds.
    fn pulse(&self, index: usize, interval: f64) -> PyResult<Pulse> {
        self.check(index)?;
        let every = Duration::try_from_secs_f64(interval)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or(HeartbeatError::BadInterval(interval))?;
        Ok(self.pulse_every(index, every))
    }
}

impl Heartbeats {
    fn new(capacity: usize) -> Result<Self, HeartbeatError> {
        if capacity == 0 {
            return Err(HeartbeatError::NoCapacity);
        }
        let cells = SharedCounters::new(capacity).map_err(HeartbeatError::Map)?;
        Ok(Heartbeats {
            cells: Arc::new(cells),
        })
    }

    fn counted(&self, index: usize) -> Result<u64, HeartbeatError> {
        self.check(index)?;
        Ok(self.cells.cells()[index].load(Ordering::Relaxed))
    }

    fn pulse_every(&self, index: usize, interval: Duration) -> Pulse {
        Pulse {
            cells: self.cells.clone(),
            index,
            interval,
        }
    }

    fn check(&self, index: usize) -> Result<(), HeartbeatError> {
        let len = self.cells.cells().len();
        if index >= len {
            return Err(HeartbeatError::NoSuchSlot(index, len));
        }
        Ok(())
    }
}

/// One worker's heartbeat: its slot and how often it must beat.
#[pyclass(module = "uringserve._uringserve", frozen)]
#[derive(Clone)]
pub struct Pulse {
    cells: Arc<SharedCounters>,
    index: usize,
    interval: Duration,
}

#[pymethods]
impl Pulse {
    #[getter]
    fn index(&self) -> usize {
        self.index
    }

    /// Seconds between beats.
    #[getter]
    fn interval(&self) -> f64 {
        self.interval.as_secs_f64()
    }

    /// One beat: a relaxed atomic add in shared memory, no syscall.
    pub fn beat(&self) {
        self.cells.cells()[self.index].fetch_add(1, Ordering::Relaxed);
    }
}

/// A loop's side of a pulse: beats when the interval has passed, and says when the loop
/// must wake next for it even with nothing else to do.
pub struct Beating {
    pulse: Pulse,
    next: Instant,
}

impl Beating {
    pub fn new(pulse: Pulse) -> Self {
        let next = Instant::now();
        Beating { pulse, next }
    }

    /// Called on every pass of the loop: one clock read (vDSO, not a syscall), and a beat
    /// at most once an interval.
    pub fn tick(&mut self) {
        let now = Instant::now();
        if now >= self.next {
            self.pulse.beat();
            self.next = now + self.pulse.interval;
        }
    }

    /// When the next beat is due: the loop's wait ends by then.
    pub fn due(&self) -> Instant {
        self.next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pulse_beats_once_an_interval_and_the_block_sees_it() {
        let block = Heartbeats::new(2).unwrap();
        let mut beating = Beating::new(block.pulse_every(1, Duration::from_secs(3600)));
        assert_eq!(block.counted(1).unwrap(), 0);
        beating.tick();
        beating.tick();
        assert_eq!(
            block.counted(1).unwrap(),
            1,
            "the second tick came before the interval"
        );
        assert_eq!(block.counted(0).unwrap(), 0);
        assert!(beating.due() > Instant::now());
    }

    #[test]
    fn bad_slots_are_refused() {
        let block = Heartbeats::new(1).unwrap();
        assert!(block.counted(1).is_err());
        assert!(block.check(0).is_ok());
        assert!(Heartbeats::new(0).is_err());
    }
}
