//! A fixed number of turns handed out earliest-first: who goes next is the waiter with the lowest
//! priority value (ties: the first to ask), not simply the first to ask.
//!
//! Profile prefetch uses it so that, across the layers (and images) of a node, the request holding
//! the chunk start-up reads first goes first: a layer whose TOC arrived late (its first chunks are
//! the dynamic loader and libc) does not wait behind another layer's later bulk.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// The turns; clones share them.
#[derive(Debug, Clone)]
pub struct Turns {
    inner: Arc<Mutex<State>>,
}

#[derive(Debug)]
struct State {
    free: usize,
    next_seq: u64,
    waiting: BinaryHeap<Reverse<Waiter>>,
}

#[derive(Debug)]
struct Waiter {
    priority: u64,
    seq: u64,
    wake: oneshot::Sender<Turn>,
}

impl PartialEq for Waiter {
    fn eq(&self, other: &Self) -> bool {
        (self.priority, self.seq) == (other.priority, other.seq)
    }
}
impl Eq for Waiter {}
impl PartialOrd for Waiter {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Waiter {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.priority, self.seq).cmp(&(other.priority, other.seq))
    }
}

/// One turn, given back (to the best waiter) when dropped.
#[derive(Debug)]
pub struct Turn {
    turns: Option<Turns>,
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Turns {
    /// `n` turns (at least one).
    pub fn new(n: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(State {
                free: n.max(1),
                next_seq: 0,
                waiting: BinaryHeap::new(),
            })),
        }
    }

    /// Waits for a turn; among waiters, the lowest `priority` is served first.
    pub async fn take(&self, priority: u64) -> Turn {
        let rx = {
            let mut state = lock(&self.inner);
            if state.free > 0 {
                state.free -= 1;
                return Turn {
                    turns: Some(self.clone()),
                };
            }
            let (wake, rx) = oneshot::channel();
            let seq = state.next_seq;
            state.next_seq += 1;
            state.waiting.push(Reverse(Waiter {
                priority,
                seq,
                wake,
            }));
            rx
        };
        // The sender is dropped only after a send, or with the state (never while we wait).
        match rx.await {
            Ok(turn) => turn,
            Err(_) => Turn { turns: None },
        }
    }

    /// Gives a turn back: to the best waiter still waiting, else to the pool.
    fn give_back(&self) {
        let mut state = lock(&self.inner);
        while let Some(Reverse(waiter)) = state.waiting.pop() {
            let turn = Turn {
                turns: Some(self.clone()),
            };
            match waiter.wake.send(turn) {
                Ok(()) => return,
                // The waiter gave up: the turn comes back here, so forget it without a drop.
                Err(mut turn) => turn.turns = None,
            }
        }
        state.free += 1;
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        if let Some(turns) = self.turns.take() {
            turns.give_back();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn the_earliest_waiter_goes_first_and_a_given_up_waiter_loses_nothing() {
        let turns = Turns::new(1);
        let held = turns.take(50).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for priority in [30u64, 10, 20] {
            let (turns, order) = (turns.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let _turn = turns.take(priority).await;
                order.lock().unwrap().push(priority);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // A waiter that gives up before its turn comes.
        let quitter = tokio::time::timeout(Duration::from_millis(20), turns.take(0)).await;
        assert!(quitter.is_err());
        drop(held);
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(5), t)
                .await
                .expect("every waiter is served")
                .unwrap();
        }
        assert_eq!(*order.lock().unwrap(), [10, 20, 30]);
        // Every turn came back.
        let _a = tokio::time::timeout(Duration::from_millis(100), turns.take(0))
            .await
            .expect("the turn is free again");
    }
}
