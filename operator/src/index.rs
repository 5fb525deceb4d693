//! Turns VideoJob watch events into the in-memory queues. Watch events can arrive after the
//! controller's own write of the same job; a resourceVersion check keeps the index from
//! stepping back to an older state.

use std::collections::{BTreeSet, HashMap};

use framelane_api::{VideoJob, videojob::JobPhase};
use kube::ResourceExt;

use crate::queue::{AdmissionClock, JobKey, Queues, Slot};

/// The queues plus what keeps them exact.
#[derive(Debug, Default)]
pub struct Index {
    pub queues: Queues,
    pub clock: AdmissionClock,
    versions: HashMap<JobKey, u64>,
    reservations: HashMap<JobKey, Reservation>,
    /// Jobs waiting for admission, in creation order.
    awaiting: BTreeSet<(CreationKey, JobKey)>,
    awaiting_keys: HashMap<JobKey, CreationKey>,
}

/// The order users created jobs in: creation time, then the API server's revision.
pub type CreationKey = (Option<jiff::Timestamp>, u64);

/// The creation key of a job.
pub fn creation_key(job: &VideoJob) -> CreationKey {
    (
        job.metadata.creation_timestamp.as_ref().map(|t| t.0),
        version(job).unwrap_or(0),
    )
}

/// A slot taken for a job whose admission is still being written to the API server.
#[derive(Clone, Debug, PartialEq)]
pub struct Reservation {
    pub lane: String,
    pub queued_at: jiff::Timestamp,
    pub position: i32,
}

/// The queue slot a job's status says it holds.
pub fn slot_of(job: &VideoJob) -> Slot {
    let Some(status) = job.status.as_ref() else {
        return Slot::None;
    };
    let Some(lane) = status.lane.clone() else {
        return Slot::None;
    };
    match (status.phase, &status.queued_at) {
        (Some(JobPhase::Queued), Some(at)) => Slot::Queued {
            lane,
            queued_at: at.0,
        },
        (Some(JobPhase::Running), _) => Slot::Running { lane },
        _ => Slot::None,
    }
}

pub fn key_of(job: &VideoJob) -> JobKey {
    JobKey {
        namespace: job.namespace().unwrap_or_default(),
        name: job.name_any(),
    }
}

fn version(job: &VideoJob) -> Option<u64> {
    job.resource_version().and_then(|v| v.parse().ok())
}

impl Index {
    /// Records a job as seen; returns the lanes whose queue changed.
    pub fn observe(&mut self, job: &VideoJob) -> Vec<String> {
        let key = key_of(job);
        if let (Some(seen), Some(new)) = (self.versions.get(&key), version(job))
            && new < *seen
        {
            return Vec::new();
        }
        if let Some(v) = version(job) {
            self.versions.insert(key.clone(), v);
        }
        let slot = slot_of(job);
        if let Slot::Queued { queued_at, .. } = &slot {
            self.clock.observe(*queued_at);
        }
        let waiting = job.status.as_ref().and_then(|s| s.phase).is_none()
            && job.metadata.deletion_timestamp.is_none();
        self.set_awaiting(&key, waiting.then(|| creation_key(job)));
        self.queues.set(key, slot)
    }

    fn set_awaiting(&mut self, key: &JobKey, creation: Option<CreationKey>) {
        if let Some(old) = self.awaiting_keys.remove(key) {
            self.awaiting.remove(&(old, key.clone()));
        }
        if let Some(c) = creation {
            self.awaiting.insert((c, key.clone()));
            self.awaiting_keys.insert(key.clone(), c);
        }
    }

    /// Jobs waiting for admission that were created no later than `upto`, oldest first.
    pub fn awaiting_upto(&self, upto: CreationKey) -> Vec<JobKey> {
        self.awaiting
            .iter()
            .take_while(|(c, _)| *c <= upto)
            .map(|(_, k)| k.clone())
            .collect()
    }

    /// Whether this copy of a job is older than one the index has already seen (a cache
    /// that has not caught up with the controller's own write).
    pub fn is_stale(&self, job: &VideoJob) -> bool {
        matches!((self.versions.get(&key_of(job)), version(job)), (Some(seen), Some(v)) if v < *seen)
    }

    /// Takes a queue slot for `job` in `lane` now, before its admission is written, so the
    /// next admission already counts it. Copies of the job older than the admission write
    /// are ignored from here on.
    pub fn reserve(&mut self, job: &VideoJob, lane: &str, now: jiff::Timestamp) -> Reservation {
        let key = key_of(job);
        let queued_at = self.clock.next(now);
        let position = self.queues.lane(lane).map_or(0, |q| q.positions().count()) as i32 + 1;
        self.queues.set(
            key.clone(),
            Slot::Queued {
                lane: lane.into(),
                queued_at,
            },
        );
        self.versions
            .insert(key.clone(), version(job).unwrap_or(0) + 1);
        let reservation = Reservation {
            lane: lane.into(),
            queued_at,
            position,
        };
        self.reservations.insert(key, reservation.clone());
        reservation
    }

    /// The reservation of a job whose admission is being written.
    pub fn reservation(&self, job: &VideoJob) -> Option<Reservation> {
        self.reservations.get(&key_of(job)).cloned()
    }

    /// The admission was written (`written`) or failed (`None`): the reservation ends.
    pub fn settle(&mut self, job: &VideoJob, written: Option<&VideoJob>) -> Vec<String> {
        let key = key_of(job);
        self.reservations.remove(&key);
        match written {
            Some(written) => self.observe(written),
            None => {
                self.versions.remove(&key);
                self.queues.set(key, Slot::None)
            }
        }
    }

    /// Forgets a deleted job; returns the lanes whose queue changed.
    pub fn forget(&mut self, job: &VideoJob) -> Vec<String> {
        let key = key_of(job);
        self.versions.remove(&key);
        self.reservations.remove(&key);
        self.set_awaiting(&key, None);
        self.queues.set(key, Slot::None)
    }

    /// Rebuilds everything from a full list (after a watch restart, deletions may have been
    /// missed).
    pub fn rebuild<'a>(&mut self, jobs: impl Iterator<Item = &'a VideoJob>) {
        *self = Index {
            clock: std::mem::take(&mut self.clock),
            ..Default::default()
        };
        for job in jobs {
            self.observe(job);
        }
    }
}
