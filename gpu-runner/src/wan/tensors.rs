//! A model's weights by name, each checked against the shape its config implies before a
//! module keeps it. The names are diffusers' (and transformers'); a reader for another layout
//! renames its keys to these.

use tch::{Device, Kind, TchError, Tensor};

/// Looks a tensor up by name: `None` when the weights have no such tensor.
pub type TensorSource<'a> = dyn FnMut(&str) -> Option<Tensor> + 'a;

/// Why a weight cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    #[error(
        "tensor `{name}` is missing (the config implies shape {expected:?}); the weights are \
         incomplete or of another model than config.json describes"
    )]
    Missing { name: String, expected: Vec<i64> },
    #[error(
        "tensor `{name}` has shape {found:?}, but the config implies {expected:?}; the weights \
         and config.json are of different models"
    )]
    Shape {
        name: String,
        expected: Vec<i64>,
        found: Vec<i64>,
    },
    #[error("tensor `{name}`: {source}")]
    Torch { name: String, source: TchError },
}

/// Takes named tensors from a source onto one device in one dtype.
pub(crate) struct Weights<'s, 'a> {
    source: &'s mut TensorSource<'a>,
    device: Device,
    kind: Kind,
}

impl<'s, 'a> Weights<'s, 'a> {
    pub(crate) fn new(source: &'s mut TensorSource<'a>, device: Device, kind: Kind) -> Self {
        Weights {
            source,
            device,
            kind,
        }
    }

    /// The tensor `name`, refused unless its shape is `shape`.
    pub(crate) fn take(&mut self, name: &str, shape: &[i64]) -> Result<Tensor, WeightError> {
        let Some(tensor) = (self.source)(name) else {
            return Err(WeightError::Missing {
                name: name.to_owned(),
                expected: shape.to_vec(),
            });
        };
        let found = tensor.size();
        if found != shape {
            return Err(WeightError::Shape {
                name: name.to_owned(),
                expected: shape.to_vec(),
                found,
            });
        }
        tensor
            .f_to_device(self.device)
            .and_then(|t| t.f_to_kind(self.kind))
            .map_err(|source| WeightError::Torch {
                name: name.to_owned(),
                source,
            })
    }
}
