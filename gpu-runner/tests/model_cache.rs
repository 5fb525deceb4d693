//! Shared mode alternating anisora/phr00t: each switch frees every tensor of the old model
//! (counted by the shim's counting CPU allocator); Dedicated mode loads its model once.
//! One test per binary: the live-byte count is process-wide.

mod common;

use std::sync::{Arc, Mutex};

use framelane_runner::accel;
use framelane_runner::cache::{CacheError, LaneMode, ModelCache, PackageRef};
use framelane_runner::generate::run_job;
use framelane_runner::sampler::StepControl;

/// Captures this thread's log lines.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    /// The model-cache events, in order: ("model loaded" | "model unloaded", model).
    fn events(&self) -> Vec<(String, String)> {
        let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .filter_map(|line| {
                let event = ["model unloaded", "model loaded"]
                    .into_iter()
                    .find(|e| line.contains(e))?;
                let model = line.split("model=").nth(1)?.split_whitespace().next()?;
                Some((event.to_owned(), model.trim_matches('"').to_owned()))
            })
            .collect()
    }
}

fn refs() -> Vec<PackageRef> {
    vec![
        PackageRef {
            model: "anisora".to_owned(),
            dir: common::anisora(),
            expected_steps: Some(8),
        },
        PackageRef {
            model: "phr00t".to_owned(),
            dir: common::phr00t(),
            expected_steps: Some(4),
        },
    ]
}

#[test]
fn shared_switching_frees_the_old_model_and_dedicated_loads_once() {
    let logs = Logs::default();
    let writer = logs.clone();
    let _subscriber = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish(),
    );
    let device = common::cpu();
    let out = tempfile::tempdir().unwrap();
    refs(); // makes the packages before the baseline is taken
    let (baseline, baseline_allocs) = accel::cpu_live().unwrap();

    let mut shared = ModelCache::new(LaneMode::Shared, device, refs()).unwrap();
    let mut loaded_bytes = std::collections::BTreeMap::new();
    for (i, model) in ["anisora", "phr00t", "anisora", "phr00t", "anisora"]
        .iter()
        .enumerate()
    {
        let pkg = shared.get(model).unwrap();
        let (with_model, _) = accel::cpu_live().unwrap();
        let weights = with_model - baseline;
        assert!(weights > 0, "{model}: loading allocated nothing?");
        // The same model takes the same bytes every time it is loaded: nothing accumulates.
        assert_eq!(
            *loaded_bytes.entry(*model).or_insert(weights),
            weights,
            "{model} load {i}"
        );
        let outcome = run_job(
            pkg,
            &device,
            &common::job(&format!("job-{i}"), i as u32),
            out.path(),
            |_| StepControl::Continue,
        );
        outcome.result.unwrap();
        let memory = outcome.memory.unwrap();
        assert_eq!(
            memory.status.after_cleanup_allocated_bytes - baseline,
            weights,
            "job {i} left tensors behind"
        );
        assert!(memory.status.peak_allocated_bytes > memory.status.after_cleanup_allocated_bytes);
    }
    assert_eq!(shared.loads(), 5);
    shared.unload().unwrap();
    let event = |e: &str, m: &str| (format!("model {e}"), m.to_owned());
    assert_eq!(
        logs.events(),
        vec![
            event("loaded", "anisora"),
            event("unloaded", "anisora"),
            event("loaded", "phr00t"),
            event("unloaded", "phr00t"),
            event("loaded", "anisora"),
            event("unloaded", "anisora"),
            event("loaded", "phr00t"),
            event("unloaded", "phr00t"),
            event("loaded", "anisora"),
            event("unloaded", "anisora"),
        ],
        "each switch logs the unload before the load"
    );
    assert_eq!(shared.loaded_model(), None);
    assert_eq!(
        accel::cpu_live().unwrap(),
        (baseline, baseline_allocs),
        "tensors of an unloaded model survived"
    );
    // Declared weight bytes are what the counting allocator saw (plus non-parameter buffers).
    for model in ["anisora", "phr00t"] {
        let declared =
            framelane_runner::package::Manifest::read(&common::packages().join(model), None)
                .unwrap()
                .weight_bytes as i64;
        assert!(
            loaded_bytes[model] >= declared,
            "{model}: {} < {declared}",
            loaded_bytes[model]
        );
    }

    let err = shared.get("wan").err().unwrap();
    assert!(matches!(err, CacheError::UnknownModel { .. }), "{err}");

    let mut dedicated = ModelCache::new(LaneMode::Dedicated, device, refs()[1..].to_vec()).unwrap();
    for i in 0..3 {
        let pkg = dedicated.get("phr00t").unwrap();
        run_job(
            pkg,
            &device,
            &common::job(&format!("d-{i}"), i),
            out.path(),
            |_| StepControl::Continue,
        )
        .result
        .unwrap();
    }
    assert_eq!(dedicated.loads(), 1, "Dedicated must keep its model warm");
    assert_eq!(
        logs.events()
            .iter()
            .filter(|(e, _)| e == "model loaded")
            .count(),
        6,
        "one load logged for the Dedicated runner"
    );
    assert!(matches!(
        dedicated.get("anisora"),
        Err(CacheError::UnknownModel { .. })
    ));
    assert!(matches!(
        ModelCache::new(LaneMode::Dedicated, device, refs()),
        Err(CacheError::DedicatedNeedsOneModel(2))
    ));
}
