"""Straightforward formulations of the exit heads' forward passes, the references of the lean ones.

``MomentHead.forward`` and ``newton_schulz_sqrt`` are written for speed (one LayerNorm over the grouped
view, adjacent-group covariances as one batched product, no products with the identity); these compute the
same thing the plain way. ``tests/test_heads.py`` asserts equality within float noise, and
``benchmarks/head_speed.py`` times the heads against them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dmpo_lightning.models import ISqrtCovHead, MomentHead


def reference_moment_forward(m: MomentHead, x: torch.Tensor) -> torch.Tensor:
    """``MomentHead.forward`` written plainly (LayerNorm of all tokens, then the class token taken)."""
    xn = m.norm(x)
    cls = xn[:, 0] if m.num_prefix_tokens > 0 else xn.mean(dim=1)
    first = m.fc_first(m.drop(cls))
    p = m.proj(x[:, m.num_prefix_tokens :]).float()
    b, n, _ = p.shape
    p = p.reshape(b, n, m.groups, m.group_dim)
    p = F.layer_norm(p, (m.group_dim,), m.group_norm.weight, m.group_norm.bias, m.group_norm.eps)
    p = (p - p.mean(dim=1, keepdim=True)).permute(0, 2, 1, 3)
    cov = F.normalize(p[:, :-1].transpose(-1, -2) @ p[:, 1:] / n, dim=-1, eps=1e-12)
    second = m.fc_second(m.drop(m.conv(cov).flatten(1)))
    return 0.5 * (first + second)


def reference_newton_schulz(a: torch.Tensor, iterations: int, eps: float = 1e-5) -> torch.Tensor:
    """``newton_schulz_sqrt`` written plainly: every product with Z = I, and the unused last Z, computed."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype).expand_as(a)
    trace = a.diagonal(dim1=-2, dim2=-1).sum(-1).view(-1, 1, 1) + eps
    y, z = a / trace, eye
    for _ in range(iterations):
        t = 0.5 * (3.0 * eye - z @ y)
        y, z = y @ t, t @ z
    return y * trace.sqrt()


def reference_isqrt_forward(m: ISqrtCovHead, x: torch.Tensor) -> torch.Tensor:
    """``ISqrtCovHead.forward`` with :func:`reference_newton_schulz`."""
    z = m.reduce(x[:, m.num_prefix_tokens :])
    b, n, d = z.shape
    z = m.act(m.bn(z.reshape(b * n, d))).reshape(b, n, d).float()
    z = z - z.mean(dim=1, keepdim=True)
    root = reference_newton_schulz(z.transpose(1, 2) @ z / n, m.iterations)
    return m.fc(m.drop(root.flatten(1)[:, m.triu_index]))
