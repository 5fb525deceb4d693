//! Shared mode alternating anisora/phr00t: each switch frees every tensor of the old model
//! (the device allocator's live bytes: on the CPU the shim's counting allocator); Dedicated
//! mode loads its model once; a model whose weights run another mode than it offers is
//! refused. One test per binary: the live-byte count is process-wide.

mod common;

use std::sync::{Arc, Mutex};

use framelane_runner::cache::{CacheError, LaneMode, ModelCache, ModelRef};
use framelane_runner::generate::run_job;
use framelane_runner::sampler::StepControl;
use framelane_runner::wan::pipeline::{MemoryPlan, Mode, Precision, WanPipeline};

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

fn refs() -> Vec<ModelRef> {
    vec![common::model("anisora"), common::model("phr00t")]
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
    let device = common::device();
    let live = || device.stats().unwrap().allocated_current;
    let out = tempfile::tempdir().unwrap();
    refs(); // makes the models before the baseline is taken
    let baseline = live();

    let mut shared = ModelCache::new(
        LaneMode::Shared,
        device,
        Precision::FLOAT32,
        MemoryPlan::default(),
        refs(),
    )
    .unwrap();
    let mut loaded_bytes = std::collections::BTreeMap::new();
    for (i, model) in ["anisora", "phr00t", "anisora", "phr00t", "anisora"]
        .iter()
        .enumerate()
    {
        let pipeline = shared.get(model).unwrap();
        let weights = live() - baseline;
        assert!(weights > 0, "{model}: loading allocated nothing?");
        // The same model takes the same bytes every time it is loaded: nothing accumulates.
        assert_eq!(
            *loaded_bytes.entry(*model).or_insert(weights),
            weights,
            "{model} load {i}"
        );
        let outcome = run_job(
            pipeline,
            &device,
            &common::job(model, &format!("job-{i}"), i as u32),
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
    assert_eq!(live(), baseline, "tensors of an unloaded model survived");
    // The weights the fit check counts are what the allocator saw, plus each transformer's
    // rotary tables (1024 positions x 64 frequencies, cosine and sine, float32: 0.5 MiB).
    for (model, transformers) in [("anisora", 2), ("phr00t", 1)] {
        let counted = WanPipeline::weight_bytes(&common::model(model).spec, Precision::FLOAT32)
            .unwrap() as i64;
        let loaded = loaded_bytes[model];
        assert!(
            loaded >= counted && loaded - counted <= transformers * (1 << 19),
            "{model}: loaded {loaded} bytes, counted {counted}"
        );
    }

    let err = shared.get("wan").err().unwrap();
    assert!(matches!(err, CacheError::UnknownModel { .. }), "{err}");

    let mut dedicated = ModelCache::new(
        LaneMode::Dedicated,
        device,
        Precision::FLOAT32,
        MemoryPlan::default(),
        refs()[1..].to_vec(),
    )
    .unwrap();
    for i in 0..3 {
        let pipeline = dedicated.get("phr00t").unwrap();
        run_job(
            pipeline,
            &device,
            &common::job("phr00t", &format!("d-{i}"), i),
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
        ModelCache::new(
            LaneMode::Dedicated,
            device,
            Precision::FLOAT32,
            MemoryPlan::default(),
            refs()
        ),
        Err(CacheError::DedicatedNeedsOneModel(2))
    ));
    drop(dedicated);

    // A VideoModel offering a mode its weights do not run is refused, and its load leaves
    // nothing behind.
    let before = live();
    let mut dishonest = common::model("anisora");
    dishonest.modes = vec![Mode::TextToVideo, Mode::ImageToVideo];
    let mut cache = ModelCache::new(
        LaneMode::Dedicated,
        device,
        Precision::FLOAT32,
        MemoryPlan::default(),
        vec![dishonest],
    )
    .unwrap();
    let err = cache.get("anisora").err().unwrap();
    assert_eq!(
        err.to_string(),
        "VideoModel \"anisora\" offers [\"t2v\", \"i2v\"] but its weights run i2v only: set its spec.modes to [i2v]"
    );
    assert_eq!(live(), before, "the refused model's weights stayed");
    drop(cache);
    // On a Shared lane it is refused before the loaded model leaves the device.
    let mut dishonest = common::model("anisora");
    dishonest.modes = vec![Mode::TextToVideo, Mode::ImageToVideo];
    let mut shared = ModelCache::new(
        LaneMode::Shared,
        device,
        Precision::FLOAT32,
        MemoryPlan::default(),
        vec![common::model("phr00t"), dishonest],
    )
    .unwrap();
    shared.get("phr00t").unwrap();
    let warm = live();
    assert!(matches!(
        shared.get("anisora"),
        Err(CacheError::Modes { .. })
    ));
    assert_eq!(
        shared.loaded_model(),
        Some("phr00t"),
        "the warm model stays"
    );
    assert_eq!((shared.loads(), live()), (1, warm));
    drop(shared);

    // A generation that panics holding the cache (a bug) poisons its lock: the next job
    // still gets the cache, with the model dropped and loaded afresh.
    let cache = Mutex::new(
        ModelCache::new(
            LaneMode::Dedicated,
            device,
            Precision::FLOAT32,
            MemoryPlan::default(),
            refs()[1..].to_vec(),
        )
        .unwrap(),
    );
    ModelCache::lock(&cache).unwrap().get("phr00t").unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            let _held = cache.lock().unwrap();
            panic!("a bug mid-generation");
        })
        .join()
        .expect_err("the thread panicked");
    });
    assert!(cache.is_poisoned());
    let mut recovered = ModelCache::lock(&cache).unwrap();
    assert!(!cache.is_poisoned());
    assert_eq!(recovered.loaded_model(), None);
    assert_eq!(live(), before, "the dropped model's weights stayed");
    let pipeline = recovered.get("phr00t").unwrap();
    run_job(
        pipeline,
        &device,
        &common::job("phr00t", "after-panic", 9),
        out.path(),
        |_| StepControl::Continue,
    )
    .result
    .unwrap();
    assert_eq!(recovered.loads(), 2);
}
