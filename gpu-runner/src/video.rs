//! Frames to files: H.264 (openh264) in an MP4 (muxide), a PNG preview of the middle frame,
//! both written under `<out>/<namespace>/<name>/` with the MP4's size and sha256.

use std::path::{Path, PathBuf};

use openh264::encoder::{Encoder, EncoderConfig, FrameRate, FrameType, QpRange, RateControlMode};
use openh264::formats::{RgbSliceU8, YUVBuffer};
use openh264::{OpenH264API, Timestamp};
use sha2::{Digest, Sha256};

use framelane_contract::outputs::{PREVIEW_FILE, VIDEO_FILE};

/// H.264 quantizer bounds: visually near-lossless for generated video.
const MIN_QP: u8 = 16;
const MAX_QP: u8 = 22;

/// Decoded video: `frames` RGB8 images of `width x height`, row-major, frame after frame.
pub struct Frames {
    pub width: u32,
    pub height: u32,
    pub count: u32,
    pub rgb: Vec<u8>,
}

impl Frames {
    fn frame(&self, i: u32) -> &[u8] {
        let len = (self.width * self.height * 3) as usize;
        &self.rgb[i as usize * len..(i as usize + 1) * len]
    }
}

/// The files a job produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VideoOutput {
    /// `<namespace>/<name>/video.mp4`, relative to the output root.
    pub path: String,
    pub preview_path: String,
    pub size_bytes: u64,
    /// Lower-case hex SHA-256 of the MP4.
    pub sha256: String,
    pub frames: u32,
    pub fps: u32,
    pub width: u32,
    pub height: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum VideoError {
    #[error("H.264 needs even frame sizes, got {width}x{height}")]
    OddSize { width: u32, height: u32 },
    #[error("`{field}` {reason}")]
    BadJobName { field: &'static str, reason: String },
    #[error("H.264 encoder: {0}")]
    Encode(#[from] openh264::Error),
    #[error("H.264 encoder produced no data for frame {0}")]
    DroppedFrame(u32),
    #[error("MP4 muxer: {0}")]
    Mux(#[from] muxide::api::MuxerError),
    #[error("PNG preview: {0}")]
    Png(#[from] png::EncodingError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Encodes every frame as H.264 at `fps` in an MP4. Deterministic: the same frames give the
/// same bytes (single-threaded encoder, no timestamps in the container).
pub fn encode_mp4(frames: &Frames, fps: u32) -> Result<Vec<u8>, VideoError> {
    let (w, h) = (frames.width, frames.height);
    if w % 2 != 0 || h % 2 != 0 {
        return Err(VideoError::OddSize {
            width: w,
            height: h,
        });
    }
    // Constant quality without rate control: openh264's bitrate modes drop frames unless
    // frame skipping is on, and every frame must be kept.
    let config = EncoderConfig::new()
        .skip_frames(false)
        .rate_control_mode(RateControlMode::Off)
        .qp(QpRange::new(MIN_QP, MAX_QP))
        .max_frame_rate(FrameRate::from_hz(fps as f32))
        .num_threads(1);
    let mut encoder = Encoder::with_api_config(OpenH264API::from_source(), config)?;
    let mut muxer = muxide::api::MuxerBuilder::new(Vec::new())
        .video(muxide::api::VideoCodec::H264, w, h, f64::from(fps))
        .build()?;
    let mut yuv = YUVBuffer::new(w as usize, h as usize);
    for i in 0..frames.count {
        yuv.read_rgb8(RgbSliceU8::new(frames.frame(i), (w as usize, h as usize)));
        let ms = u64::from(i) * 1000 / u64::from(fps);
        let bitstream = encoder.encode_at(&yuv, Timestamp::from_millis(ms))?;
        let keyframe = matches!(bitstream.frame_type(), FrameType::IDR | FrameType::I);
        let nal = bitstream.to_vec();
        if nal.is_empty() || bitstream.frame_type() == FrameType::Skip {
            return Err(VideoError::DroppedFrame(i));
        }
        muxer.write_video(f64::from(i) / f64::from(fps), &nal, keyframe)?;
    }
    muxer.finish_in_place()?;
    Ok(muxer.into_writer())
}

/// PNG of one RGB8 frame.
pub fn encode_png(frames: &Frames, index: u32) -> Result<Vec<u8>, VideoError> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, frames.width, frames.height);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header()?;
    writer.write_image_data(frames.frame(index))?;
    writer.finish()?;
    Ok(out)
}

/// A Kubernetes object name or namespace, used as a path segment.
fn check_segment(field: &'static str, value: &str) -> Result<(), VideoError> {
    let ok = !value.is_empty()
        && value.len() <= 253
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && value != "."
        && value != "..";
    if ok {
        Ok(())
    } else {
        Err(VideoError::BadJobName {
            field,
            reason: format!(
                "{value:?} is not a Kubernetes name (lower-case letters, digits, '-', '.')"
            ),
        })
    }
}

/// Writes `video.mp4` and `preview.png` under `root/<namespace>/<name>/`. Each file is written
/// to a temporary name and renamed, so a reader never sees half a video.
pub fn write_outputs(
    root: &Path,
    namespace: &str,
    name: &str,
    frames: &Frames,
    fps: u32,
) -> Result<VideoOutput, VideoError> {
    check_segment("namespace", namespace)?;
    check_segment("name", name)?;
    let mp4 = encode_mp4(frames, fps)?;
    let preview = encode_png(frames, frames.count / 2)?;
    let dir = root.join(namespace).join(name);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| VideoError::Io { path, source }
    };
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    for (file, bytes) in [(VIDEO_FILE, &mp4), (PREVIEW_FILE, &preview)] {
        let tmp = dir.join(format!(".{file}.partial"));
        std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
        let dst = dir.join(file);
        std::fs::rename(&tmp, &dst).map_err(io(&dst))?;
    }
    Ok(VideoOutput {
        path: format!("{namespace}/{name}/{VIDEO_FILE}"),
        preview_path: format!("{namespace}/{name}/{PREVIEW_FILE}"),
        size_bytes: mp4.len() as u64,
        sha256: hex::encode(Sha256::digest(&mp4)),
        frames: frames.count,
        fps,
        width: frames.width,
        height: frames.height,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(width: u32, height: u32, count: u32) -> Frames {
        let mut rgb = Vec::new();
        for f in 0..count {
            for y in 0..height {
                for x in 0..width {
                    rgb.extend_from_slice(&[(x * 8 + f) as u8, (y * 8) as u8, (f * 20) as u8]);
                }
            }
        }
        Frames {
            width,
            height,
            count,
            rgb,
        }
    }

    #[test]
    fn mp4_is_deterministic_and_keeps_every_frame() {
        let frames = gradient(32, 32, 9);
        let a = encode_mp4(&frames, 16).unwrap();
        let b = encode_mp4(&frames, 16).unwrap();
        assert_eq!(a, b);
        assert_eq!(&a[4..8], b"ftyp");
    }

    #[test]
    fn rejects_path_escaping_names() {
        let frames = gradient(16, 16, 1);
        let dir = std::env::temp_dir();
        for (ns, name) in [("..", "x"), ("a/b", "x"), ("ns", ""), ("ns", "Upper")] {
            assert!(matches!(
                write_outputs(&dir, ns, name, &frames, 8),
                Err(VideoError::BadJobName { .. })
            ));
        }
    }
}
