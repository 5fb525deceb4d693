//! Who may call the leader path: only another replica. A standby signs each review it hands
//! on with an HMAC-SHA256 keyed from the webhook Secret's `tls.key`, which only the
//! operator's service account can read; the leader checks it. The signature covers the time
//! it was made, so a captured request stops working after a short window.
//!
//! The Secret's key rotates with the serving certificate: the leader accepts the current key
//! and the one before it, so replicas that reload the Secret a moment apart still agree.

use std::{
    sync::RwLock,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ring::{digest, hmac};

/// The header a standby's signature travels in: `t=<unix seconds>,mac=<hex>`.
pub const HEADER: &str = "x-framelane-peer";

/// How far a signature's time may be from the leader's clock.
const WINDOW: Duration = Duration::from_secs(30);

/// Why the leader refuses a call on its path.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refused {
    #[error("no {HEADER} header: the leader path takes reviews from framelane's own replicas only")]
    Missing,
    #[error("the {HEADER} header is malformed (expected t=<unix seconds>,mac=<hex>)")]
    Malformed,
    #[error("the {HEADER} signature is older or newer than {}s", WINDOW.as_secs())]
    Stale,
    #[error("the {HEADER} signature does not match this replica's key")]
    Mismatch,
    #[error("this replica has not loaded the webhook Secret yet")]
    NoKey,
}

/// The keys derived from the webhook Secret's `tls.key`: the current one and the one before.
#[derive(Default)]
pub struct PeerKeys {
    keys: RwLock<(Option<hmac::Key>, Option<hmac::Key>, Vec<u8>)>,
}

impl PeerKeys {
    /// Takes the Secret's private key (PEM); a new one becomes current, the old one stays
    /// accepted.
    pub fn load(&self, tls_key: &str) {
        let seed = digest::digest(&digest::SHA256, tls_key.as_bytes());
        let mut keys = self.keys.write().expect("peer key lock");
        if keys.2 == seed.as_ref() {
            return;
        }
        let key = hmac::Key::new(hmac::HMAC_SHA256, seed.as_ref());
        keys.1 = keys.0.replace(key);
        keys.2 = seed.as_ref().to_vec();
    }

    /// The header value that vouches for `body`, made now.
    pub fn sign(&self, body: &[u8]) -> Result<String, Refused> {
        let keys = self.keys.read().expect("peer key lock");
        let key = keys.0.as_ref().ok_or(Refused::NoKey)?;
        let t = unix_now();
        let mac = hmac::sign(key, &message(t, body));
        Ok(format!("t={t},mac={}", hex(mac.as_ref())))
    }

    /// Whether `header` vouches for `body`.
    pub fn verify(&self, header: Option<&str>, body: &[u8]) -> Result<(), Refused> {
        let header = header.ok_or(Refused::Missing)?;
        let (t, mac) = parse(header).ok_or(Refused::Malformed)?;
        if unix_now().abs_diff(t) > WINDOW.as_secs() {
            return Err(Refused::Stale);
        }
        let keys = self.keys.read().expect("peer key lock");
        if keys.0.is_none() {
            return Err(Refused::NoKey);
        }
        let signed = message(t, body);
        [&keys.0, &keys.1]
            .into_iter()
            .flatten()
            .any(|key| hmac::verify(key, &signed, &mac).is_ok())
            .then_some(())
            .ok_or(Refused::Mismatch)
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn message(t: u64, body: &[u8]) -> Vec<u8> {
    let mut m = format!("framelane leader path\n{t}\n").into_bytes();
    m.extend_from_slice(body);
    m
}

fn parse(header: &str) -> Option<(u64, Vec<u8>)> {
    let (t, mac) = header.split_once(',')?;
    let t = t.strip_prefix("t=")?.parse().ok()?;
    let mac = mac.strip_prefix("mac=")?;
    if mac.len() % 2 != 0 {
        return None;
    }
    let bytes = (0..mac.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(mac.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    Some((t, bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_holds_for_its_body_and_key_only() {
        let keys = PeerKeys::default();
        assert_eq!(keys.sign(b"x"), Err(Refused::NoKey));
        keys.load("key one");
        let header = keys.sign(b"review").unwrap();
        assert_eq!(keys.verify(Some(&header), b"review"), Ok(()));
        assert_eq!(
            keys.verify(Some(&header), b"another review"),
            Err(Refused::Mismatch)
        );
        assert_eq!(keys.verify(None, b"review"), Err(Refused::Missing));
        assert_eq!(
            keys.verify(Some("t=1,mac=zz"), b"review"),
            Err(Refused::Malformed)
        );

        let other = PeerKeys::default();
        other.load("key two");
        assert_eq!(
            other.verify(Some(&header), b"review"),
            Err(Refused::Mismatch)
        );
    }

    #[test]
    fn the_key_before_a_rotation_is_still_accepted_and_the_one_before_that_is_not() {
        let (leader, standby) = (PeerKeys::default(), PeerKeys::default());
        leader.load("old");
        standby.load("old");
        let before = standby.sign(b"r").unwrap();
        leader.load("new");
        leader.load("new");
        assert_eq!(leader.verify(Some(&before), b"r"), Ok(()));
        standby.load("new");
        assert_eq!(
            leader.verify(Some(&standby.sign(b"r").unwrap()), b"r"),
            Ok(())
        );
        leader.load("newer");
        assert_eq!(leader.verify(Some(&before), b"r"), Err(Refused::Mismatch));
    }

    #[test]
    fn an_old_signature_is_refused() {
        let keys = PeerKeys::default();
        keys.load("k");
        let t = unix_now() - 120;
        let mac = {
            let guard = keys.keys.read().unwrap();
            hmac::sign(guard.0.as_ref().unwrap(), &message(t, b"r"))
        };
        let header = format!("t={t},mac={}", hex(mac.as_ref()));
        assert_eq!(keys.verify(Some(&header), b"r"), Err(Refused::Stale));
    }
}
