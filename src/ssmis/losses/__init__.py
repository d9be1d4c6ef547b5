"""Loss functions shared by all methods (computed in float32)."""

from ssmis.losses.seg import ce_dice_loss, dice_loss, softmax_mse

__all__ = ["ce_dice_loss", "dice_loss", "softmax_mse"]
