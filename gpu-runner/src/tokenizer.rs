//! Prompts to `text_encoder` input ids: exactly `textLength` of them.
//!
//! - `bytes`: UTF-8 byte `b` is id `b + 1`, 0 pads (the tiny test packages).
//! - `huggingface`: the package's `tokenizer.json`, the file a Hugging Face fast tokenizer
//!   saves (UMT5 for Wan). The prompt is cleaned as the Wan pipelines clean it (runs of
//!   whitespace become one space, the ends are trimmed), encoded with special tokens (UMT5
//!   appends `</s>`), truncated to `textLength` and padded with the file's `padding.pad_id`
//!   (or, where that is null, the `pad_token` of `tokenizer_config.json` beside it).

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tokenizers::{PaddingParams, PaddingStrategy, TruncationParams};

/// The tokenizer file of a `huggingface` package.
pub const TOKENIZER_JSON: &str = "tokenizer.json";

/// Where a saved Hugging Face tokenizer names its pad token when `tokenizer.json` does not
/// (`save_pretrained` leaves the file's `padding` null).
const TOKENIZER_CONFIG_JSON: &str = "tokenizer_config.json";

/// The manifest's `tokenizer` field.
#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TokenizerKind {
    Bytes,
    Huggingface,
}

/// Why a package's tokenizer cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct TokenizerError {
    pub path: PathBuf,
    pub message: String,
}

/// A loaded tokenizer with its fixed output length.
pub enum PromptTokenizer {
    Bytes {
        length: usize,
    },
    Huggingface {
        tokenizer: Box<tokenizers::Tokenizer>,
        length: usize,
    },
}

impl std::fmt::Debug for PromptTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PromptTokenizer::Bytes { length } => write!(f, "bytes({length})"),
            PromptTokenizer::Huggingface { length, .. } => write!(f, "huggingface({length})"),
        }
    }
}

impl PromptTokenizer {
    /// The tokenizer of the package in `dir`; `huggingface` reads `dir/tokenizer.json`.
    pub fn load(
        dir: &Path,
        kind: TokenizerKind,
        length: usize,
    ) -> Result<PromptTokenizer, TokenizerError> {
        if kind == TokenizerKind::Bytes {
            return Ok(PromptTokenizer::Bytes { length });
        }
        let path = dir.join(TOKENIZER_JSON);
        let error = |message: String| TokenizerError {
            path: path.clone(),
            message,
        };
        if !path.is_file() {
            return Err(error(
                "missing; the manifest's `tokenizer` is `huggingface`, which reads this file \
                 (export_diffusers.py writes it)"
                    .to_owned(),
            ));
        }
        let mut tokenizer = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| error(format!("not a Hugging Face tokenizer file: {e}")))?;
        let Some(padding) = tokenizer
            .get_padding()
            .cloned()
            .or_else(|| configured_padding(dir, &tokenizer))
        else {
            return Err(error(format!(
                "field `padding` is null and {TOKENIZER_CONFIG_JSON} beside it names no \
                 `pad_token` of the vocabulary; the runner pads to textLength with that token: \
                 save the tokenizer with padding enabled (export_diffusers.py does) or with its \
                 {TOKENIZER_CONFIG_JSON}"
            )));
        };
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: length,
                ..Default::default()
            }))
            .map_err(|e| error(format!("cannot truncate to textLength {length}: {e}")))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(length),
            ..padding
        }));
        Ok(PromptTokenizer::Huggingface {
            tokenizer: Box::new(tokenizer),
            length,
        })
    }

    /// Exactly `length` ids for `text`.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>, String> {
        let (ids, _) = match self {
            PromptTokenizer::Bytes { .. } => self.encode_with_mask(text)?,
            PromptTokenizer::Huggingface { .. } => {
                let cleaned = text.split_whitespace().collect::<Vec<_>>().join(" ");
                self.encode_with_mask(&cleaned)?
            }
        };
        Ok(ids)
    }

    /// Exactly `length` ids for `text` as given, and its attention mask: 1 for each token of
    /// the text, 0 for padding.
    pub fn encode_with_mask(&self, text: &str) -> Result<(Vec<i64>, Vec<i64>), String> {
        match self {
            PromptTokenizer::Bytes { length } => {
                let mut ids: Vec<i64> = text
                    .bytes()
                    .take(*length)
                    .map(|b| i64::from(b) + 1)
                    .collect();
                let mut mask = vec![1; ids.len()];
                ids.resize(*length, 0);
                mask.resize(*length, 0);
                Ok((ids, mask))
            }
            PromptTokenizer::Huggingface { tokenizer, length } => {
                let encoding = tokenizer
                    .encode(text, true)
                    .map_err(|e| format!("the tokenizer failed: {e}"))?;
                let ids: Vec<i64> = encoding.get_ids().iter().map(|&id| i64::from(id)).collect();
                if ids.len() != *length {
                    return Err(format!(
                        "the tokenizer gave {} ids, not textLength {length}",
                        ids.len()
                    ));
                }
                let mask = encoding
                    .get_attention_mask()
                    .iter()
                    .map(|&m| i64::from(m))
                    .collect();
                Ok((ids, mask))
            }
        }
    }
}

/// Right padding with the `pad_token` of `dir/tokenizer_config.json` (a string, or an object
/// with its `content`), as transformers pads when asked to pad to a length.
fn configured_padding(dir: &Path, tokenizer: &tokenizers::Tokenizer) -> Option<PaddingParams> {
    let text = std::fs::read_to_string(dir.join(TOKENIZER_CONFIG_JSON)).ok()?;
    let config: serde_json::Value = serde_json::from_str(&text).ok()?;
    let token = match &config["pad_token"] {
        serde_json::Value::String(token) => token.clone(),
        other => other["content"].as_str()?.to_owned(),
    };
    Some(PaddingParams {
        pad_id: tokenizer.token_to_id(&token)?,
        pad_token: token,
        ..PaddingParams::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_shift_by_one_pad_with_zero_and_truncate() {
        let t = PromptTokenizer::Bytes { length: 4 };
        assert_eq!(t.encode("ab").unwrap(), vec![98, 99, 0, 0]);
        assert_eq!(t.encode("abcdef").unwrap(), vec![98, 99, 100, 101]);
    }

    #[test]
    fn a_huggingface_package_without_tokenizer_json_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = PromptTokenizer::load(dir.path(), TokenizerKind::Huggingface, 8).unwrap_err();
        assert!(err.to_string().contains("tokenizer.json: missing"), "{err}");
    }
}
