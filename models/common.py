"""Initialisation shared by the models."""
import math

import torch
from torch import nn

# Expected share of lesion pixels at the start of training (RetinaNet's prior initialisation, Lin et al.
# 2017). A zero-bias head predicts p = 0.5 everywhere, and BCE then spends hundreds of steps pushing the
# ~97% background down before lesions are learnt; starting at the prior skips that phase.
FOREGROUND_PRIOR = 0.01


@torch.no_grad()
def init_prior_bias(head: nn.Conv2d, prior: float = FOREGROUND_PRIOR) -> None:
    """Set a logits layer's bias so its initial output probabilities are ``prior`` per foreground class.

    One channel (sigmoid): bias = log(prior / (1 - prior)). C channels (softmax): the background's bias is
    log((C - 1) * (1 - prior) / prior) and the others' 0, so the background starts at probability
    1 - prior and the foreground classes share ``prior``.
    """
    c = head.out_channels
    if c == 1:
        head.bias.fill_(math.log(prior / (1 - prior)))
    else:
        head.bias.zero_()
        head.bias[0] = math.log((c - 1) * (1 - prior) / prior)
