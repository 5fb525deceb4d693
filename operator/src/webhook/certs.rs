//! The webhook's certificates: a CA and a serving certificate it signs, kept in one Secret.
//! The API server trusts the CA (the webhook configuration's `caBundle`), so the serving
//! certificate can be renewed at any time without a request failing. The CA itself is
//! renewed with an overlap: the new CA joins the bundle first, and the serving certificate
//! moves to it only once the bundle the API server uses holds it.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::ByteString;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use x509_parser::{extensions::GeneralName, prelude::X509Certificate};

/// How long certificates live, and the names the serving certificate is for.
#[derive(Debug, Clone)]
pub struct Policy {
    pub ca_validity: Duration,
    pub cert_validity: Duration,
    pub names: Vec<String>,
}

impl Policy {
    /// The DNS names of `service` in `namespace`, plus loopback for a webhook run outside
    /// the cluster (the local control plane).
    pub fn for_service(service: &str, namespace: &str, ca: Duration, cert: Duration) -> Policy {
        Policy {
            ca_validity: ca,
            cert_validity: cert,
            names: vec![
                format!("{service}.{namespace}.svc"),
                format!("{service}.{namespace}.svc.cluster.local"),
                format!("{service}.{namespace}"),
                service.to_string(),
                "localhost".into(),
                "127.0.0.1".into(),
            ],
        }
    }

    /// The name clients (the API server, other replicas) verify the certificate against.
    pub fn server_name(&self) -> &str {
        &self.names[0]
    }
}

/// The Secret's contents, PEM.
#[derive(Debug, Clone, PartialEq)]
pub struct Material {
    /// Trusted CAs, the current one first; an older one stays until it expires.
    pub ca_bundle: String,
    pub ca_key: String,
    pub cert: String,
    pub key: String,
}

/// What every replica serves and trusts, read from the Secret (PEM): the CA bundle (the
/// API server's trust, and the replicas' when they reach the leader), the serving chain and
/// its key. Whoever issues the certificates, the operator or cert-manager, writes these keys.
#[derive(Debug, Clone, PartialEq)]
pub struct Serving {
    pub ca_bundle: String,
    pub cert: String,
    pub key: String,
}

impl Serving {
    /// Reads the Secret data; `Err` names each key that is missing, empty or not text.
    pub fn from_data(data: &BTreeMap<String, ByteString>) -> Result<Serving, Vec<&'static str>> {
        let text = |k: &str| {
            String::from_utf8(data.get(k)?.0.clone())
                .ok()
                .filter(|t| !t.trim().is_empty())
        };
        match (text("ca.crt"), text("tls.crt"), text("tls.key")) {
            (Some(ca_bundle), Some(cert), Some(key)) => Ok(Serving {
                ca_bundle,
                cert,
                key,
            }),
            (ca, cert, key) => Err([("ca.crt", ca), ("tls.crt", cert), ("tls.key", key)]
                .into_iter()
                .filter(|(_, v)| v.is_none())
                .map(|(k, _)| k)
                .collect()),
        }
    }

    /// The serving certificate's facts (the first of the chain).
    pub fn serving(&self) -> Result<Info, CertError> {
        Ok(certificates(&self.cert, "tls.crt")?.remove(0))
    }

    /// The facts of the bundle's first CA.
    pub fn ca(&self) -> Result<Info, CertError> {
        Ok(certificates(&self.ca_bundle, "ca.crt")?.remove(0))
    }
}

/// What a rotation changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotation {
    /// A new CA joined the bundle.
    Ca,
    /// A new serving certificate.
    Certificate,
    /// Expired CAs left the bundle.
    Pruned,
}

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the webhook Secret's {0} is not a valid PEM certificate")]
    Parse(&'static str),
}

/// Backdating for clocks a little behind ours.
const SKEW: i64 = 300;

fn at(unix: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(unix).expect("a current time fits")
}

fn serial() -> SerialNumber {
    let bytes: [u8; 16] = rand::random();
    // A positive DER integer.
    let mut bytes = bytes.to_vec();
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

fn new_ca(policy: &Policy, now: i64) -> Result<(String, String, CertificateParams), CertError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("framelane-webhook-ca-{now}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = at(now - SKEW);
    params.not_after = at(now + policy.ca_validity.as_secs() as i64);
    params.serial_number = Some(serial());
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem(), params))
}

fn new_cert(
    policy: &Policy,
    now: i64,
    ca_cert: &str,
    ca_key: &str,
) -> Result<(String, String), CertError> {
    let mut params = CertificateParams::new(policy.names.clone())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, policy.server_name());
    params.distinguished_name = dn;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = at(now - SKEW);
    params.not_after = at(now + policy.cert_validity.as_secs() as i64);
    params.serial_number = Some(serial());
    params.use_authority_key_identifier_extension = true;
    let issuer = Issuer::from_ca_cert_pem(ca_cert, KeyPair::from_pem(ca_key)?)?;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Facts read off one certificate.
#[derive(Debug, Clone)]
pub struct Info {
    pub pem: String,
    pub subject: String,
    pub issuer: String,
    pub serial: String,
    pub not_after: i64,
    pub names: Vec<String>,
}

fn info(block: &str) -> Option<Info> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(block.as_bytes()).ok()?;
    let cert: X509Certificate = pem.parse_x509().ok()?;
    let names = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .map(|n| match n {
                    GeneralName::DNSName(d) => d.to_string(),
                    GeneralName::IPAddress([a, b, c, d]) => format!("{a}.{b}.{c}.{d}"),
                    other => other.to_string(),
                })
                .collect()
        })
        .unwrap_or_default();
    Some(Info {
        pem: block.to_string(),
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        serial: cert.raw_serial_as_string(),
        not_after: cert.validity().not_after.timestamp(),
        names,
    })
}

/// Every certificate in a PEM text.
pub fn certificates(pem: &str, what: &'static str) -> Result<Vec<Info>, CertError> {
    let all: Vec<Info> = pem
        .split_inclusive("-----END CERTIFICATE-----")
        .map(str::trim)
        .filter(|b| !b.is_empty())
        .map(|b| info(&format!("{b}\n")))
        .collect::<Option<_>>()
        .ok_or(CertError::Parse(what))?;
    if all.is_empty() {
        return Err(CertError::Parse(what));
    }
    Ok(all)
}

impl Material {
    /// A new CA and serving certificate.
    pub fn generate(policy: &Policy, now: i64) -> Result<Material, CertError> {
        let (ca, ca_key, _) = new_ca(policy, now)?;
        let (cert, key) = new_cert(policy, now, &ca, &ca_key)?;
        Ok(Material {
            ca_bundle: ca,
            ca_key,
            cert,
            key,
        })
    }

    /// The serving certificate's facts.
    pub fn serving(&self) -> Result<Info, CertError> {
        Ok(certificates(&self.cert, "tls.crt")?.remove(0))
    }

    /// The current CA's facts.
    pub fn ca(&self) -> Result<Info, CertError> {
        Ok(certificates(&self.ca_bundle, "ca.crt")?.remove(0))
    }

    /// What to store next, if anything is due at `now`. A serving certificate or CA is
    /// renewed once less than a third of its life is left. A serving certificate signed by
    /// an older CA moves to the current one only when `bundle_published` (the API server
    /// trusts the current CA).
    pub fn rotate(
        &self,
        policy: &Policy,
        now: i64,
        bundle_published: bool,
    ) -> Result<Option<(Material, Rotation)>, CertError> {
        let cas = certificates(&self.ca_bundle, "ca.crt")?;
        let serving = self.serving()?;
        let current = &cas[0];
        if current.not_after - now < policy.ca_validity.as_secs() as i64 / 3 {
            let (ca, ca_key, _) = new_ca(policy, now)?;
            let mut bundle = ca;
            for old in cas.iter().filter(|c| c.not_after > now) {
                bundle.push_str(&old.pem);
            }
            let next = Material {
                ca_bundle: bundle,
                ca_key,
                ..self.clone()
            };
            return Ok(Some((next, Rotation::Ca)));
        }
        let expiring = serving.not_after - now < policy.cert_validity.as_secs() as i64 / 3;
        let old_issuer = serving.issuer != current.subject;
        let renamed = serving.names != policy.names;
        if (expiring || renamed || old_issuer) && (bundle_published || !old_issuer) {
            let (cert, key) = new_cert(policy, now, &current.pem, &self.ca_key)?;
            let next = Material {
                cert,
                key,
                ..self.clone()
            };
            return Ok(Some((next, Rotation::Certificate)));
        }
        let live: Vec<&Info> = cas
            .iter()
            .enumerate()
            .filter(|(i, c)| *i == 0 || c.not_after > now)
            .map(|(_, c)| c)
            .collect();
        if live.len() < cas.len() && !old_issuer {
            let next = Material {
                ca_bundle: live.iter().map(|c| c.pem.as_str()).collect(),
                ..self.clone()
            };
            return Ok(Some((next, Rotation::Pruned)));
        }
        Ok(None)
    }

    /// The Secret data: `tls.crt` and `tls.key` (type kubernetes.io/tls), `ca.crt`, `ca.key`.
    pub fn to_data(&self) -> BTreeMap<String, ByteString> {
        [
            ("ca.crt", &self.ca_bundle),
            ("ca.key", &self.ca_key),
            ("tls.crt", &self.cert),
            ("tls.key", &self.key),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
        .collect()
    }

    /// Reads the Secret data back; `None` when a key is missing or not text.
    pub fn from_data(data: &BTreeMap<String, ByteString>) -> Option<Material> {
        let text = |k: &str| String::from_utf8(data.get(k)?.0.clone()).ok();
        Some(Material {
            ca_bundle: text("ca.crt")?,
            ca_key: text("ca.key")?,
            cert: text("tls.crt")?,
            key: text("tls.key")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy::for_service(
            "framelane-webhook",
            "framelane-system",
            Duration::from_secs(3000),
            Duration::from_secs(300),
        )
    }

    const T0: i64 = 1_800_000_000;

    #[test]
    fn a_new_pair_is_a_ca_and_a_certificate_for_the_service_it_signs() {
        let m = Material::generate(&policy(), T0).unwrap();
        let (ca, cert) = (m.ca().unwrap(), m.serving().unwrap());
        assert_eq!(cert.issuer, ca.subject);
        assert_eq!(cert.not_after, T0 + 300);
        assert_eq!(ca.not_after, T0 + 3000);
        assert_eq!(cert.names, policy().names);
        assert_eq!(
            Material::from_data(&m.to_data()),
            Some(m.clone()),
            "the Secret round-trips"
        );
        assert!(m.rotate(&policy(), T0 + 100, true).unwrap().is_none());
    }

    #[test]
    fn the_certificate_renews_under_the_same_ca_with_a_third_left() {
        let m = Material::generate(&policy(), T0).unwrap();
        let (next, what) = m.rotate(&policy(), T0 + 201, false).unwrap().unwrap();
        assert_eq!(what, Rotation::Certificate);
        assert_eq!(
            next.ca_bundle, m.ca_bundle,
            "the API server's trust is unchanged"
        );
        assert_ne!(next.serving().unwrap().serial, m.serving().unwrap().serial);
        assert_eq!(next.serving().unwrap().not_after, T0 + 501);
    }

    #[test]
    fn the_ca_renews_with_an_overlap_and_the_certificate_follows_once_published() {
        let m = Material::generate(&policy(), T0).unwrap();
        let (with_new_ca, what) = m.rotate(&policy(), T0 + 2001, false).unwrap().unwrap();
        assert_eq!(what, Rotation::Ca);
        let cas = certificates(&with_new_ca.ca_bundle, "ca.crt").unwrap();
        assert_eq!(cas.len(), 2, "new CA first, the old one still trusted");
        assert_eq!(cas[1].pem, m.ca().unwrap().pem);
        assert_eq!(with_new_ca.cert, m.cert, "still served under the old CA");
        assert!(
            with_new_ca
                .rotate(&policy(), T0 + 2002, false)
                .unwrap()
                .is_none(),
            "waits until the API server trusts the new CA"
        );
        let (moved, what) = with_new_ca
            .rotate(&policy(), T0 + 2002, true)
            .unwrap()
            .unwrap();
        assert_eq!(what, Rotation::Certificate);
        assert_eq!(moved.serving().unwrap().issuer, cas[0].subject);
        let (renewed, _) = moved.rotate(&policy(), T0 + 2999, true).unwrap().unwrap();
        let (pruned, what) = renewed.rotate(&policy(), T0 + 3001, true).unwrap().unwrap();
        assert_eq!(what, Rotation::Pruned, "the old CA expired");
        assert_eq!(certificates(&pruned.ca_bundle, "ca.crt").unwrap().len(), 1);
    }

    #[test]
    fn what_a_replica_serves_is_read_by_key_and_missing_keys_are_named() {
        let m = Material::generate(&policy(), T0).unwrap();
        let mut data = m.to_data();
        let serving = Serving::from_data(&data).unwrap();
        assert_eq!(
            (&serving.ca_bundle, &serving.cert, &serving.key),
            (&m.ca_bundle, &m.cert, &m.key)
        );
        assert_eq!(
            serving.serving().unwrap().serial,
            m.serving().unwrap().serial
        );
        // cert-manager's Secret has no ca.key: a replica does not need it.
        data.remove("ca.key");
        assert!(Serving::from_data(&data).is_ok());
        data.remove("ca.crt");
        data.insert("tls.key".into(), ByteString(b"  ".to_vec()));
        assert_eq!(
            Serving::from_data(&data).unwrap_err(),
            ["ca.crt", "tls.key"]
        );
        assert_eq!(
            Serving::from_data(&BTreeMap::new()).unwrap_err(),
            ["ca.crt", "tls.crt", "tls.key"]
        );
    }

    #[test]
    fn a_damaged_secret_is_reported_by_key() {
        let mut m = Material::generate(&policy(), T0).unwrap();
        m.cert = "not a certificate".into();
        assert_eq!(
            m.rotate(&policy(), T0, true).unwrap_err().to_string(),
            "the webhook Secret's tls.crt is not a valid PEM certificate"
        );
    }
}
