//! `crds/` is generated from the types; this fails when someone changes a type and forgets
//! `just crds`, or edits a generated file by hand.

use std::{fs, path::Path};

#[test]
fn committed_crds_match_the_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    let mut expected: Vec<String> = Vec::new();
    for (file, crd) in framelane_api::crds::all() {
        let path = dir.join(&file);
        let committed = fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}; run `just crds`", path.display()));
        assert!(
            committed == framelane_api::crds::to_yaml(&crd),
            "{} differs from the Rust types; run `just crds` and commit the result",
            path.display()
        );
        expected.push(file);
    }
    let mut present: Vec<String> = fs::read_dir(&dir)
        .expect("crds/ exists")
        .map(|e| {
            e.expect("readable entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    present.sort();
    expected.sort();
    assert_eq!(
        present, expected,
        "crds/ holds files the types do not generate; run `just crds`"
    );
}
