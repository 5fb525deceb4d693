//! The umT5 text encoder of the Wan models (transformers' `UMT5EncoderModel`) and the prompt
//! encoding of diffusers' Wan pipelines around it: clean the prompt, tokenize it to a fixed
//! length with an attention mask, encode, then zero every position past the prompt's tokens.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tch::{Device, Kind, TchError, Tensor};

use super::tensors::{TensorSource, WeightError, Weights};
use crate::tokenizer::PromptTokenizer;

/// The model type transformers writes into this encoder's config.json. Plain T5 differs: only
/// its first layer has a relative position bias.
const MODEL_TYPE: &str = "umt5";

/// The feed-forward the Wan text encoder (umT5-XXL) has: a tanh-approximated GELU gate.
const GATED_GELU: &str = "gated-gelu";

/// A text encoder config.json (transformers' `UMT5Config` fields and defaults).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default)]
pub struct Umt5Config {
    pub model_type: Option<String>,
    pub vocab_size: i64,
    pub d_model: i64,
    pub d_kv: i64,
    pub d_ff: i64,
    pub num_layers: i64,
    pub num_heads: i64,
    pub relative_attention_num_buckets: i64,
    pub relative_attention_max_distance: i64,
    pub layer_norm_epsilon: f64,
    pub feed_forward_proj: String,
}

impl Default for Umt5Config {
    fn default() -> Self {
        Umt5Config {
            model_type: None,
            vocab_size: 250112,
            d_model: 512,
            d_kv: 64,
            d_ff: 1024,
            num_layers: 8,
            num_heads: 6,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: GATED_GELU.to_owned(),
        }
    }
}

/// Why the text encoder cannot be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum Umt5Error {
    #[error("{path}: {message}")]
    ConfigFile { path: PathBuf, message: String },
    #[error("text encoder config field `{field}`: {message}")]
    Config {
        field: &'static str,
        message: String,
    },
    #[error("text encoder weights: {0}")]
    Weights(#[from] WeightError),
    #[error("prompt {index}: {message}")]
    Prompt { index: usize, message: String },
    #[error("text encoder input: {0}")]
    Input(String),
    #[error("text encoder: {0}")]
    Torch(#[from] TchError),
}

fn config_error(field: &'static str, message: impl Into<String>) -> Umt5Error {
    Umt5Error::Config {
        field,
        message: message.into(),
    }
}

impl Umt5Config {
    /// Reads and checks a config.json.
    pub fn from_file(path: &Path) -> Result<Umt5Config, Umt5Error> {
        let error = |message: String| Umt5Error::ConfigFile {
            path: path.to_owned(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
        let config: Umt5Config = serde_json::from_str(&text)
            .map_err(|e| error(format!("not a transformers UMT5 config: {e}")))?;
        config.check()?;
        Ok(config)
    }

    /// Refuses what this implementation does not compute exactly as transformers does.
    pub fn check(&self) -> Result<(), Umt5Error> {
        if let Some(model_type) = self.model_type.as_deref().filter(|t| *t != MODEL_TYPE) {
            return Err(config_error(
                "model_type",
                format!("is {model_type}, not {MODEL_TYPE}: point the model at the umT5 encoder"),
            ));
        }
        if self.feed_forward_proj != GATED_GELU {
            return Err(config_error(
                "feed_forward_proj",
                format!(
                    "is {}; the runner implements umT5's {GATED_GELU} only",
                    self.feed_forward_proj
                ),
            ));
        }
        if self.relative_attention_num_buckets < 4 {
            return Err(config_error(
                "relative_attention_num_buckets",
                format!(
                    "is {}; bidirectional buckets need at least 4",
                    self.relative_attention_num_buckets
                ),
            ));
        }
        Ok(())
    }
}

/// transformers' `UMT5LayerNorm`: scales by the root mean square (computed in float32),
/// without centering or bias.
struct LayerNorm {
    weight: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn load(w: &mut Weights, name: &str, config: &Umt5Config) -> Result<LayerNorm, WeightError> {
        Ok(LayerNorm {
            weight: w.take(&format!("{name}.weight"), &[config.d_model])?,
            eps: config.layer_norm_epsilon,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        let variance = x
            .f_to_kind(Kind::Float)?
            .f_pow_tensor_scalar(2)?
            .f_mean_dim([-1].as_slice(), true, None)?;
        let y = x.f_mul(&variance.f_add_scalar(self.eps)?.f_rsqrt()?)?;
        let y = match self.weight.kind() {
            Kind::BFloat16 | Kind::Half => y.f_to_kind(self.weight.kind())?,
            _ => y,
        };
        self.weight.f_mul(&y)
    }
}

/// One encoder layer: self-attention with this layer's own relative position bias, then the
/// gated feed-forward, each on a normalized copy and added back.
struct Block {
    attention_norm: LayerNorm,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    /// `[buckets, heads]`: a learned bias per relative-position bucket and head.
    relative_bias: Tensor,
    ff_norm: LayerNorm,
    wi_0: Tensor,
    wi_1: Tensor,
    wo: Tensor,
    heads: i64,
    head_dim: i64,
}

impl Block {
    fn load(w: &mut Weights, i: i64, config: &Umt5Config) -> Result<Block, WeightError> {
        let (d, inner) = (config.d_model, config.num_heads * config.d_kv);
        let attn = format!("encoder.block.{i}.layer.0.SelfAttention");
        let ff = format!("encoder.block.{i}.layer.1.DenseReluDense");
        Ok(Block {
            attention_norm: LayerNorm::load(
                w,
                &format!("encoder.block.{i}.layer.0.layer_norm"),
                config,
            )?,
            q: w.take(&format!("{attn}.q.weight"), &[inner, d])?,
            k: w.take(&format!("{attn}.k.weight"), &[inner, d])?,
            v: w.take(&format!("{attn}.v.weight"), &[inner, d])?,
            o: w.take(&format!("{attn}.o.weight"), &[d, inner])?,
            relative_bias: w.take(
                &format!("{attn}.relative_attention_bias.weight"),
                &[config.relative_attention_num_buckets, config.num_heads],
            )?,
            ff_norm: LayerNorm::load(w, &format!("encoder.block.{i}.layer.1.layer_norm"), config)?,
            wi_0: w.take(&format!("{ff}.wi_0.weight"), &[config.d_ff, d])?,
            wi_1: w.take(&format!("{ff}.wi_1.weight"), &[config.d_ff, d])?,
            wo: w.take(&format!("{ff}.wo.weight"), &[d, config.d_ff])?,
            heads: config.num_heads,
            head_dim: config.d_kv,
        })
    }

    /// `buckets`: `[L, L]` relative-position buckets; `keep`: `[B, 1, 1, L]`, true for the
    /// keys to attend to, or `None` when every key is a token.
    fn forward(
        &self,
        x: &Tensor,
        buckets: &Tensor,
        keep: Option<&Tensor>,
        masked: f64,
    ) -> Result<Tensor, TchError> {
        let (b, l, _) = x.size3()?;
        let h = self.attention_norm.forward(x)?;
        let split = |weight: &Tensor| {
            h.f_linear::<&Tensor>(weight, None)?
                .f_view([b, -1, self.heads, self.head_dim])?
                .f_transpose(1, 2)
        };
        let (q, k, v) = (split(&self.q)?, split(&self.k)?, split(&self.v)?);
        let bias = Tensor::f_embedding(&self.relative_bias, buckets, -1, false, false)?
            .f_permute([2, 0, 1])?
            .f_unsqueeze(0)?;
        // The padding mask and the bias become one additive mask, as transformers builds it
        // for scaled dot-product attention; T5 does not scale the scores.
        let mask = match keep {
            Some(keep) => bias.f_where_scalarother(keep, masked)?,
            None => bias,
        }
        .f_contiguous()?;
        let attended = Tensor::f_scaled_dot_product_attention(
            &q,
            &k,
            &v,
            Some(&mask),
            0.0,
            false,
            1.0,
            false,
        )?
        .f_transpose(1, 2)?
        .f_contiguous()?
        .f_reshape([b, l, -1])?
        .f_linear::<&Tensor>(&self.o, None)?;
        let x = x.f_add(&attended)?;

        let h = self.ff_norm.forward(&x)?;
        let gate = gelu_new(&h.f_linear::<&Tensor>(&self.wi_0, None)?)?;
        let up = h.f_linear::<&Tensor>(&self.wi_1, None)?;
        let down = gate.f_mul(&up)?.f_linear::<&Tensor>(&self.wo, None)?;
        x.f_add(&down)
    }
}

/// transformers' `gelu_new`, operation for operation.
fn gelu_new(x: &Tensor) -> Result<Tensor, TchError> {
    let inner = x.f_add(&x.f_pow_tensor_scalar(3.0)?.f_mul_scalar(0.044715)?)?;
    let gate = inner
        .f_mul_scalar((2.0 / std::f64::consts::PI).sqrt())?
        .f_tanh()?
        .f_add_scalar(1.0)?;
    x.f_mul_scalar(0.5)?.f_mul(&gate)
}

/// The umT5 encoder on one device.
pub struct Umt5Encoder {
    config: Umt5Config,
    embed: Tensor,
    blocks: Vec<Block>,
    final_norm: LayerNorm,
    device: Device,
    /// What a masked-out attention score becomes: the lowest finite value of the dtype.
    masked: f64,
}

impl Umt5Encoder {
    /// Builds the encoder `config` describes from `source` (transformers' tensor names), with
    /// every weight moved to `device` as `kind` (float32 or bfloat16).
    pub fn from_tensors(
        config: Umt5Config,
        device: Device,
        kind: Kind,
        source: &mut TensorSource<'_>,
    ) -> Result<Umt5Encoder, Umt5Error> {
        config.check()?;
        let masked = match kind {
            Kind::Float => f64::from(f32::MIN),
            // The lowest finite bfloat16: float32's lowest would round to -inf.
            Kind::BFloat16 => -3.3895313892515355e38,
            other => {
                return Err(Umt5Error::Input(format!(
                    "dtype {other:?}; the encoder runs in float32 or bfloat16, as the Wan \
                     pipelines run it"
                )));
            }
        };
        let mut w = Weights::new(source, device, kind);
        let embed = w.take("shared.weight", &[config.vocab_size, config.d_model])?;
        let blocks = (0..config.num_layers)
            .map(|i| Block::load(&mut w, i, &config))
            .collect::<Result<_, _>>()?;
        let final_norm = LayerNorm::load(&mut w, "encoder.final_layer_norm", &config)?;
        Ok(Umt5Encoder {
            config,
            embed,
            blocks,
            final_norm,
            device,
            masked,
        })
    }

    pub fn config(&self) -> &Umt5Config {
        &self.config
    }

    /// The last hidden states `[B, L, d_model]` of token ids `[B, L]` (int64) whose attention
    /// mask `[B, L]` is 1 for tokens and 0 for padding, as `UMT5EncoderModel(ids, mask)`.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor, Umt5Error> {
        let size = ids.size();
        if size.len() != 2 || mask.size() != size {
            return Err(Umt5Error::Input(format!(
                "ids of shape {size:?} and mask of shape {:?}; both must be [batch, length]",
                mask.size()
            )));
        }
        let _no_grad = tch::no_grad_guard();
        let ids = ids.f_to_device(self.device)?;
        let mask = mask.f_to_device(self.device)?;
        let keep = mask.f_gt(0)?;
        let keep = if bool::try_from(keep.f_all()?)? {
            None
        } else {
            Some(keep.f_unsqueeze(1)?.f_unsqueeze(1)?)
        };
        let buckets = self.position_buckets(size[1])?;
        let mut x = Tensor::f_embedding(&self.embed, &ids, -1, false, false)?;
        for block in &self.blocks {
            x = block.forward(&x, &buckets, keep.as_ref(), self.masked)?;
        }
        Ok(self.final_norm.forward(&x)?)
    }

    /// `[L, L]` buckets of key position minus query position: exact for small distances,
    /// logarithmic up to `relative_attention_max_distance`, half of them for keys after the
    /// query. Computed with transformers' tensor operations so the float rounding at bucket
    /// edges is the same.
    fn position_buckets(&self, len: i64) -> Result<Tensor, TchError> {
        let options = (Kind::Int64, self.device);
        let query = Tensor::f_arange(len, options)?.f_unsqueeze(1)?;
        let key = Tensor::f_arange(len, options)?.f_unsqueeze(0)?;
        let relative = key.f_sub(&query)?;
        let half = self.config.relative_attention_num_buckets / 2;
        let after = relative
            .f_gt(0)?
            .f_to_kind(Kind::Int64)?
            .f_mul_scalar(half)?;
        let distance = relative.f_abs()?;
        let max_exact = half / 2;
        let max_distance = self.config.relative_attention_max_distance as f64;
        let log_ratio = distance
            .f_to_kind(Kind::Float)?
            .f_div_scalar(max_exact)?
            .f_log()?
            .f_div_scalar((max_distance / max_exact as f64).ln())?
            .f_mul_scalar(half - max_exact)?;
        let large = log_ratio
            .f_to_kind(Kind::Int64)?
            .f_add_scalar(max_exact)?
            .f_clamp_max(half - 1)?;
        let small = distance.f_lt(max_exact)?;
        after.f_add(&distance.f_where_self(&small, &large)?)
    }

    /// diffusers' Wan `_get_t5_prompt_embeds`: each prompt cleaned and tokenized to the
    /// tokenizer's fixed length, encoded as one batch with its attention mask, and every
    /// position past its tokens set to zero. `[prompts, length, d_model]`, in the encoder's
    /// dtype. The pipelines call it once for the prompts and, with guidance, once more for
    /// the negative prompts ("" when there is none).
    pub fn prompt_embeds(
        &self,
        tokenizer: &PromptTokenizer,
        prompts: &[&str],
    ) -> Result<Tensor, Umt5Error> {
        let tokens = tokenize_prompts(tokenizer, prompts)?;
        let hidden = self.forward(&tokens.ids, &tokens.mask)?;
        let (_, len, _) = hidden.size3()?;
        let rows = tokens
            .lengths
            .iter()
            .enumerate()
            .map(|(i, &tokens)| {
                let row = hidden.f_get(i as i64)?;
                let kept = row.f_narrow(0, 0, tokens)?;
                let zeros = row.f_narrow(0, tokens, len - tokens)?.f_zeros_like()?;
                Tensor::f_cat(&[kept, zeros], 0)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Tensor::f_stack(&rows, 0)?)
    }
}

/// Prompts as the encoder takes them.
pub struct PromptTokens {
    /// `[prompts, length]` int64 token ids.
    pub ids: Tensor,
    /// `[prompts, length]` int64: 1 for tokens, 0 for padding.
    pub mask: Tensor,
    /// Tokens per prompt (its mask's ones).
    pub lengths: Vec<i64>,
}

/// Cleans each prompt with [`prompt_clean`] and tokenizes it to the tokenizer's length
/// (truncated, or padded after its tokens), as the Wan pipelines call their tokenizer.
pub fn tokenize_prompts(
    tokenizer: &PromptTokenizer,
    prompts: &[&str],
) -> Result<PromptTokens, Umt5Error> {
    if prompts.is_empty() {
        return Err(Umt5Error::Input(
            "no prompts; an absent negative prompt is the empty prompt \"\"".to_owned(),
        ));
    }
    let (mut ids, mut mask, mut lengths) = (Vec::new(), Vec::new(), Vec::new());
    for (index, prompt) in prompts.iter().enumerate() {
        let (prompt_ids, prompt_mask) = tokenizer
            .encode_with_mask(&prompt_clean(prompt))
            .map_err(|message| Umt5Error::Prompt { index, message })?;
        lengths.push(prompt_mask.iter().filter(|&&m| m > 0).count() as i64);
        ids.extend(prompt_ids);
        mask.extend(prompt_mask);
    }
    let rows = prompts.len() as i64;
    Ok(PromptTokens {
        ids: Tensor::f_from_slice(&ids)?.f_view([rows, -1])?,
        mask: Tensor::f_from_slice(&mask)?.f_view([rows, -1])?,
        lengths,
    })
}

/// The Wan pipelines' `prompt_clean` as diffusers runs it without the optional `ftfy`
/// package: HTML character references unescaped twice, the ends trimmed, each run of
/// whitespace made one space, the ends trimmed again. With ftfy installed, diffusers' text
/// pipeline also repairs mojibake first (and its image-to-video pipeline requires ftfy);
/// prompts that are valid text come out the same either way.
pub fn prompt_clean(text: &str) -> String {
    let text = html_unescape(&html_unescape(text));
    let mut cleaned = String::with_capacity(text.len());
    let mut in_space = false;
    for c in text.trim_matches(python_space).chars() {
        // Python's `regex` module matches `\s` exactly where Rust sees whitespace.
        if c.is_whitespace() {
            in_space = true;
        } else {
            if in_space {
                cleaned.push(' ');
                in_space = false;
            }
            cleaned.push(c);
        }
    }
    cleaned.trim_matches(python_space).to_owned()
}

/// What Python's `str.strip()` removes: Unicode whitespace and the ASCII separators
/// U+001C..U+001F.
fn python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `html.unescape`: numeric references, and named ones (also without their `;`,
/// longest known prefix first), with the HTML standard's replacements for invalid numbers.
fn html_unescape(text: &str) -> String {
    if !text.contains('&') {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        let reference = &rest[at + 1..];
        match char_reference(reference) {
            Some((len, replacement)) => {
                out.push_str(&replacement);
                rest = &reference[len..];
            }
            None => {
                out.push('&');
                rest = reference;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The reference at the start of `text` (just after its `&`): its length in bytes and its
/// replacement, or `None` when Python's pattern does not match there.
fn char_reference(text: &str) -> Option<(usize, String)> {
    if let Some(number) = text.strip_prefix('#') {
        let (radix, digits, offset) = match number.strip_prefix(['x', 'X']) {
            Some(hex) => (16, hex, 2),
            None => (10, number, 1),
        };
        let len = digits
            .find(|c: char| !c.is_digit(radix))
            .unwrap_or(digits.len());
        if len == 0 {
            return None;
        }
        let value = digits[..len].chars().fold(0u32, |n, c| {
            n.saturating_mul(radix)
                .saturating_add(c.to_digit(radix).unwrap_or(0))
        });
        let semicolon = usize::from(digits[len..].starts_with(';'));
        return Some((offset + len + semicolon, numeric_reference(value)));
    }
    // Up to 32 characters that cannot end a reference, then an optional `;`.
    let name_len = text
        .char_indices()
        .take_while(|&(_, c)| !matches!(c, '\t' | '\n' | '\u{c}' | ' ' | '<' | '&' | '#' | ';'))
        .take(32)
        .last()
        .map(|(i, c)| i + c.len_utf8())?;
    let len = name_len + usize::from(text[name_len..].starts_with(';'));
    let name = &text[..len];
    let entity = |name: &str| {
        let key = format!("&{name}");
        htmlize::ENTITIES
            .get(key.as_bytes())
            .map(|value| String::from_utf8_lossy(value).into_owned())
    };
    if let Some(value) = entity(name) {
        return Some((len, value));
    }
    // The longest prefix of at least two characters that names an entity (only legacy names
    // without `;` can match), the rest kept as it is.
    let boundaries: Vec<usize> = name.char_indices().map(|(i, _)| i).skip(2).collect();
    let replacement = boundaries
        .iter()
        .rev()
        .find_map(|&end| entity(&name[..end]).map(|value| value + &name[end..]))
        .unwrap_or_else(|| format!("&{name}"));
    Some((len, replacement))
}

/// A numeric reference's text, with Python's (and the HTML standard's) handling of numbers
/// that are not characters a document may contain.
fn numeric_reference(value: u32) -> String {
    // Windows-1252 for the C1 range, as browsers read it.
    const C1: [char; 32] = [
        '\u{20ac}', '\u{81}', '\u{201a}', '\u{192}', '\u{201e}', '\u{2026}', '\u{2020}',
        '\u{2021}', '\u{2c6}', '\u{2030}', '\u{160}', '\u{2039}', '\u{152}', '\u{8d}', '\u{17d}',
        '\u{8f}', '\u{90}', '\u{2018}', '\u{2019}', '\u{201c}', '\u{201d}', '\u{2022}', '\u{2013}',
        '\u{2014}', '\u{2dc}', '\u{2122}', '\u{161}', '\u{203a}', '\u{153}', '\u{9d}', '\u{17e}',
        '\u{178}',
    ];
    let replacement = match value {
        0 => Some('\u{fffd}'),
        0x0d => Some('\r'),
        0x80..=0x9f => Some(C1[(value - 0x80) as usize]),
        0xd800..=0xdfff | 0x110000.. => Some('\u{fffd}'),
        0x01..=0x08 | 0x0b | 0x0e..=0x1f | 0x7f | 0xfdd0..=0xfdef => None,
        v if v & 0xfffe == 0xfffe => None,
        v => char::from_u32(v),
    };
    replacement.map(String::from).unwrap_or_default()
}
