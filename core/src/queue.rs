//! In what order do a lane's jobs run? Queue arithmetic: which unfinished jobs each lane
//! holds, in what order (admission time, then name), at which positions, and how deep each
//! queue is. The index feeds it watch events; the controller and the webhook read it.

use std::collections::{BTreeSet, HashMap};

use jiff::Timestamp;

/// A job as the queue sees it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobKey {
    pub namespace: String,
    pub name: String,
}

/// What the queue needs to know about one job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Slot {
    /// Waiting in `lane`, admitted at `queued_at`.
    Queued { lane: String, queued_at: Timestamp },
    /// Claimed by a runner of `lane`.
    Running { lane: String },
    /// Finished, or not admitted to any lane: holds no slot.
    None,
}

/// One lane's unfinished jobs.
#[derive(Debug, Default)]
pub struct LaneQueue {
    /// Queued jobs, oldest first: the FIFO order runners claim in.
    queued: BTreeSet<(Timestamp, JobKey)>,
    running: BTreeSet<JobKey>,
}

impl LaneQueue {
    /// Unfinished (Queued or Running) jobs: the number `maxDepth` bounds.
    pub fn depth(&self) -> usize {
        self.queued.len() + self.running.len()
    }

    /// Unfinished jobs of `namespace`.
    pub fn held_by(&self, namespace: &str) -> usize {
        self.queued
            .iter()
            .map(|(_, k)| k)
            .chain(&self.running)
            .filter(|k| k.namespace == namespace)
            .count()
    }

    /// Jobs running on the lane.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Queued jobs admitted before `at`: ahead of a job admitted at `at`.
    pub fn queued_before(&self, at: Timestamp) -> usize {
        self.queued.iter().take_while(|(t, _)| *t < at).count()
    }

    /// Queued jobs in claim order, each with its 1-based position.
    pub fn positions(&self) -> impl Iterator<Item = (&JobKey, i32)> {
        self.queued
            .iter()
            .zip(1..)
            .map(|((_, key), pos)| (key, pos))
    }
}

/// Every lane's queue, kept in step with the jobs' status.
#[derive(Debug, Default)]
pub struct Queues {
    lanes: HashMap<String, LaneQueue>,
    slots: HashMap<JobKey, Slot>,
}

impl Queues {
    /// Records a job's current slot; returns the lanes whose queue changed.
    pub fn set(&mut self, key: JobKey, slot: Slot) -> Vec<String> {
        let old = self.slots.remove(&key).unwrap_or(Slot::None);
        if old == slot {
            if slot != Slot::None {
                self.slots.insert(key, slot);
            }
            return Vec::new();
        }
        let mut changed = Vec::new();
        match old {
            Slot::Queued { lane, queued_at } => {
                if let Some(q) = self.lanes.get_mut(&lane) {
                    q.queued.remove(&(queued_at, key.clone()));
                }
                changed.push(lane);
            }
            Slot::Running { lane } => {
                if let Some(q) = self.lanes.get_mut(&lane) {
                    q.running.remove(&key);
                }
                changed.push(lane);
            }
            Slot::None => {}
        }
        match &slot {
            Slot::Queued { lane, queued_at } => {
                self.lanes
                    .entry(lane.clone())
                    .or_default()
                    .queued
                    .insert((*queued_at, key.clone()));
                changed.push(lane.clone());
            }
            Slot::Running { lane } => {
                self.lanes
                    .entry(lane.clone())
                    .or_default()
                    .running
                    .insert(key.clone());
                changed.push(lane.clone());
            }
            Slot::None => {}
        }
        if slot != Slot::None {
            self.slots.insert(key, slot);
        }
        changed.dedup();
        changed
    }

    /// The lane whose slot (Queued or Running) the job holds.
    pub fn lane_of(&self, key: &JobKey) -> Option<&str> {
        match self.slots.get(key)? {
            Slot::Queued { lane, .. } | Slot::Running { lane } => Some(lane),
            Slot::None => None,
        }
    }

    /// The lanes that have held jobs.
    pub fn lane_names(&self) -> impl Iterator<Item = &String> {
        self.lanes.keys()
    }

    /// A lane's queue (empty when it holds nothing).
    pub fn lane(&self, lane: &str) -> Option<&LaneQueue> {
        self.lanes.get(lane)
    }

    /// The queued jobs of a lane, first first.
    pub fn queued(&self, lane: &str) -> Vec<JobKey> {
        self.lanes
            .get(lane)
            .map(|q| q.positions().map(|(k, _)| k.clone()).collect())
            .unwrap_or_default()
    }

    /// Unfinished jobs of a lane.
    pub fn depth(&self, lane: &str) -> usize {
        self.lanes.get(lane).map_or(0, LaneQueue::depth)
    }
}

/// How far ahead of the local clock an admission time another leader wrote is still
/// followed. Leaders' clocks agree to within seconds; a `queuedAt` beyond this was written by
/// hand (the CRD lets an admin set it once) and following it would give every new job that
/// time, or overflow the year 9999. Such a job keeps its value, at the back of its queue.
pub const MAX_LEAD: jiff::SignedDuration = jiff::SignedDuration::from_hours(1);

/// Hands out strictly increasing admission times, so FIFO order never depends on a tie.
#[derive(Debug, Default)]
pub struct AdmissionClock {
    last: Option<Timestamp>,
}

impl AdmissionClock {
    /// Raises the clock to at least `seen` (an admission time another leader wrote), unless
    /// `seen` is more than [`MAX_LEAD`] ahead of `now`.
    pub fn observe(&mut self, seen: Timestamp, now: Timestamp) {
        if seen <= now.saturating_add(MAX_LEAD).unwrap_or(Timestamp::MAX) {
            self.last = self.last.max(Some(seen));
        }
    }

    /// The next admission time: now, or a microsecond after the last one. Strictly
    /// increasing on the microsecond grid status times are written with, so admissions sort
    /// in the order their slots were taken (the positions they were given).
    pub fn next(&mut self, now: Timestamp) -> Timestamp {
        // Truncated to the microsecond (`from_microsecond` refuses the last one jiff holds).
        let now =
            Timestamp::new(now.as_second(), now.subsec_nanosecond() / 1_000 * 1_000).unwrap_or(now);
        let t = match self.last {
            // `last` is at most an hour ahead of a past `now`: there is no later time only
            // when the local clock itself reads the year 9999, and then a tie is the lesser
            // harm.
            Some(last) if now <= last => last
                .checked_add(jiff::SignedDuration::from_micros(1))
                .unwrap_or(last),
            _ => now,
        };
        self.last = Some(t);
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job's 1-based place in lane `l`, as the lane reconciler writes it.
    fn position(q: &Queues, name: &str) -> Option<i32> {
        q.lane("l")?
            .positions()
            .find(|(k, _)| k.name == name)
            .map(|(_, p)| p)
    }
    fn key(name: &str) -> JobKey {
        JobKey {
            namespace: "ns".into(),
            name: name.into(),
        }
    }
    fn at(micros: i64) -> Timestamp {
        Timestamp::from_microsecond(micros).unwrap()
    }
    fn queued(lane: &str, micros: i64) -> Slot {
        Slot::Queued {
            lane: lane.into(),
            queued_at: at(micros),
        }
    }

    #[test]
    fn positions_follow_admission_time_not_names() {
        let mut q = Queues::default();
        q.set(key("b"), queued("l", 1));
        q.set(key("a"), queued("l", 2));
        q.set(key("c"), queued("l", 3));
        let order: Vec<_> = q
            .lane("l")
            .unwrap()
            .positions()
            .map(|(k, p)| (k.name.clone(), p))
            .collect();
        assert_eq!(order, [("b".into(), 1), ("a".into(), 2), ("c".into(), 3)]);
        assert_eq!(position(&q, "c"), Some(3));
    }

    #[test]
    fn depth_counts_queued_and_running_and_frees_on_finish() {
        let mut q = Queues::default();
        q.set(key("a"), queued("l", 1));
        q.set(key("b"), queued("l", 2));
        assert_eq!(q.set(key("a"), Slot::Running { lane: "l".into() }), ["l"]);
        assert_eq!(q.depth("l"), 2);
        assert_eq!(
            position(&q, "b"),
            Some(1),
            "the running job no longer counts for positions"
        );
        q.set(key("a"), Slot::None);
        assert_eq!(q.depth("l"), 1);
        q.set(key("b"), Slot::None);
        assert_eq!(q.depth("l"), 0);
    }

    #[test]
    fn a_requeued_job_goes_back_to_its_old_place() {
        let mut q = Queues::default();
        q.set(key("first"), queued("l", 1));
        q.set(key("second"), queued("l", 2));
        q.set(key("first"), Slot::Running { lane: "l".into() });
        q.set(key("third"), queued("l", 3));
        q.set(key("first"), queued("l", 1));
        assert_eq!(position(&q, "first"), Some(1));
        assert_eq!(position(&q, "third"), Some(3));
    }

    #[test]
    fn moving_lanes_changes_both() {
        let mut q = Queues::default();
        q.set(key("a"), queued("dedicated", 1));
        let mut changed = q.set(key("a"), queued("shared", 1));
        changed.sort();
        assert_eq!(changed, ["dedicated", "shared"]);
        assert_eq!(q.depth("dedicated"), 0);
        assert_eq!(q.depth("shared"), 1);
        assert!(
            q.set(key("a"), queued("shared", 1)).is_empty(),
            "no change, nothing to resync"
        );
    }

    #[test]
    fn admission_clock_is_strictly_increasing() {
        let mut c = AdmissionClock::default();
        c.observe(at(1_000), at(500));
        assert_eq!(c.next(at(500)), at(1_001));
        assert_eq!(c.next(at(500)), at(1_002));
        assert_eq!(c.next(at(5_000)), at(5_000));
        // Later by less than a microsecond: the written times would tie, so it moves on.
        let just_after = at(5_000) + jiff::SignedDuration::from_nanos(400);
        assert_eq!(c.next(just_after), at(5_001));
        assert_eq!(c.next(just_after), at(5_002));
    }

    /// The latest time on the microsecond grid (jiff's last instant is 9999-12-30T22:00Z,
    /// so that it fits every offset).
    fn last_micro() -> Timestamp {
        Timestamp::new(Timestamp::MAX.as_second(), 999_999_000).unwrap()
    }

    #[test]
    fn admission_clock_ignores_a_time_far_in_the_future() {
        let hour = 3_600_000_000;
        let mut c = AdmissionClock::default();
        // An admin wrote a queuedAt at the last microsecond a timestamp can hold.
        c.observe(last_micro(), at(500));
        c.observe(Timestamp::MAX, at(500));
        assert_eq!(c.next(at(500)), at(500));
        assert_eq!(c.next(at(500)), at(501));
        // Another leader's time within the lead is followed, also after the far one.
        c.observe(at(5_000 + hour), at(5_000));
        assert_eq!(c.next(at(5_000)), at(5_001 + hour));
    }

    #[test]
    fn admission_clock_never_overflows() {
        let mut c = AdmissionClock::default();
        let end = last_micro();
        c.observe(end, end);
        assert_eq!(c.next(end), end);
        assert_eq!(c.next(end), end, "no later time exists");
    }
}
