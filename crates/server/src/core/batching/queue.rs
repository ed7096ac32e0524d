//! The batching policy as a pure, synchronous state: entries wait in FIFO order, and [`State::next_batch`]
//! decides, given the time, whether to cut a batch now, wait, or drop expired entries.
//!
//! Rules (Triton's dynamic batcher, on CPU):
//! - Only entries with the same [`BatchKey`] (types and non-batch dimensions of every input) are merged; the oldest
//!   entry's key decides the batch, so no entry waits behind a different shape for long.
//! - A batch is cut at once when it reaches `max_batch_size` rows or one of `preferred_batch_sizes`, or when the
//!   oldest entry has waited `max_queue_delay`; otherwise the batcher waits until that moment.
//! - An entry with more rows than `max_batch_size` runs alone.
//! - Text entries count their tokens instead of rows: a batch holds at most `max_batch_tokens` (TEI's
//!   `--max-batch-tokens`), and an entry with more runs alone (the worker splits it into runs that fit, of at most
//!   `max_batch_size` texts each). Tensor entries count no tokens.
//! - Entries past their deadline are removed before batching and answered as late.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use ferry_model::DataType;

/// What must match for two requests to share a batch: each input's type and its dimensions after the first. Text
/// entries have the empty key (a tensor request always has an input), so any two texts can share a batch: the worker
/// pads them.
pub type BatchKey = Vec<(DataType, Vec<usize>)>;

/// The batching limits of one model version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// The most rows one batch may hold; 1 means no batching.
    pub max_batch_size: usize,
    /// How long the oldest entry may wait for others to join it.
    pub max_queue_delay: Duration,
    /// Batch sizes to cut at as soon as they are reached.
    pub preferred_batch_sizes: Vec<usize>,
    /// The most entries that may wait; beyond it new requests are refused at once.
    pub max_queue_size: usize,
    /// The most tokens one batch of texts may hold.
    pub max_batch_tokens: usize,
}

/// One waiting request.
#[derive(Debug)]
pub struct Entry<T> {
    /// The request itself (inputs and where to send the answer).
    pub item: T,
    /// Its number of rows (first dimension; texts for a text entry).
    pub rows: usize,
    /// Its tokens (text entries; 0 for tensors).
    pub tokens: usize,
    /// What it can be merged with.
    pub key: BatchKey,
    /// When it arrived.
    pub enqueued: Instant,
    /// When its answer stops being useful.
    pub deadline: Option<Instant>,
    /// Must run alone (its inputs disagree on the first dimension, so its rows cannot be told apart in a batch).
    pub solo: bool,
}

/// Why a batch was cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// It reached `max_batch_size` (or one entry alone exceeds it).
    Full,
    /// It reached a preferred batch size.
    Preferred,
    /// The oldest entry waited `max_queue_delay`.
    Delay,
    /// Batching is off (`max_batch_size` 1): every entry runs alone.
    Single,
}

/// What the batcher should do next.
#[derive(Debug)]
pub enum Decision<T> {
    /// Nothing is waiting.
    Idle,
    /// Wait until this moment (or until a new entry arrives), then ask again.
    WaitUntil(Instant),
    /// Run these entries together.
    Batch(Vec<Entry<T>>, StopReason),
}

/// The queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

/// The waiting entries of one model version.
#[derive(Debug)]
pub struct State<T> {
    entries: VecDeque<Entry<T>>,
    limits: Limits,
}

impl<T> State<T> {
    /// An empty queue with these limits.
    pub fn new(limits: Limits) -> State<T> {
        State {
            entries: VecDeque::new(),
            limits,
        }
    }

    /// The number of waiting entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Adds an entry, or refuses it when `max_queue_size` entries already wait.
    pub fn push(&mut self, entry: Entry<T>) -> Result<(), (Full, Entry<T>)> {
        if self.entries.len() >= self.limits.max_queue_size {
            return Err((Full, entry));
        }
        self.entries.push_back(entry);
        Ok(())
    }

    /// Removes and returns entries that are past their deadline or that `keep` rejects (a client that left).
    pub fn remove_stale(&mut self, now: Instant, keep: impl Fn(&T) -> bool) -> Vec<Entry<T>> {
        let mut stale = Vec::new();
        let mut kept = VecDeque::with_capacity(self.entries.len());
        for e in self.entries.drain(..) {
            if e.deadline.is_some_and(|d| d <= now) || !keep(&e.item) {
                stale.push(e);
            } else {
                kept.push_back(e);
            }
        }
        self.entries = kept;
        stale
    }

    /// Decides what to run at `now`.
    pub fn next_batch(&mut self, now: Instant) -> Decision<T> {
        let Some(oldest) = self.entries.front() else {
            return Decision::Idle;
        };
        let limits = &self.limits;
        if limits.max_batch_size <= 1 {
            let e = self.entries.pop_front().expect("checked non-empty");
            return Decision::Batch(vec![e], StopReason::Single);
        }
        // Text entries are bounded by tokens only: the worker cuts their batch into runs of at most
        // `max_batch_size` texts, so a few long lists never fill a batch's rows and keep short requests out.
        let text = oldest.key.is_empty();
        let max_rows = if text {
            usize::MAX
        } else {
            limits.max_batch_size
        };
        if oldest.rows >= max_rows || oldest.tokens >= limits.max_batch_tokens || oldest.solo {
            let e = self.entries.pop_front().expect("checked non-empty");
            return Decision::Batch(vec![e], StopReason::Full);
        }
        // Gather, in arrival order, the entries that share the oldest entry's key and fit.
        let key = &oldest.key;
        let mut rows = 0;
        let mut tokens = 0;
        let mut chosen = Vec::new();
        let mut reason = None;
        // The longest prefix of `chosen` that reached a preferred size, if any.
        let mut preferred_prefix = None;
        for (i, e) in self.entries.iter().enumerate() {
            if &e.key != key
                || e.solo
                || rows + e.rows > max_rows
                || tokens + e.tokens > limits.max_batch_tokens
            {
                continue;
            }
            rows += e.rows;
            tokens += e.tokens;
            chosen.push(i);
            if rows == max_rows {
                reason = Some(StopReason::Full);
                break;
            }
            if limits.preferred_batch_sizes.contains(&rows) {
                preferred_prefix = Some(chosen.len());
            }
        }
        if reason.is_none() {
            if let Some(n) = preferred_prefix {
                // Cut at the largest preferred size reached; the rest waits for the next batch.
                chosen.truncate(n);
                reason = Some(StopReason::Preferred);
            }
        }
        let ready_at = oldest.enqueued + limits.max_queue_delay;
        if reason.is_none() && now >= ready_at {
            reason = Some(StopReason::Delay);
        }
        match reason {
            None => Decision::WaitUntil(ready_at),
            Some(reason) => {
                let mut batch = Vec::with_capacity(chosen.len());
                for (taken, i) in chosen.into_iter().enumerate() {
                    batch.push(
                        self.entries
                            .remove(i - taken)
                            .expect("index from this queue"),
                    );
                }
                Decision::Batch(batch, reason)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: usize, delay_ms: u64, preferred: &[usize], queue: usize) -> Limits {
        Limits {
            max_batch_size: max,
            max_queue_delay: Duration::from_millis(delay_ms),
            preferred_batch_sizes: preferred.to_vec(),
            max_queue_size: queue,
            max_batch_tokens: usize::MAX,
        }
    }

    fn entry(id: u32, rows: usize, width: usize, at: Instant) -> Entry<u32> {
        Entry {
            item: id,
            rows,
            tokens: 0,
            key: vec![(DataType::F32, vec![width])],
            enqueued: at,
            deadline: None,
            solo: false,
        }
    }

    /// Runs the policy and describes the outcome as text: `wait +Nms`, `idle`, or `Reason [ids]`.
    fn check(state: &mut State<u32>, now: Instant, t0: Instant, expect: &str) {
        let got = match state.next_batch(now) {
            Decision::Idle => "idle".to_string(),
            Decision::WaitUntil(t) => format!("wait +{}ms", (t - t0).as_millis()),
            Decision::Batch(b, r) => {
                format!("{r:?} {:?}", b.iter().map(|e| e.item).collect::<Vec<_>>())
            }
        };
        assert_eq!(got, expect);
    }

    #[test]
    fn cuts_when_full_or_late() {
        let t0 = Instant::now();
        let mut s = State::new(limits(4, 10, &[], 100));
        check(&mut s, t0, t0, "idle");
        s.push(entry(1, 1, 2, t0)).unwrap();
        s.push(entry(2, 2, 2, t0)).unwrap();
        check(&mut s, t0, t0, "wait +10ms");
        s.push(entry(3, 1, 2, t0)).unwrap();
        check(&mut s, t0, t0, "Full [1, 2, 3]");
        s.push(entry(4, 1, 2, t0)).unwrap();
        check(&mut s, t0 + Duration::from_millis(10), t0, "Delay [4]");
    }

    #[test]
    fn different_shapes_never_merge_and_oldest_goes_first() {
        let t0 = Instant::now();
        let mut s = State::new(limits(8, 5, &[], 100));
        s.push(entry(1, 1, 2, t0)).unwrap();
        s.push(entry(2, 1, 3, t0)).unwrap();
        s.push(entry(3, 1, 2, t0)).unwrap();
        let late = t0 + Duration::from_millis(5);
        check(&mut s, late, t0, "Delay [1, 3]");
        check(&mut s, late, t0, "Delay [2]");
    }

    #[test]
    fn skips_entries_that_do_not_fit_and_runs_oversized_alone() {
        let t0 = Instant::now();
        let mut s = State::new(limits(4, 5, &[], 100));
        s.push(entry(1, 3, 2, t0)).unwrap();
        s.push(entry(2, 2, 2, t0)).unwrap();
        s.push(entry(3, 1, 2, t0)).unwrap();
        check(&mut s, t0, t0, "Full [1, 3]");
        s.push(entry(4, 9, 2, t0)).unwrap();
        check(&mut s, t0, t0, "wait +5ms");
        check(&mut s, t0 + Duration::from_millis(5), t0, "Delay [2]");
        check(&mut s, t0, t0, "Full [4]");
    }

    #[test]
    fn preferred_sizes_cut_early() {
        let t0 = Instant::now();
        let mut s = State::new(limits(16, 100, &[2, 8], 100));
        s.push(entry(1, 1, 2, t0)).unwrap();
        check(&mut s, t0, t0, "wait +100ms");
        s.push(entry(2, 1, 2, t0)).unwrap();
        check(&mut s, t0, t0, "Preferred [1, 2]");
    }

    #[test]
    fn preferred_size_cuts_at_the_largest_reached_and_solo_entries_run_alone() {
        let t0 = Instant::now();
        let mut s = State::new(limits(16, 100, &[2, 4], 100));
        for id in 1..=5 {
            s.push(entry(id, 1, 2, t0)).unwrap();
        }
        check(&mut s, t0, t0, "Preferred [1, 2, 3, 4]");
        s.push(Entry {
            solo: true,
            ..entry(6, 1, 2, t0)
        })
        .unwrap();
        s.push(entry(7, 1, 2, t0)).unwrap();
        check(&mut s, t0, t0, "Preferred [5, 7]");
        check(&mut s, t0, t0, "Full [6]");
    }

    #[test]
    fn texts_share_batches_within_the_token_budget() {
        let t0 = Instant::now();
        let mut s = State::new(Limits {
            max_batch_tokens: 100,
            ..limits(8, 5, &[], 100)
        });
        let text = |id, rows, tokens| Entry {
            tokens,
            key: Vec::new(),
            ..entry(id, rows, 0, t0)
        };
        s.push(text(1, 2, 60)).unwrap();
        s.push(entry(2, 1, 2, t0)).unwrap();
        s.push(text(3, 1, 50)).unwrap();
        s.push(text(4, 1, 40)).unwrap();
        s.push(text(5, 4, 500)).unwrap();
        // Texts never join tensors; 1 and 4 fit in 100 tokens, 3 does not; the oversized entry runs alone.
        check(&mut s, t0 + Duration::from_millis(5), t0, "Delay [1, 4]");
        // Rows do not bound a text batch: a short text joins lists that fill `max_batch_size` rows.
        s.push(text(6, 8, 40)).unwrap();
        s.push(text(7, 1, 10)).unwrap();
        check(&mut s, t0 + Duration::from_millis(5), t0, "Delay [2]");
        check(&mut s, t0 + Duration::from_millis(5), t0, "Delay [3, 6, 7]");
        check(&mut s, t0, t0, "Full [5]");
    }

    #[test]
    fn no_batching_runs_each_alone() {
        let t0 = Instant::now();
        let mut s = State::new(limits(1, 100, &[], 100));
        s.push(entry(1, 5, 2, t0)).unwrap();
        s.push(entry(2, 1, 2, t0)).unwrap();
        check(&mut s, t0, t0, "Single [1]");
        check(&mut s, t0, t0, "Single [2]");
    }

    #[test]
    fn bounded_queue_and_stale_entries() {
        let t0 = Instant::now();
        let mut s = State::new(limits(4, 5, &[], 2));
        s.push(entry(1, 1, 2, t0)).unwrap();
        s.push(Entry {
            deadline: Some(t0 + Duration::from_millis(1)),
            ..entry(2, 1, 2, t0)
        })
        .unwrap();
        assert!(s.push(entry(3, 1, 2, t0)).is_err(), "a full queue refuses");
        let stale = s.remove_stale(t0 + Duration::from_millis(2), |_| true);
        assert_eq!(stale.iter().map(|e| e.item).collect::<Vec<_>>(), vec![2]);
        let gone = s.remove_stale(t0, |id| *id != 1);
        assert_eq!(gone.len(), 1);
        assert!(s.is_empty());
    }
}
