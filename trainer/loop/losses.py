"""The training loss on the velocity residual r = v_pred − v, per sample, and its weighting over σ.

    mse           r²                                        (the rectified-flow loss)
    l1            |r|
    huber         r² for |r| ≤ c, 2c·|r| − c² beyond         (2 × PyTorch's huber_loss with delta c)
    pseudo_huber  2c·(√(r² + c²) − c)                       (kohya's and SimpleTuner's `huber` loss)

The two Huber losses equal MSE for residuals well below c and grow like 2c·|r| (L1's slope) above it,
so a few outlier pixels (a watermark, a bad crop) pull the LoRA less. Weightings over σ are diffusers'
`compute_loss_weighting_for_sd3`: sigma_sqrt (1/σ²) and cosmap (2 / (π(1 − 2σ + 2σ²))).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.training_utils import compute_loss_weighting_for_sd3

LOSSES = ("mse", "l1", "huber", "pseudo_huber")
LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


def mse(residual: torch.Tensor, c: float = 0.0) -> torch.Tensor:
    return residual.square()


def l1(residual: torch.Tensor, c: float = 0.0) -> torch.Tensor:
    return residual.abs()


def huber(residual: torch.Tensor, c: float) -> torch.Tensor:
    """Huber's loss scaled to match r² near 0: r² inside |r| ≤ c, 2c·|r| − c² outside."""
    zero = torch.zeros_like(residual)
    return 2 * torch.nn.functional.huber_loss(residual, zero, reduction="none", delta=c)


def pseudo_huber(residual: torch.Tensor, c: float) -> torch.Tensor:
    """The pseudo-Huber loss (smooth everywhere), 2c·(√(r² + c²) − c): ≈ r² for |r| ≪ c, ≈ 2c·|r| for |r| ≫ c.
    Computed as 2c·r² / (√(r² + c²) + c), the same value without the cancellation of a large c."""
    square = residual.square()
    return 2 * c * square / (torch.sqrt(square + c * c) + c)


LOSS_FUNCTIONS = {"mse": mse, "l1": l1, "huber": huber, "pseudo_huber": pseudo_huber}


@dataclass(frozen=True)
class LossSettings:
    """Which loss the LoRA is trained on."""

    kind: str = "mse"  # mse, l1, huber, pseudo_huber
    huber_c: float = 0.1  # where the Huber losses turn from squared to linear (kohya's and SimpleTuner's 0.1)
    weighting: str = "none"  # diffusers' --weighting_scheme for the loss: none, sigma_sqrt, cosmap

    def __post_init__(self):
        checks = [
            (self.kind in LOSSES, f"loss is {self.kind!r}; choose one of {', '.join(LOSSES)}."),
            (self.huber_c > 0, f"huber_c is {self.huber_c}; use a value above 0 (0.1 is usual)."),
            (self.weighting in LOSS_WEIGHTINGS,
             f"loss_weighting is {self.weighting!r}; choose one of {', '.join(LOSS_WEIGHTINGS)}."),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def per_sample(self, v_pred: torch.Tensor, v_target: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        """The loss of each sample (shape [B]): the elementwise loss, averaged, times its σ weight."""
        residual = v_pred.float() - v_target.float()
        loss = LOSS_FUNCTIONS[self.kind](residual, self.huber_c).flatten(1).mean(dim=1)
        if self.weighting == "none":
            return loss
        return loss * compute_loss_weighting_for_sd3(self.weighting, sigmas.float().to(loss.device))
