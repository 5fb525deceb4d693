//! Wan 2.x natively on tch: the diffusion transformer, its weights in the diffusers and
//! ComfyUI layouts, and the samplers the checkpoints ship with.
//!
//! - [`safetensors`]: tensors read one at a time from one or more safetensors files.
//! - [`weights`]: where a transformer's weights are and what they are called.
//! - [`transformer`]: the transformer's config and forward pass.
//! - [`scheduler`]: flow UniPC, flow Euler, Euler ancestral, and the expert boundary.

pub mod safetensors;
pub mod scheduler;
pub mod transformer;
pub mod weights;
