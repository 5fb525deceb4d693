//! A standby hands a review to the leader, which alone decides queue depth: its address is
//! on the leader Lease, read again when the one known stops answering (a failover). Each
//! hand-over is signed (`peer`), so the leader can tell it from a forged one.

use bytes::Bytes;

use super::{LEADER_PATH, Webhook};

impl Webhook {
    /// Posts the review to the leader and returns its AdmissionReview answer.
    pub(super) async fn forward(&self, body: Bytes) -> Result<Vec<u8>, String> {
        let forwarder = self
            .forwarder
            .read()
            .expect("forwarder lock")
            .clone()
            .ok_or("no CA loaded yet")?;
        let signed = self.peers.sign(&body).map_err(|e| e.to_string())?;
        let known = self.elector.leader_endpoint();
        let answer = match &known {
            Some(endpoint) => {
                forwarder
                    .post(endpoint, LEADER_PATH, body.clone(), &signed)
                    .await
            }
            None => Err("no leader is known yet".into()),
        };
        // No leader known, or the one known stopped answering (a failover): read the Lease
        // again and try the leader it names.
        let (endpoint, answer) = match answer {
            Ok(answer) => (known.unwrap_or_default(), answer),
            Err(first) => {
                let endpoint = self
                    .elector
                    .refresh_leader_endpoint()
                    .await
                    .map_err(|e| format!("{first}; reading the leader Lease: {e}"))?
                    .filter(|e| Some(e) != known.as_ref())
                    .ok_or(first)?;
                let answer = forwarder
                    .post(&endpoint, LEADER_PATH, body, &signed)
                    .await?;
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
