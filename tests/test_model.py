"""The seed encoder against an independent float64 reference and against RoPE's mathematical properties."""

import math

import pytest
import torch
import torch.nn.functional as F

from vitcore.encoders.seed.config import PRESETS, EncoderConfig, parameter_count, parse_model
from vitcore.errors import UsageError
from vitcore.encoders.seed.model import Attention, Rope2D, VisionEncoder, apply_rope, pool_tokens
from vitcore.encoders.seed.weights import seeded_encoder

TINY = EncoderConfig(dim=32, depth=2, heads=2, patch=14, image_size=56)
SEED_PARAMS = {"small": 38e6, "base": 303e6, "large": 630e6}


# -- configs and shapes ------------------------------------------------------------------
@pytest.mark.parametrize("name", PRESETS)
def test_preset_parameter_count_within_2_percent_of_the_seed(name):
    counted = parameter_count(PRESETS[name])
    with torch.device("meta"):
        actual = sum(p.numel() for p in VisionEncoder(PRESETS[name]).parameters())
    assert actual == counted
    assert abs(actual - SEED_PARAMS[name]) / SEED_PARAMS[name] < 0.02


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("pool", ["none", "mean", "max"])
def test_output_shapes_for_every_preset_and_pooling(name, pool):
    cfg = PRESETS[name]
    with torch.device("meta"):  # shapes only: no memory, no compute
        out = VisionEncoder(cfg)(torch.empty(2, 3, 224, 224), pool=pool, layers=(-2, 0))
    expected = (2, 256, cfg.dim) if pool == "none" else (2, cfg.dim)
    assert tuple(out.tokens.shape) == expected
    assert tuple(out.layers[-2].shape) == expected and tuple(out.layers[0].shape) == expected


def test_projector_widens_every_token_and_pooling_comes_last():
    cfg = parse_model("dim=32,depth=1,heads=2,image_size=28,project_dim=48")
    model = seeded_encoder(cfg)
    x = torch.randn(3, 3, 28, 28)
    tokens = model(x).tokens
    assert tokens.shape == (3, 4, 48)
    torch.testing.assert_close(model(x, pool="mean").tokens, tokens.mean(1))
    torch.testing.assert_close(model(x, pool="max").tokens, tokens.amax(1))


def test_custom_spec_and_invalid_configs():
    cfg = parse_model("dim=64, depth=3, heads=4, image_size=112")
    assert (cfg.dim, cfg.depth, cfg.heads, cfg.image_size, cfg.num_tokens) == (64, 3, 4, 112, 64)
    for bad in ("dim=60,heads=7", "dim=40,heads=4", "image_size=100", "depth=0", "colour=3", "dim=abc", "huge"):
        with pytest.raises(UsageError):
            parse_model(bad)


def test_non_square_inputs_and_other_sizes_work():
    model = seeded_encoder(TINY)
    out = model(torch.randn(1, 3, 42, 70)).tokens  # 3 × 5 grid
    assert out.shape == (1, 15, 32)
    assert torch.isfinite(out).all()


# -- RoPE properties ---------------------------------------------------------------------
def _rotated(rope, vec, row, col):
    angles = rope.angles(torch.tensor([float(row)]), torch.tensor([float(col)]))
    angles = torch.cat([angles, angles], -1)
    return apply_rope(vec[None], angles.cos(), angles.sin())[0]


def test_rope_scores_depend_only_on_relative_offsets():
    rope = Rope2D(head_dim=16)
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(16, generator=gen, dtype=torch.float64), torch.randn(16, generator=gen, dtype=torch.float64)
    q, k = q.float(), k.float()
    base = torch.dot(_rotated(rope, q, 2, 3), _rotated(rope, k, 5, 1))
    for shift_r, shift_c in [(1, 0), (0, 7), (-2, 4), (11, 13)]:
        shifted = torch.dot(_rotated(rope, q, 2 + shift_r, 3 + shift_c), _rotated(rope, k, 5 + shift_r, 1 + shift_c))
        assert shifted.item() == pytest.approx(base.item(), abs=1e-4)


def test_rope_distinguishes_rows_from_columns_and_preserves_norm():
    rope = Rope2D(head_dim=16)
    q = torch.randn(16, generator=torch.Generator().manual_seed(2))
    row_step = torch.dot(_rotated(rope, q, 0, 0), _rotated(rope, q, 1, 0))
    col_step = torch.dot(_rotated(rope, q, 0, 0), _rotated(rope, q, 0, 1))
    assert abs(row_step - col_step) > 1e-3
    # A row offset only turns the first quarter-frequency pairs; a column offset only the second.
    moved_by_row = _rotated(rope, q, 3, 0) - q
    assert moved_by_row[[0, 1, 2, 3, 8, 9, 10, 11]].abs().max() > 1e-3
    assert moved_by_row[[4, 5, 6, 7, 12, 13, 14, 15]].abs().max() < 1e-6
    assert torch.linalg.norm(_rotated(rope, q, 4, 9)) == pytest.approx(torch.linalg.norm(q).item(), rel=1e-5)


def test_rope_cache_is_float32_math_reused_and_grid_shaped():
    rope = Rope2D(head_dim=8)
    cos, sin = rope.cos_sin(3, 5, torch.device("cpu"), torch.float32)
    assert cos.shape == (15, 8) and sin.shape == (15, 8)
    again = rope.cos_sin(3, 5, torch.device("cpu"), torch.float32)
    assert again[0] is cos
    # Token 7 of a 3×5 grid sits at row 1, column 2.
    inv = torch.tensor([1.0, 10000 ** -0.5])
    expected = torch.cat([1 * inv, 2 * inv, 1 * inv, 2 * inv])
    torch.testing.assert_close(cos[7], expected.cos())


# -- attention and the whole encoder against a naive reference ---------------------------
def test_attention_equals_a_naive_softmax_reference():
    torch.manual_seed(0)
    attn = Attention(TINY).double()
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    cos = torch.ones(6, 16, dtype=torch.float64)
    sin = torch.zeros(6, 16, dtype=torch.float64)
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).split(32, dim=-1)
    heads = lambda t: t.reshape(2, 6, 2, 16).transpose(1, 2)  # noqa: E731
    q, k, v = heads(q), heads(k), heads(v)
    scores = q @ k.transpose(-1, -2) / math.sqrt(16)
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    weights = weights / weights.sum(-1, keepdim=True)
    expected = (weights @ v).transpose(1, 2).reshape(2, 6, 32) @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(attn(x, cos, sin), expected)


def _reference_encoder(state, cfg, pixels):
    """The seed architecture written out longhand in float64: unfold patches, pair-by-pair rotation."""
    s = {k: v.double() for k, v in state.items()}
    x = pixels.double()
    B, p, D, H = x.shape[0], cfg.patch, cfg.dim, cfg.heads
    Dh = D // H
    gh, gw = x.shape[2] // p, x.shape[3] // p
    patches = x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(B, gh * gw, 3 * p * p)
    h = patches @ s["patch_embed.proj.weight"].reshape(D, -1).T + s["patch_embed.proj.bias"]

    def norm(t, prefix):
        mu = t.mean(-1, keepdim=True)
        var = ((t - mu) ** 2).mean(-1, keepdim=True)
        return (t - mu) / torch.sqrt(var + cfg.norm_eps) * s[prefix + ".weight"] + s[prefix + ".bias"]

    rows = torch.arange(gh).repeat_interleave(gw).double()
    cols = torch.arange(gw).repeat(gh).double()
    freqs = torch.tensor([cfg.rope_theta ** (-4 * i / Dh) for i in range(Dh // 4)], dtype=torch.float64)

    def rotate(t):  # (B, H, N, Dh): turn pair (j, j + Dh/2) by angle j
        out = t.clone()
        for j in range(Dh // 2):
            angle = (rows * freqs[j]) if j < Dh // 4 else (cols * freqs[j - Dh // 4])
            a, b = t[..., j], t[..., j + Dh // 2]
            out[..., j] = a * torch.cos(angle) - b * torch.sin(angle)
            out[..., j + Dh // 2] = a * torch.sin(angle) + b * torch.cos(angle)
        return out

    for i in range(cfg.depth):
        pre = f"blocks.{i}."
        t = norm(h, pre + "norm1")
        qkv = t @ s[pre + "attn.qkv.weight"].T + s[pre + "attn.qkv.bias"]
        q, k, v = (z.reshape(B, -1, H, Dh).transpose(1, 2) for z in qkv.split(D, -1))
        q, k = rotate(q), rotate(k)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(Dh), dim=-1)
        a = (att @ v).transpose(1, 2).reshape(B, -1, D)
        h = h + a @ s[pre + "attn.proj.weight"].T + s[pre + "attn.proj.bias"]
        t = norm(h, pre + "norm2") @ s[pre + "mlp.fc1.weight"].T + s[pre + "mlp.fc1.bias"]
        t = 0.5 * t * (1 + torch.erf(t / math.sqrt(2)))
        h = h + t @ s[pre + "mlp.fc2.weight"].T + s[pre + "mlp.fc2.bias"]
    h = norm(h, "norm")
    if cfg.project_dim:
        h = h @ s["projector.weight"].T + s["projector.bias"]
    return h


@pytest.mark.parametrize("spec", ["dim=32,depth=2,heads=2,image_size=56", "dim=48,depth=2,heads=3,image_size=42,project_dim=20"])
def test_encoder_matches_an_independent_float64_reference(spec):
    cfg = parse_model(spec)
    model = seeded_encoder(cfg, seed=3)
    # Bigger-than-init weights so every part of the network matters numerically.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size - cfg.patch)  # non-square grid
    expected = _reference_encoder(model.state_dict(), cfg, pixels)
    got = model(pixels).tokens.double()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_layer_outputs_are_the_hidden_states_after_the_named_blocks():
    model = seeded_encoder(TINY)
    x = torch.randn(1, 3, 56, 56)
    out = model(x, layers=(0, -1))
    h, grid = model.patch_embed(x)
    cos, sin = model.rope.cos_sin(*grid, x.device, x.dtype)
    after0 = model.blocks[0](h, cos, sin)
    after1 = model.blocks[1](after0, cos, sin)
    torch.testing.assert_close(out.layers[0], after0)
    torch.testing.assert_close(out.layers[-1], after1)
    torch.testing.assert_close(out.tokens, F.layer_norm(after1, (32,), model.norm.weight, model.norm.bias, 1e-6))


# -- batch invariance and determinism ----------------------------------------------------
def test_an_image_tokens_do_not_depend_on_its_batch_mates():
    model = seeded_encoder(TINY)
    images = torch.randn(5, 3, 56, 56, generator=torch.Generator().manual_seed(4))
    alone = model(images[2:3]).tokens
    together = model(images).tokens[2:3]
    other_mates = model(torch.cat([images[2:3], torch.zeros(2, 3, 56, 56)])).tokens[:1]
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(other_mates, alone, rtol=1e-5, atol=1e-5)


def test_initialisation_is_determined_by_the_seed():
    a, b, c = seeded_encoder(TINY, 7).state_dict(), seeded_encoder(TINY, 7).state_dict(), seeded_encoder(TINY, 8).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], c["blocks.0.attn.qkv.weight"])
    assert torch.equal(a["blocks.0.norm1.weight"], torch.ones(32)) and torch.equal(a["blocks.0.attn.qkv.bias"], torch.zeros(96))
    w = a["blocks.1.mlp.fc1.weight"]
    assert w.abs().max() <= 0.04 and 0.015 < w.std() < 0.02


def test_pool_tokens_rejects_unknown_modes():
    with pytest.raises(ValueError):
        pool_tokens(torch.zeros(1, 2, 3), "median")
