//! A job's start image (`spec.image`): PNG or JPEG bytes to the first frame the
//! image-to-video pipeline takes, prepared as diffusers' `WanImageToVideoPipeline` prepares a
//! PIL image: resized to exactly the job's width and height with PIL's Lanczos filter (the
//! aspect ratio is not kept and nothing is cropped), scaled to [0, 1], then to [-1, 1].
//!
//! The resize is PIL's `Image.resize(size, LANCZOS)` step for step (8-bit fixed-point
//! coefficients, a horizontal pass, then a vertical one, rounding to 8 bits between them), so
//! an 8-bit RGB image gives the pipeline's tensor exactly. Other images are made RGB first:
//! alpha is dropped, grey is repeated in the three channels, 16-bit samples keep their high
//! byte. A JPEG is turned upright as its EXIF orientation says (a phone's portrait photo is
//! stored sideways), as diffusers' `load_image` does with PIL's `ImageOps.exif_transpose`.

use std::f64::consts::PI;

use tch::{Kind, Tensor};

/// Files larger than this are refused before decoding.
pub const MAX_IMAGE_BYTES: usize = 32 << 20;
/// Images with more pixels than this are refused before decoding them whole.
pub const MAX_IMAGE_PIXELS: u64 = 8192 * 8192;

/// Why an image cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    #[error("is {bytes} bytes; the runner takes images up to {MAX_IMAGE_BYTES} bytes")]
    TooLarge { bytes: usize },
    #[error("is {width}x{height} pixels; the runner takes images up to {MAX_IMAGE_PIXELS} pixels")]
    TooManyPixels { width: u64, height: u64 },
    #[error("is not a PNG or JPEG image")]
    UnknownFormat,
    #[error("is not a readable {format} image: {reason}")]
    Unreadable {
        format: &'static str,
        reason: String,
    },
}

/// An 8-bit RGB image, row after row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rgb8 {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

impl Rgb8 {
    /// Decodes PNG or JPEG bytes.
    pub fn decode(bytes: &[u8]) -> Result<Rgb8, ImageError> {
        if bytes.len() > MAX_IMAGE_BYTES {
            return Err(ImageError::TooLarge { bytes: bytes.len() });
        }
        if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
            decode_png(bytes)
        } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
            decode_jpeg(bytes)
        } else {
            Err(ImageError::UnknownFormat)
        }
    }

    /// PIL's `resize((width, height), Image.LANCZOS)`.
    pub fn resize(&self, width: usize, height: usize) -> Rgb8 {
        if (width, height) == (self.width, self.height) {
            return self.clone();
        }
        let vertical = Coefficients::new(self.height, height);
        // The rows the vertical pass reads; the horizontal pass makes only those.
        let first = vertical.bounds[0].0;
        let last = vertical
            .bounds
            .last()
            .map_or(self.height, |(start, len)| start + len);
        let rows = if width == self.width {
            Rgb8 {
                width,
                height: last - first,
                pixels: self.pixels[first * self.width * 3..last * self.width * 3].to_vec(),
            }
        } else {
            let horizontal = Coefficients::new(self.width, width);
            let mut out = vec![0u8; width * (last - first) * 3];
            for (y, row) in out.chunks_exact_mut(width * 3).enumerate() {
                let source = &self.pixels[(first + y) * self.width * 3..][..self.width * 3];
                for (x, pixel) in row.chunks_exact_mut(3).enumerate() {
                    let (start, weights) = horizontal.at(x);
                    for (c, value) in pixel.iter_mut().enumerate() {
                        *value = horizontal.sum(weights, |k| source[(start + k) * 3 + c]);
                    }
                }
            }
            Rgb8 {
                width,
                height: last - first,
                pixels: out,
            }
        };
        if height == self.height {
            return rows;
        }
        let mut out = vec![0u8; width * height * 3];
        for (y, row) in out.chunks_exact_mut(width * 3).enumerate() {
            let (start, weights) = vertical.at(y);
            let start = start - first;
            for (i, value) in row.iter_mut().enumerate() {
                *value = vertical.sum(weights, |k| rows.pixels[(start + k) * width * 3 + i]);
            }
        }
        Rgb8 {
            width,
            height,
            pixels: out,
        }
    }

    /// The image upright, as EXIF `orientation` (1 to 8) says to show it: PIL's
    /// `ImageOps.exif_transpose` (2 mirrors, 3 turns half round, 4 flips, 5 transposes, 6 turns
    /// a quarter clockwise, 7 transverses, 8 turns a quarter counter-clockwise).
    fn oriented(self, orientation: u16) -> Rgb8 {
        let (w, h) = (self.width, self.height);
        // Where each upright pixel (x, y) is in the stored image.
        let source = |x: usize, y: usize| match orientation {
            2 => (w - 1 - x, y),
            3 => (w - 1 - x, h - 1 - y),
            4 => (x, h - 1 - y),
            5 => (y, x),
            6 => (y, h - 1 - x),
            7 => (w - 1 - y, h - 1 - x),
            8 => (w - 1 - y, x),
            _ => (x, y),
        };
        if !(2..=8).contains(&orientation) {
            return self;
        }
        let (width, height) = if orientation >= 5 { (h, w) } else { (w, h) };
        let mut pixels = Vec::with_capacity(self.pixels.len());
        for y in 0..height {
            for x in 0..width {
                let (sx, sy) = source(x, y);
                let at = (sy * w + sx) * 3;
                pixels.extend_from_slice(&self.pixels[at..at + 3]);
            }
        }
        Rgb8 {
            width,
            height,
            pixels,
        }
    }

    /// `[1, 3, height, width]` float32 in [-1, 1], as the pipelines' image processor makes a
    /// picture: `x / 255`, then `2x - 1`.
    pub fn to_tensor(&self) -> Tensor {
        let unit = Tensor::from_slice(&self.pixels)
            .view([self.height as i64, self.width as i64, 3])
            .permute([2, 0, 1])
            .unsqueeze(0)
            .to_kind(Kind::Float)
            / 255.0;
        unit * 2.0 - 1.0
    }
}

fn decode_png(bytes: &[u8]) -> Result<Rgb8, ImageError> {
    let unreadable = |e: png::DecodingError| ImageError::Unreadable {
        format: "PNG",
        reason: e.to_string(),
    };
    let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().map_err(unreadable)?;
    let (width, height) = {
        let info = reader.info();
        (u64::from(info.width), u64::from(info.height))
    };
    check_pixels(width, height)?;
    let size = reader
        .output_buffer_size()
        .ok_or(ImageError::TooManyPixels { width, height })?;
    let mut buffer = vec![0u8; size];
    let frame = reader.next_frame(&mut buffer).map_err(unreadable)?;
    buffer.truncate(frame.buffer_size());
    let channels = frame.color_type.samples();
    Ok(to_rgb(width as usize, height as usize, channels, &buffer))
}

fn decode_jpeg(bytes: &[u8]) -> Result<Rgb8, ImageError> {
    let unreadable = |e: jpeg_decoder::Error| ImageError::Unreadable {
        format: "JPEG",
        reason: e.to_string(),
    };
    let mut decoder = jpeg_decoder::Decoder::new(std::io::Cursor::new(bytes));
    decoder.read_info().map_err(unreadable)?;
    let info = decoder.info().ok_or(ImageError::UnknownFormat)?;
    let (width, height) = (u64::from(info.width), u64::from(info.height));
    check_pixels(width, height)?;
    let pixels = decoder.decode().map_err(unreadable)?;
    let channels = match info.pixel_format {
        jpeg_decoder::PixelFormat::L8 => 1,
        jpeg_decoder::PixelFormat::RGB24 => 3,
        other => {
            return Err(ImageError::Unreadable {
                format: "JPEG",
                reason: format!("its {other:?} pixels are neither grey nor RGB"),
            });
        }
    };
    let orientation = decoder.exif_data().map_or(1, exif_orientation);
    Ok(to_rgb(width as usize, height as usize, channels, &pixels).oriented(orientation))
}

/// The orientation tag (1 to 8) of raw EXIF data that starts at its TIFF header: how the
/// stored pixels are turned from upright. 1 (upright) when there is none or it is unreadable.
fn exif_orientation(exif: &[u8]) -> u16 {
    let big_endian = match exif.get(..4) {
        Some(b"MM\0*") => true,
        Some(b"II*\0") => false,
        _ => return 1,
    };
    // An unsigned number of `n` bytes at `at`, in the data's byte order.
    let number = |at: usize, n: usize| {
        let bytes = exif.get(at..at.checked_add(n)?)?;
        let digit = |value: u32, byte: &u8| value << 8 | u32::from(*byte);
        Some(if big_endian {
            bytes.iter().fold(0, digit)
        } else {
            bytes.iter().rev().fold(0, digit)
        })
    };
    // The first image file directory: a count, then 12-byte entries (tag, type, count, value);
    // the orientation is one SHORT, in the first two bytes of the value.
    const ORIENTATION: u32 = 0x0112;
    let Some(ifd) = number(4, 4).and_then(|at| usize::try_from(at).ok()) else {
        return 1;
    };
    let entries = number(ifd, 2).unwrap_or(0) as usize;
    (0..entries)
        .map(|i| ifd + 2 + 12 * i)
        .find(|&entry| number(entry, 2) == Some(ORIENTATION))
        .and_then(|entry| number(entry + 8, 2))
        .and_then(|o| u16::try_from(o).ok())
        .filter(|o| (1..=8).contains(o))
        .unwrap_or(1)
}

fn check_pixels(width: u64, height: u64) -> Result<(), ImageError> {
    if width * height > MAX_IMAGE_PIXELS || width == 0 || height == 0 {
        return Err(ImageError::TooManyPixels { width, height });
    }
    Ok(())
}

/// Grey, grey + alpha, RGB or RGBA samples to RGB.
fn to_rgb(width: usize, height: usize, channels: usize, samples: &[u8]) -> Rgb8 {
    let pixels = samples
        .chunks_exact(channels)
        .flat_map(|p| match channels {
            1 | 2 => [p[0], p[0], p[0]],
            _ => [p[0], p[1], p[2]],
        })
        .collect();
    Rgb8 {
        width,
        height,
        pixels,
    }
}

/// PIL's fixed-point precision: 32 bits less 8 for the result and 2 for overflow.
const PRECISION_BITS: u32 = 32 - 8 - 2;
/// The Lanczos filter's support (a = 3).
const SUPPORT: f64 = 3.0;

/// One pass's filter weights: for each output pixel, the first input pixel and the
/// fixed-point weights of the input pixels from there.
struct Coefficients {
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
    size: usize,
}

impl Coefficients {
    /// PIL's `precompute_coeffs` and `normalize_coeffs_8bpc` for the Lanczos filter over the
    /// whole input.
    fn new(input: usize, output: usize) -> Coefficients {
        let scale = input as f64 / output as f64;
        let filter_scale = scale.max(1.0);
        let support = SUPPORT * filter_scale;
        let size = support.ceil() as usize * 2 + 1;
        let mut bounds = Vec::with_capacity(output);
        let mut weights = vec![0i32; output * size];
        for (out, row) in weights.chunks_exact_mut(size).enumerate() {
            let center = (out as f64 + 0.5) * scale;
            // C's (int) cast truncates towards zero.
            let start = ((center - support + 0.5) as i64).max(0) as usize;
            let end = ((center + support + 0.5) as i64).min(input as i64) as usize;
            let inverse = 1.0 / filter_scale;
            let taps: Vec<f64> = (start..end)
                .map(|x| lanczos((x as f64 - center + 0.5) * inverse))
                .collect();
            let total: f64 = taps.iter().sum();
            for (w, tap) in row.iter_mut().zip(&taps) {
                let k = if total != 0.0 { tap / total } else { *tap };
                let fixed = k * f64::from(1u32 << PRECISION_BITS);
                *w = if k < 0.0 {
                    (fixed - 0.5) as i32
                } else {
                    (fixed + 0.5) as i32
                };
            }
            bounds.push((start, end - start));
        }
        Coefficients {
            bounds,
            weights,
            size,
        }
    }

    fn at(&self, out: usize) -> (usize, &[i32]) {
        let (start, len) = self.bounds[out];
        (start, &self.weights[out * self.size..][..len])
    }

    /// The weighted sum of `len` input samples, rounded and clipped to 8 bits.
    fn sum(&self, weights: &[i32], sample: impl Fn(usize) -> u8) -> u8 {
        let mut acc: i32 = 1 << (PRECISION_BITS - 1);
        for (k, w) in weights.iter().enumerate() {
            acc = acc.wrapping_add(i32::from(sample(k)).wrapping_mul(*w));
        }
        (acc >> PRECISION_BITS).clamp(0, 255) as u8
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        (x * PI).sin() / (x * PI)
    }
}

fn lanczos(x: f64) -> f64 {
    if (-SUPPORT..SUPPORT).contains(&x) {
        sinc(x) * sinc(x / SUPPORT)
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_size_is_a_copy_and_a_flat_image_stays_flat() {
        let flat = Rgb8 {
            width: 7,
            height: 5,
            pixels: [10, 200, 30].repeat(35),
        };
        assert_eq!(flat.resize(7, 5), flat);
        let resized = flat.resize(16, 3);
        assert_eq!((resized.width, resized.height), (16, 3));
        assert_eq!(resized.pixels, [10, 200, 30].repeat(48));
    }

    #[test]
    fn weights_of_each_output_pixel_sum_to_one() {
        for (input, output) in [(80, 64), (56, 48), (5, 32), (1000, 7)] {
            let c = Coefficients::new(input, output);
            for out in 0..output {
                let (start, weights) = c.at(out);
                assert!(start + weights.len() <= input);
                let sum: i64 = weights.iter().map(|&w| i64::from(w)).sum();
                assert!(
                    (sum - (1 << PRECISION_BITS)).abs() <= weights.len() as i64,
                    "{sum}"
                );
            }
        }
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        assert_eq!(Rgb8::decode(b"GIF89a"), Err(ImageError::UnknownFormat));
        let truncated = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";
        assert!(matches!(
            Rgb8::decode(truncated),
            Err(ImageError::Unreadable { format: "PNG", .. })
        ));
        let huge = vec![0u8; MAX_IMAGE_BYTES + 1];
        assert_eq!(
            Rgb8::decode(&huge),
            Err(ImageError::TooLarge { bytes: huge.len() })
        );
    }
}
