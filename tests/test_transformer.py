"""BackboneFeatures: the pretrained-CNN feature transformer."""

import pickle

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer

from skpatchad.features import BackboneFeatures


@pytest.fixture(scope="module")
def images():
    return np.random.RandomState(0).randint(0, 256, size=(3, 64, 64, 3), dtype=np.uint8)


def test_transform_shape_and_mixed_sizes(images):
    features = BackboneFeatures(image_size=64).fit(images)
    out = features.transform(images)
    assert out.shape == (3, 8, 8, 152) and out.dtype == np.float32 and np.isfinite(out).all()
    # any size and channel count is resized to image_size
    mixed = features.transform([images[0, :40], images[1, :, :50, 0]])
    assert mixed.shape == (2, 8, 8, 152)
    np.testing.assert_allclose(features.transform(images[:1]), out[:1], rtol=1e-4, atol=1e-4)  # batch-size rounding


def test_layer_order_does_not_change_the_grid(images):
    shallow, deep = BackboneFeatures(image_size=64).fit(images).backbone_.layers
    n_shallow = BackboneFeatures(image_size=64, layers=[shallow]).fit_transform(images).shape[-1]
    shallow_first = BackboneFeatures(image_size=64, layers=[shallow, deep]).fit_transform(images)
    deep_first = BackboneFeatures(image_size=64, layers=[deep, shallow]).fit_transform(images)
    # upsampled to the finest grid either way, channels in the order asked for
    assert deep_first.shape == shallow_first.shape == (3, 8, 8, 152)
    np.testing.assert_allclose(deep_first[..., -n_shallow:], shallow_first[..., :n_shallow], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(deep_first[..., :-n_shallow], shallow_first[..., n_shallow:], rtol=1e-5, atol=1e-5)


def test_random_weights_follow_random_state_and_leave_torch_rng_alone(images):
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    with pytest.warns(UserWarning):
        a = BackboneFeatures(image_size=64, weights=None, random_state=0).fit_transform(images)
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)
    with pytest.warns(UserWarning):
        b = BackboneFeatures(image_size=64, weights=None, random_state=0).fit_transform(images)
        c = BackboneFeatures(image_size=64, weights=None, random_state=1).fit_transform(images)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


@pytest.mark.parametrize("params, match", [({"batch_size": 0}, "batch_size"), ({"batch_size": 2.5}, "batch_size"),
                                           ({"batch_size": True}, "batch_size"), ({"image_size": 8}, "image_size"),
                                           ({"image_size": 64, "crop_size": 80}, "crop_size"),
                                           ({"device": "tpu"}, "device")])
def test_invalid_parameters_fail_in_fit_with_their_name(images, params, match):
    with pytest.raises(ValueError, match=match):
        BackboneFeatures(**params).fit(images)


def test_unfitted_transform_raises_and_tags_say_fit_is_required(images):
    features = BackboneFeatures(image_size=64)
    assert features.__sklearn_tags__().requires_fit
    with pytest.raises(NotFittedError):
        features.transform(images)
    with pytest.raises(ValueError, match="batch_size"):  # a failed refit forgets the old network
        features.fit(images).set_params(batch_size=-1).fit(images)
    with pytest.raises(NotFittedError):
        features.transform(images)


def test_pipeline_clone_and_pickle(images):
    pipeline = make_pipeline(BackboneFeatures(image_size=64),
                             FunctionTransformer(lambda f: f.reshape(len(f), -1).mean(axis=1, keepdims=True)))
    out = pipeline.fit_transform(images)
    assert out.shape == (3, 1)
    features = clone(BackboneFeatures(image_size=64, batch_size=2)).fit(images)
    restored = pickle.loads(pickle.dumps(features))
    np.testing.assert_array_equal(restored.transform(images), features.transform(images))


@pytest.mark.parametrize("size", [128, 160])
def test_resnet_cells_sit_at_stride_multiples(size):
    # "corner" alignment: a ResNet cell (i, j) of stride s looks at input pixel
    # (s i, s j). The centroid of its input gradient (random weights, a noisy
    # grey input, a random projection of the channels) says so within 1.5 px;
    # the even layout would put it 3.5 (layer2) or 7.5 (layer3) px further on.
    from skpatchad.features.backbone import make_backbone
    from skpatchad.features.maps import cell_centres

    with torch.random.fork_rng():
        torch.manual_seed(0)
        backbone = make_backbone("resnet18", weights=None)
    assert backbone.cell_alignment == "corner"
    assert make_backbone("efficientnet_lite0").cell_alignment == "even"
    generator = torch.Generator().manual_seed(0)
    x = (0.5 + 0.1 * torch.randn(1, 3, size, size, generator=generator)).requires_grad_(True)
    positions = torch.arange(size, dtype=torch.float64)
    for level, features in enumerate(backbone(x)):
        n = features.shape[-1]
        i = n // 2
        projection = torch.randn(features.shape[1], generator=generator)
        gradient, = torch.autograd.grad((features[0, :, i, i] * projection).sum(), x, retain_graph=True)
        weight = gradient.abs().sum((0, 1)).double()
        centroid = [float((weight.sum(1 - axis) * positions).sum() / weight.sum()) for axis in (0, 1)]
        corner = float(cell_centres(n, size, "corner")[i])
        even = float(cell_centres(n, size, "even")[i])
        assert corner == (8, 16)[level] * i
        for value in centroid:
            assert abs(value - corner) < 1.5 and abs(value - even) > 2.0, (level, centroid, corner, even)
