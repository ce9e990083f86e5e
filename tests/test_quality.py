import numpy as np
import pytest
import torch

from ldmflow.evaluation.quality import (
    autoencoder_features,
    frechet_distance,
    frechet_distance_from_stats,
    inception_features,
    load_inception,
    precision_recall,
    sqrtm_psd,
)


def gaussian(n, mean, cov, seed):
    return np.random.default_rng(seed).multivariate_normal(mean, cov, size=n)


def test_frechet_distance_of_identical_sets_is_zero_and_grows_with_a_mean_shift():
    x = gaussian(2000, np.zeros(8), np.eye(8), 0)
    assert frechet_distance(x, x) == pytest.approx(0, abs=1e-8)
    shifts = [0.5, 1.0, 2.0]
    values = [frechet_distance(x, x + s) for s in shifts]
    assert values == sorted(values)
    for s, v in zip(shifts, values):  # a shift of every coordinate by s adds 8 s^2 and nothing else
        assert v == pytest.approx(8 * s**2, rel=1e-6)


def test_frechet_distance_matches_the_closed_form_for_gaussians():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.2, 3, 5), rng.uniform(0.2, 3, 5)
    # diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    closed = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance_from_stats(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(closed, rel=1e-10)
    # rotating both distributions by the same orthogonal matrix changes nothing (non-commuting case checked)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    s1, s2 = q @ np.diag(a) @ q.T, np.diag(b)
    rotated = frechet_distance_from_stats(q @ mu1, q @ s1 @ q.T, q @ mu2, q @ s2 @ q.T)
    assert rotated == pytest.approx(frechet_distance_from_stats(mu1, s1, mu2, s2), rel=1e-9)
    # one dimension: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance_from_stats([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1)
    # from samples, close to the closed form of the generating Gaussians
    x, y = gaussian(20000, mu1, np.diag(a), 2), gaussian(20000, mu2, np.diag(b), 3)
    assert frechet_distance(x, y) == pytest.approx(closed, rel=0.05)


def test_matrix_square_root_squares_back():
    m = np.random.default_rng(0).normal(size=(6, 6))
    psd = m @ m.T
    root = sqrtm_psd(psd)
    np.testing.assert_allclose(root @ root, psd, atol=1e-9)
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance_from_stats(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_precision_and_recall_on_shifted_and_collapsed_distributions():
    real = gaussian(600, np.zeros(4), np.eye(4), 0)
    same = precision_recall(real, gaussian(600, np.zeros(4), np.eye(4), 1))
    assert same["precision"] > 0.8 and same["recall"] > 0.8
    half = precision_recall(real, gaussian(600, np.full(4, 1.0), np.eye(4), 2))
    far = precision_recall(real, gaussian(600, np.full(4, 10.0), np.eye(4), 3))
    assert far["precision"] == 0 and far["recall"] == 0
    assert far["precision"] < half["precision"] < same["precision"]
    # mode collapse: realistic samples (high precision) that cover little of the data (low recall)
    collapsed = precision_recall(real, gaussian(600, np.zeros(4), 0.01 * np.eye(4), 4))
    assert collapsed["precision"] > 0.9 and collapsed["recall"] < 0.3
    # blocks change nothing
    assert precision_recall(real, real[:300] + 0.1, block=64) == precision_recall(real, real[:300] + 0.1)


def test_autoencoder_features_are_pooled_encoder_features():
    from ldmflow.config.autoencoder import AutoencoderModelConfig
    from ldmflow.models.autoencoder import Autoencoder

    model = Autoencoder(AutoencoderModelConfig(base_channels=8)).eval()
    feats = autoencoder_features(model, torch.rand(5, 3, 16, 16) * 2 - 1, batch_size=2)
    assert feats.shape == (5, 16) and np.isfinite(feats).all()  # base 8 x channel_mult 2 at the last level


class TinyInception(torch.nn.Module):
    """NVIDIA's calling convention: uint8 images in, pool features out with return_features=True."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 16)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        pooled = x.float().mean((2, 3)) / 255  # (N, 3)
        return self.proj(pooled) if return_features else self.proj(pooled).softmax(1)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_inception_path_reads_a_local_torchscript_file(tmp_path):
    path = tmp_path / "inception.pt"
    torch.jit.script(TinyInception()).save(str(path))
    net = load_inception(path)
    images = torch.randint(0, 256, (7, 3, 20, 20), dtype=torch.uint8)
    feats = inception_features(net, images, batch_size=3)
    assert feats.shape == (7, 16)
    with pytest.raises(FileNotFoundError, match="Inception weights not found"):
        load_inception(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not torchscript")
    with pytest.raises(ValueError, match="not a TorchScript Inception"):
        load_inception(tmp_path / "junk.pt")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_inception_fid_is_skipped_with_a_note_and_computed_with_weights(tmp_path):
    from ldmflow.stages.memorization import check_memorization

    gen = torch.Generator().manual_seed(0)
    train = torch.rand(40, 3, 16, 16, generator=gen) * 2 - 1
    loader = [train[i:i + 8] for i in range(0, 40, 8)]
    skipped = check_memorization(lambda n: train[:n], loader, num_generate=10, image_size=16, n=10)
    assert "no Inception weights given" in skipped["inception_fid"]["skipped"]
    assert "no autoencoder checkpoint" in skipped["quality"]["skipped"]
    weights = tmp_path / "inception.pt"
    torch.jit.script(TinyInception()).save(str(weights))
    done = check_memorization(lambda n: train[:n], loader, num_generate=10, image_size=16, n=10,
                              inception=str(weights))
    fid = done["inception_fid"]
    assert fid["weights"] == str(weights) and fid["images"] == {"train": 40, "generated": 10}
    assert fid["generated"]["frechet_distance"] >= 0 and 0 <= fid["generated"]["precision"] <= 1
