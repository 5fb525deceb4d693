//! The CustomResourceDefinitions generated from the types: the only source of `crds/`.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use crate::{ModelLane, VideoJob, VideoModel};

/// Every Framelane CRD, each with the file name it has under `crds/`.
pub fn all() -> Vec<(String, CustomResourceDefinition)> {
    [VideoModel::crd(), ModelLane::crd(), VideoJob::crd()]
        .into_iter()
        .map(|crd| {
            (
                format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or_default()),
                crd,
            )
        })
        .collect()
}

/// A CRD as the YAML committed under `crds/`.
pub fn to_yaml(crd: &CustomResourceDefinition) -> String {
    let body = serde_yaml::to_string(crd).expect("a CRD always serializes to YAML");
    format!("# Generated from the Rust types in api/ by `just crds`; do not edit.\n{body}")
}
