//! Wan 2.x natively on tch: the diffusion transformer, its weights in the diffusers and
//! ComfyUI layouts, and the samplers the checkpoints ship with.
//!
//! - [`scheduler`]: flow UniPC, flow Euler, Euler ancestral, and the expert boundary.

pub mod scheduler;
