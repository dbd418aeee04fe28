"""Weights: safetensors round trip, the config in the metadata, strict loading with named problems."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from vitcore.encoders.seed.config import parse_model
from vitcore.errors import UsageError, WeightsError
from vitcore.encoders.seed.weights import CONFIG_METADATA_KEY, build_encoder, file_sha256, read_weights_config, save_weights, seeded_encoder

SPEC = "dim=32,depth=2,heads=2,image_size=28"


def test_round_trip_rebuilds_the_same_encoder_from_the_file_alone(tmp_path):
    original = seeded_encoder(parse_model(SPEC), seed=5)
    path = tmp_path / "w.safetensors"
    save_weights(original, path)
    loaded, info = build_encoder(weights=path)  # no model given: the file says what it is
    assert loaded.cfg == original.cfg
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in original.state_dict().items())
    assert not info.untrained and info.sha256 == file_sha256(path)
    x = torch.randn(1, 3, 28, 28)
    torch.testing.assert_close(loaded(x).tokens, original(x).tokens, rtol=0, atol=0)


def test_untrained_build_records_the_seed():
    _, info = build_encoder(SPEC, seed=9)
    assert info.untrained and info.seed == 9 and "UNTRAINED" in info.describe()


def _rewrite(path, out, change):
    state = load_file(path)
    change(state)
    save_file(state, out, metadata={CONFIG_METADATA_KEY: parse_model(SPEC).to_json()})


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda s: s.pop("blocks.1.mlp.fc2.weight"), "missing blocks.1.mlp.fc2.weight"),
        (lambda s: s.__setitem__("blocks.0.extra", torch.zeros(2)), "unexpected blocks.0.extra"),
        (lambda s: s.__setitem__("norm.weight", torch.zeros(31)), "norm.weight [31] (expected [32])"),
    ],
)
def test_strict_load_names_every_problem(tmp_path, change, words):
    good = tmp_path / "good.safetensors"
    save_weights(seeded_encoder(parse_model(SPEC)), good)
    bad = tmp_path / "bad.safetensors"
    _rewrite(good, bad, change)
    with pytest.raises(WeightsError) as caught:
        build_encoder(weights=bad)
    assert words in str(caught.value)
    assert str(bad) in str(caught.value)


def test_a_file_without_config_uses_model_and_is_checked_strictly(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file(seeded_encoder(parse_model(SPEC)).state_dict(), path)
    assert read_weights_config(path) is None
    model, _ = build_encoder(SPEC, weights=path)
    assert model.cfg.dim == 32
    with pytest.raises(WeightsError, match="missing|wrong shape"):
        build_encoder("small", weights=path)


def test_contradicting_options_and_unreadable_files_are_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    save_weights(seeded_encoder(parse_model(SPEC)), path)
    with pytest.raises(UsageError, match="does not match"):
        build_encoder("small", weights=path)
    with pytest.raises(UsageError, match="--project-dim"):
        build_encoder(weights=path, project_dim=64)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(WeightsError, match="cannot read"):
        build_encoder(weights=junk)
    with pytest.raises(WeightsError, match="does not exist"):
        build_encoder(weights=tmp_path / "absent.safetensors")
