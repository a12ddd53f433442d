//! The queue of requests waiting for a node with room (SPEC §8): how many wait, and one waker per model.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// Requests waiting for a node with room, and how to wake them: one waker per model.
#[derive(Default)]
pub struct Queue {
    waiting: AtomicUsize,
    wakers: Mutex<HashMap<Arc<str>, Arc<Notify>>>,
}

/// A request's place in the [`Queue`], given up when dropped.
#[derive(Debug)]
pub struct Place<'a>(&'a Queue);

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue").field("waiting", &self.len()).finish_non_exhaustive()
    }
}

impl Queue {
    /// Requests waiting now.
    pub fn len(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes a place in the queue, unless `max` requests already wait.
    pub fn join(&self, max: usize) -> Option<Place<'_>> {
        self.waiting.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| (n < max).then_some(n + 1)).ok()?;
        Some(Place(self))
    }

    /// What a request queued for `model` waits on.
    pub fn waker(&self, model: &str) -> Arc<Notify> {
        let mut wakers = self.wakers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(waker) = wakers.get(model) {
            return waker.clone();
        }
        let waker = Arc::new(Notify::new());
        wakers.insert(Arc::from(model), waker.clone());
        waker
    }

    pub(super) fn existing_waker(&self, model: &str) -> Option<Arc<Notify>> {
        self.wakers.lock().unwrap_or_else(|p| p.into_inner()).get(model).cloned()
    }
}
