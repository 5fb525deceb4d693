//! Chunked decoding keeps the VAE's memory flat in the number of frames: decoding 81 frames
//! with a full-size Wan 2.1 VAE (random weights) needs no more tensor memory at its peak than
//! decoding 9 (from the third latent frame on, every chunk holds the same). Its own test
//! binary, so no other test's tensors count.

mod common;

use std::time::Instant;

use framelane_runner::wan::vae::{AutoencoderKLWan, VaeConfig};
use tch::{Kind, Tensor};

/// Latent height and width: 32x32-pixel frames.
const LATENT_SIZE: i64 = 4;

/// Peak resident host memory of this process since the last reset, in bytes (Linux).
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kib * 1024)
}

/// Starts a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

const MIB: f64 = 1024.0 * 1024.0;

#[test]
fn decoding_memory_does_not_grow_with_the_number_of_frames() {
    let dir = tempfile::tempdir().unwrap();
    common::run_python("wan_vae_full_size.py", &[dir.path()], None);
    let device = common::device();
    let config = VaeConfig::from_file(&dir.path().join("config.json")).unwrap();
    let weights: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.path().join("diffusion_pytorch_model.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let vae = AutoencoderKLWan::from_tensors(config, device.device, Kind::Float, &mut |name| {
        weights.get(name).map(Tensor::shallow_clone)
    })
    .unwrap_or_else(|e| panic!("{e}"));
    drop(weights);

    let mut peaks = Vec::new();
    for frames in [9i64, 41, 81] {
        tch::manual_seed(0);
        let latents = Tensor::randn(
            [1, 16, (frames - 1) / 4 + 1, LATENT_SIZE, LATENT_SIZE],
            (Kind::Float, device.device),
        );
        let before = device.begin_job().unwrap();
        reset_peak_rss();
        let start = Instant::now();
        let video = vae.decode_frames(&latents, None).unwrap();
        let seconds = start.elapsed().as_secs_f64();
        let after = device.stats().unwrap();
        assert_eq!(video.count as i64, frames);
        let peak = after.allocated_peak - before.allocated_current;
        let rss = peak_rss().map_or("unknown".to_owned(), |b| {
            format!("{:.0} MiB", b as f64 / MIB)
        });
        println!(
            "{frames} frames of {size}x{size}: peak tensor memory {:.1} MiB above weights and latents, \
             peak host RSS {rss}, frames {:.2} MiB, {seconds:.1} s",
            peak as f64 / MIB,
            video.rgb.len() as f64 / MIB,
            size = video.width,
        );
        peaks.push(peak);
    }
    let (first, last) = (peaks[0] as f64, peaks[peaks.len() - 1] as f64);
    assert!(
        last <= first * 1.02,
        "decoding 81 frames peaked at {:.1} MiB, 9 frames at {:.1} MiB",
        last / MIB,
        first / MIB
    );
}
