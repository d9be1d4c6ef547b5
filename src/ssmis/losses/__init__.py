"""Loss functions shared by all methods (computed in float32)."""

from ssmis.losses.contrastive import odcl_loss, odcl_terms
from ssmis.losses.seg import ce_dice_loss, dice_loss, softmax_mse

__all__ = ["ce_dice_loss", "dice_loss", "odcl_loss", "odcl_terms", "softmax_mse"]
