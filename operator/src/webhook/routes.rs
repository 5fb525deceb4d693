//! The webhook's HTTP routes: `POST /validate-videojob` and `POST /mutate-videojob` for the
//! API server, and `POST /leader/validate-videojob` where a standby hands a review to the
//! leader.

use std::sync::Arc;

use bytes::Bytes;
use warp::Filter;

use super::Webhook;

/// Reviews are small; a body over this is refused before it is read.
const MAX_BODY: u64 = 3 << 20;

impl Webhook {
    /// The HTTP routes.
    pub fn routes(
        self: Arc<Self>,
    ) -> impl Filter<Extract = (impl warp::Reply,), Error = warp::Rejection> + Clone {
        let api_server = self.clone();
        let mutator = self.clone();
        let standby = self;
        let body = || warp::body::content_length_limit(MAX_BODY).and(warp::body::bytes());
        let validate = warp::path!("validate-videojob")
            .and(body())
            .then(move |b: Bytes| {
                let webhook = api_server.clone();
                async move { json(webhook.review(b, true).await) }
            });
        let leader = warp::path!("leader" / "validate-videojob")
            .and(body())
            .then(move |b: Bytes| {
                let webhook = standby.clone();
                async move { json(webhook.review(b, false).await) }
            });
        let mutate = warp::path!("mutate-videojob")
            .and(body())
            .map(move |b: Bytes| json(mutator.mutate(&b)));
        warp::post().and(validate.or(mutate).unify().or(leader).unify())
    }
}

fn json(body: Vec<u8>) -> warp::http::Response<Vec<u8>> {
    warp::http::Response::builder()
        .header("content-type", "application/json")
        .body(body)
        .expect("a static header is valid")
}
