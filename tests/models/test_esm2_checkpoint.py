"""ESM-2 checkpoint loading and conversion: HF dir, fair-esm .pt, our Orbax format;
the preset read from each (a size that is no preset, 2 layers x 32 wide), through a
local path and a file:// URL (the stand-in for gs://, through the same tf.io.gfile).

Budget: ~35 s on 2 busy cores (one tiny model shape, a few jits).
"""

import json
import os

os.environ.setdefault("USE_TF", "0")

import jax
import numpy as np
import pytest

from bihier_jax import convert_esm
from bihier_jax.common import residue_constants as rc
from bihier_jax.models import esm2
from bihier_jax.models.esm2 import checkpoint as esm2_checkpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
esm = pytest.importorskip("esm")

LAYERS, WIDTH, HEADS = 2, 32, 4
SEQUENCES = ["MKT<mask>YIAKQRQISFVK", "ACDEFGHIK"]


def _hf_config():
  return transformers.EsmConfig(
      vocab_size=33, hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
      intermediate_size=4 * WIDTH, position_embedding_type="rotary", token_dropout=True,
      emb_layer_norm_before=False, mask_token_id=rc.ESM_MASK, pad_token_id=rc.ESM_PAD,
      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=1026,
      attn_implementation="eager")


def _randomise_(module):
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if name.endswith("bias"):
        p.copy_(0.05 * torch.randn(p.shape, generator=gen))
  return module


@pytest.fixture(scope="module")
def hf_mlm_dir(tmp_path_factory):
  torch.manual_seed(0)
  model = _randomise_(transformers.EsmForMaskedLM(_hf_config()).eval())
  path = tmp_path_factory.mktemp("hf_mlm")
  model.save_pretrained(path)  # safetensors
  return str(path), model


def _reference_outputs(model, tokens):
  t = torch.from_numpy(tokens).long()
  with torch.no_grad():
    out = model(t, attention_mask=(t != rc.ESM_PAD).long(), output_hidden_states=True)
  return out.hidden_states[-1].numpy(), out.logits.numpy()


def _port_outputs(model, params, tokens):
  out = jax.jit(lambda p, t: model.apply({"params": p}, t, return_mlm_logits=True,
                                         output_hidden_states=False))(params, tokens)
  return np.asarray(out.last_hidden_state), np.asarray(out.logits)


def test_hf_dir_convert_load_round_trip(hf_mlm_dir, tmp_path):
  src, model = hf_mlm_dir
  tokens = esm2.tokenize(SEQUENCES)  # padded row 1 has no <mask>: transformers agrees
  ref_last, ref_logits = _reference_outputs(model, tokens)

  direct_model, direct = esm2.from_pretrained(src)
  assert direct_model.config.mlm_head and direct_model.config.num_heads == HEADS
  last, logits = _port_outputs(direct_model, direct, tokens)
  np.testing.assert_allclose(last, ref_last, atol=1e-5, rtol=0)
  np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=0)

  out = tmp_path / "converted"
  assert convert_esm.main(["--src", src, "--out", str(out)]) == 0
  meta = json.loads((out / "config.json").read_text())
  assert meta["format"] == esm2_checkpoint.FORMAT
  assert meta["config"]["num_layers"] == LAYERS and meta["config"]["dtype"] == "float32"
  loaded_model, loaded = esm2.from_pretrained(str(out))
  assert loaded_model.config == direct_model.config
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(direct)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Converting again into the same place is refused unless asked.
  assert convert_esm.main(["--src", src, "--out", str(out)]) == 1
  # Execution options can change on load; architecture stays.
  bf16_model, _ = esm2.from_pretrained(str(out), dtype="bfloat16", remat=True)
  assert bf16_model.config.dtype == np.dtype("bfloat16") and bf16_model.config.remat


def test_hf_encoder_without_head_and_pytorch_bin(tmp_path):
  torch.manual_seed(1)
  model = _randomise_(transformers.EsmModel(_hf_config(), add_pooling_layer=False).eval())
  model.save_pretrained(tmp_path, safe_serialization=False)  # pytorch_model.bin
  assert (tmp_path / "pytorch_model.bin").exists()
  port, params = esm2.from_pretrained(str(tmp_path))
  assert not port.config.mlm_head and "lm_head" not in params
  tokens = esm2.tokenize(SEQUENCES)
  t = torch.from_numpy(tokens).long()
  with torch.no_grad():
    ref = model(t, attention_mask=(t != rc.ESM_PAD).long()).last_hidden_state.numpy()
  out = port.apply({"params": params}, tokens, output_hidden_states=False)
  np.testing.assert_allclose(np.asarray(out.last_hidden_state), ref, atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match="no MLM head"):
    port.apply({"params": params}, tokens, return_mlm_logits=True)


def test_fair_esm_pt_file_and_drop_head(tmp_path):
  torch.manual_seed(2)
  alphabet = esm.Alphabet.from_architecture("ESM-1b")
  model = _randomise_(esm.model.esm2.ESM2(num_layers=LAYERS, embed_dim=WIDTH,
                                          attention_heads=HEADS, alphabet=alphabet).eval())
  # Release layout: {'model': prefixed state dict, 'cfg': {'model': Namespace}}.
  import argparse  # pylint: disable=import-outside-toplevel
  state = {f"encoder.sentence_encoder.{k}": v for k, v in model.state_dict().items()}
  cfg = {"model": argparse.Namespace(encoder_layers=LAYERS, encoder_embed_dim=WIDTH,
                                     encoder_attention_heads=HEADS, token_dropout=True)}
  path = tmp_path / "esm2_tiny.pt"
  torch.save({"model": state, "cfg": cfg}, path)

  port, params = esm2.from_pretrained(str(path))
  tokens = esm2.tokenize(SEQUENCES)
  with torch.no_grad():
    ref = model(torch.from_numpy(tokens).long())["logits"].numpy()
  _, logits = _port_outputs(port, params, tokens)
  np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)

  out = tmp_path / "converted"
  assert convert_esm.main(["--src", str(path), "--out", str(out), "--no-mlm-head"]) == 0
  headless, hparams = esm2.from_pretrained(str(out))
  assert not headless.config.mlm_head and "lm_head" not in hparams


def test_mismatch_error_lists_names_and_shapes(hf_mlm_dir, tmp_path):
  from safetensors.numpy import load_file, save_file  # pylint: disable=import-outside-toplevel
  src, _ = hf_mlm_dir
  tensors = load_file(os.path.join(src, "model.safetensors"))
  del tensors["esm.encoder.layer.1.attention.self.key.weight"]
  tensors["esm.encoder.layer.0.intermediate.dense.bias"] = np.zeros(7, np.float32)
  tensors["esm.encoder.layer.0.extra.weight"] = np.zeros((2, 3), np.float32)
  broken = tmp_path / "broken"
  broken.mkdir()
  save_file(tensors, str(broken / "model.safetensors"))
  (broken / "config.json").write_text(open(os.path.join(src, "config.json")).read())
  with pytest.raises(esm2_checkpoint.CheckpointMismatchError) as info:
    esm2.from_pretrained(str(broken))
  message = str(info.value)
  assert "missing (1)" in message
  assert "encoder.layer.1.attention.self.key.weight (32, 32)" in message
  assert "encoder.layer.0.intermediate.dense.bias: checkpoint (7,), expected (128,)" in message
  assert "unexpected (1)" in message and "encoder.layer.0.extra.weight (2, 3)" in message
  # The CLI reports the same list and fails.
  assert convert_esm.main(["--src", str(broken), "--out", str(tmp_path / "x")]) == 1


def test_non_esm2_config_refused(hf_mlm_dir, tmp_path):
  src, _ = hf_mlm_dir
  config = json.loads(open(os.path.join(src, "config.json")).read())
  config["position_embedding_type"] = "absolute"
  bad = tmp_path / "absolute"
  bad.mkdir()
  (bad / "config.json").write_text(json.dumps(config))
  os.symlink(os.path.join(src, "model.safetensors"), bad / "model.safetensors")
  with pytest.raises(esm2_checkpoint.CheckpointMismatchError, match="rotary"):
    esm2.from_pretrained(str(bad))


def test_orbax_save_restore_random_params(tmp_path):
  cfg = esm2.config_from_preset("tiny", mlm_head=False)
  params = esm2.init_params(cfg, seed=5)
  esm2_checkpoint.save(str(tmp_path / "ck"), cfg, params)
  with pytest.raises(FileExistsError):
    esm2_checkpoint.save(str(tmp_path / "ck"), cfg, params)
  restored_cfg, restored = esm2_checkpoint.load_pretrained(str(tmp_path / "ck"))
  assert restored_cfg == cfg
  assert jax.tree.structure(restored) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _fair_esm_pt(path):
  """A fair-esm release-layout .pt of the module's size (no cfg: shapes only)."""
  alphabet = esm.Alphabet.from_architecture("ESM-1b")
  model = esm.model.esm2.ESM2(num_layers=LAYERS, embed_dim=WIDTH, attention_heads=HEADS,
                              alphabet=alphabet)
  state = {f"encoder.sentence_encoder.{k}": v for k, v in model.state_dict().items()}
  torch.save({"model": state}, path)
  return str(path)


def test_preset_read_from_every_format_and_url(hf_mlm_dir, tmp_path):
  from bihier_jax import config_check  # pylint: disable=import-outside-toplevel
  from configs import demo  # pylint: disable=import-outside-toplevel
  src, _ = hf_mlm_dir
  name = f"L{LAYERS}_D{WIDTH}_H{HEADS}_F{4 * WIDTH}"  # no released size
  converted = str(tmp_path / "converted")
  assert convert_esm.main(["--src", src, "--out", converted]) == 0
  # fair-esm without cfg: the heads come from the file... or are not guessed.
  pt = _fair_esm_pt(tmp_path / "esm2.pt")
  with pytest.raises(esm2_checkpoint.CheckpointMismatchError, match="not a released"):
    esm2_checkpoint.preset_of(pt)
  for path in (src, "file://" + src, converted, "file://" + converted):
    assert esm2_checkpoint.preset_of(path) == name, path
  # The architecture comes from config.json alone: no weights are read.
  released = tmp_path / "t12"
  released.mkdir()
  hf = json.loads(open(os.path.join(src, "config.json")).read())
  hf.update(num_hidden_layers=12, hidden_size=480, num_attention_heads=20,
            intermediate_size=1920)
  (released / "config.json").write_text(json.dumps(hf))
  assert esm2_checkpoint.preset_of(str(released)) == "t12_35M"
  assert esm2.config_from_preset(name).num_layers == LAYERS
  with pytest.raises(ValueError, match="L<layers>_D<width>"):
    esm2.config_from_preset("L2_D32")

  # The train command: model.esm.preset from the checkpoint, not from the config file.
  config = demo.get_config("tiny")
  config.model.esm.checkpoint = "file://" + src
  note = config_check.check_esm_checkpoint(config)
  assert config.model.esm.preset == name
  assert note == (f"model.esm.preset={name} read from model.esm.checkpoint=file://{src} "
                  "(2 layers x 32 wide, 4 heads; the config file said tiny)")
  config_check.check_values(config)
  with pytest.raises(config_check.ConfigError) as info:  # named on the command line
    config_check.check_esm_checkpoint(config, explicit_preset="tiny")
  assert str(info.value) == (
      f"--config.model.esm.preset=tiny conflicts with model.esm.checkpoint=file://{src}, "
      f"a {name} checkpoint (2 layers x 32 wide, 4 heads): leave the preset out (it is "
      "read from the checkpoint) or give a checkpoint of that size")
  config.model.esm.checkpoint = str(tmp_path / "nowhere")
  with pytest.raises(config_check.ConfigError, match="nowhere: no such file or dir"):
    config_check.check_esm_checkpoint(config)


def test_weights_through_a_file_url_equal_the_local_ones(hf_mlm_dir, tmp_path):
  src, model = hf_mlm_dir
  converted = str(tmp_path / "converted")
  assert convert_esm.main(["--src", "file://" + src, "--out", converted]) == 0
  # The larger Hub checkpoints come as shards (pytorch_model-0000i-of-0000n.bin).
  sharded = tmp_path / "sharded"
  model.save_pretrained(sharded, safe_serialization=False, max_shard_size="40KB")
  assert (sharded / "pytorch_model.bin.index.json").exists()
  _, local = esm2_checkpoint.load_pretrained(src)
  for path in ("file://" + src, "file://" + converted, f"file://{sharded}"):
    cfg, remote = esm2_checkpoint.load_pretrained(path)
    assert cfg.num_layers == LAYERS and cfg.mlm_head
    assert jax.tree.structure(remote) == jax.tree.structure(local)
    for a, b in zip(jax.tree.leaves(remote), jax.tree.leaves(local)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
