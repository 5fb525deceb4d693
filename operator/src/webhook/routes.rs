//! The webhook's HTTP routes: `POST /validate-videojob` and `POST /mutate-videojob` for the
//! API server, and `POST /leader/validate-videojob` where a standby hands a review to the
//! leader. A caller that cannot show it is one of those is refused before its body is read.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use warp::{
    Filter,
    http::{Response, StatusCode},
};

use super::{
    Webhook, decide_within,
    forward::ANSWER_WITHIN,
    peer::{self, Refused},
    tls::Peer,
};
use crate::metrics::RefusedCallLabels;

/// The largest review read. A VideoJob's spec is a few KiB (its strings are bounded by the
/// CRD); its metadata can add at most 256 KiB of annotations (the API server's limit, which
/// `kubectl apply`'s last-applied copy counts against) plus labels and managedFields.
pub const MAX_BODY: u64 = 512 << 10;

impl Webhook {
    /// The HTTP routes.
    pub fn routes(
        self: Arc<Self>,
    ) -> impl Filter<Extract = (impl warp::Reply,), Error = std::convert::Infallible> + Clone {
        let (validator, mutator, leader, gate) =
            (self.clone(), self.clone(), self.clone(), self.clone());
        let body = || warp::body::content_length_limit(MAX_BODY).and(warp::body::bytes());
        // The API server's paths: with a client CA, only a connection that showed a
        // certificate it signed.
        let api_server = warp::ext::get::<Peer>().and_then(move |who: Peer| {
            let webhook = gate.clone();
            async move {
                match webhook.client_ca && who == Peer::Anonymous {
                    false => Ok(()),
                    true => Err(warp::reject::custom(Unauthenticated(
                        "api_server",
                        "framelane's webhook takes reviews from the API server only: this connection \
                         showed no client certificate signed by the CA in --webhook-client-ca"
                            .into(),
                    ))),
                }
            }
        })
        .untuple_one();
        // The body is read before the caller is refused: an answer while a client is still
        // sending makes some clients report a broken connection instead of the refusal.
        let validate = warp::path!("validate-videojob")
            .and(warp::query::<HashMap<String, String>>())
            .and(body())
            .and(api_server.clone())
            .then(move |query: HashMap<String, String>, b: Bytes| {
                let webhook = validator.clone();
                let within = decide_within(query.get("timeout").map(String::as_str));
                async move { json(webhook.review(b, within).await) }
            });
        let mutate = warp::path!("mutate-videojob")
            .and(body())
            .and(api_server)
            .map(move |b: Bytes| json(mutator.mutate(&b)));
        let standby = warp::path!("leader" / "validate-videojob")
            .and(warp::header::optional::<String>(peer::HEADER))
            .and(warp::header::optional::<u64>(ANSWER_WITHIN))
            .and(body())
            .and_then(
                move |signed: Option<String>, within: Option<u64>, b: Bytes| {
                    let answer_by = within.map(|ms| Instant::now() + Duration::from_millis(ms));
                    let webhook = leader.clone();
                    async move {
                        if let Err(refused) = webhook.peers.verify(signed.as_deref(), &b) {
                            let status = match refused {
                                Refused::NoKey => StatusCode::SERVICE_UNAVAILABLE,
                                _ => StatusCode::FORBIDDEN,
                            };
                            if status == StatusCode::FORBIDDEN {
                                return Err(warp::reject::custom(Unauthenticated(
                                    "leader",
                                    refused.to_string(),
                                )));
                            }
                            return Ok(text(status, refused.to_string()));
                        }
                        Ok(match webhook.review_as_leader(&b, answer_by) {
                            Ok(answer) => json(answer),
                            Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, why.into()),
                        })
                    }
                },
            );
        warp::post()
            .and(validate.or(mutate).unify().or(standby).unify())
            .recover(move |rejection| {
                let webhook = self.clone();
                async move { Ok::<_, std::convert::Infallible>(webhook.refused(rejection)) }
            })
            .unify()
    }

    /// The answer to a call no route took: the caller's identity, the body's size or the
    /// path was wrong.
    fn refused(&self, rejection: warp::Rejection) -> Response<Vec<u8>> {
        if let Some(Unauthenticated(path, why)) = rejection.find() {
            self.metrics
                .webhook_refused_calls
                .get_or_create(&RefusedCallLabels {
                    path: (*path).into(),
                })
                .inc();
            return text(StatusCode::FORBIDDEN, why.clone());
        }
        if rejection.find::<warp::reject::PayloadTooLarge>().is_some() {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the AdmissionReview is over {} KiB, more than any VideoJob needs: keep large \
                     data out of the job's annotations and labels",
                    MAX_BODY >> 10
                ),
            );
        }
        if rejection.find::<warp::reject::LengthRequired>().is_some() {
            return text(
                StatusCode::LENGTH_REQUIRED,
                "a review needs a Content-Length header".into(),
            );
        }
        if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
            return text(StatusCode::METHOD_NOT_ALLOWED, "reviews are POSTed".into());
        }
        text(
            StatusCode::NOT_FOUND,
            "framelane's webhook serves POST /validate-videojob, /mutate-videojob and /leader/validate-videojob"
                .into(),
        )
    }
}

/// A caller that could not show it is the API server (`api_server`) or a replica (`leader`).
#[derive(Debug)]
struct Unauthenticated(&'static str, String);

impl warp::reject::Reject for Unauthenticated {}

fn json(body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .header("content-type", "application/json")
        .body(body)
        .expect("a static header is valid")
}

fn text(status: StatusCode, message: String) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(message.into_bytes())
        .expect("a static header is valid")
}
