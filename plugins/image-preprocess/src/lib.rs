//! PNG or JPEG bytes into a resized, normalised NCHW FP32 tensor: the compute-heavy
//! pre-processing of vision models, done in the sandbox.
//!
//! Config (JSON, every key optional): `{"input": "image", "width": 224, "height": 224,
//! "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}`. Pixels are scaled to [0, 1],
//! resized bilinearly, then normalised per channel as `(x - mean) / std`; the result has shape
//! `[1, 3, height, width]`. Grey images are expanded to three channels and alpha is dropped.

use meshserve_guest::{Error, Plugin, Pre, Preprocess, Request, Tensor, config_json};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(default)]
struct Config {
    input: String,
    width: usize,
    height: usize,
    mean: [f32; 3],
    std: [f32; 3],
}

impl Default for Config {
    fn default() -> Self {
        Config {
            input: "image".into(),
            width: 224,
            height: 224,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        }
    }
}

/// An image as interleaved RGB bytes.
struct Rgb {
    width: usize,
    height: usize,
    pixels: Vec<u8>,
}

/// Largest decoded image accepted, in pixels, so a small file cannot claim a huge canvas.
const MAX_PIXELS: usize = 40_000_000;

fn decode(bytes: &[u8]) -> Result<Rgb, Error> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        decode_png(bytes)
    } else if bytes.starts_with(&[0xFF, 0xD8]) {
        decode_jpeg(bytes)
    } else {
        Err(Error::unprocessable(
            "body is neither a PNG nor a JPEG image",
        ))
    }
}

fn decode_png(bytes: &[u8]) -> Result<Rgb, Error> {
    let mut decoder = png::Decoder::new(bytes);
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder
        .read_info()
        .map_err(|e| Error::unprocessable(format!("bad PNG: {e}")))?;
    let (width, height) = (reader.info().width as usize, reader.info().height as usize);
    if width * height > MAX_PIXELS {
        return Err(Error::unprocessable(format!(
            "image of {width}x{height} pixels is too large"
        )));
    }
    let mut buffer = vec![0; reader.output_buffer_size()];
    let frame = reader
        .next_frame(&mut buffer)
        .map_err(|e| Error::unprocessable(format!("bad PNG: {e}")))?;
    let data = &buffer[..frame.buffer_size()];
    let channels = frame.color_type.samples();
    Ok(Rgb {
        width,
        height,
        pixels: to_rgb(data, channels),
    })
}

fn decode_jpeg(bytes: &[u8]) -> Result<Rgb, Error> {
    let mut decoder = jpeg_decoder::Decoder::new(bytes);
    decoder
        .read_info()
        .map_err(|e| Error::unprocessable(format!("bad JPEG: {e}")))?;
    let info = decoder
        .info()
        .ok_or_else(|| Error::unprocessable("bad JPEG: no header"))?;
    let (width, height) = (usize::from(info.width), usize::from(info.height));
    if width * height > MAX_PIXELS {
        return Err(Error::unprocessable(format!(
            "image of {width}x{height} pixels is too large"
        )));
    }
    let data = decoder
        .decode()
        .map_err(|e| Error::unprocessable(format!("bad JPEG: {e}")))?;
    let channels = match info.pixel_format {
        jpeg_decoder::PixelFormat::L8 => 1,
        jpeg_decoder::PixelFormat::RGB24 => 3,
        other => {
            return Err(Error::unprocessable(format!(
                "unsupported JPEG pixel format {other:?}"
            )));
        }
    };
    Ok(Rgb {
        width,
        height,
        pixels: to_rgb(&data, channels),
    })
}

fn to_rgb(data: &[u8], channels: usize) -> Vec<u8> {
    match channels {
        3 => data.to_vec(),
        4 => data
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
        2 => data
            .chunks_exact(2)
            .flat_map(|p| [p[0], p[0], p[0]])
            .collect(),
        _ => data.iter().flat_map(|&g| [g, g, g]).collect(),
    }
}

/// Bilinear resize and normalisation straight into NCHW planes.
fn to_nchw(image: &Rgb, config: &Config) -> Vec<f32> {
    let (w, h) = (config.width, config.height);
    let mut out = vec![0.0f32; 3 * w * h];
    let scale_x = image.width as f32 / w as f32;
    let scale_y = image.height as f32 / h as f32;
    let pixel = |x: usize, y: usize, c: usize| {
        f32::from(image.pixels[(y * image.width + x) * 3 + c]) / 255.0
    };
    for y in 0..h {
        let sy = ((y as f32 + 0.5) * scale_y - 0.5).clamp(0.0, (image.height - 1) as f32);
        let (y0, fy) = (sy.floor() as usize, sy.fract());
        let y1 = (y0 + 1).min(image.height - 1);
        for x in 0..w {
            let sx = ((x as f32 + 0.5) * scale_x - 0.5).clamp(0.0, (image.width - 1) as f32);
            let (x0, fx) = (sx.floor() as usize, sx.fract());
            let x1 = (x0 + 1).min(image.width - 1);
            for c in 0..3 {
                let top = pixel(x0, y0, c) * (1.0 - fx) + pixel(x1, y0, c) * fx;
                let bottom = pixel(x0, y1, c) * (1.0 - fx) + pixel(x1, y1, c) * fx;
                let value = top * (1.0 - fy) + bottom * fy;
                out[c * w * h + y * w + x] = (value - config.mean[c]) / config.std[c];
            }
        }
    }
    out
}

/// The plugin: its config, checked once per instance.
pub struct ImagePreprocess {
    config: Config,
}

impl Plugin for ImagePreprocess {
    fn init(config: &str) -> Result<Self, Error> {
        let config: Config = config_json(config)?;
        if config.width == 0 || config.height == 0 {
            return Err(Error::internal(
                "image-preprocess: width and height must be positive",
            ));
        }
        Ok(ImagePreprocess { config })
    }
}

impl Preprocess for ImagePreprocess {
    fn preprocess(&mut self, request: &Request) -> Result<Pre, Error> {
        let config = &self.config;
        let image = decode(&request.body())?;
        if image.width == 0 || image.height == 0 {
            return Err(Error::unprocessable("image has no pixels"));
        }
        let data = to_nchw(&image, config);
        Ok(vec![Tensor::fp32(
            config.input.clone(),
            vec![1, 3, config.height as i64, config.width as i64],
            data,
        )]
        .into())
    }
}

meshserve_guest::export_plugin!(ImagePreprocess: pre);
