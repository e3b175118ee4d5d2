# %% [markdown]
# # Train
#
# > The notebook that pretrains: a flat cell of parameters for papermill, one call of `train`, then the loss, learning-rate and momentum curves, the throughput, and what the trained model's pixel features look like.

# %% [markdown]
# Run it as it is (in JupyterLab, or `papermill nbs/train.ipynb runs/train.ipynb`) and it pretrains a ResNet-RS-50
# with PixPro on the embedded SyntheticScenes: no download, 2 min 21 s for the whole notebook on a 2-core machine
# like our CI's (the training loop 124 s; `-p arch resnetrs101`: 3 min 41 s, loop 204 s). Every parameter below can
# be set from papermill's command line, with the same names as the training chapter's `TrainConfig`, the
# `pixpro-train` command and the `params.yaml` files:
#
# ```bash
# papermill nbs/train.ipynb runs/train-rs101.ipynb -p arch resnetrs101         # the demo with ResNet-RS-101
# papermill nbs/train.ipynb runs/imagenet.ipynb -f params.yaml                  # parameters from a YAML file
# papermill nbs/train.ipynb runs/rs50-400ep.ipynb -p data /data/imagenet/train -p recipe pixpro_rs50_400ep \
#     -p mixed_precision bf16 -p num_workers 10 -p output_dir runs/rs50-400ep
# ```
#
# **The full-scale run.** `-p recipe pixpro_r50_400ep` is the paper's ResNet-50 run (per-device batch 128, 8
# devices: 1024 images per step, lr 1.0 x 1024/256 = 4.0); `pixpro_rs{50..420}_{100,400}ep` are the ResNet-RS
# counterparts. A notebook runs in one process, so it trains on one GPU: with `batch_size` 128 on one GPU the global
# batch is 128 and the learning rate is scaled to it by the linear rule (printed at the start). For the recipe's
# 8-GPU layout, run the same code with Accelerate:
#
# ```bash
# accelerate launch --multi_gpu --num_processes 8 -m pixpro_rs.train --recipe pixpro_rs50_400ep \
#     --data /data/imagenet/train --mixed_precision bf16 --channels_last true --compile true \
#     --num_workers 10 --output_dir runs/rs50-400ep
# # two machines of 8 GPUs (run on each, --machine_rank 0 and 1): global batch 2048, lr 8.0
# accelerate launch --multi_gpu --num_machines 2 --machine_rank 0 --main_process_ip 10.0.0.1 --main_process_port 29500 \
#     --num_processes 16 -m pixpro_rs.train --recipe pixpro_rs50_400ep --data /data/imagenet/train --mixed_precision bf16
# ```
#
# **Expected cost.** A user of the reference code reported 58 hours for 100 epochs of ResNet-50 on 8 V100-32GB
# (about 77 images per second per GPU). On one H200, the performance chapter measured the PixPro step of
# ResNet-RS-50 at 224 pixels at 1831 images per second (batch 256, `mixed_precision bf16`, `channels_last true`,
# `compile true`; 895 uncompiled at batch 128) and ResNet-50 at 2180; the training engine itself, reading JPEG
# files with `gpu_augment true` and 15 workers, ran ResNet-50 at 2050 images per second with the GPU busy 98.6 % of
# the time. At 1831 images per second, 100 epochs of ImageNet take about 19 H200-hours for RS-50 and 400 epochs
# about 78; the chapter has the table for the whole family. Add these switches to the commands above for a fast GPU
# run: `--channels_last true --compile true` (`gpu_augment` is on by default on CUDA). Interrupting is safe: start the same command again
# and it resumes from the last checkpoint in `output_dir`, exactly.

# %% tags=["parameters"]
# Parameters: papermill -p NAME VALUE, or -f params.yaml. None takes the recipe's value.
recipe = 'pixpro_demo_cpu'  # named recipe: pixpro_demo_cpu, pixpro_r50_100ep, pixpro_r50_400ep, pixpro_rs101_400ep ...
arch = None  # backbone (the demo: resnetrs50): resnetrs50 ... resnetrs420, resnet50, resnetrs_tiny
data = 'synthetic'  # 'synthetic' (the embedded SyntheticScenes) or a folder of images, e.g. /data/imagenet/train
epochs = None  # passes over the data (demo: 3)
batch_size = None  # images per device per micro-batch (demo: 16)
image_size = None  # side of each view (demo: 96, a 3x3 C5 map; the paper: 224, 7x7)
lr = None  # base lr per 256 images, scaled linearly to the global batch (demo: 16 per 256, i.e. 1.0 at 16)
weight_decay = None  # LARS weight decay (1e-5)
momentum = None  # base EMA momentum of the target network (0.99)
threshold = None  # T: pixels closer than T bin diagonals are positive pairs (0.7)
gamma = None  # PPM sharpness (2)
ppm_layers = None  # layers of the PPM transform g (1)
instance_weight = None  # weight of the instance branch (0: off)
method = None  # 'pixpro', 'pixcontrast' or 'instance'
tau = 0.3  # temperature of PixContrast (0.3)
output_dir = None  # None: runs/<recipe>-<arch>-seed<seed> (relative to where the notebook runs)
seed = 0  # initialisation, data order and augmentations
num_workers = 2  # DataLoader workers
mixed_precision = 'no'  # 'no', 'bf16' or 'fp16' (fp16 needs a GPU)
max_steps = 0  # stop after this many steps (0: all epochs)
save_every = 1  # checkpoint every this many epochs (and at the end)
resume = 'auto'  # 'auto' (continue the run found in output_dir), 'never', or a checkpoint file
overwrite = False  # start afresh in an output_dir that holds a different run
grad_accum = 1  # micro-batches per optimiser step
synthetic_length = 256  # scenes in the synthetic data
synthetic_size = 128  # side of the scenes
keep_checkpoints = 1  # newest checkpoints kept (RS-50 + PixPro: about 520 MB each)
progress = True  # progress bar
channels_last = False  # NHWC memory format (faster on GPUs; see the performance chapter)
compile = False  # torch.compile the networks (GPUs; minutes of compilation first)
gpu_augment = None  # workers crop and flip, the device does the rest (None: on when training on CUDA)
prefetch_factor = 2  # batches each worker loads ahead

# %%
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from pixpro_rs.data import SyntheticScenes
from pixpro_rs.evaluate import normalize_images
from pixpro_rs.pixpro import PixPro
from pixpro_rs.train import TrainConfig, build_model, train

# %% [markdown]
# ## Train

# %%
result = train(TrainConfig(
    recipe=recipe, arch=arch, data=data, epochs=epochs, batch_size=batch_size, image_size=image_size, lr=lr,
    weight_decay=weight_decay, momentum=momentum, threshold=threshold, gamma=gamma, ppm_layers=ppm_layers,
    instance_weight=instance_weight, method=method, tau=tau, output_dir=output_dir, seed=seed, num_workers=num_workers,
    mixed_precision=mixed_precision, max_steps=max_steps, save_every=save_every, resume=resume, overwrite=overwrite,
    grad_accum=grad_accum, synthetic_length=synthetic_length, synthetic_size=synthetic_size,
    keep_checkpoints=keep_checkpoints, progress=progress, channels_last=channels_last, compile=compile,
    gpu_augment=gpu_augment, prefetch_factor=prefetch_factor))
c, metrics = result.config, result.metrics
print(f'{len(metrics)} steps in {result.output_dir}; final checkpoint {result.checkpoint}')

# %% [markdown]
# ## The curves
#
# Figure 1: the loss (the sum of both directions' pixel losses, in $[-4, 4]$; $-4$ would be perfect agreement of
# every positive pair) with its parts, the learning rate of every step (linear warm-up, then cosine) and the target
# network's momentum (cosine from the base value to 1).

# %%
steps = [m['step'] for m in metrics]
fig, axs = plt.subplots(1, 3, figsize=(13, 3.2))
axs[0].plot(steps, [m['loss'] for m in metrics], label='loss')
if c['instance_weight'] > 0 or c['method'] == 'instance':
    axs[0].plot(steps, [m['pixel'] for m in metrics], label='pixel', alpha=.7)
    axs[0].plot(steps, [m['instance'] for m in metrics], label='instance', alpha=.7)
axs[0].set(xlabel='step', title='loss'); axs[0].legend()
axs[1].plot(steps, [m['lr'] for m in metrics]); axs[1].set(xlabel='step', title=f"lr (peak {c['global_lr']:g})")
axs[2].plot(steps, [m['momentum'] for m in metrics]); axs[2].set(xlabel='step', title='target momentum')
fig.suptitle(f"Figure 1: {c['arch']} {c['method']}, global batch {c['global_batch']}, {len(metrics)} steps"); fig.tight_layout()
first, last = metrics[:max(len(metrics) // 10, 1)], metrics[-max(len(metrics) // 10, 1):]
print(f"mean loss over the first tenth of the steps {sum(m['loss'] for m in first) / len(first):.3f}, "
      f"over the last tenth {sum(m['loss'] for m in last) / len(last):.3f}")

# %% [markdown]
# ## Throughput
#
# Images per second (one image = its two views) of each optimiser step, measured from the end of one step to the end
# of the next (data loading included); the first steps include one-off costs (worker start-up, memory allocation).

# %%
rates = [m['images_per_s'] for m in metrics[min(3, len(metrics) - 1):]]
wall = metrics[-1]['time_s'] if metrics else float('nan')
print(f"{c['arch']} at {c['image_size']} px, batch {c['global_batch']}, {c['world_size']} process(es) on "
      f"{'cuda' if torch.cuda.is_available() else 'cpu'} ({torch.get_num_threads()} threads): "
      f"median {sorted(rates)[len(rates) // 2]:.1f} images/s; the loop took {wall:.0f} s (this session's steps)")


# %% [markdown]
# ## What the pixel features learned
#
# Figure 2 is the PPM's similarity $s(i, j) = \max(\cos(x_i, x_j), 0)^\gamma$ between one pixel of a scene (the cross,
# placed on an object) and every other pixel, computed on the output of the projector for a 256-pixel SyntheticScenes
# image, before training (the same initialisation, rebuilt from the seed) and after. One query pixel proves nothing
# either way, so the table after it averages over every object pixel of 16 scenes: the mean similarity of a pixel to
# the other pixels of its own object, and to all pixels outside it. Features that group pixels by object make the
# first number clearly larger than the second.

# %%
def pixel_features(model:PixPro, x):
    "The online pixel features used by the PPM: projector output (encoder output for method='instance')."
    model = model.cpu().eval()
    with torch.no_grad():
        f = model.encoder.forward_features(x)
        return model.projector(f) if hasattr(model, 'projector') else f  # [1, D, h, w]

def similarity(model:PixPro, image):
    "The PPM similarity of every feature-map pixel to every other one: [hw, hw], and the map's (h, w)."
    f = F.normalize(pixel_features(model, normalize_images(image[None])), dim=1)  # [1, D, h, w]
    return (f.flatten(2)[0].T @ f.flatten(2)[0]).clamp(min=0) ** c['gamma'], f.shape[-2:]

def grouping(model:PixPro, scenes, n:int=16) -> tuple[float, float, int]:
    "Mean similarity of an object pixel to the rest of its object and to everything outside it, over all such pixels."
    same, other, count = 0.0, 0.0, 0
    for i in range(n):
        image, _, _, inst = scenes.scene(i, instances=True)
        S, (h, w) = similarity(model, image)
        obj = F.interpolate(inst[None, None].float(), size=(h, w), mode='nearest').flatten().long()  # [hw]
        for q in (obj > 0).nonzero().flatten().tolist():
            mine = obj == obj[q]; mine[q] = False
            if mine.any() and (~mine).sum() > 1:
                same += float(S[q][mine].mean()); other += float(S[q][obj != obj[q]].mean()); count += 1
    return same / max(count, 1), other / max(count, 1), count


# %%
scenes = SyntheticScenes(16, image_size=256, seed=1)
scene_img, labels, _, inst = scenes.scene(3, instances=True)
initial = build_model(c, total_steps=1)  # the run's initialisation, rebuilt from its seed
S, (h, w) = similarity(initial, scene_img)
small = F.interpolate(inst[None, None].float(), size=(h, w), mode='nearest')[0, 0].long()  # [h, w] objects
obj = max(range(1, int(inst.max()) + 1), key=lambda k: int((small == k).sum()))
q = int((small.flatten() == obj).nonzero()[len((small.flatten() == obj).nonzero()) // 2])
fig, axs = plt.subplots(1, 3, figsize=(11, 3.8))
axs[0].imshow(scene_img.permute(1, 2, 0)); axs[0].set_title('scene (cross: the query pixel)')
for ax, (name, mdl) in zip(axs[1:], [('before training', initial), ('after training', result.model)]):
    s = similarity(mdl, scene_img)[0][q]  # [hw]
    ax.imshow(s.view(h, w), cmap='magma', vmin=0, vmax=1); ax.set_title(name)
for ax, scale in zip(axs, (256 / w, 1, 1)):  # the scene in pixels, the maps in C5 cells
    ax.plot((q % w + .5) * scale - .5, (q // w + .5) * scale - .5, 'c+', ms=14, mew=2); ax.axis('off')
fig.suptitle('Figure 2: PPM similarity of one pixel to all others'); fig.tight_layout()

# %%
rows = {name: grouping(mdl, scenes) for name, mdl in [('before training', initial), ('after training', result.model)]}
print(f"{'':16s} {'same object':>12s} {'elsewhere':>10s} {'difference':>11s}  query pixels")
for name, (same, other, n) in rows.items(): print(f'{name:16s} {same:12.3f} {other:10.3f} {same - other:+11.3f}  {n}')
gain = (rows['after training'][0] - rows['after training'][1]) - (rows['before training'][0] - rows['before training'][1])
print(f"training changed (same object - elsewhere) by {gain:+.3f}")

# %% [markdown]
# Read the table, not the single map. In the committed run (ResNet-RS-50, 48 steps) the gap between same-object and
# elsewhere similarity grew from +0.03 to +0.085 over 253 query pixels of 16 scenes: the features moved away from the
# initialisation's near-uniform similarity (random ResNet features are nearly parallel, hence the pale map before
# training) and group objects a little. A run of a few minutes on 256 synthetic scenes is a demonstration of the
# machinery, not a pretrained model; whether the features separate objects better is a question with a real answer
# only under a controlled experiment: the [experiments chapter](10_claims.ipynb) pretrains a small
# ResNet-RS for 384 steps with 3 seeds per arm and measures, on held-out scenes, how much better a linear probe
# segments objects from PixPro's features than from the same network's initialisation. The run's folder holds
# `config.json`, `metrics.csv`/`metrics.jsonl`, the checkpoints (`checkpoints/step-*.pt`, loadable with
# `torch.load(weights_only=True)`), TensorBoard logs when TensorBoard is installed, and `encoder.safetensors`, the
# online encoder for transfer (`pixpro_rs.resnet_rs.load_pretrained`).
