//! Wan 2.x natively on tch: the diffusion transformer, the umT5 text encoder and the VAE, their
//! weights in the diffusers and ComfyUI layouts, and the samplers the checkpoints ship with.
//!
//! - [`safetensors`]: tensors read one at a time from one or more safetensors files.
//! - [`weights`]: where a transformer's weights are and what they are called.
//! - [`tensors`]: a module's tensors by name, each checked against its expected shape.
//! - [`transformer`]: the transformer's config and forward pass.
//! - [`umt5`]: the umT5 text encoder and the Wan prompt encoding.
//! - [`vae`]: the Wan VAE, decoding and encoding chunk by chunk with a feature cache.
//! - [`scheduler`]: flow UniPC, flow Euler, Euler ancestral, and the expert boundary.
//! - [`recipe`]: a model's solver and schedule, and each job's sampler and noise.
//! - [`components`]: the text encoder's and the VAE's files, in either layout.
//! - [`pipeline`]: a whole model, text or image to video, as diffusers' Wan pipelines run it.

pub mod components;
pub mod pipeline;
pub mod recipe;
pub mod safetensors;
pub mod scheduler;
pub mod tensors;
pub mod transformer;
pub mod umt5;
pub mod vae;
pub mod weights;
