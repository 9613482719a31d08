"""The frozen backbone's packaged weights are real and load strictly; the text encoder works offline."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from iumad.errors import UsageError
from iumad.model.backbone import (BackboneSpec, DepthwiseConvSame, FrozenBackbone, fold_batchnorm,
                                  load_state_dict_renamed, pad_inside_depthwise_convs, resolve_weights)

ESPRESSO, EGYPTIAN_CAT = 967, 285


@pytest.fixture(scope="module")
def classifier() -> torch.nn.Module:
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    path = resolve_weights(BackboneSpec())
    load_state_dict_renamed(net, torch.load(path, map_location="cpu", weights_only=True), path)
    return net.eval()


@pytest.mark.parametrize("name, label, min_prob", [("coffee", ESPRESSO, 0.8), ("chelsea", EGYPTIAN_CAT, 0.6)])
def test_packaged_weights_classify_known_images(classifier: torch.nn.Module, name: str, label: int,
                                                min_prob: float) -> None:
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image (test extra) ships the images")
    img = np.asarray(Image.fromarray(getattr(skimage_data, name)()).resize((224, 224), Image.BICUBIC))
    x = (torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        prob = classifier(x).softmax(-1)[0]
    assert int(prob.argmax()) == label
    assert float(prob[label]) > min_prob


def test_rename_refuses_foreign_weights(tmp_path) -> None:
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = {f"k{i}": v for i, v in enumerate(net.state_dict().values())}
    first = next(iter(state))
    state[first] = torch.zeros(1)
    with pytest.raises(UsageError, match="does not fit"):
        load_state_dict_renamed(net, state, tmp_path / "foreign.pth")
    with pytest.raises(UsageError, match="tensors but"):
        load_state_dict_renamed(net, dict(list(state.items())[:-1]), tmp_path / "short.pth")


def test_backbone_is_frozen_multilevel_and_deterministic() -> None:
    bb = FrozenBackbone(BackboneSpec(input_size=64))
    assert bb.channels == [40, 112] and bb.out_channels == 152
    assert not any(p.requires_grad for p in bb.parameters())
    bb.train()
    assert not bb.training and not bb.net.training  # batch-norm statistics stay frozen
    x = torch.rand(2, 3, 64, 64, requires_grad=True)
    y = bb(x)
    assert y.shape == (2, 152, 8, 8) and not y.requires_grad
    assert torch.equal(y, bb(x.detach()))


def test_bfloat16_backbone_gives_float32_features_close_to_the_float32_ones() -> None:
    exact, low = (FrozenBackbone(BackboneSpec(input_size=64, precision=p)) for p in ("float32", "bfloat16"))
    assert all(p.dtype == torch.bfloat16 for p in low.net.parameters())
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    a, b = exact(x), low(x)
    assert b.dtype == torch.float32 and b.shape == a.shape and torch.equal(b, low(x))
    assert float((a - b).abs().mean() / a.abs().mean()) < 0.08  # about 3.5 % at 288 px
    assert np.corrcoef(a.ravel().numpy(), b.ravel().numpy())[0, 1] > 0.99
    assert low.spec.cache_id() != exact.spec.cache_id()  # their features never share a cache entry


def test_folded_batchnorm_gives_the_unfolded_features(classifier: torch.nn.Module) -> None:
    bb = FrozenBackbone(BackboneSpec(input_size=96))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in bb.net.modules())  # every one folded
    x = torch.rand(2, 3, 96, 96)
    x_norm = (x - bb.mean) / bb.std
    with torch.no_grad():
        ref = classifier.forward_intermediates(x_norm, indices=[2, 3], intermediates_only=True)
    ref = torch.cat([ref[0], torch.nn.functional.interpolate(ref[1], size=ref[0].shape[-2:], mode="bilinear",
                                                             align_corners=False)], 1)
    torch.testing.assert_close(bb(x), ref, rtol=1e-4, atol=1e-4)
    assert fold_batchnorm(bb.net) == 0  # nothing left to fold


@pytest.mark.parametrize("kernel, stride", [(3, 2), (5, 2), (3, 1), (4, 2), (5, 3)])
@pytest.mark.parametrize("size", [7, 14, 15, 28])
def test_padding_inside_a_depthwise_conv_gives_timm_same_padding_bit_for_bit(kernel: int, stride: int, size: int) -> None:
    torch.manual_seed(kernel * 100 + stride * 10 + size)
    conv = timm.layers.Conv2dSame(24, 24, kernel, stride=stride, groups=24).eval()
    net = torch.nn.Sequential(conv)
    assert pad_inside_depthwise_convs(net) == 1 and type(net[0]) is DepthwiseConvSame
    x = torch.randn(3, 24, size, size + 3).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref, out = conv(x), net[0](x)
    assert out.shape == ref.shape and torch.equal(out, ref)


def test_backbone_pads_inside_its_depthwise_convs_only() -> None:
    bb = FrozenBackbone(BackboneSpec(input_size=64))
    kinds = [type(m) for m in bb.net.modules()]
    assert kinds.count(DepthwiseConvSame) == 3  # the stride-2 depthwise convs up to stride 16
    assert kinds.count(timm.layers.Conv2dSame) == 1  # the dense stem keeps F.pad: its sums could reorder


def test_missing_weight_file_names_the_fix(tmp_path) -> None:
    with pytest.raises(UsageError, match="backbone weight file not found"):
        resolve_weights(BackboneSpec(weights=str(tmp_path / "nope.pth")))
    with pytest.raises(UsageError, match="no packaged weights"):
        resolve_weights(BackboneSpec(name="resnet18"))


def test_cache_id_depends_on_weights_content(tmp_path) -> None:
    spec = BackboneSpec()
    copy = tmp_path / "w.pth"
    copy.write_bytes(resolve_weights(spec).read_bytes())
    same = BackboneSpec(weights=str(copy))
    assert same.cache_id() == spec.cache_id()
    changed = tmp_path / "w2.pth"
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF
    changed.write_bytes(bytes(data))
    assert BackboneSpec(weights=str(changed)).cache_id() != spec.cache_id()
    assert BackboneSpec(input_size=256).cache_id() != spec.cache_id()


def test_text_encoder_offline_embeddings() -> None:
    from iumad.model.text import EMBED_DIM, TextEncoder, model_dir

    enc = TextEncoder()
    a = enc.class_embedding("cable_gland")
    assert a.shape == (EMBED_DIM,) and a.dtype == np.float32
    assert abs(float(np.linalg.norm(a)) - 1) < 1e-5
    np.testing.assert_array_equal(a, enc.class_embedding("cable_gland"))
    # a paraphrase is closer than an unrelated object
    assert a @ enc.class_embedding("cable-gland") > a @ enc.class_embedding("banana") + 0.2
    # the vectors are all-MiniLM-L6-v2's: attention-masked mean pooling of the plain transformer's tokens
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir(), local_files_only=True)
    plain = AutoModel.from_pretrained(model_dir(), local_files_only=True).eval()
    sentences = ["a screw", "an industrial photo of a normal cable gland."]  # padded: the mask matters
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = plain(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    manual = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    np.testing.assert_allclose(enc.encode(sentences), manual, atol=1e-5)
