//! The budget of request-body bytes in flight: one count for the server, one per API key, taken as bytes
//! arrive and given back when the request ends (its handler has returned, so nothing holds the body).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::Cut;

/// The shared budget (cheap to clone).
#[derive(Debug, Clone)]
pub struct BodyBudget(Arc<Counts>);

#[derive(Debug)]
struct Counts {
    server_limit: usize,
    key_limit: usize,
    server: AtomicUsize,
    keys: Mutex<HashMap<String, usize>>,
}

impl BodyBudget {
    /// A budget of `server_limit` bytes in all and `key_limit` per key.
    pub fn new(server_limit: usize, key_limit: usize) -> Self {
        Self(Arc::new(Counts {
            server_limit,
            key_limit,
            server: AtomicUsize::new(0),
            keys: Mutex::new(HashMap::new()),
        }))
    }

    /// Bytes in flight over all requests.
    pub fn in_flight(&self) -> usize {
        self.0.server.load(Ordering::SeqCst)
    }

    /// Whether a body of `bytes` would fit now (for a quick refusal when `Content-Length` says it cannot;
    /// nothing is taken).
    pub fn fits(&self, key: Option<&str>, bytes: usize) -> Result<(), Cut> {
        let counts = &self.0;
        if let Some(key) = key {
            let used = counts.keys().get(key).copied().unwrap_or(0);
            if used.saturating_add(bytes) > counts.key_limit {
                return Err(Cut::KeyBudget { limit: counts.key_limit });
            }
        }
        if self.in_flight().saturating_add(bytes) > counts.server_limit {
            return Err(Cut::ServerBudget { limit: counts.server_limit });
        }
        Ok(())
    }

    /// An account for one request's body, charged to `key` (if any) and the server.
    pub fn account(&self, key: Option<String>) -> Account {
        Account { budget: self.clone(), key, held: AtomicUsize::new(0) }
    }
}

impl Counts {
    fn keys(&self) -> MutexGuard<'_, HashMap<String, usize>> {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn take_server(&self, bytes: usize) -> Result<(), Cut> {
        self.server
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.server_limit)
            })
            .map(|_| ())
            .map_err(|_| Cut::ServerBudget { limit: self.server_limit })
    }

    fn take(&self, key: Option<&str>, bytes: usize) -> Result<(), Cut> {
        let Some(key) = key else {
            return self.take_server(bytes);
        };
        let mut keys = self.keys();
        let used = keys.get(key).copied().unwrap_or(0);
        if used.saturating_add(bytes) > self.key_limit {
            return Err(Cut::KeyBudget { limit: self.key_limit });
        }
        self.take_server(bytes)?;
        keys.insert(key.to_string(), used + bytes);
        Ok(())
    }

    fn give_back(&self, key: Option<&str>, bytes: usize) {
        if let Some(key) = key {
            let mut keys = self.keys();
            if let Some(used) = keys.get_mut(key) {
                *used = used.saturating_sub(bytes);
                if *used == 0 {
                    keys.remove(key);
                }
            }
        }
        self.server.fetch_sub(bytes, Ordering::SeqCst);
    }
}

/// What one request's body has taken; given back when dropped.
#[derive(Debug)]
pub struct Account {
    budget: BodyBudget,
    key: Option<String>,
    held: AtomicUsize,
}

impl Account {
    /// Takes `bytes` more, or says which budget is spent (taking nothing).
    pub fn take(&self, bytes: usize) -> Result<(), Cut> {
        self.budget.0.take(self.key.as_deref(), bytes)?;
        self.held.fetch_add(bytes, Ordering::SeqCst);
        metrics::gauge!("denoised_request_body_bytes_in_flight").set(self.budget.in_flight() as f64);
        Ok(())
    }
}

impl Drop for Account {
    fn drop(&mut self) {
        let held = *self.held.get_mut();
        if held > 0 {
            self.budget.0.give_back(self.key.as_deref(), held);
            metrics::gauge!("denoised_request_body_bytes_in_flight").set(self.budget.in_flight() as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_count_against_the_key_and_the_server_until_the_account_drops() {
        let budget = BodyBudget::new(100, 60);
        let a = budget.account(Some("a".into()));
        a.take(50).unwrap();
        assert_eq!(a.take(20), Err(Cut::KeyBudget { limit: 60 }));
        let b = budget.account(Some("b".into()));
        b.take(50).unwrap();
        assert_eq!(b.take(1), Err(Cut::ServerBudget { limit: 100 }));
        assert_eq!(budget.fits(Some("c"), 1), Err(Cut::ServerBudget { limit: 100 }));
        drop(a);
        assert_eq!(budget.in_flight(), 50);
        budget.fits(Some("c"), 50).unwrap();
        let anonymous = budget.account(None);
        anonymous.take(50).unwrap();
        drop((b, anonymous));
        assert_eq!(budget.in_flight(), 0);
        assert!(budget.0.keys().is_empty(), "keys with nothing in flight are forgotten");
    }

    #[test]
    fn a_refused_take_takes_nothing() {
        let budget = BodyBudget::new(10, 10);
        let a = budget.account(Some("a".into()));
        assert!(a.take(11).is_err());
        assert_eq!(budget.in_flight(), 0);
        assert!(budget.0.keys().get("a").is_none());
    }
}
