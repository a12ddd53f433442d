//! The write-behind of heartbeat figures: a heartbeat changes memory only, and [`Registry::flush`] writes every
//! changed node's figures (and lists, when its models changed) in one batch, every `--flush-interval`.

use std::sync::{Arc, Mutex, MutexGuard};

use uuid::Uuid;

use super::Registry;
use super::index::{Slot, SlotState};
use crate::clock::Millis;
use crate::metrics::Metrics;
use crate::model::node::NodeLists;
use crate::store::Figures;

/// The nodes whose figures changed since the last flush, and when the oldest of those figures arrived.
#[derive(Debug, Default)]
pub(super) struct WriteBehind(Mutex<(Vec<Uuid>, Option<Millis>)>);

impl WriteBehind {
    fn queue(&self) -> MutexGuard<'_, (Vec<Uuid>, Option<Millis>)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues the node of `state` for the next flush, unless it is queued already; its figures arrived at `at`.
    pub(super) fn mark(&self, state: &mut SlotState, at: Millis) {
        if !state.figures_dirty {
            state.figures_dirty = true;
            let mut queue = self.queue();
            queue.0.push(state.node.id);
            queue.1.get_or_insert(at);
        }
    }

    /// The queued nodes, and when the oldest figures arrived; the queue starts again empty.
    fn take(&self) -> (Vec<Uuid>, Option<Millis>) {
        std::mem::take(&mut *self.queue())
    }

    /// Queues a node again whose figures, from `oldest` on, could not be written.
    fn again(&self, state: &mut SlotState, oldest: Option<Millis>) {
        if !state.figures_dirty {
            state.figures_dirty = true;
            let mut queue = self.queue();
            queue.0.push(state.node.id);
            queue.1 = match (queue.1, oldest) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
    }
}

impl Registry {
    /// Writes the figures of every heartbeat since the last flush, in one transaction. Returns the batch size.
    pub async fn flush(&self) -> anyhow::Result<usize> {
        let (ids, oldest) = self.figures.take();
        if ids.is_empty() {
            return Ok(0);
        }
        let slots: Vec<(Uuid, Arc<Slot>)> = {
            let index = self.read();
            ids.iter().filter_map(|id| index.nodes.get(id).map(|slot| (*id, slot.clone()))).collect()
        };
        let mut batch = Vec::with_capacity(slots.len());
        for (id, slot) in &slots {
            let mut state = slot.bookkeeping();
            state.figures_dirty = false;
            if state.deleted {
                continue;
            }
            let lists = std::mem::take(&mut state.models_dirty).then(|| NodeLists::of(&state.node));
            batch.push(Figures {
                node_id: *id,
                last_seen_at: state.node.last_seen_at.unwrap_or(state.alive_since),
                figures: state.node.figures.clone(),
                lists,
            });
        }
        if let Err(err) = self.store.flush_figures(&batch).await {
            // Keep the figures for the next flush rather than lose them.
            for (id, slot) in &slots {
                let mut state = slot.bookkeeping();
                if batch.iter().any(|f| f.node_id == *id && f.lists.is_some()) {
                    state.models_dirty = true;
                }
                self.figures.again(&mut state, oldest);
            }
            Metrics::inc(&self.metrics.flush_errors);
            return Err(err.into());
        }
        self.metrics.flush_batch_size.observe(batch.len() as f64);
        if let Some(oldest) = oldest {
            self.metrics.flush_lag_seconds.observe((self.clock.now_ms() - oldest).max(0) as f64 / 1000.0);
        }
        Ok(batch.len())
    }
}
