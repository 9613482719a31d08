"""The learned network's parts: what each prediction may see (mapping, masking), the uncertainty term,
the bottleneck and L_IB, the decoder ablation, fusion weights and distillation."""

from __future__ import annotations

import copy

import pytest
import torch

from iumad.config import ContinualConfig, ModelConfig
from iumad.continual.distill import Distiller
from iumad.model.fusion import Bottleneck, ib_loss
from iumad.model.memory import ClassState
from iumad.model.network import ConvBlock, IUMADNet, partition_masks, prediction_loss, tasks_for
from iumad.model.scorer import fuse

C, G = 24, 8


def net_of(**model) -> IUMADNet:
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, bottleneck=16, depth=1, heads=2, d_state=4)
    for k, v in model.items():
        setattr(cfg, k, v)
    return IUMADNet(cfg, C, text_dim=8).eval()


def feats_of(b: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {m: torch.randn(b, C, G, G, generator=gen) for m in ("rgb", "geometry")}


TEXT = torch.nn.functional.normalize(torch.randn(2, 8, generator=torch.Generator().manual_seed(1)), dim=1)


@pytest.mark.parametrize("h,w,block", [(8, 8, 1), (7, 5, 1), (1, 3, 1), (8, 8, 2), (9, 7, 3)])
def test_partitions_cover_the_grid_once_and_hidden_squares_touch_only_visible_tokens(h: int, w: int,
                                                                                   block: int) -> None:
    parts = partition_masks((h, w), block)
    assert parts.shape == (4, h, w) and torch.equal(parts.sum(0), torch.ones(h, w, dtype=torch.long))
    square = lambda i, j: (i // block, j // block)  # noqa: E731
    for part in parts:
        for i, j in part.nonzero().tolist():
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    ni, nj = i + di, j + dj
                    if 0 <= ni < h and 0 <= nj < w and square(ni, nj) != square(i, j):
                        assert not part[ni, nj]


def test_tasks_map_across_modalities_or_reconstruct_each() -> None:
    assert tasks_for(("rgb", "geometry"), True) == ("rgb>geometry", "geometry>rgb")
    assert tasks_for(("rgb", "geometry"), False) == ("rgb>rgb", "geometry>geometry")
    assert tasks_for(("geometry",), True) == ("geometry>geometry",)


def test_mapping_never_sees_its_target_modality() -> None:
    net = net_of()
    feats = feats_of()
    changed = {"rgb": feats["rgb"], "geometry": feats["geometry"] * 3 + 1}
    with torch.no_grad():
        a = net.predict(net.tokens(feats), "rgb>geometry", TEXT)
        b = net.predict(net.tokens(changed), "rgb>geometry", TEXT)
        c = net.predict(net.tokens(changed), "geometry>rgb", TEXT)
        d = net.predict(net.tokens(feats), "geometry>rgb", TEXT)
    assert torch.equal(a.prediction, b.prediction) and torch.equal(a.log_scale, b.log_scale)
    assert not torch.allclose(c.prediction, d.prediction)  # the source does matter


def test_masked_reconstruction_never_sees_the_tokens_it_scores() -> None:
    """The hidden tokens' own values cannot reach any output of the pass that hides them, so a defect
    cannot be copied into its own reconstruction; without masking (the ablation) they can."""
    feats = feats_of()
    hidden = partition_masks((G, G))[1].expand(2, G, G)
    changed = {m: torch.where(hidden[:, None], f * 5 - 2, f) for m, f in feats.items()}
    for masking in (True, False):
        net = net_of(masking=masking)
        with torch.no_grad():
            a = net.predict(net.tokens(feats), "rgb>rgb", TEXT, hidden).prediction
            b = net.predict(net.tokens(changed), "rgb>rgb", TEXT, hidden).prediction
        assert torch.equal(a, b) == masking


def test_anomaly_tokens_score_every_token_in_the_pass_that_hid_it() -> None:
    net = net_of()
    feats = {"rgb": feats_of()["rgb"]}
    with torch.no_grad():
        scores = net.anomaly_tokens(feats, TEXT)["reconstruction/rgb"]
        tokens = net.tokens(feats)
        for part in partition_masks((G, G)):
            mask = part.expand(2, G, G)
            out = net.predict(tokens, "rgb>rgb", TEXT, mask)
            want = (1 - torch.nn.functional.cosine_similarity(feats["rgb"], out.prediction, dim=1)) * \
                torch.exp(-out.log_scale)
            torch.testing.assert_close(scores[mask], want[mask])


def test_uncertainty_term_is_smallest_at_the_expected_error_and_leaves_the_prediction_gradient() -> None:
    target = torch.randn(1, C, 4, 4)
    pred = (target + 0.5 * torch.randn(1, C, 4, 4)).requires_grad_(True)
    where = torch.ones(1, 4, 4, dtype=torch.bool)
    cos = (1 - torch.nn.functional.cosine_similarity(target, pred, dim=1)).detach()
    best = torch.log(cos)
    at = lambda s: float(prediction_loss(target, pred.detach(), where, log_scale=s))  # noqa: E731
    assert at(best) < at(best + 0.3) and at(best) < at(best - 0.3)
    g_plain = torch.autograd.grad(prediction_loss(target, pred, where), pred)[0]
    g_scaled = torch.autograd.grad(prediction_loss(target, pred, where, log_scale=best + 2.0), pred)[0]
    torch.testing.assert_close(g_plain, g_scaled)


def test_bottleneck_forms_and_ib_loss() -> None:
    x = torch.randn(2, 5, 16)
    det = Bottleneck(16, 4).eval()
    y, kl = det(x)
    assert y.shape == x.shape and float(kl) == 0.0
    var = Bottleneck(16, 4, variational=True).train()
    _, kl = var(x)
    assert float(kl.detach()) > 0
    assert net_of(bottleneck=0).bottleneck is None
    torch.manual_seed(0)
    fused = torch.randn(3, 4, requires_grad=True)
    bott = torch.randn(3, 4, requires_grad=True)
    assert float(ib_loss(fused, fused.detach().clone())) == pytest.approx(0.0, abs=1e-6)
    loss = ib_loss(fused, bott)
    assert float(loss.detach()) > 0
    loss.backward()
    assert fused.grad is None and bott.grad is not None and bott.grad.abs().sum() > 0  # F_fu is the target only


def test_conv_decoder_ablation_has_the_width_and_depth_of_the_mamba_one() -> None:
    mamba, conv = net_of(decoder="mamba", depth=2), net_of(decoder="conv", depth=2)
    assert len(mamba.decoder) == len(conv.decoder) == 2 and all(isinstance(b, ConvBlock) for b in conv.decoder)
    assert conv.decoder[0].in_proj.out_features == mamba.decoder[0].d_inner
    out = conv.anomaly_tokens(feats_of(), TEXT)
    assert set(out) == {"mapping/rgb", "mapping/geometry"} and out["mapping/rgb"].shape == (2, G, G)


def test_text_film_off_ignores_the_class_text() -> None:
    feats = feats_of()
    other = TEXT.flip(0)
    for film in (True, False):
        net = net_of(text_film=film)
        torch.nn.init.normal_(net.adaptor.film[-1].weight)  # far from the identity it starts at
        with torch.no_grad():
            a = net.anomaly_tokens(feats, TEXT)["mapping/rgb"]
            b = net.anomaly_tokens(feats, other)["mapping/rgb"]
        assert torch.equal(a, b) != film


def test_reliability_fusion_is_the_weighted_mean_and_mean_fusion_the_plain_one() -> None:
    z = {"mapping/rgb": torch.full((1, 2, 2), 1.0), "retrieval/rgb": torch.full((1, 2, 2), 4.0)}
    state = ClassState("a", ("rgb",), torch.zeros(8))
    out = fuse(z, {"a": state}, ["a"], ("rgb",))
    torch.testing.assert_close(out["fused"], torch.full((1, 2, 2), 2.5))
    state.weights = {"mapping/rgb": 3.0, "retrieval/rgb": 1.0}
    out = fuse(z, {"a": state}, ["a"], ("rgb",))
    torch.testing.assert_close(out["fused"], torch.full((1, 2, 2), 7.0 / 4))
    torch.testing.assert_close(out["rgb"], out["fused"])


def test_distillation_is_zero_for_the_teachers_copy_and_skips_the_classes_being_learned() -> None:
    net = net_of().train()
    feats = feats_of(4)
    texts = TEXT
    y = torch.tensor([0, 0, 1, 1])
    cfg = ContinualConfig()
    distill = Distiller(net, texts[:1], cfg, learning=[1])
    torch.manual_seed(3)
    out = net(feats, texts[y], texts)
    net.eval()  # the teacher runs in eval mode: compare with the student in eval mode too
    torch.manual_seed(3)
    out = net(feats, texts[y], texts, hidden=out.hidden)
    assert float(distill(feats, texts[y], out, y).detach()) == pytest.approx(0.0, abs=1e-6)
    student = copy.deepcopy(net)
    with torch.no_grad():
        student.out["geometry"].weight.add_(0.5)
    out = student(feats, texts[y], texts)
    assert float(distill(feats, texts[y], out, y).detach()) > 0
    only_new = torch.tensor([1, 1, 1, 1])  # every sample of a class being learned: nothing to keep
    out = student(feats, texts[only_new], texts)
    assert float(distill(feats, texts[only_new], out, only_new).detach()) == pytest.approx(0.0, abs=1e-6)

