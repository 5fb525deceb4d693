//! Peak host memory while loading a Wan transformer: writes a random bfloat16 transformer of
//! Wan 2.1's 1.3B shape (diffusers layout, one safetensors file), then loads it onto the CPU
//! and prints the process's peak resident memory during the load against the file's size.
//!
//!     cargo run --release -p framelane-runner --example wan_load_memory -- [DIR] [LAYERS]
//!
//! DIR (default: a temporary folder) receives `transformer/`; LAYERS (default 30) shrinks or
//! grows the model. Linux only: it reads and resets VmHWM through /proc/self.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use framelane_runner::wan::transformer::{TransformerConfig, WanTransformer};
use framelane_runner::wan::weights::TransformerCheckpoint;
use tch::{Device, Kind, Tensor};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let temp;
    let root = match args.next() {
        Some(dir) => PathBuf::from(dir),
        None => {
            temp = tempfile::tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let layers: i64 = args.next().map_or(Ok(30), |n| n.parse())?;
    let config = TransformerConfig {
        num_attention_heads: 12,
        attention_head_dim: 128,
        ffn_dim: 8960,
        num_layers: layers,
        ..TransformerConfig::default()
    };
    let dir = root.join("transformer");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    let weights = dir.join("diffusion_pytorch_model.safetensors");
    let started = Instant::now();
    let parameters = write_random_bf16(&weights, &config)?;
    let file_bytes = std::fs::metadata(&weights)?.len();
    println!(
        "wrote {parameters} parameters ({:.2} GiB) to {} in {:.1} s",
        gib(file_bytes),
        weights.display(),
        started.elapsed().as_secs_f64()
    );

    // libtorch sets up its CPU runtime on first use; do that before measuring the load.
    let warm = Tensor::ones([64, 64], (Kind::Float, Device::Cpu));
    let _ = warm.f_matmul(&warm)?.f_gelu("tanh")?;
    reset_peak()?;
    let before = status_kib("VmRSS")?;
    let started = Instant::now();
    let checkpoint = TransformerCheckpoint::diffusers(&dir)?;
    let model = WanTransformer::load(&checkpoint, Kind::BFloat16, Device::Cpu)?;
    let seconds = started.elapsed().as_secs_f64();
    let peak = status_kib("VmHWM")? - before;
    let after = status_kib("VmRSS")? - before;
    println!(
        "loaded {} layers in {seconds:.1} s: peak RSS +{:.2} GiB, resident +{:.2} GiB, file {:.2} GiB \
         (peak / file = {:.3})",
        model.config().num_layers,
        gib(peak * 1024),
        gib(after * 1024),
        gib(file_bytes),
        (peak * 1024) as f64 / file_bytes as f64
    );
    Ok(())
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 30)
}

/// Writes every parameter the config needs as bfloat16 in [-0.05, 0.05), streaming, so the
/// writer holds no tensor: the values cycle through one random 16 MiB block, which is as good
/// as fresh noise for measuring memory.
fn write_random_bf16(path: &Path, config: &TransformerConfig) -> Result<u64> {
    let parameters = config.parameters();
    let mut header = BTreeMap::new();
    let mut offset = 0u64;
    for (name, shape) in &parameters {
        let bytes = 2 * shape.iter().product::<i64>() as u64;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut json = serde_json::to_vec(&header)?;
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut out = BufWriter::with_capacity(1 << 22, File::create(path)?);
    out.write_all(&(json.len() as u64).to_le_bytes())?;
    out.write_all(&json)?;
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let block: Vec<u8> = (0..8 << 20)
        .flat_map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let value = ((state >> 40) as f32 / (1u32 << 24) as f32 - 0.5) * 0.1;
            ((value.to_bits() >> 16) as u16).to_le_bytes()
        })
        .collect();
    let mut left = offset as usize;
    while left > 0 {
        let n = left.min(block.len());
        out.write_all(&block[..n])?;
        left -= n;
    }
    out.flush()?;
    Ok(offset / 2)
}

/// Resets VmHWM to the current RSS (Linux 4.0+).
fn reset_peak() -> Result<()> {
    std::fs::write("/proc/self/clear_refs", "5").context("resetting the peak RSS")
}

fn status_kib(field: &str) -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().trim_end_matches(" kB").parse().ok())
        .with_context(|| format!("no {field} in /proc/self/status"))
}
