//! Prompts to text-encoder input ids: exactly a fixed number of them, from the model's
//! `tokenizer.json`, the file a Hugging Face fast tokenizer saves (UMT5 for Wan). A prompt is
//! encoded with special tokens (UMT5 appends `</s>`), truncated to the length and padded with
//! the file's `padding.pad_id` (or, where that is null, the `pad_token` of
//! `tokenizer_config.json` beside it). The Wan prompt cleaning is `wan::umt5::prompt_clean`.

use std::path::{Path, PathBuf};

use tokenizers::{PaddingParams, PaddingStrategy, TruncationParams};

/// The tokenizer file in a model's tokenizer folder.
pub const TOKENIZER_JSON: &str = "tokenizer.json";

/// Where a saved Hugging Face tokenizer names its pad token when `tokenizer.json` does not
/// (`save_pretrained` leaves the file's `padding` null).
const TOKENIZER_CONFIG_JSON: &str = "tokenizer_config.json";

/// Why a model's tokenizer cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct TokenizerError {
    pub path: PathBuf,
    pub message: String,
}

/// A loaded tokenizer with its fixed output length.
pub struct PromptTokenizer {
    tokenizer: Box<tokenizers::Tokenizer>,
    length: usize,
}

impl std::fmt::Debug for PromptTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PromptTokenizer({})", self.length)
    }
}

impl PromptTokenizer {
    /// The tokenizer in `dir/tokenizer.json`, giving `length` ids per prompt.
    pub fn load(dir: &Path, length: usize) -> Result<PromptTokenizer, TokenizerError> {
        let path = dir.join(TOKENIZER_JSON);
        let error = |message: String| TokenizerError {
            path: path.clone(),
            message,
        };
        if !path.is_file() {
            return Err(error(
                "missing; a model's tokenizer folder holds the tokenizer.json a Hugging Face \
                 fast tokenizer saves (the tokenizer/ folder of a diffusers Wan model)"
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
                 `pad_token` of the vocabulary; the runner pads prompts with that token: save \
                 the tokenizer with padding enabled or with its {TOKENIZER_CONFIG_JSON}"
            )));
        };
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: length,
                ..Default::default()
            }))
            .map_err(|e| error(format!("cannot truncate to {length} tokens: {e}")))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(length),
            ..padding
        }));
        Ok(PromptTokenizer {
            tokenizer: Box::new(tokenizer),
            length,
        })
    }

    /// Exactly `length` ids for `text` as given, and its attention mask: 1 for each token of
    /// the text, 0 for padding.
    pub fn encode_with_mask(&self, text: &str) -> Result<(Vec<i64>, Vec<i64>), String> {
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| format!("the tokenizer failed: {e}"))?;
        let ids: Vec<i64> = encoding.get_ids().iter().map(|&id| i64::from(id)).collect();
        if ids.len() != self.length {
            return Err(format!(
                "the tokenizer gave {} ids, not {}",
                ids.len(),
                self.length
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
    fn a_folder_without_tokenizer_json_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = PromptTokenizer::load(dir.path(), 8).unwrap_err();
        assert!(err.to_string().contains("tokenizer.json: missing"), "{err}");
    }
}
