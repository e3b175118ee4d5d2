"""Run by tests/test_train.py under `accelerate launch` with two processes: one optimiser step of a tiny run, then
each rank saves its parameters and the first step's per-process losses to OUT/rank{rank}.pt."""
import os
import sys
from pathlib import Path

import torch

from pixpro_rs.train import TrainConfig, train

out = Path(sys.argv[1])
result = train(TrainConfig(arch='resnetrs_tiny', image_size=64, batch_size=4, synthetic_length=32, synthetic_size=64,
                           num_workers=0, progress=False, max_steps=1, output_dir=str(out/'run')))
rank = int(os.environ.get('RANK', 0))
torch.save({'params': {n: p.detach().cpu() for n, p in result.model.named_parameters()},
            'first_losses': result.metrics[0]['loss_per_process'], 'config': result.config,
            'world_size': result.config['world_size']}, out/f'rank{rank}.pt')
