//! A standby hands a review to the leader, which alone decides queue depth: its address is
//! on the leader Lease, read again when the one known stops answering (a failover). Each
//! hand-over is signed (`peer`), so the leader can tell it from a forged one.
//!
//! The whole hand-over, the Lease read included, ends by the review's deadline, well inside
//! the API server's webhook timeout. The leader is told how long the standby still waits
//! ([`ANSWER_WITHIN`]) and takes no slot for a review it could not answer in time: a create
//! the standby had to refuse leaves no hold behind.

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{LEADER_PATH, Webhook};

/// The header with the milliseconds the standby still waits for the leader's answer.
pub const ANSWER_WITHIN: &str = "x-framelane-answer-within-ms";

/// How much of the standby's wait the leader leaves for its answer's way back: it takes a
/// slot only if at least this much of the wait is left.
pub const REPLY_MARGIN: Duration = Duration::from_millis(300);

impl Webhook {
    /// Posts the review to the leader and returns its AdmissionReview answer, or why there
    /// is none by `deadline`.
    pub(super) async fn forward(&self, body: Bytes, deadline: Instant) -> Result<Vec<u8>, String> {
        let forwarder = self
            .forwarder
            .read()
            .expect("forwarder lock")
            .clone()
            .ok_or("no CA loaded yet")?;
        let post = |endpoint: String, body: Bytes| {
            let forwarder = forwarder.clone();
            async move {
                let left = deadline.saturating_duration_since(Instant::now());
                if left <= REPLY_MARGIN {
                    return Err(format!("no answer from the leader at {endpoint} in time"));
                }
                let signed = self.peers.sign(&body).map_err(|e| e.to_string())?;
                forwarder
                    .post(&endpoint, LEADER_PATH, body, &signed, left)
                    .await
                    .map_err(|e| format!("the leader at {endpoint}: {e}"))
            }
        };
        let known = self.elector.leader_endpoint();
        let answer = match &known {
            Some(endpoint) => post(endpoint.clone(), body.clone()).await,
            None => Err("no leader is known yet".into()),
        };
        // No leader known, or the one known refused (a failover): read the Lease again and
        // try the leader it names. The known leader gets the whole wait: one that hangs is
        // not replaced within it anyway (its Lease lasts longer).
        let (endpoint, answer) = match answer {
            Ok(answer) => (known.unwrap_or_default(), answer),
            Err(first) => {
                let read = tokio::time::timeout_at(
                    deadline.into(),
                    self.elector.refresh_leader_endpoint(),
                )
                .await
                .map_err(|_| format!("{first}; the leader Lease could not be read in time"))?;
                let endpoint = read
                    .map_err(|e| format!("{first}; reading the leader Lease: {e}"))?
                    .filter(|e| Some(e) != known.as_ref())
                    .ok_or(first)?;
                let answer = post(endpoint.clone(), body).await?;
                (endpoint, answer)
            }
        };
        match serde_json::from_slice::<serde_json::Value>(&answer) {
            Ok(v)
                if v.pointer("/response/allowed")
                    .is_some_and(|a| a.is_boolean()) =>
            {
                Ok(answer.to_vec())
            }
            _ => Err(format!("the leader at {endpoint} gave no AdmissionReview")),
        }
    }
}
