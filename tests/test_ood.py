"""Out-of-distribution scores: the math against references, both model backends' embeddings, thresholds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitcli import ood


def test_energy_is_minus_t_logsumexp():
    z = torch.tensor([[2.0, 0.0, -1.0], [10.0, 10.0, 10.0]])
    want = -0.5 * torch.log(torch.exp(z / 0.5).sum(-1))
    assert torch.allclose(ood.energy(z, 0.5), want)


def test_knn_distance_is_one_minus_cosine_to_the_kth_neighbour():
    bank = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]), dim=-1)
    x = torch.tensor([[2.0, 0.0]])  # cosines to the bank: 1, 0, -1
    assert ood.knn_distance(x, bank, 1).item() == pytest.approx(0.0)
    assert ood.knn_distance(x, bank, 2).item() == pytest.approx(1.0)
    assert ood.knn_distance(x, bank, 3).item() == pytest.approx(2.0)
    assert ood.knn_distance(x, bank, 1, exclude_self=True).item() == pytest.approx(1.0)


def test_auroc_and_fpr_match_references():
    from sklearn.metrics import roc_auc_score, roc_curve

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=300).round(1), rng.normal(1.5, size=200).round(1)  # rounded: ties
    want = roc_auc_score(np.r_[np.zeros(300), np.ones(200)], np.r_[a, b])
    assert ood.auroc(a, b) == pytest.approx(want, abs=1e-12)
    fpr = ood.fpr_at_tpr(a, b, 0.95)  # share of OOD at or below the 95% quantile of ID
    assert fpr == pytest.approx((b <= np.quantile(a, 0.95)).mean())
    roc_fpr, roc_tpr, _ = roc_curve(np.r_[np.ones(300), np.zeros(200)], -np.r_[a, b])  # ID as positives
    assert fpr >= roc_fpr[np.searchsorted(roc_tpr, 0.95)] - 1e-9  # never better than the ROC curve allows


def test_thresholds_keep_the_chosen_share_of_validation_images():
    g = torch.Generator().manual_seed(0)
    train, val = torch.randn(500, 16, generator=g), torch.randn(400, 16, generator=g)
    logits = torch.randn(400, 5, generator=g)
    meta = ood.fit_ood(train, val, logits, temperature=1.0, keep=0.9)
    assert meta["bank"].dtype == torch.float16 and meta["bank"].shape == (500, 16)
    for name, s in ood.ood_scores(meta, val, logits).items():
        kept = (s <= meta["thresholds"][name]).float().mean().item()
        assert 0.88 <= kept <= 0.92, (name, kept)


def test_far_images_score_higher_than_near_ones():
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(3, 32, generator=g) * 4
    cloud = lambda n: centres[torch.randint(0, 3, (n,), generator=g)] + torch.randn(n, 32, generator=g)  # noqa: E731
    meta = ood.fit_ood(cloud(600), cloud(200), torch.randn(200, 3, generator=g), 1.0)
    near, far = cloud(200), torch.randn(200, 32, generator=g) * 4  # far: no cluster
    s_near = ood.ood_scores(meta, near, torch.zeros(200, 3))["knn"]
    s_far = ood.ood_scores(meta, far, torch.zeros(200, 3))["knn"]
    assert ood.auroc(s_near.numpy(), s_far.numpy()) > 0.95


@pytest.mark.parametrize("backend", ["scratch", "timm"])
def test_embeddings_and_logits_come_from_one_pass_of_either_backend(backend):
    torch.manual_seed(0)
    if backend == "scratch":
        from vitcli.vit import VisionTransformer

        model = VisionTransformer(img_size=32, patch_size=8, num_classes=4, embed_dim=32, depth=1, num_heads=2)
    else:
        import timm

        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, img_size=32,
                                  patch_size=8, embed_dim=32, depth=1, num_heads=2)
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        feats, logits = ood.features_and_logits(model, x)
        assert feats.shape == (3, 32)
        assert torch.allclose(logits, model(x), atol=1e-5)


def test_scores_a_model_cannot_give_are_refused_in_one_line():
    from vitcli.errors import VitcliError

    with pytest.raises(VitcliError, match="no out-of-distribution thresholds"):
        ood.check_score("knn", None, True, "model.onnx")
    with pytest.raises(VitcliError, match="use one of knn, energy"):
        ood.check_score("mahalanobis", {"k": 1}, True, "best.pt")
    with pytest.raises(VitcliError, match="--ood-score energy"):
        ood.check_score("knn", {"k": 1}, False, "model.onnx")
