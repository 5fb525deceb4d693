//! The decision core stays free of I/O: nothing it depends on (normal dependencies, as
//! built for it alone) is a Kubernetes client, an async runtime or an HTTP stack.

use std::process::Command;

const FORBIDDEN: &[&str] = &[
    "kube-client",
    "kube-runtime",
    "tokio",
    "hyper",
    "warp",
    "reqwest",
];

#[test]
fn the_core_depends_on_no_client_runtime_or_http_stack() {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "tree",
            "--offline",
            "-p",
            "framelane-core",
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8(out.stdout).expect("cargo tree prints UTF-8");
    let crates: Vec<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(
        crates.contains(&"framelane-api"),
        "the tree lists the core's dependencies:\n{tree}"
    );
    let found: Vec<&&str> = FORBIDDEN.iter().filter(|f| crates.contains(f)).collect();
    assert!(
        found.is_empty(),
        "framelane-core depends on {found:?}:\n{tree}"
    );
}
