//! The table of open connections: a cap on how many there are, and which of them may be closed to make
//! room. A connection is *pending* while it has no request in progress: it is still sending its first
//! header, or it sits idle between requests. When the table is full, the oldest pending connection is
//! evicted to admit a new one, so that a flood of slow-header connections cannot keep real requests out:
//! a client that sends its header at once is past the pending stage long before the flood can evict it.
//! A connection is never evicted in its first [`HEAD_START`] of waiting: when every pending connection is
//! younger, the newcomer waits (and the rest wait in the kernel's accept queue), which also bounds how
//! fast a flood can churn connections.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// How long a pending connection is safe from eviction: time for its task to run and read a header that
/// was sent at once, even on a busy machine.
pub const HEAD_START: Duration = Duration::from_millis(100);

/// Why a connection cannot be admitted now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// Every connection has a request in progress.
    Busy,
    /// The oldest pending connection may be evicted from this instant on.
    Until(Instant),
}

/// The connection table shared by the accept loop and every connection task.
#[derive(Debug)]
pub struct Registry {
    cap: usize,
    inner: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    /// Connections holding a slot (evicted ones keep theirs until their task has closed them).
    open: usize,
    next_id: u64,
    next_turn: u64,
    /// Pending connections (id, since when) by the turn at which they became pending: the first is the
    /// oldest.
    pending: BTreeMap<u64, (u64, Instant)>,
    connections: HashMap<u64, Entry>,
}

#[derive(Debug)]
struct Entry {
    in_flight: usize,
    pending_turn: Option<u64>,
    evicted: bool,
    evict: Arc<Notify>,
}

impl Registry {
    /// A table for at most `cap` connections.
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self { cap: cap.max(1), inner: Mutex::new(Table::default()) })
    }

    /// The cap.
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.lock().open
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admits a new connection (pending until its first request starts), evicting the oldest pending one
    /// if the table is full and that one has had its [`HEAD_START`].
    pub fn admit(self: &Arc<Self>) -> Result<Ticket, Full> {
        self.admit_at(Instant::now())
    }

    fn admit_at(self: &Arc<Self>, now: Instant) -> Result<Ticket, Full> {
        let mut table = self.lock();
        if table.open >= self.cap {
            match table.pending.first_key_value() {
                None => return Err(Full::Busy),
                Some((_, (_, since))) if now < *since + HEAD_START => return Err(Full::Until(*since + HEAD_START)),
                Some(_) => table.evict_oldest(),
            };
        }
        table.open += 1;
        let id = table.next_id;
        table.next_id += 1;
        let evict = Arc::new(Notify::new());
        table.connections.insert(id, Entry { in_flight: 0, pending_turn: None, evicted: false, evict: evict.clone() });
        table.park(id, now);
        metrics::gauge!("denoised_connections_open").set(table.open as f64);
        Ok(Ticket { registry: self.clone(), id, evict })
    }

    /// Evicts the oldest pending connection, if any (the accept loop calls it when the process is out of
    /// file descriptors). Returns whether one was evicted.
    pub fn evict_oldest_pending(&self) -> bool {
        self.lock().evict_oldest()
    }
}

impl Table {
    fn evict_oldest(&mut self) -> bool {
        let Some((_, (id, _))) = self.pending.pop_first() else {
            return false;
        };
        if let Some(entry) = self.connections.get_mut(&id) {
            entry.pending_turn = None;
            entry.evicted = true;
            entry.evict.notify_one();
        }
        metrics::counter!("denoised_connections_evicted_total").increment(1);
        true
    }

    /// Makes `id` pending, as the newest.
    fn park(&mut self, id: u64, now: Instant) {
        let turn = self.next_turn;
        self.next_turn += 1;
        if let Some(entry) = self.connections.get_mut(&id) {
            if entry.evicted {
                return;
            }
            entry.pending_turn = Some(turn);
            self.pending.insert(turn, (id, now));
        }
    }
}

/// One admitted connection's slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Ticket {
    registry: Arc<Registry>,
    id: u64,
    evict: Arc<Notify>,
}

impl Ticket {
    /// Marks a request as started on this connection (no longer pending) until the guard is dropped.
    pub fn begin_request(self: &Arc<Self>) -> RequestGuard {
        let mut table = self.registry.lock();
        let table = &mut *table;
        if let Some(entry) = table.connections.get_mut(&self.id) {
            entry.in_flight += 1;
            if let Some(turn) = entry.pending_turn.take() {
                table.pending.remove(&turn);
            }
        }
        RequestGuard { ticket: self.clone() }
    }

    /// Whether no request is in progress on this connection.
    pub fn is_pending(&self) -> bool {
        self.registry.lock().connections.get(&self.id).is_none_or(|entry| entry.in_flight == 0)
    }

    /// Resolves once this connection has been chosen for eviction.
    pub async fn evicted(&self) {
        self.evict.notified().await;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut table = self.registry.lock();
        if let Some(entry) = table.connections.remove(&self.id) {
            if let Some(turn) = entry.pending_turn {
                table.pending.remove(&turn);
            }
        }
        table.open = table.open.saturating_sub(1);
        metrics::gauge!("denoised_connections_open").set(table.open as f64);
    }
}

/// A request in progress; when the last one on a connection ends, the connection is pending again.
#[derive(Debug)]
pub struct RequestGuard {
    ticket: Arc<Ticket>,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let mut table = self.ticket.registry.lock();
        let id = self.ticket.id;
        let idle = match table.connections.get_mut(&id) {
            Some(entry) => {
                entry.in_flight = entry.in_flight.saturating_sub(1);
                entry.in_flight == 0
            }
            None => false,
        };
        if idle {
            table.park(id, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn later() -> Instant {
        Instant::now() + HEAD_START
    }

    #[test]
    fn a_full_table_evicts_the_oldest_pending_connection() {
        let registry = Registry::new(2);
        let first = Arc::new(registry.admit().expect("room"));
        let second = Arc::new(registry.admit().expect("room"));
        let busy = second.begin_request();
        let third = registry.admit_at(later()).expect("the pending first one makes room");
        assert_eq!(registry.open(), 3, "the evicted one holds its slot until its task closes it");
        drop(first);
        assert_eq!(registry.open(), 2);
        assert!(registry.admit_at(later() + HEAD_START).is_ok(), "the third is pending, so it goes");
        assert!(!second.is_pending());
        drop(busy);
        assert!(second.is_pending(), "idle between requests counts as pending");
        drop(third);
    }

    #[test]
    fn a_connection_has_a_head_start_before_it_can_be_evicted() {
        let registry = Registry::new(1);
        let _young = registry.admit().expect("room");
        match registry.admit() {
            Err(Full::Until(at)) => assert!(at > Instant::now() && at <= later()),
            other => panic!("expected to wait, got {other:?}"),
        }
        assert!(registry.admit_at(later()).is_ok());
    }

    #[test]
    fn a_table_of_busy_connections_refuses_new_ones() {
        let registry = Registry::new(1);
        let only = Arc::new(registry.admit().expect("room"));
        let _busy = only.begin_request();
        assert_eq!(registry.admit_at(later()).err(), Some(Full::Busy));
        assert!(!registry.evict_oldest_pending());
    }

    #[tokio::test]
    async fn eviction_wakes_the_connection() {
        let registry = Registry::new(1);
        let victim = registry.admit().expect("room");
        let _newcomer = registry.admit_at(later()).expect("evicts the victim");
        tokio::time::timeout(std::time::Duration::from_secs(1), victim.evicted()).await.expect("woken");
    }

    #[test]
    fn a_connection_idle_again_becomes_the_newest_pending() {
        let registry = Registry::new(2);
        let older = Arc::new(registry.admit().expect("room"));
        let newer = Arc::new(registry.admit().expect("room"));
        drop(older.begin_request());
        let _third = registry.admit_at(later() + HEAD_START).expect("evicts `newer`, now the oldest pending");
        assert!(registry.lock().connections.get(&1).is_some_and(|e| e.evicted));
        drop(newer);
    }
}
