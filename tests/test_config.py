"""ModelConfig: every impossible combination is refused with a ValueError naming the field;
derived sizes (F, K, D); replace / to_dict / from_dict; preset_config's errors and overrides."""

import re

import pytest

from npformer.config import ModelConfig, config_field_names
from npformer.presets import preset_config, preset_names


def assert_invalid(field, **fields):
    """ModelConfig(**fields) raises a ValueError whose message names ``field`` and its value."""
    with pytest.raises(ValueError, match=rf"config field {re.escape(field)}=") as info:
        ModelConfig(**fields)
    return str(info.value)


def test_the_default_config_is_valid_and_every_preset_too():
    ModelConfig()
    for name in preset_names():
        preset_config(name)


# ---- heads and sizes --------------------------------------------------------------------


def test_heads_must_divide_d_model_unless_head_dim_is_given():
    message = assert_invalid("n_heads", d_model=10, n_heads=4)
    assert "d_model=10" in message and "[1, 2, 5, 10]" in message  # the valid choices
    config = ModelConfig(d_model=10, n_heads=4, head_dim=3)  # explicit D: allowed
    assert config.head_size == 3


def test_kv_heads_must_divide_heads():
    message = assert_invalid("n_kv_heads", n_heads=4, n_kv_heads=3)
    assert "[1, 2, 4]" in message
    assert_invalid("n_kv_heads", n_heads=4, n_kv_heads=8)
    assert_invalid("n_kv_heads", n_heads=4, n_kv_heads=0)
    ModelConfig(n_heads=4, n_kv_heads=2)


@pytest.mark.parametrize("rotary_dim", [3, 5, 34, 64, 0, -2])
def test_rotary_dim_must_be_even_and_at_most_head_dim(rotary_dim):
    # d_model 128, 4 heads: head_dim 32
    message = assert_invalid("rotary_dim", positions="rope", rotary_dim=rotary_dim)
    assert "head_dim=32" in message


def test_rotary_dim_is_only_for_rope():
    assert_invalid("rotary_dim", positions="learned", rotary_dim=8)
    ModelConfig(positions="rope", rotary_dim=8)
    ModelConfig(positions="rope", rotary_dim=32)


def test_odd_head_dim_needs_a_partial_even_rotary_dim():
    # d_model 12, 4 heads: D = 3, which RoPE cannot rotate whole
    message = assert_invalid("rotary_dim", d_model=12, n_heads=4, positions="rope")
    assert "head_dim" in message and "odd" in message
    assert ModelConfig(d_model=12, n_heads=4, positions="rope", rotary_dim=2).head_size == 3
    ModelConfig(d_model=12, n_heads=4, positions="learned")  # no RoPE: odd D is fine


@pytest.mark.parametrize("field, value", [
    ("architecture", "encoder"), ("ffn", "swish"), ("ffn", "GELU"), ("norm", "batchnorm"),
    ("positions", "alibi"), ("block", "parallel3"), ("norm_placement", "sandwich"),
    ("rope_layout", "interleave"), ("softmax", "sparsemax"), ("dtype", "float16"),
    ("dtype", "bfloat16"),
])
def test_unknown_choices_are_refused_with_the_valid_ones(field, value):
    extra = dict(positions="rope") if field == "rope_layout" else {}
    message = assert_invalid(field, **{field: value}, **extra)
    assert value in message and "choose one of" in message


@pytest.mark.parametrize("field", ["qkv_bias", "out_bias", "ffn_bias", "norm_bias", "tie_embeddings",
                                   "final_norm", "document_mask", "scale_embeddings"])
def test_switches_must_be_booleans(field):
    assert_invalid(field, **{field: 1})
    assert_invalid(field, **{field: "yes"})


def test_attention_pattern_entries():
    assert_invalid("attention_pattern", attention_pattern=("dense", "global"))
    assert_invalid("attention_pattern", attention_pattern=())


# ---- windows ------------------------------------------------------------------------------


def test_a_local_layer_needs_a_window():
    message = assert_invalid("window", attention_pattern=("dense", "local"))
    assert "local" in message
    for bad in (0, -3, 2.5, True):
        assert_invalid("window", attention_pattern=("local",), window=bad)
    config = ModelConfig(attention_pattern=("dense", "local"), window=4, n_layers=4)
    assert [config.layer_window(layer) for layer in range(4)] == [None, 4, None, 4]


def test_a_window_needs_a_local_layer():
    message = assert_invalid("window", window=4)
    assert "local" in message
    assert_invalid("window", attention_pattern=("dense", "dense"), window=4)


# ---- combinations ---------------------------------------------------------------------------


def test_rmsnorm_has_no_bias():
    message = assert_invalid("norm_bias", norm="rmsnorm", norm_bias=True)
    assert "norm_bias=False" in message
    ModelConfig(norm="rmsnorm", norm_bias=False)
    ModelConfig(norm="layernorm", norm_bias=False)  # PaLM's LayerNorm without bias


@pytest.mark.parametrize("ffn", ["swiglu", "geglu"])
def test_glu_has_no_biases(ffn):
    message = assert_invalid("ffn_bias", ffn=ffn, ffn_bias=True)
    assert ffn in message and "ffn_bias=False" in message
    ModelConfig(ffn=ffn, ffn_bias=False)


def test_parallel_block_is_pre_norm():
    message = assert_invalid("block", block="parallel", norm_placement="post")
    assert "norm_placement='pre'" in message
    ModelConfig(block="parallel", norm_placement="pre")


@pytest.mark.parametrize("n", [0, 3])
def test_parallel_norms_is_one_or_two(n):
    assert_invalid("parallel_norms", block="parallel", parallel_norms=n)


ENC_DEC = dict(architecture="encoder-decoder", positions="sinusoidal")


def test_encoder_decoder_refuses_decoder_only_features():
    assert_invalid("block", **ENC_DEC, block="parallel")
    assert_invalid("attention_pattern", **ENC_DEC, attention_pattern=("dense", "local"), window=4)
    assert_invalid("positions", **{**ENC_DEC, "positions": "rope"})
    assert_invalid("document_mask", **ENC_DEC, document_mask=True)
    assert ModelConfig(**ENC_DEC, n_encoder_layers=3).encoder_layers == 3
    assert ModelConfig(**ENC_DEC, n_layers=5).encoder_layers == 5  # None: as many as the decoder


def test_encoder_layers_are_for_the_encoder_decoder_only():
    message = assert_invalid("n_encoder_layers", n_encoder_layers=2)
    assert "encoder-decoder" in message


# ---- numbers ------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5, "0.1", None])
def test_dropout_is_a_probability_below_one(p):
    assert_invalid("dropout", dropout=p)


def test_dropout_in_range_is_accepted():
    assert ModelConfig(dropout=0.0).dropout == 0.0
    assert ModelConfig(dropout=0.999).dropout == 0.999


@pytest.mark.parametrize("field", ["norm_eps", "init_std", "logit_scale"])
@pytest.mark.parametrize("value", [-1e-5, 0.0, float("nan"), float("inf")])
def test_positive_numbers(field, value):
    assert_invalid(field, **{field: value})


@pytest.mark.parametrize("field", ["vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len",
                                   "ffn_multiple_of", "n_kv_heads", "head_dim", "d_ff"])
@pytest.mark.parametrize("value", [2.0, True, 0, -4, "8"])
def test_sizes_are_positive_integers(field, value):
    message = assert_invalid(field, **{field: value})
    assert "integer" in message


def test_n_encoder_layers_must_be_an_integer():
    assert_invalid("n_encoder_layers", **ENC_DEC, n_encoder_layers=2.0)
    assert_invalid("n_encoder_layers", **ENC_DEC, n_encoder_layers=True)


@pytest.mark.parametrize("idx", [65, 100, -1, 2.0])
def test_padding_idx_must_be_a_vocabulary_id(idx):
    message = assert_invalid("padding_idx", padding_idx=idx)  # vocab_size 65
    assert "[0, 65)" in message


def test_padding_idx_in_range():
    assert ModelConfig(padding_idx=0).padding_idx == 0
    assert ModelConfig(padding_idx=64).padding_idx == 64


# ---- replace / dict round trip --------------------------------------------------------------


def test_replace_validates_and_refuses_unknown_fields():
    config = ModelConfig()
    assert config.replace(d_model=256).d_model == 256
    assert config.d_model == 128  # frozen: replace returns a copy
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['d_modle'\]"):
        config.replace(d_modle=256)
    with pytest.raises(ValueError, match="config field n_kv_heads="):
        config.replace(n_kv_heads=3)


def test_from_dict_refuses_unknown_fields():
    d = ModelConfig().to_dict()
    d["n_head"] = 4
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['n_head'\]"):
        ModelConfig.from_dict(d)


def test_from_dict_validates():
    d = ModelConfig().to_dict()
    d["ffn"] = "swiglu"  # ffn_bias stays True: impossible
    with pytest.raises(ValueError, match="config field ffn_bias="):
        ModelConfig.from_dict(d)


@pytest.mark.parametrize("name", preset_names())
def test_dict_round_trip(name):
    config = preset_config(name)
    d = config.to_dict()
    assert set(d) == set(config_field_names())
    assert isinstance(d["attention_pattern"], list)  # JSON-friendly
    again = ModelConfig.from_dict(d)
    assert again == config
    assert hash(again) == hash(config)
    assert isinstance(again.attention_pattern, tuple)


# ---- derived sizes ----------------------------------------------------------------------------


def test_ffn_width_plain_is_four_c():
    for ffn in ("relu", "gelu", "gelu_tanh"):
        assert ModelConfig(d_model=96, ffn=ffn).ffn_width == 384


@pytest.mark.parametrize("d_model, multiple_of, expected", [
    (128, 1, 341),  # int(8 * 128 / 3) = int(341.33)
    (128, 32, 352),  # rounded up to a multiple of 32
    (96, 32, 256),  # int(256.0) = 256, already a multiple
    (96, 1, 256),
    (4096, 256, 11008),  # Llama 7B: int(2 * 16384 / 3) = 10922 -> 11008
    (12, 7, 35),  # int(32) -> 35
])
@pytest.mark.parametrize("ffn", ["swiglu", "geglu"])
def test_ffn_width_glu_is_eight_thirds_c_rounded_up(d_model, multiple_of, expected, ffn):
    config = ModelConfig(d_model=d_model, n_heads=4, ffn=ffn, ffn_bias=False,
                         ffn_multiple_of=multiple_of)
    assert config.ffn_width == expected


def test_ffn_multiplier_and_explicit_d_ff():
    assert ModelConfig(ffn_multiplier=2.5).ffn_width == 320
    glu = dict(ffn="swiglu", ffn_bias=False)
    assert ModelConfig(**glu, ffn_multiplier=4.0).ffn_width == 512  # PaLM: 4C even for a GLU
    assert ModelConfig(**glu, ffn_multiplier=3.0, ffn_multiple_of=100).ffn_width == 400
    # an explicit d_ff wins over multiplier and rounding
    assert ModelConfig(**glu, d_ff=77, ffn_multiplier=4.0, ffn_multiple_of=32).ffn_width == 77
    assert ModelConfig(d_ff=77).ffn_width == 77
    for bad in (0, -1.0, "2"):
        assert_invalid("ffn_multiplier", ffn_multiplier=bad)


def test_kv_heads_and_head_size():
    config = ModelConfig(d_model=128, n_heads=8)
    assert (config.kv_heads, config.head_size) == (8, 16)  # None: MHA, C // H
    config = ModelConfig(d_model=128, n_heads=8, n_kv_heads=2, head_dim=24)
    assert (config.kv_heads, config.head_size) == (2, 24)
    assert ModelConfig(n_heads=8, n_kv_heads=1).kv_heads == 1


# ---- presets -----------------------------------------------------------------------------------


def test_unknown_preset_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown preset 'nope'") as info:
        preset_config("nope")
    for name in preset_names():
        assert name in str(info.value)


def test_preset_overrides_with_unknown_fields_raise():
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['layers'\]"):
        preset_config("gpt2", layers=8)


def test_preset_overrides_that_make_it_impossible_raise():
    with pytest.raises(ValueError, match="config field n_kv_heads="):
        preset_config("llama2", n_heads=8, n_kv_heads=3)
    with pytest.raises(ValueError, match="config field rotary_dim="):
        preset_config("gpt-j", rotary_dim=7)
    with pytest.raises(ValueError, match="config field ffn_bias="):
        preset_config("palm", ffn_bias=True)


@pytest.mark.parametrize("name", preset_names())
def test_preset_scales(name):
    base = preset_config(name)
    config = preset_config(name, d_model=256, n_heads=8)
    assert (config.d_model, config.n_heads, config.head_size) == (256, 8, 32)
    # every other field is the preset's
    others = {k: v for k, v in base.to_dict().items() if k not in ("d_model", "n_heads")}
    assert {k: v for k, v in config.to_dict().items() if k in others} == others
    if config.d_ff is None and config.ffn_multiplier is None and config.ffn not in ("swiglu", "geglu"):
        assert config.ffn_width == 1024


_FLOAT_FIELDS = [f.name for f in __import__("dataclasses").fields(ModelConfig)
                 if f.type in ("float", "Optional[float]")]


def test_every_float_field_is_covered():
    # the list the config checks is read from the annotations; make sure it is the real one
    assert set(_FLOAT_FIELDS) == {"attention_scale", "clip_gamma", "clip_zeta", "clip_alpha", "attention_softcap",
                                  "rope_theta", "ffn_multiplier", "norm_eps", "dropout",
                                  "init_std", "logit_scale", "final_logit_softcap", "rope_factor",
                                  "rope_low_freq_factor", "rope_high_freq_factor", "rope_beta_fast",
                                  "rope_beta_slow", "rope_attention_factor", "attention_gate_init"}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", _FLOAT_FIELDS)
def test_non_finite_float_fields_are_refused_by_name(name, value):
    # whether or not this config uses the field (rope_theta without RoPE, clip_* without the
    # clipped softmax): a NaN theta or an infinite soft-cap would only surface as NaN logits
    with pytest.raises(ValueError, match=rf"config field {name}=.* must be a finite number"):
        ModelConfig(**{name: value})


@pytest.mark.parametrize("changes, size", [
    (dict(vocab_size=10**13), "PB"),
    (dict(n_layers=10**12), "EB"),
    (dict(d_model=2**21, n_heads=1), "PB"),
    (dict(max_seq_len=10**13), "PB"),
])
def test_absurd_sizes_are_refused_with_the_memory_they_would_need(changes, size):
    with pytest.raises(ValueError, match=rf"parameters .* would need [\d.]+ {size} of memory"):
        ModelConfig(**changes)


def test_a_big_but_possible_config_is_accepted():
    # Llama-7B-like sizes: 6.7e9 parameters, below the 1e12 limit; nothing is allocated
    config = ModelConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, norm="rmsnorm",
                         norm_bias=False, ffn="swiglu", ffn_bias=False, qkv_bias=False,
                         out_bias=False, positions="rope", tie_embeddings=False)
    assert config.d_model == 4096


def test_a_huge_prime_d_model_gives_its_error_at_once():
    # the "valid n_heads" list used to try every number up to d_model
    with pytest.raises(ValueError, match="n_heads=7"):
        ModelConfig(d_model=2**61 - 1, n_heads=7)


# ---- RoPE scaling fields ------------------------------------------------------------------------

_ROPE = dict(positions="rope")
_ROPE_OK = {
    "default": {},
    "linear": dict(rope_factor=2.0),
    "dynamic": dict(rope_factor=2.0, rope_original_max_seq_len=64),
    "yarn": dict(rope_factor=4.0, rope_original_max_seq_len=64, rope_beta_fast=16.0,
                 rope_beta_slow=2.0, rope_truncate=False, rope_attention_factor=1.5),
    "llama3": dict(rope_factor=8.0, rope_original_max_seq_len=64, rope_low_freq_factor=2.0,
                   rope_high_freq_factor=6.0),
}


@pytest.mark.parametrize("rope_type", sorted(_ROPE_OK))
def test_each_rope_type_accepts_its_own_fields(rope_type):
    config = ModelConfig(**_ROPE, rope_type=rope_type, **_ROPE_OK[rope_type])
    assert ModelConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("rope_type, field, value", [
    ("default", "rope_factor", 2.0),
    ("linear", "rope_original_max_seq_len", 64),
    ("dynamic", "rope_beta_fast", 16.0),
    ("yarn", "rope_low_freq_factor", 2.0),
    ("llama3", "rope_attention_factor", 1.2),
    ("llama3", "rope_truncate", False),
])
def test_a_rope_field_its_type_does_not_read_is_refused(rope_type, field, value):
    changes = dict(_ROPE_OK[rope_type], **{field: value})
    with pytest.raises(ValueError, match=rf"config field {field}=.*not read with rope_type='{rope_type}'"):
        ModelConfig(**_ROPE, rope_type=rope_type, **changes)


@pytest.mark.parametrize("field, value", [("rope_type", "linear"), ("rope_factor", 2.0),
                                          ("rope_original_max_seq_len", 64),
                                          ("rope_truncate", False)])
def test_rope_scaling_fields_need_rope_positions(field, value):
    with pytest.raises(ValueError, match=rf"config field {field}=.*positions='learned'"):
        ModelConfig(**{field: value})


@pytest.mark.parametrize("rope_type, changes, field", [
    ("bogus", {}, "rope_type"),
    ("linear", dict(rope_factor=0.5), "rope_factor"),
    ("dynamic", dict(rope_factor=2.0), "rope_original_max_seq_len"),
    ("yarn", dict(rope_factor=4.0, rope_original_max_seq_len=0), "rope_original_max_seq_len"),
    ("llama3", dict(rope_factor=8.0, rope_original_max_seq_len=64.0), "rope_original_max_seq_len"),
    ("llama3", dict(rope_factor=8.0, rope_original_max_seq_len=64, rope_high_freq_factor=1.0),
     "rope_high_freq_factor"),
    ("llama3", dict(rope_factor=8.0, rope_original_max_seq_len=64, rope_low_freq_factor=0.0),
     "rope_low_freq_factor"),
    ("yarn", dict(rope_factor=4.0, rope_original_max_seq_len=64, rope_beta_slow=0.0), "rope_beta_slow"),
    ("yarn", dict(rope_factor=4.0, rope_original_max_seq_len=64, rope_beta_fast=0.5), "rope_beta_fast"),
    ("yarn", dict(rope_factor=4.0, rope_original_max_seq_len=64, rope_attention_factor=-1.0),
     "rope_attention_factor"),
    ("yarn", dict(rope_factor=4.0, rope_original_max_seq_len=64, rope_truncate=1), "rope_truncate"),
])
def test_impossible_rope_scaling_is_refused_by_name(rope_type, changes, field):
    with pytest.raises(ValueError, match=rf"config field {field}="):
        ModelConfig(**_ROPE, rope_type=rope_type, **changes)
