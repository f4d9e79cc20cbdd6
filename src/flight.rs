//! In-process coalescing: one running flight per key, shared by every caller that asks for it.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use dashmap::{mapref::entry::Entry, DashMap};
use futures_util::future::{BoxFuture, FutureExt, Shared};
use tokio::sync::oneshot;

use crate::Key;

/// A flight's result, as every caller that waits on it sees it.
pub(crate) type SharedFlight<T> = Shared<BoxFuture<'static, Option<T>>>;

/// The flights running in this process, by key.
pub(crate) struct Flights<T: Clone> {
    map: DashMap<Key, (u64, SharedFlight<T>, Fallback<T>)>,
    next_id: AtomicU64,
}

/// The one run a flight's callers make themselves when they give up waiting for its leader:
/// whoever gives up first runs it, the others that give up take its result.
pub(crate) type Fallback<T> = Arc<tokio::sync::OnceCell<T>>;

/// What [`Flights::join_or_start`] found.
pub(crate) enum Joined<T: Clone> {
    /// A flight was running: wait on it.
    Follower(SharedFlight<T>, Fallback<T>),
    /// No flight was running: the caller must run one, land it through the [`Landing`], and may
    /// wait on the shared result like everyone else.
    Leader(Landing<T>, SharedFlight<T>, Fallback<T>),
}

/// The leader's side of a flight. Landing it (or dropping it, however the flight ends: panic,
/// cancellation) removes the flight from the map first, so a caller arriving after that starts a
/// new flight instead of joining a finished one.
pub(crate) struct Landing<T: Clone> {
    flights: Arc<Flights<T>>,
    key: Key,
    id: u64,
    sender: Option<oneshot::Sender<T>>,
}

impl<T: Clone + Send + Sync + 'static> Flights<T> {
    pub(crate) fn new() -> Self {
        Self {
            map: DashMap::new(),
            next_id: AtomicU64::new(0),
        }
    }

    /// Joins the running flight for `key`, or registers a new one for the caller to lead.
    pub(crate) fn join_or_start(self: &Arc<Self>, key: &Key) -> Joined<T> {
        // The shard lock is held only for this match: never across an await.
        match self.map.entry(key.clone()) {
            Entry::Occupied(running) => {
                let (_, shared, fallback) = running.get();
                Joined::Follower(shared.clone(), Arc::clone(fallback))
            }
            Entry::Vacant(vacant) => {
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                let (sender, receiver) = oneshot::channel();
                let shared = receiver.map(Result::ok).boxed().shared();
                let fallback = Fallback::default();
                vacant.insert((id, shared.clone(), Arc::clone(&fallback)));
                let landing = Landing {
                    flights: Arc::clone(self),
                    key: key.clone(),
                    id,
                    sender: Some(sender),
                };
                Joined::Leader(landing, shared, fallback)
            }
        }
    }

    /// Forgets the running flight for `key`: callers already waiting on it still get its result,
    /// later callers start a new one.
    #[cfg(test)]
    pub(crate) fn forget(&self, key: &Key) {
        self.map.remove(key);
    }

    /// Forgets every running flight whose key has this URI part, as [`forget`](Self::forget)
    /// does for one.
    pub(crate) fn forget_uri(&self, uri: &str) {
        self.map.retain(|key, _| key.uri_part() != uri);
    }

    /// How many flights are running.
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

impl<T: Clone> Landing<T> {
    /// Ends the flight with `result`: out of the map first, then to every waiter.
    pub(crate) fn land(mut self, result: T) {
        self.flights_remove();
        if let Some(sender) = self.sender.take() {
            // Nobody waiting is fine: the flight's value was stored or not needed.
            let _ = sender.send(result);
        }
    }

    fn flights_remove(&self) {
        self.flights
            .map
            .remove_if(&self.key, |_, (running, ..)| *running == self.id);
    }
}

impl<T: Clone> Drop for Landing<T> {
    fn drop(&mut self) {
        if self.sender.is_some() {
            // Not landed: the flight was cancelled. Waiters see `None`.
            self.flights_remove();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_flight_leaves_the_map_before_its_waiters_hear_of_it() {
        let flights = Arc::new(Flights::<u32>::new());
        let key = Key::new("k");
        let Joined::Leader(landing, shared, _) = flights.join_or_start(&key) else {
            panic!("first caller leads")
        };
        let Joined::Follower(follower, _) = flights.join_or_start(&key) else {
            panic!("second caller follows")
        };
        assert_eq!(flights.len(), 1);
        landing.land(7);
        assert_eq!(flights.len(), 0);
        assert_eq!((shared.await, follower.await), (Some(7), Some(7)));
    }

    #[tokio::test]
    async fn a_dropped_landing_ends_the_flight_with_none() {
        let flights = Arc::new(Flights::<u32>::new());
        let key = Key::new("k");
        let Joined::Leader(landing, shared, _) = flights.join_or_start(&key) else {
            panic!("first caller leads")
        };
        drop(landing);
        assert_eq!(flights.len(), 0);
        assert_eq!(shared.await, None);
    }

    #[tokio::test]
    async fn a_forgotten_flight_is_not_removed_by_its_late_landing_over_a_new_one() {
        let flights = Arc::new(Flights::<u32>::new());
        let key = Key::new("k");
        let Joined::Leader(old, ..) = flights.join_or_start(&key) else {
            panic!("first caller leads")
        };
        flights.forget(&key);
        let Joined::Leader(_new, ..) = flights.join_or_start(&key) else {
            panic!("after forget, a new flight")
        };
        old.land(1);
        assert_eq!(flights.len(), 1, "the new flight stays");
    }
}
