//! Kubernetes Events, published off the reconcile path. One task posts them in order, as
//! client-go's event broadcaster does: an admission's status write never waits behind Events,
//! and a burst of them does not crowd the API server while it is taking creates. Events are
//! best effort there too: when QUEUE of them wait, newer ones are dropped (and counted in
//! `framelane_events_dropped_total`) rather than held in memory.

use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc::{self, error::TrySendError};

/// Events waiting to be posted before newer ones are dropped (client-go's broadcaster keeps
/// 1000).
const QUEUE: usize = 4096;
/// Events posted at once.
const POSTS: usize = 2;

#[derive(Clone)]
pub struct EventSink {
    tx: mpsc::Sender<(Event, ObjectReference)>,
    dropped: Counter,
}

impl EventSink {
    /// Starts the publishing task; it ends once every sink is dropped and its queue is posted.
    pub fn start(recorder: Recorder, dropped: Counter) -> EventSink {
        let (tx, mut rx) = mpsc::channel::<(Event, ObjectReference)>(QUEUE);
        let events = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
        tokio::spawn(
            events
                .for_each_concurrent(POSTS, move |(event, reference)| {
                    let recorder = recorder.clone();
                    async move {
                        if let Err(e) = recorder.publish(&event, &reference).await {
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
