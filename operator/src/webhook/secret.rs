//! The webhook's certificates over their life, on every replica: the Secret is created or
//! filled when it has none (with the operator's own certificates), followed as it changes
//! (the served certificate and the CA used to reach the leader reload in place), and, on the
//! leader, rotated before expiry with the caBundle published into the webhook configuration.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use framelane_contract::{
    api_errors::is_conflict,
    backoff::{Backoff, WATCH_BACKOFF_MAX, jittered, watch_backoff},
};
use futures::StreamExt;
use k8s_openapi::{
    ByteString,
    api::{
        admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration},
        core::v1::Secret,
    },
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
    runtime::{WatchStreamExt, watcher},
};

use super::{
    Webhook,
    certs::{Material, Policy, Rotation, Serving},
    tls::Forwarder,
};
use crate::{config::CertificateSource, metrics::CertificateLabels};

impl Webhook {
    /// Reads the webhook Secret `name` in `namespace` (with the operator's own certificates:
    /// creating or filling it when no replica has yet) and keeps the served certificate and
    /// the CA used to reach the leader current as it changes. Runs on every replica, for the
    /// life of the process.
    pub async fn follow_certificates(
        self: Arc<Self>,
        client: Client,
        namespace: String,
        name: String,
    ) {
        let secrets: Api<Secret> = Api::namespaced(client, &namespace);
        let qualified = format!("{namespace}/{name}");
        if self.source == CertificateSource::Operator {
            let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
            while let Err(e) = ensure_secret(&secrets, &name, &self.policy).await {
                tracing::warn!(secret = qualified, error = %e, "cannot create or fill the webhook Secret; retrying");
                tokio::time::sleep(backoff.next_wait()).await;
            }
        }
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let mut events =
            std::pin::pin!(watcher(secrets, config).backoff(watch_backoff(WATCH_BACKOFF_MAX)));
        // Whether the latest (re)list found the Secret.
        let mut found = false;
        while let Some(event) = events.next().await {
            match event {
                Ok(watcher::Event::Apply(secret) | watcher::Event::InitApply(secret)) => {
                    found = true;
                    if let Err(e) = self.load(&secret) {
                        tracing::error!(
                            secret = qualified,
                            error = %e,
                            "the webhook Secret {qualified} is unusable: {e}; {}{}",
                            self.consequence(),
                            self.hint()
                        );
                    }
                }
                Ok(watcher::Event::Init) => found = false,
                Ok(watcher::Event::InitDone) if !found => tracing::error!(
                    secret = qualified,
                    "the webhook Secret {qualified} does not exist; {}{}",
                    self.consequence(),
                    self.hint()
                ),
                Ok(watcher::Event::Delete(_)) => tracing::warn!(
                    secret = qualified,
                    "the webhook Secret {qualified} was deleted; {}{}",
                    self.consequence(),
                    self.hint()
                ),
                Ok(watcher::Event::InitDone) => {}
                Err(e) => tracing::warn!(error = %e, "watching the webhook Secret failed"),
            }
        }
    }

    /// What a Secret that cannot be used means for this replica now.
    fn consequence(&self) -> &'static str {
        match self.certs.is_loaded() {
            true => "still serving the certificate loaded before",
            false => "the webhook is not ready until it has ca.crt, tls.crt and tls.key",
        }
    }

    fn hint(&self) -> &'static str {
        match self.source {
            CertificateSource::External => {
                " (with --webhook-certificates external, cert-manager's Certificate writes them)"
            }
            CertificateSource::Operator => "",
        }
    }

    fn load(&self, secret: &Secret) -> Result<(), String> {
        let empty = BTreeMap::new();
        let material = Serving::from_data(secret.data.as_ref().unwrap_or(&empty))
            .map_err(|missing| format!("it lacks {}", missing.join(", ")))?;
        let serving = material.serving().map_err(|e| e.to_string())?;
        let ca = material.ca().map_err(|e| e.to_string())?;
        let stale = self
            .forwarder
            .read()
            .expect("forwarder lock")
            .as_ref()
            .is_none_or(|f| f.ca_bundle != material.ca_bundle);
        let forwarder = match stale {
            true => Some(Forwarder::new(
                &material.ca_bundle,
                self.policy.server_name(),
            )?),
            false => None,
        };
        self.certs.load(&material)?;
        self.peers.load(&material.key);
        if let Some(forwarder) = forwarder {
            *self.forwarder.write().expect("forwarder lock") = Some(Arc::new(forwarder));
        }
        for (which, not_after) in [("serving", serving.not_after), ("ca", ca.not_after)] {
            self.metrics
                .certificate_expiry
                .get_or_create(&CertificateLabels {
                    certificate: which.into(),
                })
                .set(not_after);
        }
        tracing::info!(
            serial = serving.serial,
            not_after = serving.not_after,
            ca = ca.subject,
            "loaded the webhook certificate"
        );
        Ok(())
    }
}

/// Makes sure the Secret holds a CA and serving certificate: creates it when missing, and
/// fills it when it exists without usable material (the Helm chart creates it empty, so that
/// `helm uninstall` removes it). Its type and any other keys stay as they are.
async fn ensure_secret(
    secrets: &Api<Secret>,
    name: &str,
    policy: &Policy,
) -> Result<(), kube::Error> {
    let generate = || {
        Material::generate(policy, jiff::Timestamp::now().as_second())
            .expect("generating a key pair and certificate")
    };
    loop {
        let Some(mut secret) = secrets.get_opt(name).await? else {
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(name.into()),
                    ..Default::default()
                },
                type_: Some("kubernetes.io/tls".into()),
                data: Some(generate().to_data()),
                ..Default::default()
            };
            match secrets.create(&PostParams::default(), &secret).await {
                Ok(_) => {
                    tracing::info!(secret = name, "created the webhook CA and certificate");
                    return Ok(());
                }
                // Created meanwhile, by another replica or the chart: read what it holds.
                Err(e) if is_conflict(&e) => continue,
                Err(e) => return Err(e),
            }
        };
        let data = secret.data.get_or_insert_with(Default::default);
        if Material::from_data(data).is_some() {
            return Ok(());
        }
        data.extend(generate().to_data());
        // The read's resourceVersion is the precondition: one replica fills the Secret.
        match secrets.replace(name, &PostParams::default(), &secret).await {
            Ok(_) => {
                tracing::info!(
                    secret = name,
                    "filled the webhook Secret with a new CA and certificate"
                );
                return Ok(());
            }
            Err(e) if is_conflict(&e) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// The leader's duty: keeps `caBundle` of the webhook configurations (validating and
/// mutating, both named `configuration`) equal to the Secret's CA bundle and rotates
/// certificates when due. Runs until the process ends.
pub async fn maintain_certificates(
    client: Client,
    secrets: Api<Secret>,
    secret: String,
    configuration: String,
    policy: Policy,
) {
    let tick = (policy.cert_validity / 10).clamp(Duration::from_secs(1), Duration::from_secs(30));
    loop {
        if let Err(e) = maintain_once(&client, &secrets, &secret, &configuration, &policy).await {
            tracing::warn!(error = %e, "maintaining the webhook certificates failed; retrying");
        }
        tokio::time::sleep(jittered(tick)).await;
    }
}

async fn maintain_once(
    client: &Client,
    secrets: &Api<Secret>,
    name: &str,
    configuration: &str,
    policy: &Policy,
) -> anyhow::Result<()> {
    let material_of = |s: &Secret| s.data.as_ref().and_then(Material::from_data);
    let mut secret = match secrets.get_opt(name).await? {
        Some(secret) if material_of(&secret).is_some() => secret,
        // Deleted or emptied (an admin forcing new certificates): made again, under a new CA
        // that the bundle below publishes at once.
        _ => {
            tracing::warn!(
                secret = name,
                "the webhook Secret is missing or unusable; making it again"
            );
            ensure_secret(secrets, name, policy).await?;
            secrets.get(name).await?
        }
    };
    let material = material_of(&secret)
        .ok_or_else(|| anyhow::anyhow!("Secret {name} lacks ca.crt, ca.key, tls.crt or tls.key"))?;
    let published = publish_ca_bundles(client, configuration, &material.ca_bundle).await?;
    let Some((next, what)) =
        material.rotate(policy, jiff::Timestamp::now().as_second(), published)?
    else {
        return Ok(());
    };
    secret.data = Some(next.to_data());
    secrets
        .replace(name, &PostParams::default(), &secret)
        .await?;
    tracing::info!(secret = name, rotation = ?what, "rotated the webhook certificates");
    if what == Rotation::Ca {
        publish_ca_bundles(client, configuration, &next.ca_bundle).await?;
    }
    Ok(())
}

/// A webhook configuration whose webhooks' `caBundle` the leader keeps.
trait WebhookConfiguration:
    kube::Resource<DynamicType = (), Scope = k8s_openapi::ClusterResourceScope>
    + Clone
    + serde::Serialize
    + serde::de::DeserializeOwned
    + std::fmt::Debug
{
    fn ca_bundles(&mut self) -> Vec<&mut Option<ByteString>>;
}

impl WebhookConfiguration for ValidatingWebhookConfiguration {
    fn ca_bundles(&mut self) -> Vec<&mut Option<ByteString>> {
        self.webhooks
            .iter_mut()
            .flatten()
            .map(|w| &mut w.client_config.ca_bundle)
            .collect()
    }
}

impl WebhookConfiguration for MutatingWebhookConfiguration {
    fn ca_bundles(&mut self) -> Vec<&mut Option<ByteString>> {
        self.webhooks
            .iter_mut()
            .flatten()
            .map(|w| &mut w.client_config.ca_bundle)
            .collect()
    }
}

/// Publishes `bundle` to both configurations named `name`. Returns whether both already had
/// it (the API server trusts the bundle).
async fn publish_ca_bundles(
    client: &Client,
    name: &str,
    bundle: &str,
) -> Result<bool, kube::Error> {
    let validating = publish_ca_bundle(
        &Api::<ValidatingWebhookConfiguration>::all(client.clone()),
        name,
        bundle,
    )
    .await?;
    let mutating = publish_ca_bundle(
        &Api::<MutatingWebhookConfiguration>::all(client.clone()),
        name,
        bundle,
    )
    .await?;
    Ok(validating && mutating)
}

/// Sets every webhook's `caBundle` in the configuration to `bundle`. Returns whether it
/// already was, also when the configuration does not exist (then nothing calls it yet).
async fn publish_ca_bundle<K: WebhookConfiguration>(
    configurations: &Api<K>,
    name: &str,
    bundle: &str,
) -> Result<bool, kube::Error> {
    let Some(mut configuration) = configurations.get_opt(name).await? else {
        return Ok(true);
    };
    let wanted = ByteString(bundle.as_bytes().to_vec());
    let mut bundles = configuration.ca_bundles();
    if bundles.iter().all(|b| b.as_ref() == Some(&wanted)) {
        return Ok(true);
    }
    for b in bundles.iter_mut() {
        **b = Some(wanted.clone());
    }
    configurations
        .replace(name, &PostParams::default(), &configuration)
        .await?;
    tracing::info!(
        configuration = name,
        kind = K::kind(&()).as_ref(),
        "published the webhook CA bundle"
    );
    Ok(false)
}
