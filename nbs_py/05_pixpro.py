# %% [markdown]
# # The PixPro model
#
# > The pixel propagation module, the projector, the momentum encoder and the full PixPro model with its optional instance branch.

# %%
#| default_exp pixpro

# %%
#| export
from __future__ import annotations

import torch
from torch import nn, Tensor

from pixpro_rs.core import ConfigError, check_choice, check_positive, check_range
from pixpro_rs.positives import positive_mask  # re-exported: pixpro_rs.pixpro.*
