"""Bicubic resizing of relative-position bias tables (tfgcvit.weights.resize) and its use in loading.

The reference is PyTorch's `F.interpolate(mode="bicubic", align_corners=False)`,
which the official detection backbone applies to the tables viewed as
(1, heads, 2w-1, 2w-1). End to end, a 224 checkpoint loaded into a Keras model
with windows 12/12/24/12 must match timm at 384 given the torch-resized tables.
"""

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import FIXTURE_CONFIG, FIXTURES, realistic_weights_, tolerance
from tfgcvit.weights.resize import bicubic_matrix, bicubic_resize, resize_bias_table, table_window_size

torch = pytest.importorskip("torch")
F = torch.nn.functional


def torch_bicubic(array, size):
    """PyTorch's bicubic resize of (N, C, H, W), in the array's own precision."""
    return F.interpolate(torch.from_numpy(array), size=size, mode="bicubic",
                         align_corners=False).numpy()


def official_table_resize(table, window_size):
    """The official detection backbone's recipe, on a (L, heads) numpy table."""
    length, heads = table.shape
    old, new = int(length**0.5), 2 * window_size - 1
    grid = torch.from_numpy(table).permute(1, 0).reshape(1, heads, old, old)
    resized = F.interpolate(grid, size=(new, new), mode="bicubic")
    return resized.reshape(heads, new * new).permute(1, 0).numpy()


@pytest.mark.parametrize(
    "shape, size",
    [((13, 13), (23, 23)), ((27, 27), (47, 47)), ((13, 13), (7, 7)), ((5, 9), (11, 3)),
     ((1, 1), (3, 3)), ((2, 3), (9, 10)), ((13, 13), (13, 13))],
)
def test_bicubic_matches_torch(shape, size):
    images = np.random.default_rng(0).normal(size=(2, 3, *shape))
    # Both in float64: the same arithmetic, so agreement to rounding.
    np.testing.assert_allclose(bicubic_resize(images, size), torch_bicubic(images, size),
                               rtol=0, atol=1e-12)
    # torch in float32 is itself ~1e-6 away from its float64 result.
    images32 = images.astype("float32")
    result32 = bicubic_resize(images32, size)
    assert result32.dtype == np.float32
    np.testing.assert_allclose(result32, torch_bicubic(images32, size), rtol=0, atol=2e-5)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 30), st.integers(1, 30), st.integers(1, 30), st.integers(1, 30))
def test_bicubic_matches_torch_any_size(in_h, in_w, out_h, out_w):
    images = np.random.default_rng(in_h * 31 + in_w).normal(size=(1, 2, in_h, in_w))
    np.testing.assert_allclose(bicubic_resize(images, (out_h, out_w)),
                               torch_bicubic(images, (out_h, out_w)), rtol=0, atol=1e-12)


def test_bicubic_matrix_rows_sum_to_one_and_same_size_is_identity():
    for in_size, out_size in ((13, 23), (23, 13), (1, 5), (7, 7)):
        np.testing.assert_allclose(bicubic_matrix(in_size, out_size).sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_array_equal(bicubic_matrix(9, 9), np.eye(9))
    with pytest.raises(ValueError, match="positive"):
        bicubic_matrix(0, 3)


@pytest.mark.parametrize("old, new, heads", [(7, 12, 2), (14, 24, 4), (7, 16, 1), (12, 7, 3)])
def test_resize_bias_table_matches_official_recipe(old, new, heads):
    table = np.random.default_rng(old).normal(size=((2 * old - 1) ** 2, heads)).astype("float32")
    resized = resize_bias_table(table, new)
    assert resized.shape == ((2 * new - 1) ** 2, heads) and resized.dtype == np.float32
    np.testing.assert_allclose(resized, official_table_resize(table, new), rtol=0, atol=2e-5)


def test_resize_bias_table_identity_and_errors():
    table = np.random.default_rng(0).normal(size=(169, 2)).astype("float32")
    assert resize_bias_table(table, 7) is table
    assert table_window_size(169) == 7 and table_window_size(2209) == 24
    assert table_window_size(168) is None and table_window_size(16) is None  # even side
    with pytest.raises(ValueError, match=r"\(2w-1\)\*\*2 rows"):
        resize_bias_table(table[:168], 12)
    with pytest.raises(ValueError, match="2-D"):
        resize_bias_table(table.reshape(-1), 12)
    with pytest.raises(ValueError, match="positive integer"):
        resize_bias_table(table, 0)


# ---------------------------------------------------------------------------
# Loading: load_torch_weights resizes tables whose window differs.

HIGHRES_WINDOWS = (12, 12, 24, 12)


def _bias_tables(model):
    return {f"levels_{i}/{k}": np.asarray(block.attn.relative_position_bias_table)
            for i in range(4)
            for k, block in enumerate(model.get_layer(f"levels_{i}").blocks)}


def test_load_resizes_fixture_tables_into_384_model(fixture_state_dict):
    from tfgcvit import GCViT, load_torch_weights

    config = dict(FIXTURE_CONFIG, window_size=HIGHRES_WINDOWS)
    model = GCViT(**config, input_shape=(384, 384, 3))
    load_torch_weights(model, fixture_state_dict)
    tables = _bias_tables(model)
    for i, window in enumerate(HIGHRES_WINDOWS):
        for k in range(FIXTURE_CONFIG["depths"][i]):
            source = fixture_state_dict[f"levels.{i}.blocks.{k}.attn.relative_position_bias_table"]
            np.testing.assert_allclose(tables[f"levels_{i}/{k}"], resize_bias_table(source, window),
                                       rtol=0, atol=1e-6)
    # Everything else is copied unchanged, e.g. the head.
    np.testing.assert_array_equal(np.asarray(model.get_layer("head").kernel),
                                  fixture_state_dict["head.weight"].T)
    logits = keras.ops.convert_to_numpy(model(np.zeros((1, 384, 384, 3), "float32")))
    assert logits.shape == (1, 10) and np.all(np.isfinite(logits))


def test_load_without_resizing_reports_the_tables(fixture_state_dict):
    from tfgcvit import GCViT, load_torch_weights
    from tfgcvit.weights.mapping import WeightsMismatchError

    model = GCViT(**dict(FIXTURE_CONFIG, window_size=HIGHRES_WINDOWS), input_shape=(384, 384, 3))
    with pytest.raises(WeightsMismatchError) as error:
        load_torch_weights(model, fixture_state_dict, resize_bias_tables=False)
    message = str(error.value)
    assert "levels.0.blocks.0.attn.relative_position_bias_table" in message
    assert "(169, 1)" in message and "(529, 1)" in message


def test_tables_with_other_heads_are_not_resized(fixture_state_dict):
    from tfgcvit import GCViT, load_torch_weights
    from tfgcvit.weights.mapping import WeightsMismatchError

    state_dict = dict(fixture_state_dict)
    name = "levels.3.blocks.0.attn.relative_position_bias_table"
    state_dict[name] = np.zeros((169, 4), "float32")  # 4 heads where the model has 8
    model = GCViT(**dict(FIXTURE_CONFIG, window_size=HIGHRES_WINDOWS), input_shape=(384, 384, 3))
    with pytest.raises(WeightsMismatchError, match=rf"{name}: checkpoint \(169, 4\)"):
        load_torch_weights(model, state_dict)


def test_weights_path_loads_224_checkpoint_into_384_model():
    """The documented one-liner: a 224 checkpoint file for a model with larger windows."""
    pytest.importorskip("tfgcvit.weights.checkpoint")
    from tfgcvit import GCViT

    model = GCViT(**dict(FIXTURE_CONFIG, window_size=HIGHRES_WINDOWS), input_shape=(384, 384, 3),
                  weights=str(FIXTURES / "custom_224.pth.tar"))
    assert model.get_layer("levels_2").blocks[0].attn.relative_position_bias_table.shape == (2209, 4)


# ---------------------------------------------------------------------------
# End to end against timm at 384 (timm derives windows 12/12/24/12 from img_size).

TIMM_CONFIG = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), mlp_ratio=3,
                   layer_scale=1e-5, num_classes=10)


@pytest.mark.backends
def test_224_weights_at_384_match_timm_with_torch_resized_tables():
    if keras.backend.backend() == "jax":
        pytest.skip("a 384 model compiles for ~40 s on JAX here; resizing is numpy, "
                    "backend-independent")
    gcvit = pytest.importorskip("timm.models.gcvit")
    from tfgcvit import GCViT, load_torch_weights

    # embed_dim 32: timm rounds SE widths to multiples of 8, which equals the
    # official int(C / 4) only from 32 channels on.
    source = gcvit.GlobalContextVit(**TIMM_CONFIG, img_size=224)
    realistic_weights_(source, seed=0)
    state_dict = source.state_dict()
    reference = gcvit.GlobalContextVit(**TIMM_CONFIG, img_size=384).eval()
    resized = {}
    for name, target in reference.state_dict().items():
        value = state_dict[name]
        if value.shape != target.shape:
            assert name.endswith("relative_position_bias_table")
            window = table_window_size(target.shape[0])
            value = torch.from_numpy(official_table_resize(value.numpy(), window))
        resized[name] = value
    reference.load_state_dict(resized)
    images = np.random.default_rng(0).normal(size=(2, 384, 384, 3)).astype("float32")
    with torch.no_grad():
        expected = reference(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()

    model = GCViT(window_size=HIGHRES_WINDOWS, embed_dim=32, depths=(2, 2, 2, 2),
                  num_heads=(1, 2, 4, 8), mlp_ratio=3, layer_scale=1e-5, classes=10,
                  classifier_activation=None, input_shape=(384, 384, 3))
    load_torch_weights(model, {name: value.numpy() for name, value in state_dict.items()})
    # An eager call: no compilation, the fastest way to run one batch on every backend.
    logits = keras.ops.convert_to_numpy(model(images, training=False))
    assert np.std(expected) > 0.1
    np.testing.assert_allclose(logits, expected, rtol=0, atol=tolerance(expected))
