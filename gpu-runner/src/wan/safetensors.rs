//! Tensors read one at a time from safetensors files, straight into libtorch tensors.
//!
//! Opening a file parses only its JSON header. A tensor is read when it is asked for, with
//! positional reads of at most [`CHUNK_BYTES`] copied (and converted) straight into the tensor
//! on its device, so loading a model holds the weights plus one chunk in host memory (tch's
//! own reader reads whole files first).
//!
//! Several files form one namespace: the shards of a diffusers checkpoint, ComfyUI split
//! files, or one AllInOne file whose components live under different prefixes
//! ([`TensorFiles::find_prefixes`] finds them). The handle is cheap to clone, so the
//! transformer, text encoder and VAE loaders can share one open AllInOne file.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use tch::{Device, Kind, TchError, Tensor};

/// Headers larger than this are refused before being read (real ones are a few MB).
const MAX_HEADER_BYTES: u64 = 256 << 20;

/// Bytes read per chunk while filling a tensor: loading holds no more than this in host
/// memory beyond the weights themselves. Below glibc's default mmap threshold (128 KiB), so
/// chunk buffers are recycled on the heap; larger ones are mmapped and freed per tensor, which
/// raises that threshold and leaves heap holes between the weights.
pub const CHUNK_BYTES: usize = 64 << 10;

/// Why a safetensors file or one of its tensors cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum SafetensorsError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a safetensors file: {reason}")]
    Header { path: PathBuf, reason: String },
    #[error("tensor `{name}` is in both {first} and {second}; pass each file of a checkpoint once")]
    Duplicate {
        name: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("tensor `{name}` is not in {files}")]
    NotFound { name: String, files: String },
    #[error(
        "tensor `{name}` in {path} has dtype {dtype}; a weight must be F32, F16, BF16, F8_E4M3 or F8_E5M2"
    )]
    NotFloat {
        name: String,
        path: PathBuf,
        dtype: String,
    },
    #[error("tensor `{name}` in {path}: {source}")]
    Torch {
        name: String,
        path: PathBuf,
        source: TchError,
    },
}

/// A tensor's element type as safetensors names it.
#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    #[serde(rename = "BOOL")]
    Bool,
    U8,
    I8,
    I16,
    I32,
    I64,
    F16,
    BF16,
    F32,
    F64,
    #[serde(rename = "F8_E4M3")]
    F8E4M3,
    #[serde(rename = "F8_E5M2")]
    F8E5M2,
}

impl Dtype {
    fn kind(self) -> Kind {
        match self {
            Dtype::Bool => Kind::Bool,
            Dtype::U8 => Kind::Uint8,
            Dtype::I8 => Kind::Int8,
            Dtype::I16 => Kind::Int16,
            Dtype::I32 => Kind::Int,
            Dtype::I64 => Kind::Int64,
            Dtype::F16 => Kind::Half,
            Dtype::BF16 => Kind::BFloat16,
            Dtype::F32 => Kind::Float,
            Dtype::F64 => Kind::Double,
            Dtype::F8E4M3 => Kind::Float8e4m3fn,
            Dtype::F8E5M2 => Kind::Float8e5m2,
        }
    }

    fn is_float(self) -> bool {
        matches!(
            self,
            Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64 | Dtype::F8E4M3 | Dtype::F8E5M2
        )
    }

    pub fn is_fp8(self) -> bool {
        matches!(self, Dtype::F8E4M3 | Dtype::F8E5M2)
    }
}

/// Where one tensor lives and what it holds.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub dtype: Dtype,
    pub shape: Vec<i64>,
    file: usize,
    /// Absolute byte range in the file.
    start: u64,
    len: u64,
}

#[derive(Deserialize)]
struct HeaderEntry {
    dtype: Dtype,
    shape: Vec<i64>,
    data_offsets: [u64; 2],
}

struct Inner {
    files: Vec<(PathBuf, File)>,
    tensors: BTreeMap<String, TensorInfo>,
}

/// One or more safetensors files read as one set of named tensors.
#[derive(Clone)]
pub struct TensorFiles {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for TensorFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorFiles")
            .field("files", &self.describe())
            .field("tensors", &self.inner.tensors.len())
            .finish()
    }
}

impl TensorFiles {
    /// Opens the files and reads their headers. A name in two files is refused.
    pub fn open<P: AsRef<Path>>(paths: &[P]) -> Result<TensorFiles, SafetensorsError> {
        let mut files = Vec::with_capacity(paths.len());
        let mut tensors: BTreeMap<String, TensorInfo> = BTreeMap::new();
        for (index, path) in paths.iter().enumerate() {
            let path = path.as_ref().to_path_buf();
            let (file, header) = read_header(&path)?;
            for (name, info) in header {
                let info = TensorInfo {
                    file: index,
                    ..info
                };
                if let Some(first) = tensors.get(&name) {
                    // Names are unique within one header, so the first is in an earlier file.
                    let first: &(PathBuf, File) = &files[first.file];
                    return Err(SafetensorsError::Duplicate {
                        name,
                        first: first.0.clone(),
                        second: path,
                    });
                }
                tensors.insert(name, info);
            }
            files.push((path, file));
        }
        Ok(TensorFiles {
            inner: Arc::new(Inner { files, tensors }),
        })
    }

    /// The file paths, comma-separated, for messages.
    pub fn describe(&self) -> String {
        let paths: Vec<String> = self
            .inner
            .files
            .iter()
            .map(|(p, _)| p.display().to_string())
            .collect();
        paths.join(", ")
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.inner.tensors.keys().map(String::as_str)
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.inner.tensors.get(name)
    }

    /// The file that holds `info`.
    pub fn path_of(&self, info: &TensorInfo) -> &Path {
        &self.inner.files[info.file].0
    }

    /// Every prefix `p` for which `p + marker` names a tensor, e.g. the marker
    /// `head.modulation` finds `model.diffusion_model.` in a ComfyUI checkpoint and `""` in a
    /// bare diffusion-model file.
    pub fn find_prefixes(&self, marker: &str) -> Vec<String> {
        self.names()
            .filter_map(|name| name.strip_suffix(marker))
            .filter(|prefix| prefix.is_empty() || prefix.ends_with('.'))
            .map(str::to_owned)
            .collect()
    }

    /// Reads a floating-point tensor onto `device` as `kind`. Float8 weights are converted as
    /// they are copied; a float8 `X.weight` beside an `X.scale_weight` (ComfyUI's scaled fp8)
    /// is multiplied by that scale in float32 first.
    pub fn weight(
        &self,
        name: &str,
        kind: Kind,
        device: Device,
    ) -> Result<Tensor, SafetensorsError> {
        let info = self.require(name)?;
        if !info.dtype.is_float() {
            return Err(SafetensorsError::NotFloat {
                name: name.to_owned(),
                path: self.path_of(info).to_path_buf(),
                dtype: format!("{:?}", info.dtype),
            });
        }
        let scale = self.scale_name(name, info);
        let torch = |source| SafetensorsError::Torch {
            name: name.to_owned(),
            path: self.path_of(info).to_path_buf(),
            source,
        };
        match scale {
            Some(scale) => {
                let factor = self.weight(&scale, Kind::Float, device)?;
                self.read(name, info, Kind::Float, device)?
                    .f_mul(&factor)
                    .and_then(|w| w.f_to_kind(kind))
                    .map_err(torch)
            }
            None => self.read(name, info, kind, device),
        }
    }

    /// A float8 tensor as stored, on `device`, with its float32 scale (0-dim): the `X.scale_weight`
    /// beside a float8 `X.weight` (ComfyUI's scaled fp8), or 1. `None` when `name` is not
    /// float8.
    pub fn fp8(
        &self,
        name: &str,
        device: Device,
    ) -> Result<Option<(Tensor, Tensor)>, SafetensorsError> {
        let info = self.require(name)?;
        if !info.dtype.is_fp8() {
            return Ok(None);
        }
        let values = self.read(name, info, info.dtype.kind(), device)?;
        let scale = match self.scale_name(name, info) {
            Some(scale) => self
                .weight(&scale, Kind::Float, device)?
                .f_reshape([])
                .map_err(|source| SafetensorsError::Torch {
                    name: scale.clone(),
                    path: self.path_of(info).to_path_buf(),
                    source,
                })?,
            None => Tensor::from(1f32).to_device(device),
        };
        Ok(Some((values, scale)))
    }

    /// The scale of a float8 `X.weight` in ComfyUI's scaled fp8, `X.scale_weight`, if the
    /// files have it.
    fn scale_name(&self, name: &str, info: &TensorInfo) -> Option<String> {
        name.strip_suffix(".weight")
            .map(|stem| format!("{stem}.scale_weight"))
            .filter(|scale| info.dtype.is_fp8() && self.info(scale).is_some())
    }

    fn require(&self, name: &str) -> Result<&TensorInfo, SafetensorsError> {
        self.info(name).ok_or_else(|| SafetensorsError::NotFound {
            name: name.to_owned(),
            files: self.describe(),
        })
    }

    /// Fills a new `kind` tensor on `device` from the file, [`CHUNK_BYTES`] at a time.
    fn read(
        &self,
        name: &str,
        info: &TensorInfo,
        kind: Kind,
        device: Device,
    ) -> Result<Tensor, SafetensorsError> {
        let (path, file) = &self.inner.files[info.file];
        let torch = |source| SafetensorsError::Torch {
            name: name.to_owned(),
            path: path.clone(),
            source,
        };
        let stored = info.dtype.kind();
        let element = stored.elt_size_in_bytes();
        let numel = info.len as usize / element;
        let out = Tensor::f_empty(info.shape.as_slice(), (kind, device)).map_err(torch)?;
        let flat = out.f_view([-1]).map_err(torch)?;
        let per_chunk = CHUNK_BYTES / element;
        let mut buffer = vec![0u8; per_chunk.min(numel) * element];
        let mut done = 0;
        while done < numel {
            let n = per_chunk.min(numel - done);
            let bytes = &mut buffer[..n * element];
            file.read_exact_at(bytes, info.start + (done * element) as u64)
                .map_err(|source| SafetensorsError::Io {
                    path: path.clone(),
                    source,
                })?;
            let chunk = Tensor::f_from_data_size(bytes, &[n as i64], stored).map_err(torch)?;
            flat.f_narrow(0, done as i64, n as i64)
                .and_then(|mut part| part.f_copy_(&chunk))
                .map_err(torch)?;
            done += n;
        }
        Ok(out)
    }
}

/// Parses the header: an 8-byte little-endian length, then that many bytes of JSON mapping
/// names to dtype, shape and byte offsets relative to the end of the header.
fn read_header(path: &Path) -> Result<(File, Vec<(String, TensorInfo)>), SafetensorsError> {
    let io = |source| SafetensorsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let bad = |reason: String| SafetensorsError::Header {
        path: path.to_path_buf(),
        reason,
    };
    let file = File::open(path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    let mut len_bytes = [0u8; 8];
    file.read_exact_at(&mut len_bytes, 0)
        .map_err(|_| bad(format!("{file_len} bytes is too short for a header")))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_BYTES || 8 + header_len > file_len {
        return Err(bad(format!(
            "its header claims {header_len} bytes but the file has {file_len}"
        )));
    }
    let mut json = vec![0u8; header_len as usize];
    file.read_exact_at(&mut json, 8).map_err(io)?;
    let mut map: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&json).map_err(|e| bad(format!("header JSON: {e}")))?;
    map.remove("__metadata__");
    let data_start = 8 + header_len;
    let mut tensors = Vec::with_capacity(map.len());
    for (name, value) in map {
        let entry: HeaderEntry =
            serde_json::from_value(value).map_err(|e| bad(format!("entry for `{name}`: {e}")))?;
        let [begin, end] = entry.data_offsets;
        let numel: i64 = entry.shape.iter().product();
        let expected = numel as u64 * entry.dtype.kind().elt_size_in_bytes() as u64;
        if entry.shape.iter().any(|&d| d < 0) || end < begin || end - begin != expected {
            return Err(bad(format!(
                "`{name}` has shape {:?} of {:?} but {} bytes",
                entry.shape,
                entry.dtype,
                end.saturating_sub(begin)
            )));
        }
        if data_start + end > file_len {
            return Err(bad(format!(
                "`{name}` ends at byte {} but the file has {file_len} (truncated?)",
                data_start + end
            )));
        }
        tensors.push((
            name,
            TensorInfo {
                dtype: entry.dtype,
                shape: entry.shape,
                file: 0,
                start: data_start + begin,
                len: end - begin,
            },
        ));
    }
    Ok((file, tensors))
}
