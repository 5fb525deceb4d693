pub mod tensors;
pub mod umt5;
pub mod vae;
