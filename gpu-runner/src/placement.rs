//! Where a model's parts live: the memory modes (`--memory-mode`), VAE tiling
//! (`--vae-tiling`), and the host store offloaded weights wait in. docs/memory.md explains
//! what each mode keeps where and when to pick it.

use std::collections::HashMap;

use tch::{Device, TchError, Tensor};

use crate::accel::{self, AccelError};

/// `--memory-mode` and `--vae-tiling` take the ModelLane's `spec.runner.memory` values
/// (docs/memory.md): the mode's `auto` resolves by [`place`], tiling's per job by
/// `framelane_core::memory::RunnerMemory::tiles`.
pub use framelane_api::modellane::{MemoryMode, VaeTiling};

/// What a loaded model keeps where: a [`MemoryMode`] resolved for one model on one device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    Resident,
    ExpertSwap,
    ModelOffload,
}

impl Placement {
    /// As `status.memory.memoryMode` and the metrics show it (the ModelLane's spelling).
    pub fn as_str(self) -> &'static str {
        match self {
            Placement::Resident => "resident",
            Placement::ExpertSwap => "expertSwap",
            Placement::ModelOffload => "modelOffload",
        }
    }
}

/// Weight bytes of a model's parts, in the precision it runs in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PartBytes {
    pub text_encoder: u64,
    pub transformer: u64,
    /// The low-noise expert of a two-expert model.
    pub transformer_2: Option<u64>,
    pub vae: u64,
}

impl PartBytes {
    pub fn all(&self) -> u64 {
        self.text_encoder + self.transformer + self.transformer_2.unwrap_or(0) + self.vae
    }

    /// What waits in host memory under `placement`: nothing when resident, both experts
    /// under expert-swap, every part under model-offload.
    pub fn host(&self, placement: Placement) -> u64 {
        match placement {
            Placement::Resident => 0,
            Placement::ExpertSwap => self.transformer + self.transformer_2.unwrap_or(0),
            Placement::ModelOffload => self.all(),
        }
    }

    /// What model-offload needs on the device at most: its largest part.
    pub fn largest(&self) -> u64 {
        [
            self.text_encoder,
            self.transformer,
            self.transformer_2.unwrap_or(0),
            self.vae,
        ]
        .into_iter()
        .max()
        .unwrap_or(0)
    }
}

/// The placement of a model of `bytes` in `mode`, with `auto` resolved first
/// ([`crate::profile::resolve_auto`]; an unresolved `auto` is resident, as on the CPU).
/// Expert-swap of a one-transformer model is resident (nothing to swap). Model-offload: the
/// text encoder, the transformer(s) and the VAE each come to the device for their stage only,
/// as diffusers' `enable_model_cpu_offload`.
pub fn place(mode: MemoryMode, bytes: &PartBytes) -> Placement {
    match mode {
        MemoryMode::Auto | MemoryMode::Resident => Placement::Resident,
        MemoryMode::ExpertSwap if bytes.transformer_2.is_some() => Placement::ExpertSwap,
        MemoryMode::ExpertSwap => Placement::Resident,
        MemoryMode::ModelOffload => Placement::ModelOffload,
    }
}

/// Weights by name, each a host copy the device's allocator does not count (pinned memory
/// next to a GPU; memory outside the counting allocator on a CPU-only runner): where an
/// offloaded part waits. Bringing a part to the device copies its weights into new device
/// tensors; sending it back drops them (weights do not change during inference).
#[derive(Default)]
pub struct HostWeights {
    tensors: HashMap<String, Tensor>,
    bytes: u64,
}

impl HostWeights {
    /// Keeps a host copy of `tensor` under `name` and returns it (it shares the copy's
    /// memory, so a module built from it holds no device memory).
    pub fn keep(&mut self, name: &str, tensor: &Tensor) -> Result<Tensor, AccelError> {
        let copy = accel::host_copy(tensor)?;
        self.bytes += (copy.numel() * copy.kind().elt_size_in_bytes()) as u64;
        let shared = copy.shallow_clone();
        self.tensors.insert(name.to_owned(), copy);
        Ok(shared)
    }

    /// A new tensor on `device` with the weight `name` (a copy even on the CPU, so the
    /// counting allocator sees it); `None` when there is no such weight.
    pub fn to_device(&self, name: &str, device: Device) -> Option<Result<Tensor, TchError>> {
        let host = self.tensors.get(name)?;
        Some(host.f_to_device_(device, host.kind(), true, true))
    }

    /// Bytes the host copies take.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Wan 2.2 A14B in bfloat16: two 28.6 GB experts, umT5-XXL 11.4 GB, the VAE 0.25 GB.
    const A14B: PartBytes = PartBytes {
        text_encoder: 11_400_000_000,
        transformer: 28_600_000_000,
        transformer_2: Some(28_600_000_000),
        vae: 254_000_000,
    };

    #[test]
    fn host_memory_holds_what_the_placement_offloads() {
        assert_eq!(A14B.host(Placement::Resident), 0);
        assert_eq!(A14B.host(Placement::ExpertSwap), 57_200_000_000);
        assert_eq!(A14B.host(Placement::ModelOffload), A14B.all());
    }

    #[test]
    fn each_mode_places_the_model() {
        assert_eq!(place(MemoryMode::Resident, &A14B), Placement::Resident);
        assert_eq!(place(MemoryMode::ExpertSwap, &A14B), Placement::ExpertSwap);
        assert_eq!(
            place(MemoryMode::ModelOffload, &A14B),
            Placement::ModelOffload
        );
        let one = PartBytes {
            transformer_2: None,
            ..A14B
        };
        assert_eq!(
            place(MemoryMode::ExpertSwap, &one),
            Placement::Resident,
            "nothing to swap"
        );
        assert_eq!(
            place(MemoryMode::ModelOffload, &one),
            Placement::ModelOffload
        );
    }
}
