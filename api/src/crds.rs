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
    let body: String = body
        .lines()
        .map(|line| quote_yaml11_bool(line) + "\n")
        .collect();
    format!("# Generated from the Rust types in api/ by `just crds`; do not edit.\n{body}")
}

/// Quotes a plain scalar that YAML 1.1 reads as a boolean (`on`, `off`, `yes`, `no`, ...):
/// serde_yaml writes YAML 1.2, but kubectl and Helm read YAML 1.1, where the enum value
/// `off` of `vaeTiling` would become `false`.
fn quote_yaml11_bool(line: &str) -> String {
    const BOOLS: [&str; 6] = ["y", "n", "yes", "no", "on", "off"];
    let split = line.rfind(": ").map(|i| i + 2).or_else(|| {
        line.trim_start()
            .starts_with("- ")
            .then(|| line.find("- ").unwrap() + 2)
    });
    match split {
        Some(at) if BOOLS.contains(&line[at..].to_ascii_lowercase().as_str()) => {
            format!("{}'{}'", &line[..at], &line[at..])
        }
        _ => line.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_scalars_yaml_1_1_reads_as_booleans_are_quoted() {
        assert_eq!(quote_yaml11_bool("        - off"), "        - 'off'");
        assert_eq!(quote_yaml11_bool("  default: On"), "  default: 'On'");
        assert_eq!(quote_yaml11_bool("  served: true"), "  served: true");
        assert_eq!(quote_yaml11_bool("  - auto"), "  - auto");
        let lanes = to_yaml(
            &all()
                .into_iter()
                .find(|(f, _)| f.contains("modellanes"))
                .unwrap()
                .1,
        );
        assert!(lanes.contains("- 'off'") && lanes.contains("- 'on'"));
    }
}
