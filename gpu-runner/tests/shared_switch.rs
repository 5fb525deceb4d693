//! A Shared runner's switch from host memory, on the CPU standing in for a GPU (the shim's
//! counting allocator is "the device"; host copies wait in memory it does not count): with a
//! host budget that holds both tiny models, in every memory mode, a model switched away from
//! leaves the device whole, and a switch back brings it from host memory (its files deleted by
//! then) to the same device bytes and the same video, byte for byte. With a budget one byte too
//! small, a switch reads the files again; a budget that cannot hold a model's offloaded parts
//! is refused. One test per binary: the live-byte count is process-wide.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use framelane_runner::cache::{CacheError, LaneMode, LoadedFrom, ModelCache, ModelRef};
use framelane_runner::generate::run_job;
use framelane_runner::placement::MemoryMode;
use framelane_runner::sampler::StepControl;
use framelane_runner::wan::pipeline::{MemoryPlan, Precision, WanPipeline};

/// A Shared cache of anisora and phr00t on a copy of the tiny models in `dir`, and the bytes
/// of both models' weights.
fn shared(dir: &Path, mode: MemoryMode) -> (ModelCache, u64) {
    let copied = Command::new("cp")
        .arg("-r")
        .arg(common::models())
        .arg(dir)
        .status()
        .unwrap();
    assert!(copied.success());
    let refs: Vec<ModelRef> = ["anisora", "phr00t"]
        .iter()
        .map(|m| common::model_at(m, dir))
        .collect();
    let weights = refs
        .iter()
        .map(|r| {
            WanPipeline::part_bytes(&r.spec, Precision::FLOAT32)
                .unwrap()
                .all()
        })
        .sum();
    let plan = MemoryPlan {
        mode,
        ..MemoryPlan::default()
    };
    let cache = ModelCache::new(
        LaneMode::Shared,
        common::device(),
        Precision::FLOAT32,
        plan,
        refs,
    )
    .unwrap();
    (cache, weights)
}

#[test]
fn a_switch_back_comes_from_host_memory_when_the_budget_holds_both_models() {
    let device = common::device();
    let live = || device.stats().unwrap().allocated_current;
    let out = tempfile::tempdir().unwrap();
    common::models(); // makes the models before the baseline is taken
    let baseline = live();
    let models = ["anisora", "phr00t"];
    for mode in [
        MemoryMode::Resident,
        MemoryMode::ExpertSwap,
        MemoryMode::ModelOffload,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (cache, weights) = shared(&dir.path().join("models"), mode);
        let mut cache = cache.with_host_budget(weights).unwrap();
        assert!(
            cache.keeps_in_host(),
            "{mode:?}: a budget of {weights} holds both"
        );
        // Device bytes after each model's load, and its video.
        let mut first: BTreeMap<&str, (i64, String)> = BTreeMap::new();
        for round in 0..2 {
            if round == 1 {
                // From here on nothing can be read from the files.
                std::fs::remove_dir_all(dir.path()).unwrap();
            }
            for (seed, model) in models.iter().enumerate() {
                let pipeline = cache.get(model).unwrap_or_else(|e| panic!("{mode:?}: {e}"));
                let on_device = live() - baseline;
                let job = common::job(model, &format!("{model}-{round}"), seed as u32);
                let video = run_job(pipeline, &device, &job, out.path(), |_| {
                    StepControl::Continue
                })
                .result
                .unwrap_or_else(|e| panic!("{mode:?} {model} round {round}: {e}"));
                let from = cache.last_load_from();
                let label = format!("{mode:?} {model} round {round}");
                println!("{label}: from {from:?}, {on_device} bytes on the device");
                if round == 0 {
                    assert_eq!(from, LoadedFrom::Files, "{label}");
                    first.insert(model, (on_device, video.sha256));
                    continue;
                }
                assert_eq!(from, LoadedFrom::Host, "{label}");
                let (bytes, sha256) = &first[model];
                assert_eq!(
                    on_device, *bytes,
                    "{label}: the parked model left something on the device, or came back incomplete"
                );
                assert_eq!(video.sha256, *sha256, "{label}: another video");
            }
        }
        assert_eq!(cache.loads(), 4, "{mode:?}: every switch is a load");
        assert_eq!(
            cache.host_bytes(),
            weights,
            "{mode:?}: host memory holds each model's weights once"
        );
        drop(cache);
        assert_eq!(
            live(),
            baseline,
            "{mode:?}: dropping the cache frees it all"
        );
    }

    // One byte short: the models do not wait in host memory, so a switch reads the files,
    // which are gone.
    let dir = tempfile::tempdir().unwrap();
    let (cache, weights) = shared(&dir.path().join("models"), MemoryMode::Resident);
    let mut cache = cache.with_host_budget(weights - 1).unwrap();
    assert!(!cache.keeps_in_host());
    for model in models {
        cache.get(model).unwrap();
        assert_eq!(cache.last_load_from(), LoadedFrom::Files);
    }
    assert_eq!(
        cache.host_bytes(),
        0,
        "resident without parking keeps no host copy"
    );
    std::fs::remove_dir_all(dir.path()).unwrap();
    let err = cache.get("anisora").err().expect("the files are gone");
    assert!(matches!(err, CacheError::Load { .. }), "{err}");
    drop(cache);
    assert_eq!(live(), baseline);

    // Under model-offload every part waits in host memory: a budget that cannot hold the
    // larger model is refused before anything loads, naming what to change.
    let dir = tempfile::tempdir().unwrap();
    let (cache, _) = shared(&dir.path().join("models"), MemoryMode::ModelOffload);
    let anisora = WanPipeline::part_bytes(&common::model("anisora").spec, Precision::FLOAT32)
        .unwrap()
        .all();
    let err = cache.with_host_budget(anisora - 1).err().expect("refused");
    assert!(matches!(err, CacheError::HostMemory { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("spec.runner.resources.limits.memory"),
        "{err}"
    );
}
