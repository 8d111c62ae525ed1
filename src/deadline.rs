//! Connection deadlines (header, keep-alive, body timeouts), free of I/O, for both loops.
//!
//! Every deadline of one kind is "now + that kind's timeout", so a kind's deadlines arrive in
//! the order they fall due: a FIFO list per kind is already sorted. Starting, stopping and
//! expiring are O(1); the links live in a table indexed by fd that grows only with the highest
//! fd, so steady state allocates nothing. The loop arms one timer for `next_due()`.

use std::time::{Duration, Instant};

/// Which timeout a connection is under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The request head is not complete yet (from accept, or from the first byte after an
    /// idle spell, or from the end of the previous response when the next one is buffered).
    Header,
    /// Between requests: nothing received, nothing left to send.
    KeepAlive,
    /// The rest of a request body the app did not read is being discarded: the gap between
    /// two receives. (A body the app reads is timed by the app's read itself.)
    Body,
}

const KINDS: usize = 3;

impl Kind {
    /// 0, 1 and 2, for tables with one entry per kind.
    pub fn index(self) -> usize {
        match self {
            Kind::Header => 0,
            Kind::KeepAlive => 1,
            Kind::Body => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Header => "header",
            Kind::KeepAlive => "keep_alive",
            Kind::Body => "body",
        }
    }
}

/// The three timeouts of one server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub header: Duration,
    pub keep_alive: Duration,
    pub body: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            header: Duration::from_secs(10),
            keep_alive: Duration::from_secs(5),
            body: Duration::from_secs(30),
        }
    }
}

impl Timeouts {
    pub fn of(&self, kind: Kind) -> Duration {
        match kind {
            Kind::Header => self.header,
            Kind::KeepAlive => self.keep_alive,
            Kind::Body => self.body,
        }
    }
}

/// What the session waits for from its peer once a turn is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Awaiting {
    /// Nothing: the connection is closing, or held back until its output drains.
    Nothing,
    /// More of a request body it is discarding.
    Body,
    /// A request head. `requests` counts the heads received so far on the connection;
    /// `buffered` says part of the next head is already here.
    Head { requests: u32, buffered: bool },
}

/// What to do with a connection's deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timer {
    Keep,
    Start(Kind),
    Stop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Untimed,
    /// Between requests, waiting for the last response to be sent before idling.
    Flushing,
    Timed(Kind),
}

/// One connection's timing state: decides, after each turn, which timeout applies and
/// whether it starts afresh or keeps running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Phase {
    state: State,
    requests: u32,
}

impl Phase {
    /// A connection just accepted: its first head is due within the header timeout.
    pub fn opened() -> (Phase, Timer) {
        let phase = Phase {
            state: State::Timed(Kind::Header),
            requests: 0,
        };
        (phase, Timer::Start(Kind::Header))
    }

    /// After a turn of the session. `unsent` says response bytes still wait to be sent.
    pub fn after_turn(&mut self, awaiting: Awaiting, unsent: bool) -> Timer {
        let (state, same_request) = match awaiting {
            Awaiting::Nothing => (State::Untimed, false),
            // Every turn in this state follows a receive: the gap starts again.
            Awaiting::Body => (State::Timed(Kind::Body), false),
            Awaiting::Head { requests, buffered } => {
                let same = requests == self.requests;
                self.requests = requests;
                if requests == 0 || buffered {
                    (State::Timed(Kind::Header), same)
                } else if unsent {
                    (State::Flushing, same)
                } else {
                    (State::Timed(Kind::KeepAlive), same)
                }
            }
        };
        let unchanged = same_request && state == self.state;
        self.state = state;
        match state {
            _ if unchanged => Timer::Keep,
            State::Timed(kind) => Timer::Start(kind),
            State::Untimed | State::Flushing => Timer::Stop,
        }
    }

    /// The heads counted on the connection at its last turn (see [`Awaiting::Head`]).
    pub fn requests(&self) -> u32 {
        self.requests
    }

    /// The timeout the connection is under, if any.
    pub fn kind(&self) -> Option<Kind> {
        match self.state {
            State::Timed(kind) => Some(kind),
            State::Untimed | State::Flushing => None,
        }
    }

    /// Everything queued for the peer has been sent.
    pub fn flushed(&mut self) -> Timer {
        if self.state == State::Flushing {
            self.state = State::Timed(Kind::KeepAlive);
            Timer::Start(Kind::KeepAlive)
        } else {
            Timer::Keep
        }
    }
}

const NIL: u32 = u32::MAX;

#[derive(Debug, Clone, Copy)]
struct Link {
    prev: u32,
    next: u32,
    /// Milliseconds after the table's epoch.
    due: u64,
    /// The kind's index, or KINDS when not linked.
    kind: u8,
}

const UNLINKED: Link = Link {
    prev: NIL,
    next: NIL,
    due: 0,
    kind: KINDS as u8,
};

/// Every timed connection of one loop, keyed by fd, one FIFO list per kind.
pub struct Deadlines {
    epoch: Instant,
    timeouts: Timeouts,
    /// Each kind's timeout in whole milliseconds (rounded up).
    millis: [u64; KINDS],
    head: [u32; KINDS],
    tail: [u32; KINDS],
    links: Vec<Link>,
    len: usize,
}

fn ceil_millis(d: Duration) -> u64 {
    let ms = d.as_nanos().div_ceil(1_000_000);
    u64::try_from(ms).unwrap_or(u64::MAX / 4).max(1)
}

impl Deadlines {
    pub fn new(timeouts: Timeouts) -> Self {
        Deadlines {
            epoch: Instant::now(),
            timeouts,
            millis: [Kind::Header, Kind::KeepAlive, Kind::Body]
                .map(|k| ceil_millis(timeouts.of(k))),
            head: [NIL; KINDS],
            tail: [NIL; KINDS],
            links: Vec::new(),
            len: 0,
        }
    }

    pub fn timeouts(&self) -> &Timeouts {
        &self.timeouts
    }

    /// How many connections have a deadline.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn now_ms(&self, now: Instant) -> u64 {
        let ms = now.saturating_duration_since(self.epoch).as_millis();
        u64::try_from(ms).unwrap_or(u64::MAX / 2)
    }

    /// (Re)starts `key`'s deadline: `kind`'s timeout from `now`.
    pub fn start(&mut self, key: u32, kind: Kind, now: Instant) {
        self.stop(key);
        let i = key as usize;
        if i >= self.links.len() {
            self.links.resize(i + 1, UNLINKED);
        }
        let k = kind.index();
        let tail = self.tail[k];
        self.links[i] = Link {
            prev: tail,
            next: NIL,
            due: self.now_ms(now).saturating_add(self.millis[k]),
            kind: k as u8,
        };
        if tail == NIL {
            self.head[k] = key;
        } else {
            self.links[tail as usize].next = key;
        }
        self.tail[k] = key;
        self.len += 1;
    }

    /// Removes `key`'s deadline, if it has one.
    pub fn stop(&mut self, key: u32) {
        let Some(&link) = self.links.get(key as usize) else {
            return;
        };
        let k = link.kind as usize;
        if k >= KINDS {
            return;
        }
        match link.prev {
            NIL => self.head[k] = link.next,
            prev => self.links[prev as usize].next = link.next,
        }
        match link.next {
            NIL => self.tail[k] = link.prev,
            next => self.links[next as usize].prev = link.prev,
        }
        self.links[key as usize] = UNLINKED;
        self.len -= 1;
    }

    pub fn apply(&mut self, key: u32, timer: Timer, now: Instant) {
        match timer {
            Timer::Keep => {}
            Timer::Start(kind) => self.start(key, kind, now),
            Timer::Stop => self.stop(key),
        }
    }

    /// `key`'s running timeout and when it falls due, if it has one.
    pub fn deadline_of(&self, key: u32) -> Option<(Kind, Instant)> {
        let link = self.links.get(key as usize)?;
        let kind = [Kind::Header, Kind::KeepAlive, Kind::Body].get(link.kind as usize)?;
        Some((*kind, self.epoch + Duration::from_millis(link.due)))
    }

    /// When the earliest deadline falls due.
    pub fn next_due(&self) -> Option<Instant> {
        let due = self
            .head
            .iter()
            .filter(|&&h| h != NIL)
            .map(|&h| self.links[h as usize].due)
            .min()?;
        Some(self.epoch + Duration::from_millis(due))
    }

    /// Removes and returns one deadline that has passed at `now`, earliest kind first found.
    pub fn pop_expired(&mut self, now: Instant) -> Option<(u32, Kind)> {
        let now = self.now_ms(now);
        for kind in [Kind::Header, Kind::KeepAlive, Kind::Body] {
            let head = self.head[kind.index()];
            if head != NIL && self.links[head as usize].due <= now {
                self.stop(head);
                return Some((head, kind));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeouts() -> Timeouts {
        Timeouts {
            header: Duration::from_millis(100),
            keep_alive: Duration::from_millis(50),
            body: Duration::from_millis(300),
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn expires_in_order_per_kind_and_not_before() {
        let mut d = Deadlines::new(timeouts());
        let t0 = d.epoch;
        d.start(5, Kind::Header, t0);
        d.start(3, Kind::Header, t0 + ms(10));
        d.start(9, Kind::KeepAlive, t0 + ms(20));
        assert_eq!(d.len(), 3);
        assert_eq!(d.next_due(), Some(t0 + ms(70)));
        assert_eq!(d.pop_expired(t0 + ms(69)), None);
        assert_eq!(d.pop_expired(t0 + ms(70)), Some((9, Kind::KeepAlive)));
        assert_eq!(d.next_due(), Some(t0 + ms(100)));
        assert_eq!(d.pop_expired(t0 + ms(105)), Some((5, Kind::Header)));
        assert_eq!(d.pop_expired(t0 + ms(105)), None);
        assert_eq!(d.pop_expired(t0 + ms(110)), Some((3, Kind::Header)));
        assert!(d.is_empty());
        assert_eq!(d.next_due(), None);
    }

    #[test]
    fn restart_moves_to_the_back_and_stop_unlinks_anywhere() {
        let mut d = Deadlines::new(timeouts());
        let t0 = d.epoch;
        for (i, key) in [1u32, 2, 3, 4].into_iter().enumerate() {
            d.start(key, Kind::Body, t0 + ms(i as u64));
        }
        d.stop(2);
        d.stop(2);
        d.start(1, Kind::Body, t0 + ms(10));
        d.start(4, Kind::Header, t0 + ms(10));
        d.stop(1000);
        assert_eq!(d.len(), 3);
        let late = t0 + ms(1000);
        let mut order = Vec::new();
        while let Some((key, _)) = d.pop_expired(late) {
            order.push(key);
        }
        assert_eq!(order, vec![4, 3, 1]);
        assert!(d.is_empty());
        // The table keeps its memory: starting again allocates nothing.
        let cap = d.links.capacity();
        d.start(3, Kind::KeepAlive, late);
        assert_eq!(d.links.capacity(), cap);
    }

    #[test]
    fn apply_follows_the_timer() {
        let mut d = Deadlines::new(timeouts());
        let t0 = d.epoch;
        d.apply(7, Timer::Start(Kind::KeepAlive), t0);
        d.apply(7, Timer::Keep, t0 + ms(40));
        assert_eq!(d.next_due(), Some(t0 + ms(50)));
        d.apply(7, Timer::Stop, t0);
        assert!(d.is_empty());
    }

    #[test]
    fn header_time_runs_from_accept_through_a_dripping_head() {
        let (mut p, timer) = Phase::opened();
        assert_eq!(timer, Timer::Start(Kind::Header));
        let dripping = Awaiting::Head {
            requests: 0,
            buffered: true,
        };
        // More bytes of the same head keep the deadline: dripping does not extend it.
        assert_eq!(p.after_turn(dripping, false), Timer::Keep);
        assert_eq!(p.after_turn(dripping, false), Timer::Keep);
    }

    #[test]
    fn response_sent_then_keep_alive_then_header_on_the_next_bytes() {
        let (mut p, _) = Phase::opened();
        let answered = Awaiting::Head {
            requests: 1,
            buffered: false,
        };
        assert_eq!(p.after_turn(answered, true), Timer::Stop);
        assert_eq!(p.flushed(), Timer::Start(Kind::KeepAlive));
        assert_eq!(p.flushed(), Timer::Keep);
        // A stray CRLF between requests changes nothing.
        assert_eq!(p.after_turn(answered, false), Timer::Keep);
        let next_head = Awaiting::Head {
            requests: 1,
            buffered: true,
        };
        assert_eq!(p.after_turn(next_head, false), Timer::Start(Kind::Header));
        assert_eq!(p.after_turn(next_head, false), Timer::Keep);
        // Answered with nothing left to send: idle at once.
        let second = Awaiting::Head {
            requests: 2,
            buffered: false,
        };
        assert_eq!(p.after_turn(second, false), Timer::Start(Kind::KeepAlive));
    }

    #[test]
    fn pipelined_head_starts_fresh_and_body_gap_restarts() {
        let (mut p, _) = Phase::opened();
        let pipelined = Awaiting::Head {
            requests: 1,
            buffered: true,
        };
        assert_eq!(p.after_turn(pipelined, true), Timer::Start(Kind::Header));
        assert_eq!(
            p.after_turn(Awaiting::Body, false),
            Timer::Start(Kind::Body)
        );
        assert_eq!(
            p.after_turn(Awaiting::Body, false),
            Timer::Start(Kind::Body)
        );
        assert_eq!(p.after_turn(Awaiting::Nothing, true), Timer::Stop);
        assert_eq!(p.flushed(), Timer::Keep);
    }
}
