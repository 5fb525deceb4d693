//! Names that several parts must agree on: labels, annotations, the finalizer and the
//! runner's environment. Defined once here; condition types and reasons are in `reasons`.

/// Label on runner pods and heartbeat Leases: the lane they belong to.
pub const LABEL_LANE: &str = "framelane.dev/lane";
/// Label on runner pods: the model a Dedicated lane's pod serves, or `shared`.
pub const LABEL_MODEL: &str = "framelane.dev/model";
/// Label on heartbeat Leases, marking them as runner heartbeats.
pub const LABEL_RUNNER: &str = "framelane.dev/runner";
/// Annotation on a heartbeat Lease: the model the runner has loaded now.
pub const ANNOTATION_LOADED_MODEL: &str = "framelane.dev/loaded-model";
/// Annotation on a heartbeat Lease: the runner's GPU memory, budget, memory mode and model
/// shapes (versioned JSON, `framelane_core::memory::RunnerMemory`), for the fit check.
pub const ANNOTATION_MEMORY: &str = "framelane.dev/memory";
/// Finalizer on a running VideoJob, so deleting it stops its runner before the slot is freed.
pub const JOB_FINALIZER: &str = "framelane.dev/cancel";
/// The allocator setting every runner pod carries unless its lane overrides it.
pub const ALLOC_CONF_ENV: &str = "PYTORCH_CUDA_ALLOC_CONF";
/// Expandable segments keep a model switch from fragmenting GPU memory into OOMs.
pub const ALLOC_CONF_DEFAULT: &str = "expandable_segments:True";
/// Value of [`LABEL_MODEL`] on a Shared lane's pods.
pub const SHARED_MODEL_LABEL: &str = "shared";
