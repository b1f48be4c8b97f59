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
    with pytest.raises(VitcliError, match="use auto or one of knn, energy"):
        ood.check_score("mahalanobis", {"k": 1}, True, "best.pt")
    with pytest.raises(VitcliError, match="--ood-score energy"):
        ood.check_score("knn", {"k": 1, "bank": None}, True, "model.onnx")


# ----------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def run_and_data(tmp_path_factory):
    from conftest import trained_run

    return trained_run(tmp_path_factory.mktemp("ood"), "--epochs", "6", per_class=20)


def grey_stripes(root, n: int = 12):
    """Images of another kind: grey stripes, no coloured shape on noise."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a = np.zeros((32, 32), np.uint8)
        a[:, (np.arange(32) // (2 + i % 4)) % 2 == 0] = 200 + i
        Image.fromarray(a).convert("RGB").save(root / f"s{i:02d}.png")
    return root


def test_training_stores_thresholds_and_predict_answers_unknown_for_another_kind(run_and_data, tmp_path):
    import json

    from conftest import run_cli
    from vitcli.checkpoint import load_checkpoint

    run, data = run_and_data
    meta = load_checkpoint(run / "best.pt")["ood"]
    assert set(meta["thresholds"]) == {"knn", "energy"} and meta["bank"].dtype == torch.float16
    assert meta["keep"] == 0.95 and meta["images"] > 0
    other = grey_stripes(tmp_path / "stripes")
    res = run_cli("predict", str(other), str(data / "red"), "--model", str(run), "--ood", "--ood-word", "other",
                  "--json")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout[res.stdout.index("["):])
    far = [r for r in rows if "stripes" in r["file"]]
    near = [r for r in rows if "stripes" not in r["file"]]
    assert all("ood_score" in r for r in rows)
    assert sum(r["ood"] for r in far) >= 0.9 * len(far), far  # another kind of image: unknown
    assert all(r["class"] == "other" for r in far if r["ood"])
    assert sum(not r["ood"] for r in near) >= 0.8 * len(near)  # training-like images: answered
    assert min(r["ood_score"] for r in far) > np.median([r["ood_score"] for r in near])


def test_ood_in_csv_and_exports_carry_the_logit_score(run_and_data, tmp_path):
    import csv

    from conftest import run_cli

    run, data = run_and_data
    out = tmp_path / "p.csv"
    res = run_cli("predict", str(data / "blue"), "--model", str(run), "--ood", "-o", str(out))
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(out.open()))
    assert rows and all(r["ood_score"] and r["answer"] for r in rows)
    onnx = tmp_path / "m.onnx"
    res = run_cli("export", "--model", str(run), "--format", "onnx", "-o", str(onnx))
    assert res.exit_code == 0, res.output
    res = run_cli("predict", str(data / "blue"), "--model", str(onnx), "--ood", "--ood-score", "knn")
    assert res.exit_code == 1 and "use --ood-score energy" in res.output
    res = run_cli("predict", str(data / "blue"), "--model", str(onnx), "--ood", "--json")
    assert res.exit_code == 0 and "energy score above" in res.output, res.output


def test_eval_ood_data_reports_auroc_fpr_and_a_histogram(run_and_data, tmp_path):
    import json

    from conftest import run_cli

    run, data = run_and_data
    other = grey_stripes(tmp_path / "stripes")
    out, js = tmp_path / "ev", tmp_path / "ev.json"
    res = run_cli("eval", str(data), "--model", str(run), "--ood-data", str(other), "--output", str(out),
                  "--json-out", str(js))
    assert res.exit_code == 0, res.output
    r = json.loads(js.read_text())["ood"]
    assert r["ood_images"] == 12 and set(r["scores"]) == {"knn", "energy"}
    knn = r["scores"]["knn"]
    assert knn["auroc"] >= 0.9 and knn["ood_unknown"] >= 0.9, knn
    assert 0 <= knn["fpr_at_95_tpr"] <= 1 and 0 < knn["id_answered"] <= 1
    assert (out / "ood.png").is_file() and "Out of distribution" in (out / "report.html").read_text()
    assert "AUROC" in res.output
    res = run_cli("eval", str(data), "--model", str(run), "--ood-data", str(tmp_path / "nothing"))
    assert res.exit_code == 1 and "holds no images" in res.output
