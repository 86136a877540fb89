"""compression.pruning.reconstruct: the per-row update against least squares solved independently, PSD projection, and
masks kept exactly."""
import torch
from torch import nn

from compression.pruning.reconstruct import psd_projection, reconstruct


def _layer(seed=0, d_in=12, d_out=5, tokens=200):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_in, generator=g, dtype=torch.float64) @ torch.randn(d_in, d_in, generator=g,
                                                                                  dtype=torch.float64)
    layer = nn.Linear(d_in, d_out, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(d_out, d_in, generator=g, dtype=torch.float64))
    mask = (torch.rand(d_out, d_in, generator=g) > 0.5).double()
    mask[0] = 1  # a row with nothing pruned stays as it was
    return x, layer, mask


def test_update_is_the_least_squares_fit_of_the_dense_output_on_the_kept_inputs():
    """Oracle: for each row, torch.linalg.lstsq of the dense row's outputs X w on the kept columns X[:, K]."""
    x, layer, mask = _layer()
    dense = layer.weight.detach().clone()
    ratios = reconstruct(layer, {"weight": mask}, {"weight": x.T @ x}, damping=1e-12)
    got = layer.weight.detach()
    assert torch.equal(got[mask == 0], torch.zeros_like(got[mask == 0]))
    torch.testing.assert_close(got[0], dense[0])
    for r in range(1, dense.shape[0]):
        kept = mask[r].bool()
        expected = torch.linalg.lstsq(x[:, kept], (x @ dense[r]).unsqueeze(1)).solution.squeeze(1)
        torch.testing.assert_close(got[r, kept], expected, rtol=1e-6, atol=1e-8)
    assert ratios["weight"] < 1  # better than zeroing the pruned weights
    before = ((x @ (dense * mask).T - x @ dense.T) ** 2).sum()
    after = ((x @ got.T - x @ dense.T) ** 2).sum()
    assert abs(float(after / before) - ratios["weight"]) < 1e-6


def test_psd_projection_clips_negative_eigenvalues_and_keeps_psd_matrices():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    psd = a @ a.T
    torch.testing.assert_close(psd_projection(psd), psd)
    noisy = psd + 5 * torch.randn(6, 6, generator=g, dtype=torch.float64)
    projected = psd_projection(noisy)
    assert float(torch.linalg.eigvalsh(projected).min()) > -1e-9
    torch.testing.assert_close(projected, projected.T)
