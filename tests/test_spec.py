import json

import pytest

from dn.core.errors import DnError
from dn.model.spec import SPEC_VERSION, Architecture, ModelSpec, TensorInfo, load_spec, role_of, validate

HF5 = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
       "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100, "rms_norm_eps": 1e-5,
       "max_position_embeddings": 256, "tie_word_embeddings": True,
       "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}}


def test_rope_base_read_from_transformers5_layout():
    a = Architecture.from_hf_config(HF5)
    assert a.rope_theta == 100000.0
    # mlx-lm reads rope_theta and falls back to 10000 silently: the translation must set it.
    assert a.to_mlx_config()["rope_theta"] == 100000.0
    hf = a.to_hf_config()
    assert hf["rope_parameters"]["rope_theta"] == 100000.0 and hf["rope_theta"] == 100000.0


def test_rope_base_read_from_transformers4_layout():
    cfg = {k: v for k, v in HF5.items() if k != "rope_parameters"} | {"rope_theta": 5e5}
    assert Architecture.from_hf_config(cfg).rope_theta == 5e5


def test_translated_configs_build_models_with_the_same_rope():
    pytest.importorskip("transformers")
    from mlx_lm.models import llama
    from transformers import LlamaConfig

    a = Architecture.from_hf_config(HF5)
    assert llama.ModelArgs.from_dict(a.to_mlx_config()).rope_theta == 100000.0
    hf = a.to_hf_config()
    hf.pop("model_type")
    assert LlamaConfig(**hf).rope_parameters["rope_theta"] == 100000.0


def test_unsupported_architecture_is_an_error():
    with pytest.raises(DnError, match="unsupported architecture 'gpt2'"):
        Architecture.from_hf_config({**HF5, "model_type": "gpt2"})


@pytest.mark.parametrize("cfg,want", [({}, "silu"), ({"hidden_act": "silu"}, "silu"), ({"hidden_act": "swish"}, "silu"),
                                      ({"hidden_activation": "gelu_pytorch_tanh", "hidden_act": "gelu"}, "gelu_tanh")])
def test_mlp_act_from_config(cfg, want):
    """config.json's activation (hidden_activation first, as Gemma names it) as dn names it."""
    assert Architecture.from_hf_config({**HF5, **cfg}).mlp_act == want


def test_unsupported_mlp_act_is_an_error():
    with pytest.raises(DnError, match="unsupported MLP activation 'relu'"):
        Architecture.from_hf_config({**HF5, "hidden_act": "relu"}).mlp_act  # noqa: B018 (the property raises)


def test_missing_config_key_is_an_error():
    cfg = dict(HF5)
    del cfg["hidden_size"]
    with pytest.raises(DnError, match="hidden_size"):
        Architecture.from_hf_config(cfg)


def test_json_round_trip_and_version(tmp_path):
    spec = ModelSpec(Architecture.from_hf_config(HF5), [TensorInfo("model.norm.weight", [64], "BF16", "norms")])
    spec.save(tmp_path)
    data = json.loads((tmp_path / "dn_spec.json").read_text())
    assert ModelSpec.from_json(data) == spec
    with pytest.raises(DnError, match="version"):
        ModelSpec.from_json({**data, "version": SPEC_VERSION + 1})


def test_validate_rejects_wrong_shapes(default_spec):
    tensors = [t if t.name != "model.layers.3.mlp.up_proj.weight" else TensorInfo(t.name, [7, 7], t.dtype, t.role)
               for t in default_spec.tensors]
    with pytest.raises(DnError, match=r"model.layers.3.mlp.up_proj.weight has shape \[7, 7\]"):
        validate(default_spec, tensors)
    with pytest.raises(DnError, match="lack tensor"):
        validate(default_spec, tensors[1:])


def test_default_model_spec(default_model_dir, default_spec):
    a = default_spec.architecture
    assert (a.model_type, a.num_hidden_layers, a.hidden_size, a.rope_theta) == ("llama", 30, 576, 100000.0)
    assert a.tie_word_embeddings and load_spec(default_model_dir) == default_spec
    assert {t.role for t in default_spec.tensors} == {"embeddings", "attention", "mlp", "norms"}


def test_roles():
    assert role_of("model.layers.0.self_attn.q_proj.weight") == "attention"
    assert role_of("model.layers.0.mlp.down_proj.weight") == "mlp"
    assert role_of("model.layers.0.input_layernorm.weight") == "norms"
    assert role_of("lm_head.weight") == "lm_head"
