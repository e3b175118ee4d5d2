# %% [markdown]
# # Fine-tune
#
# > The notebook that fine-tunes: a flat cell of parameters for papermill, one call of `finetune` (the ResNet-RS supervised recipe, from scratch or a PixPro encoder), then the loss and learning-rate curves and the top-1 of the raw and EMA models.

# %% [markdown]
# Run it as it is (`papermill nbs/finetune.ipynb runs/finetune.ipynb`) and it trains `resnetrs_tiny` from scratch on
# the embedded `SceneLooks` task (three classes: a synthetic scene as photographed, in grayscale, blurred) with the
# CPU demo recipe: no download, well under a minute of training on a 2-core machine. The parameters are those of
# `FinetuneConfig` in the fine-tuning chapter, of the `pixpro-finetune` command and of its `params.yaml` files:
#
# ```bash
# papermill nbs/finetune.ipynb runs/ft.ipynb -p init runs/pixpro_demo_cpu-resnetrs50-seed0/encoder.safetensors \
#     -p arch resnetrs50                                        # fine-tune the training notebook's encoder
# papermill nbs/finetune.ipynb runs/rs50-imagenet.ipynb -p recipe supervised_rs50_160_350ep -p data /data/imagenet \
#     -p init runs/rs50-400ep/encoder.safetensors -p mixed_precision bf16 -p num_workers 10
# ```
#
# `data` is `'looks'`, `'synthetic'` (SyntheticScenes' dominant-object labels, a much harder task) or an
# ImageNet-style root holding `train/<class>/...` and `val/<class>/...`. A notebook runs one process; the recipe's
# global batch of 4096 is `batch_size x grad_accum x processes`, so either accumulate (`-p grad_accum 32` with the
# recipe's 128 images per micro-batch) or, faster, use `accelerate launch -m pixpro_rs.finetune` on several GPUs with
# the same parameters as flags. Interrupting is safe: run the same command again and it resumes exactly from the last
# checkpoint in `output_dir`.

# %% tags=["parameters"]
# Parameters: papermill -p NAME VALUE, or -f params.yaml. None takes the recipe's value.
recipe = 'supervised_demo_cpu'  # named recipe: supervised_demo_cpu, supervised_rs50_160_350ep, supervised_rs101_192_350ep ...
arch = None  # backbone (the demo: resnetrs_tiny): resnetrs50 ... resnetrs420
data = 'looks'  # 'looks', 'objects', 'synthetic' or a root with train/ and val/ class folders, e.g. /data/imagenet
init = 'scratch'  # 'scratch' or a PixPro checkpoint / encoder.safetensors
num_classes = None  # 'objects' / 'synthetic': their classes (8 / 4); 'looks': 3; class folders: counted
epochs = None  # passes over the data (demo: 12; the paper: 350)
batch_size = None  # images per device per micro-batch (demo: 32; the paper: 4096 in all)
image_size = None  # training crop and evaluation size (demo: 64; RS-50: 160)
lr = None  # base lr per 256 images, scaled linearly to the global batch (the paper: 0.1)
weight_decay = None  # on conv and linear weights only (4e-5)
warmup_epochs = None  # linear warm-up from 0 (the paper: 5)
lr_schedule = 'cosine'  # after the warm-up: 'cosine' (the recipe's) or 'step' (x0.1 at 30, 60, 80 of 90 epochs)
label_smoothing = None  # of the cross-entropy (0.1)
ema_decay = None  # EMA of weights and BN statistics (0.9999)
randaugment_ops = None  # RandAugment operations per image (2)
randaugment_magnitude = None  # on TF's scale (the paper: 10 or 15; demo: 5)
dropout = None  # before the classifier (the paper: 0.25 or 0.4)
stochastic_depth = None  # drop-path rate (the paper: 0 or 0.1)
output_dir = None  # None: runs/<recipe>-<arch>-seed<seed> (relative to where the notebook runs)
seed = 0  # initialisation, data order and augmentations
num_workers = 2  # DataLoader workers
mixed_precision = 'no'  # 'no', 'bf16' or 'fp16' (fp16 needs a GPU)
max_steps = 0  # stop after this many steps (0: all epochs)
save_every = 1  # checkpoint and evaluate every this many epochs (and at the end)
resume = 'auto'  # 'auto' (continue the run found in output_dir), 'never', or a checkpoint file
overwrite = False  # start afresh in an output_dir that holds a different run
grad_accum = 1  # micro-batches per optimiser step; the global batch is batch_size x grad_accum x processes
synthetic_length = 512  # training images of 'looks' / 'objects' / 'synthetic'
synthetic_size = 96  # side of the synthetic images
keep_checkpoints = 1  # newest checkpoints kept
progress = True  # progress bar
channels_last = False  # NHWC memory format for the model and the images (faster convolutions on GPUs)
compile = False  # compile the classifier and its EMA in place (nn.Module.compile)

# %%
import matplotlib.pyplot as plt
import torch

from pixpro_rs.finetune import FinetuneConfig, build_datasets, finetune

# %% [markdown]
# ## Fine-tune

# %%
result = finetune(FinetuneConfig(
    recipe=recipe, arch=arch, data=data, init=init, num_classes=num_classes, epochs=epochs, batch_size=batch_size,
    image_size=image_size, lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs, lr_schedule=lr_schedule,
    label_smoothing=label_smoothing, ema_decay=ema_decay, randaugment_ops=randaugment_ops,
    randaugment_magnitude=randaugment_magnitude, dropout=dropout, stochastic_depth=stochastic_depth,
    output_dir=output_dir, seed=seed, num_workers=num_workers, mixed_precision=mixed_precision, max_steps=max_steps,
    save_every=save_every, resume=resume, overwrite=overwrite, grad_accum=grad_accum, synthetic_length=synthetic_length,
    synthetic_size=synthetic_size, keep_checkpoints=keep_checkpoints, progress=progress, channels_last=channels_last,
    compile=compile))
c, metrics = result.config, result.metrics
print(f'{len(metrics)} steps in {result.output_dir}; final checkpoint {result.checkpoint}')

# %% [markdown]
# ## The curves
#
# Figure 1: the label-smoothed cross-entropy of every step, the learning rate (linear warm-up from 0, then cosine to
# 0) and the validation top-1 of the raw and the EMA model after each evaluation, against the majority class.

# %%
evals = [m for m in metrics if 'top1_ema' in m]
_, val = build_datasets(c)
labels = torch.tensor([val[i][1] for i in range(len(val))]) if len(val) <= 5000 else None
chance = float(torch.bincount(labels).max()) / len(labels) if labels is not None else None
fig, axs = plt.subplots(1, 3, figsize=(13, 3.2))
axs[0].plot([m['step'] for m in metrics], [m['loss'] for m in metrics]); axs[0].set(xlabel='step', title='loss')
axs[1].plot([m['step'] for m in metrics], [m['lr'] for m in metrics]); axs[1].set(xlabel='step', title=f"lr (peak {c['global_lr']:g})")
axs[2].plot([m['step'] for m in evals], [m['top1'] for m in evals], 'o-', label='raw')
axs[2].plot([m['step'] for m in evals], [m['top1_ema'] for m in evals], 's-', label='EMA')
if chance is not None: axs[2].axhline(chance, color='gray', ls='--', label='majority class')
axs[2].set(xlabel='step', title='validation top-1', ylim=(0, 1)); axs[2].legend()
fig.suptitle(f"Figure 1: {c['arch']} ({c['init']}) on {c['data']}, global batch {c['global_batch']}"); fig.tight_layout()
n = max(len(metrics) // 10, 1)
print(f"mean loss over the first tenth of the steps {sum(m['loss'] for m in metrics[:n]) / n:.3f}, over the last tenth "
      f"{sum(m['loss'] for m in metrics[-n:]) / n:.3f}; final top-1: raw {evals[-1]['top1']:.3f}, EMA {evals[-1]['top1_ema']:.3f}"
      + (f', majority class {chance:.3f}' if chance is not None else ''))

# %% [markdown]
# ## Throughput

# %%
rates = [m['images_per_s'] for m in metrics[min(3, len(metrics) - 1):]]
print(f"{c['arch']} at {c['image_size']} px, global batch {c['global_batch']}, {c['world_size']} process(es) on "
      f"{'cuda' if torch.cuda.is_available() else 'cpu'} ({torch.get_num_threads()} threads): median "
      f"{sorted(rates)[len(rates) // 2]:.1f} images/s; the loop took {metrics[-1]['time_s']:.0f} s (this session's steps)")

# %% [markdown]
# The run's folder holds `config.json`, `metrics.csv` / `metrics.jsonl` (the evaluation rows have `top1` and
# `top1_ema`), `checkpoints/step-*.pt` (model, EMA, optimiser, RNG states; `torch.load(weights_only=True)`) and
# `model.safetensors`, the EMA model, which `pixpro_rs.resnet_rs.load_pretrained(create_model(arch,
# num_classes=K), path)` loads.
