//! Watches that one unreadable object cannot stall.
//!
//! A typed list fails as a whole when one item does not deserialize, and kube's watcher then
//! relists, fails again, and delivers nothing more: one object written by a newer Framelane
//! (a phase or field this version does not know, after a rollback) would stop every
//! admission. These watches read objects untyped and parse each on its own; an object that
//! does not parse is reported and left out, while every other object keeps flowing.

use futures::{Stream, TryStreamExt, future};
use kube::{
    Api, Client, Resource,
    api::{ApiResource, DynamicObject},
    runtime::watcher,
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};
use serde::de::DeserializeOwned;

/// Labels of the watch-error counters (`framelane_watch_errors_total`,
/// `framelane_runner_watch_errors_total`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WatchErrorLabels {
    /// The kind watched: `VideoJob`, `ModelLane`, `VideoModel`, `Lease`.
    pub kind: String,
    /// [`watch_error_cause`].
    pub cause: String,
}

/// Why a watch restarted: `expired` when the API server no longer holds the resourceVersion
/// it was resuming from (410 Gone: after an API server restart, or a client cut off longer
/// than the server's history), so the cache is listed again whole, deletions missed meanwhile
/// included; `failed` for any other error (refused, timed out, 5xx), retried with backoff.
pub fn watch_error_cause(e: &watcher::Error) -> &'static str {
    let gone = match e {
        watcher::Error::WatchError(status) => status.code == 410,
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => status.code == 410,
        _ => false,
    };
    if gone { "expired" } else { "failed" }
}

/// Counts a watch error of `kind` in `errors` by its cause and logs it: an expiry is routine
/// (the watch lists again and goes on), any other error is a warning.
pub fn count_watch_error(
    errors: &Family<WatchErrorLabels, Counter>,
    kind: &str,
    e: &watcher::Error,
) {
    let cause = watch_error_cause(e);
    errors
        .get_or_create(&WatchErrorLabels {
            kind: kind.into(),
            cause: cause.into(),
        })
        .inc();
    if cause == "expired" {
        tracing::info!(kind, error = %e, "watch expired; listing again");
    } else {
        tracing::warn!(kind, error = %e, "watch failed; retrying");
    }
}

/// An object a watch left out because it does not parse as its kind.
#[derive(Debug)]
pub struct Unreadable {
    /// `namespace/name`, or `name` for a cluster-scoped kind.
    pub object: String,
    /// What did not parse.
    pub error: String,
}

/// Watches `K` in `namespace` (all namespaces when `None`; cluster-scoped kinds take `None`),
/// leaving out objects that do not parse and telling `unreadable` about each. A deletion of
/// an object whose status no longer parses still arrives (read without its status), so
/// caches do not keep it.
pub fn watch_readable<K, F>(
    client: Client,
    namespace: Option<&str>,
    config: watcher::Config,
    unreadable: F,
) -> impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + use<K, F>
where
    K: Resource<DynamicType = ()> + DeserializeOwned + Clone + std::fmt::Debug + Send + 'static,
    F: Fn(Unreadable) + Send + 'static,
{
    let resource = ApiResource::erase::<K>(&());
    let api: Api<DynamicObject> = match namespace {
        Some(ns) => Api::namespaced_with(client, ns, &resource),
        None => Api::all_with(client, &resource),
    };
    watcher(api, config).try_filter_map(move |event| future::ok(readable_event(event, &unreadable)))
}

fn readable_event<K>(
    event: watcher::Event<DynamicObject>,
    unreadable: &impl Fn(Unreadable),
) -> Option<watcher::Event<K>>
where
    K: Resource<DynamicType = ()> + DeserializeOwned,
{
    // The object, or None after telling `unreadable` why not.
    let read = |object: DynamicObject| {
        let name = object.metadata.name.clone().unwrap_or_default();
        let at = match &object.metadata.namespace {
            Some(ns) => format!("{ns}/{name}"),
            None => name,
        };
        object
            .try_parse::<K>()
            .map_err(|e| {
                unreadable(Unreadable {
                    object: at,
                    error: e.to_string(),
                })
            })
            .ok()
    };
    match event {
        watcher::Event::Init => Some(watcher::Event::Init),
        watcher::Event::InitDone => Some(watcher::Event::InitDone),
        watcher::Event::InitApply(o) => read(o).map(watcher::Event::InitApply),
        watcher::Event::Apply(o) => read(o).map(watcher::Event::Apply),
        watcher::Event::Delete(o) => {
            let mut without_status = o.clone();
            if let Some(fields) = without_status.data.as_object_mut() {
                fields.remove("status");
            }
            o.try_parse::<K>()
                .ok()
                .or_else(|| read(without_status))
                .map(watcher::Event::Delete)
        }
    }
}

#[cfg(test)]
mod tests {
    use framelane_api::{VideoJob, videojob::JobPhase};
    use std::sync::Mutex;

    use super::*;

    fn job(status: serde_json::Value) -> DynamicObject {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "framelane.dev/v1alpha1", "kind": "VideoJob",
            "metadata": {"name": "j", "namespace": "ns"},
            "spec": {"model": "anisora", "prompt": "a cat"},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn a_410_from_any_step_of_a_watch_is_an_expiry() {
        let status = |code| {
            Box::new(kube::core::Status {
                code,
                ..Default::default()
            })
        };
        let gone = [
            watcher::Error::WatchError(status(410)),
            watcher::Error::WatchStartFailed(kube::Error::Api(status(410))),
            watcher::Error::InitialListFailed(kube::Error::Api(status(410))),
            watcher::Error::WatchFailed(kube::Error::Api(status(410))),
        ];
        for e in &gone {
            assert_eq!(watch_error_cause(e), "expired", "{e:?}");
        }
        let other = [
            watcher::Error::WatchError(status(500)),
            watcher::Error::WatchStartFailed(kube::Error::Api(status(503))),
            watcher::Error::NoResourceVersion,
        ];
        for e in &other {
            assert_eq!(watch_error_cause(e), "failed", "{e:?}");
        }
        let errors = Family::default();
        count_watch_error(&errors, "VideoJob", &gone[0]);
        count_watch_error(&errors, "VideoJob", &other[0]);
        count_watch_error(&errors, "VideoJob", &gone[1]);
        let count = |cause: &str| {
            errors
                .get_or_create(&WatchErrorLabels {
                    kind: "VideoJob".into(),
                    cause: cause.into(),
                })
                .get()
        };
        assert_eq!((count("expired"), count("failed")), (2, 1));
    }

    #[test]
    fn an_unreadable_object_is_reported_and_left_out_and_its_deletion_still_arrives() {
        let told = Mutex::new(Vec::new());
        let tell = |u: Unreadable| told.lock().unwrap().push(u);
        let good = job(serde_json::json!({"phase": "Queued"}));
        let bad = job(serde_json::json!({"phase": "Paused"}));
        let read = readable_event::<VideoJob>(watcher::Event::Apply(good), &tell);
        let Some(watcher::Event::Apply(j)) = read else {
            panic!("{read:?}")
        };
        assert_eq!(j.status.and_then(|s| s.phase), Some(JobPhase::Queued));
        assert!(told.lock().unwrap().is_empty());

        let read = readable_event::<VideoJob>(watcher::Event::InitApply(bad.clone()), &tell);
        assert!(read.is_none(), "{read:?}");
        let told_now = told.lock().unwrap();
        assert_eq!(told_now.len(), 1);
        assert_eq!(told_now[0].object, "ns/j");
        assert!(
            told_now[0].error.contains("Paused"),
            "{}",
            told_now[0].error
        );
        drop(told_now);

        let read = readable_event::<VideoJob>(watcher::Event::Delete(bad), &tell);
        let Some(watcher::Event::Delete(j)) = read else {
            panic!("{read:?}")
        };
        assert_eq!(j.metadata.name.as_deref(), Some("j"));
    }
}
