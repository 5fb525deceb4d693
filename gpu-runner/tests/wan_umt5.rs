//! The umT5 text encoder and the Wan prompt encoding against transformers'
//! `UMT5EncoderModel` and diffusers' `WanPipeline` (tests/wan_umt5_reference.py), on the tiny
//! random-weight pipeline `wan-t2v` of tests/make_tiny_wan_models.py: prompt cleaning, token ids and
//! masks, hidden states at the pipelines' 512 tokens, the padded prompt embeddings, and the
//! refusal of weights or configs that do not fit.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use framelane_runner::tokenizer::PromptTokenizer;
use framelane_runner::wan::umt5::{
    Umt5Config, Umt5Encoder, Umt5Error, prompt_clean, tokenize_prompts,
};
use serde_json::json;
use tch::{Device, Kind, Tensor};

/// The Wan pipelines' `max_sequence_length`.
const MAX_LENGTH: usize = 512;

const NEGATIVE: &str = "blurry, the dog";

/// Prompts of different lengths: one that needs cleaning, an empty one, one truncated to 512
/// tokens.
fn prompts() -> Vec<String> {
    vec![
        "a red fox running through snow".to_owned(),
        "  a   cat\tsurfing at\n dusk &amp;amp; the dog &lt;3  ".to_owned(),
        String::new(),
        "Ünïcode: the dog, on the beach!".to_owned(),
        "the fox and the dog in the snow ".repeat(80),
    ]
}

/// Strings whose cleaning differs between careless implementations.
const CLEAN: &[&str] = &[
    "",
    " \t\n ",
    "plain",
    "  two  spaces\tand\ttabs\nand\r\nlines  ",
    "\u{1c}separators\u{1d} at \u{1e}the ends\u{1f}",
    "\u{85}next line\u{a0}no-break\u{3000}ideographic\u{2028}\u{202f}\u{200b}zero-width",
    "&amp; &lt;&gt; &quot;&#39; &amp;amp;lt; &amplt;",
    "&notit; &notin; &not &ampx &amp &copy2024 &CounterClockwiseContourIntegral;",
    "&#65;&#x42;&#X43; &#0; &#13; &#128; &#x9d; &#1; &#x7f; &#xfdd0; &#xffff; &#x1fffe;",
    "&#xd800; &#x110000; &#99999999999999999999; &#; &#x; &#xg; &# 1",
    "& ; &&amp; &;amp &unknown; &abcdefghijklmnopqrstuvwxyz0123456789;",
    "&ampé &Ééé; &lt\u{85}x &#x41\u{3000}",
    "caf&eacute; &Eacute;cole &hellip;&nbsp;end",
];

struct Fixture {
    _dir: tempfile::TempDir,
    pipeline: PathBuf,
    reference: PathBuf,
    json: serde_json::Value,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let pipeline = common::models().join("wan-t2v");
        let reference = dir.path().join("reference.safetensors");
        let case = json!({
            "prompts": prompts(), "negativePrompt": NEGATIVE, "maxLength": MAX_LENGTH,
            "clean": CLEAN,
        });
        let out = common::run_python(
            "wan_umt5_reference.py",
            &[&pipeline, &reference],
            Some(&case.to_string()),
        );
        Fixture {
            json: serde_json::from_str(&out).unwrap(),
            pipeline,
            reference,
            _dir: dir,
        }
    })
}

fn read_tensors(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn device() -> Device {
    common::device().device
}

fn config() -> Umt5Config {
    Umt5Config::from_file(&fixture().pipeline.join("text_encoder/config.json")).unwrap()
}

/// The pipeline's text encoder on the runner's device, after `edit` changed its weights.
fn load(
    config: Umt5Config,
    edit: impl FnOnce(&mut HashMap<String, Tensor>),
) -> Result<Umt5Encoder, Umt5Error> {
    let mut weights = read_tensors(&fixture().pipeline.join("text_encoder/model.safetensors"));
    edit(&mut weights);
    Umt5Encoder::from_tensors(config, device(), Kind::Float, &mut |name| {
        weights.get(name).map(Tensor::shallow_clone)
    })
}

fn encoder() -> Umt5Encoder {
    load(config(), |_| {}).unwrap_or_else(|e| panic!("{e}"))
}

fn load_error(config: Umt5Config, edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> String {
    match load(config, edit) {
        Ok(_) => panic!("the encoder loaded"),
        Err(e) => e.to_string(),
    }
}

fn tokenizer() -> PromptTokenizer {
    PromptTokenizer::load(&fixture().pipeline.join("tokenizer"), MAX_LENGTH).unwrap()
}

fn reference_ids(field: &str) -> Tensor {
    let rows: Vec<Vec<i64>> = serde_json::from_value(fixture().json[field].clone()).unwrap();
    Tensor::from_slice2(&rows)
}

/// The largest difference between `ours` and the reference tensor `name`.
fn off(ours: &Tensor, name: &str) -> f64 {
    let expected = &read_tensors(&fixture().reference)[name];
    assert_eq!(ours.size(), expected.size(), "shape of {name}");
    let diff = (ours.to_device(Device::Cpu) - expected).abs().max();
    let diff = diff.double_value(&[]);
    println!("{name}: max |ours - reference| = {diff:e}");
    diff
}

#[test]
fn prompt_cleaning_is_diffusers_prompt_clean() {
    let expected: Vec<String> = serde_json::from_value(fixture().json["clean"].clone()).unwrap();
    for (text, expected) in CLEAN.iter().zip(&expected) {
        assert_eq!(&prompt_clean(text), expected, "prompt_clean({text:?})");
    }
}

#[test]
fn token_ids_and_masks_are_the_pipeline_tokenizers() {
    let prompts = prompts();
    let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let tokens = tokenize_prompts(&tokenizer(), &prompts).unwrap();
    let (ids, mask) = (reference_ids("ids"), reference_ids("mask"));
    assert_eq!(tokens.ids.size(), [5, MAX_LENGTH as i64]);
    assert!(tokens.ids.equal(&ids), "token ids differ");
    assert!(tokens.mask.equal(&mask), "attention masks differ");
    let lengths: Vec<i64> = Vec::try_from(mask.sum_dim_intlist(1, false, Kind::Int64)).unwrap();
    assert_eq!(tokens.lengths, lengths);
    // An empty prompt is its end token alone; the long one fills all 512 positions.
    assert_eq!((lengths[2], lengths[4]), (1, MAX_LENGTH as i64));
}

#[test]
fn hidden_states_match_transformers_at_512_tokens() {
    let hidden = encoder()
        .forward(&reference_ids("ids"), &reference_ids("mask"))
        .unwrap();
    assert_eq!(hidden.size(), [5, MAX_LENGTH as i64, 32]);
    assert!(off(&hidden, "hidden") < 1e-4);
    assert_eq!(fixture().json["attention"], "sdpa");
}

#[test]
fn prompt_embeddings_match_the_pipelines() {
    let (encoder, tokenizer) = (encoder(), tokenizer());
    let prompts = prompts();
    let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let embeds = encoder.prompt_embeds(&tokenizer, &prompts).unwrap();
    assert!(off(&embeds, "embeds") < 1e-4);
    // Past its tokens every prompt is zeros, exactly.
    let tokens = tokenize_prompts(&tokenizer, &prompts).unwrap();
    for (i, &len) in tokens.lengths.iter().enumerate() {
        let padding = embeds.get(i as i64).narrow(0, len, MAX_LENGTH as i64 - len);
        assert_eq!(padding.abs().sum(Kind::Float).double_value(&[]), 0.0);
    }

    let encode = |prompt: &str| encoder.prompt_embeds(&tokenizer, &[prompt]).unwrap();
    assert!(off(&encode(prompts[0]), "cond") < 1e-4);
    // Guidance without a negative prompt encodes "", as encode_prompt does.
    assert!(off(&encode(""), "uncond_default") < 1e-4);
    assert!(off(&encode(NEGATIVE), "uncond") < 1e-4);
}

#[test]
fn a_missing_layer_bias_is_refused_with_its_name_and_expected_shape() {
    // umT5 has a relative position bias in every layer, not only the first as T5.
    let message = load_error(config(), |weights| {
        weights.remove("encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight");
    });
    assert_eq!(
        message,
        "text encoder weights: tensor \
         `encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight` is missing (the \
         config implies shape [8, 4]); the weights are incomplete or of another model than \
         config.json describes"
    );
}

#[test]
fn a_wrongly_shaped_tensor_is_refused_with_both_shapes() {
    let message = load_error(config(), |weights| {
        weights.insert(
            "encoder.block.0.layer.1.DenseReluDense.wo.weight".to_owned(),
            Tensor::zeros([64, 32], (Kind::Float, Device::Cpu)),
        );
    });
    assert_eq!(
        message,
        "text encoder weights: tensor `encoder.block.0.layer.1.DenseReluDense.wo.weight` has \
         shape [64, 32], but the config implies [32, 64]; the weights and config.json are of \
         different models"
    );
}

#[test]
fn a_t5_config_is_refused() {
    let message = load_error(
        Umt5Config {
            model_type: Some("t5".to_owned()),
            ..config()
        },
        |_| {},
    );
    assert_eq!(
        message,
        "text encoder config field `model_type`: is t5, not umt5: point the model at the umT5 \
         encoder"
    );
}

#[test]
fn no_prompts_is_refused() {
    let Err(e) = tokenize_prompts(&tokenizer(), &[]) else {
        panic!("tokenized no prompts");
    };
    assert_eq!(
        e.to_string(),
        "text encoder input: no prompts; an absent negative prompt is the empty prompt \"\""
    );
}
