//! Writes Framelane's CRDs to the directory given as the only argument (`just crds`).

use std::{fs, path::PathBuf, process::ExitCode};

fn main() -> ExitCode {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: crdgen <directory>   (for example: crdgen crds)");
        return ExitCode::from(2);
    };
    if let Err(e) = fs::create_dir_all(&dir) {
        eprintln!("cannot create {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    for (file, crd) in framelane_api::crds::all() {
        let path = dir.join(file);
        if let Err(e) = fs::write(&path, framelane_api::crds::to_yaml(&crd)) {
            eprintln!("cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("wrote {}", path.display());
    }
    ExitCode::SUCCESS
}
