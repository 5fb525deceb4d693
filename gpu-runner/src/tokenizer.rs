//! Prompts to `text_encoder` input ids: exactly `textLength` of them.
//!
//! - `bytes`: UTF-8 byte `b` is id `b + 1`, 0 pads (the tiny test packages).
//! - `huggingface`: the package's `tokenizer.json`, the file a Hugging Face fast tokenizer
//!   saves (UMT5 for Wan). The prompt is cleaned as the Wan pipelines clean it (runs of
//!   whitespace become one space, the ends are trimmed), encoded with special tokens (UMT5
//!   appends `</s>`), truncated to `textLength` and padded with the file's `padding.pad_id`.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tokenizers::{PaddingParams, PaddingStrategy, TruncationParams};

/// The tokenizer file of a `huggingface` package.
pub const TOKENIZER_JSON: &str = "tokenizer.json";

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
        let Some(padding) = tokenizer.get_padding().cloned() else {
            return Err(error(
                "field `padding` is null; the runner pads to textLength with the pad token it \
                 names: save the tokenizer with padding enabled (export_diffusers.py does)"
                    .to_owned(),
            ));
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
        match self {
            PromptTokenizer::Bytes { length } => {
                let mut ids: Vec<i64> = text
                    .bytes()
                    .take(*length)
                    .map(|b| i64::from(b) + 1)
                    .collect();
                ids.resize(*length, 0);
                Ok(ids)
            }
            PromptTokenizer::Huggingface { tokenizer, length } => {
                let cleaned = text.split_whitespace().collect::<Vec<_>>().join(" ");
                let encoding = tokenizer
                    .encode(cleaned, true)
                    .map_err(|e| format!("the tokenizer failed: {e}"))?;
                let ids: Vec<i64> = encoding.get_ids().iter().map(|&id| i64::from(id)).collect();
                if ids.len() != *length {
                    return Err(format!(
                        "the tokenizer gave {} ids, not textLength {length}",
                        ids.len()
                    ));
                }
                Ok(ids)
            }
        }
    }
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
