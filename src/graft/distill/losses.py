"""Distillation and compatibility losses: pure functions over logits (N, C) and labels (N,).

Transfer between any two models (``graft distill``):

* **KD** (Hinton et al. 2015): ``α·τ²·KL(softmax(z_t/τ) ‖ softmax(z_s/τ)) + (1−α)·CE(z_s, y)``.
  The τ² keeps the soft term's gradients at the scale of the hard one as τ grows.
* **DP**, data-partitioned transfer (Roth et al., ICLR 2024, "Fantastic Gains and Where to
  Find Them", KL-Dist + DP, their Eq. 4): every example is taught either by the teacher
  or by the *frozen initial student* (their "student-teacher"), whichever is more confident
  on it — on the true class (supervised), or in its own top class (unsupervised: no labels
  needed). ``m = 1[p_t > p_s0]``; loss ``τ²·[m·KL(p_t‖p_s) + λ·(1−m)·KL(p_s0‖p_s)]``.
  Conventions graft chose: confidences at temperature 1 (the models' own probabilities),
  a tie goes to the student, ``λ`` (``keep_weight``) is 1 in the paper, and ``α < 1``
  (supervised only) adds ``(1−α)·CE`` as KD does; the paper's DP has no CE (``α = 1``).

Compatible updates (``graft update``): train the new model without breaking what the old
one got right.

* **Focal distillation** (Yan et al. 2021, "Positive-Congruent Training"):
  ``CE(z, y) + λ·mean_i[(α + β·1[old right on i])·D_i]`` with ``D`` the KL at temperature τ
  (``fd-kl``, τ² scaled) or logit matching ``½‖z − z_old‖²`` (``fd-lm``). Paper values
  α = 1, β = 5.
* **MUSCLE** (Echterhoff et al. 2024): per example, distil from the old model where it is
  more likely than the new model (as given, frozen) on the true class, else from that new
  model itself: ``CE + λ·τ²·[m·KL(p_old‖p) + (1−m)·KL(p_new0‖p)]``. This is DP with the old
  model as teacher and a CE term — graft computes both with `partition`.

All losses average over the batch. KL terms are ``KL(target ‖ model)`` per example.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DISTILL_MODES = ("kd", "dp", "dp-unsupervised")
UPDATE_MODES = ("fd-kl", "fd-lm", "muscle", "ce")


def kl_per_example(target: torch.Tensor, logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``τ²·KL(softmax(target/τ) ‖ softmax(logits/τ))`` per example (N,); no gradient flows
    into ``target``."""
    t = F.log_softmax(target.detach() / temperature, dim=1)
    s = F.log_softmax(logits / temperature, dim=1)
    return (t.exp() * (t - s)).sum(1) * temperature**2


def confidence(logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Softmax probability (temperature 1) on ``labels``, or the top probability when
    ``labels`` is None (N,)."""
    p = torch.softmax(logits, dim=1)
    if labels is None:
        return p.amax(1)
    return p.gather(1, labels.view(-1, 1)).squeeze(1)


def partition(
    teacher: torch.Tensor, student0: torch.Tensor, labels: torch.Tensor | None
) -> torch.Tensor:
    """DP's selection mask (N,) bool: True where the teacher is strictly more confident than
    the initial student (on the true class; on its own top class without labels)."""
    return confidence(teacher, labels) > confidence(student0, labels)


def kd_loss(
    logits: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """Hinton's KD: ``α·τ²·KL(teacher‖student) + (1−α)·CE`` (batch mean)."""
    soft = kl_per_example(teacher, logits, temperature).mean()
    if alpha >= 1.0:
        return soft
    return alpha * soft + (1.0 - alpha) * F.cross_entropy(logits, labels)


def dp_loss(
    logits: torch.Tensor,
    teacher: torch.Tensor,
    student0: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float,
    keep_weight: float = 1.0,
    labels: torch.Tensor | None = None,
    alpha: float = 1.0,
) -> torch.Tensor:
    """Data-partitioned transfer: KL to the teacher where ``mask``, ``keep_weight`` × KL to
    the initial student elsewhere, both τ²-scaled; ``(1−α)·CE`` added when ``alpha < 1``."""
    m = mask.to(logits.dtype)
    teach = kl_per_example(teacher, logits, temperature)
    keep = kl_per_example(student0, logits, temperature)
    loss = (m * teach + keep_weight * (1.0 - m) * keep).mean()
    if alpha >= 1.0:
        return loss
    return alpha * loss + (1.0 - alpha) * F.cross_entropy(logits, labels)


def focal_weights(
    old: torch.Tensor, labels: torch.Tensor, *, alpha: float, beta: float
) -> torch.Tensor:
    """Focal distillation's per-example weights ``α + β·1[argmax old == y]`` (N,)."""
    right = (old.argmax(1) == labels).to(old.dtype)
    return alpha + beta * right


def fd_loss(
    logits: torch.Tensor,
    old: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 5.0,
    weight: float = 1.0,
    temperature: float = 1.0,
    divergence: str = "kl",
) -> torch.Tensor:
    """Focal distillation: ``CE + weight·mean(focal_weights·D)``, ``D`` = τ²-scaled KL
    (``"kl"``) or ``½‖z − z_old‖²`` (``"lm"``)."""
    if divergence == "kl":
        d = kl_per_example(old, logits, temperature)
    elif divergence == "lm":
        d = 0.5 * (logits - old.detach()).pow(2).sum(1)
    else:
        raise ValueError(f"unknown divergence {divergence!r}; valid: kl, lm")
    w = focal_weights(old, labels, alpha=alpha, beta=beta)
    return F.cross_entropy(logits, labels) + weight * (w * d).mean()


def muscle_loss(
    logits: torch.Tensor,
    old: torch.Tensor,
    new0: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    *,
    weight: float = 1.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """MUSCLE's masked distillation: ``CE + weight·`` `dp_loss` with the old model as the
    teacher and the new model as given as the model to keep (``mask`` = `partition`)."""
    kd = dp_loss(logits, old, new0, mask, temperature=temperature)
    return F.cross_entropy(logits, labels) + weight * kd
