pub mod tensors;
pub mod vae;
