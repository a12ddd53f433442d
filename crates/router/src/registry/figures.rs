//! The write-behind of heartbeat figures: a heartbeat changes memory only, and [`Registry::flush`] writes every
//! changed node's figures (and lists, when its models changed) in one batch, every `--flush-interval`.

use std::sync::Arc;

use uuid::Uuid;

use super::Registry;
use super::index::{Slot, SlotState};
use crate::clock::Millis;
use crate::metrics::Metrics;
use crate::model::node::NodeLists;
use crate::store::Figures;

impl Registry {
    /// Queues the node of `state` for the next flush, unless it is queued already.
    pub(super) fn mark_figures_dirty(&self, state: &mut SlotState, now: Millis) {
        if !state.figures_dirty {
            state.figures_dirty = true;
            let mut dirty = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
            dirty.0.push(state.node.id);
            dirty.1.get_or_insert(now);
        }
    }

    /// Writes the figures of every heartbeat since the last flush, in one transaction. Returns the batch size.
    pub async fn flush(&self) -> anyhow::Result<usize> {
        let (ids, oldest) = std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|p| p.into_inner()));
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
                metrics: state.node.metrics.clone(),
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
                if !state.figures_dirty {
                    state.figures_dirty = true;
                    let mut dirty = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
                    dirty.0.push(*id);
                    dirty.1 = match (dirty.1, oldest) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                }
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
