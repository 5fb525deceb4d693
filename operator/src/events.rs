//! Kubernetes Events, published off the reconcile path. One task posts them in order, as
//! client-go's event broadcaster does: an admission's status write never waits behind Events,
//! and a burst of them does not crowd the API server while it is taking creates. Events are
//! best effort there too: when QUEUE of them wait, newer ones are dropped (and counted in
//! `framelane_events_dropped_total`) rather than held in memory.
//!
//! An Event that repeats (same object, type, reason and note within six minutes) is one
//! Event with a series count, as kube's `Recorder` does; unlike it, Events of one reason
//! that say different things (a job's second start, another pod created) are each their own,
//! with their own note: the `Recorder` keys on the reason alone and would count the second
//! as a repeat of the first, its text lost.

use std::{collections::HashMap, sync::Arc};

use futures::StreamExt;
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::{
    api::{
        core::v1::ObjectReference,
        events::v1::{Event as K8sEvent, EventSeries},
    },
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::{
    Api, Client, ResourceExt,
    api::{Patch, PatchParams, PostParams},
    runtime::events::{Event, EventType, Reporter},
};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{
    Mutex,
    mpsc::{self, error::TrySendError},
};

/// Events waiting to be posted before newer ones are dropped (client-go's broadcaster keeps
/// 1000).
const QUEUE: usize = 4096;
/// Events posted at once.
const POSTS: usize = 2;
/// How long an Event is remembered for repeats (kube's `Recorder`: six minutes).
const REPEAT_WINDOW: SignedDuration = SignedDuration::from_mins(6);

/// What makes an Event a repeat of an earlier one.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    warning: bool,
    reason: String,
    note: Option<String>,
    kind: Option<String>,
    namespace: Option<String>,
    name: Option<String>,
    uid: Option<String>,
}

/// Posts Events (events.k8s.io/v1), counting repeats in the first one's series.
#[derive(Clone)]
pub struct Publisher {
    client: Client,
    reporter: Reporter,
    posted: Arc<Mutex<HashMap<Key, K8sEvent>>>,
}

impl Publisher {
    pub fn new(client: Client, reporter: Reporter) -> Publisher {
        Publisher {
            client,
            reporter,
            posted: Arc::default(),
        }
    }

    /// Posts `event` about `regarding`, or counts it as a repeat of the same Event posted
    /// within [`REPEAT_WINDOW`].
    pub async fn publish(&self, event: &Event, regarding: &ObjectReference) -> kube::Result<()> {
        let now = Timestamp::now();
        let key = Key {
            warning: event.type_ == EventType::Warning,
            reason: event.reason.clone(),
            note: event.note.clone(),
            kind: regarding.kind.clone(),
            namespace: regarding.namespace.clone(),
            name: regarding.name.clone(),
            uid: regarding.uid.clone(),
        };
        let earlier = {
            let mut posted = self.posted.lock().await;
            posted.retain(|_, e| {
                let last = e.series.as_ref().map(|s| s.last_observed_time.0);
                last.or(e.event_time.as_ref().map(|t| t.0))
                    .is_some_and(|t| t + REPEAT_WINDOW > now)
            });
            posted.get(&key).cloned()
        };
        let namespace = regarding.namespace.as_deref().unwrap_or("default");
        let events: Api<K8sEvent> = Api::namespaced(self.client.clone(), namespace);
        let written = match earlier {
            Some(mut repeat) => {
                repeat.series = Some(EventSeries {
                    count: repeat.series.as_ref().map_or(2, |s| s.count + 1),
                    last_observed_time: MicroTime(now),
                });
                events
                    .patch(
                        &repeat.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(&repeat),
                    )
                    .await?;
                repeat
            }
            None => {
                let new = self.event(event, regarding, now);
                events.create(&PostParams::default(), &new).await?
            }
        };
        self.posted.lock().await.insert(key, written);
        Ok(())
    }

    fn event(&self, event: &Event, regarding: &ObjectReference, now: Timestamp) -> K8sEvent {
        let controller = &self.reporter.controller;
        K8sEvent {
            action: Some(event.action.clone()),
            reason: Some(event.reason.clone()),
            note: event.note.clone(),
            type_: Some(
                match event.type_ {
                    EventType::Normal => "Normal",
                    EventType::Warning => "Warning",
                }
                .into(),
            ),
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding.clone()),
            related: event.secondary.clone(),
            reporting_controller: Some(controller.clone()),
            reporting_instance: Some(
                self.reporter
                    .instance
                    .clone()
                    .unwrap_or_else(|| controller.clone()),
            ),
            metadata: ObjectMeta {
                namespace: regarding.namespace.clone(),
                name: Some(format!(
                    "{}.{:x}",
                    regarding.name.as_deref().unwrap_or(controller),
                    now.as_nanosecond()
                )),
                ..Default::default()
            },
            ..Default::default()
        }
    }
}

#[derive(Clone)]
pub struct EventSink {
    tx: mpsc::Sender<(Event, ObjectReference)>,
    dropped: Counter,
}

impl EventSink {
    /// Starts the publishing task; it ends once every sink is dropped and its queue is posted.
    pub fn start(publisher: Publisher, dropped: Counter) -> EventSink {
        let (tx, mut rx) = mpsc::channel::<(Event, ObjectReference)>(QUEUE);
        let events = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
        tokio::spawn(
            events
                .for_each_concurrent(POSTS, move |(event, reference)| {
                    let publisher = publisher.clone();
                    async move {
                        if let Err(e) = publisher.publish(&event, &reference).await {
                            tracing::warn!(error = %e, object = ?reference.name, reason = %event.reason, "cannot publish Event");
                        }
                    }
                }),
        );
        EventSink { tx, dropped }
    }

    /// Queues an Event about `reference`; drops it when the queue is full.
    pub fn publish(&self, reference: ObjectReference, type_: EventType, reason: &str, note: &str) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note.into()),
            action: "Reconcile".into(),
            secondary: None,
        };
        match self.tx.try_send((event, reference)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped.inc();
            }
            Err(TrySendError::Closed(_)) => {}
        }
    }
}
