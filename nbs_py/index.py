# %% [markdown]
# # pixpro_rs
#
# > PixPro pixel-level self-supervised pretraining on ResNet-RS backbones: a Jupyter-first, tested, reproducible textbook and library.

# %% [markdown]
# `pixpro_rs` implements **PixPro** ("Propagate Yourself", Xie et al., CVPR 2021) on **ResNet-RS** backbones
# ("Revisiting ResNets", Bello et al., NeurIPS 2021). Every component is defined, explained and tested in a notebook
# chapter, and exported with [nbdev](https://nbdev.fast.ai) to the `pixpro_rs` package, so the object a reader
# studies in a chapter is the one a multi-GPU run imports. The reference PixPro code is frozen at PyTorch 1.4 with
# apex, supports ResNet-50 only and has no tests; this project aims to be numerically faithful to it (and to say so,
# with tests, where we depart from it) on current PyTorch, with Accelerate for one CPU to many GPUs.

# %% [markdown]
# ## The two papers
#
# **PixPro** learns dense features without labels. Two random crops of one image go through an online and a
# momentum (EMA) network; feature-map pixels whose centres fall close together in the original image (closer than
# T = 0.7 bin diagonals) are positive pairs. Instead of contrasting pixels directly, a *pixel propagation module*
# smooths each online feature with the features similar to it, and the loss pulls the propagated feature towards
# its positives in the other view. Pretrained for 100 epochs on ImageNet, a ResNet-50 reaches 58.8 AP on Pascal VOC
# detection (60.2 after 400 epochs, against 53.5 for supervised pretraining and 57.6 for MoCo v2 after 800 epochs),
# 40.8 box AP with a COCO Mask R-CNN R50-FPN 1x (41.4 with the added instance branch after 400 epochs), and 77.2 mIoU
# on Cityscapes.
#
# **ResNet-RS** shows that training and scaling methods matter more than architecture changes: a ResNet with the
# ResNet-D stem and shortcut, squeeze-and-excitation, and a modern recipe (350 epochs, cosine schedule, EMA, label
# smoothing, RandAugment, dropout, stochastic depth, weight decay lowered to 4e-5) climbs from 79.0 % to 83.4 %
# ImageNet top-1 at ResNet-200 size. Scaling depth rather than width for long schedules and growing resolution
# slowly gives a family from RS-50 (35.7 M parameters, 78.8 %) to RS-420 (191.9 M, 84.4 %) that is 1.7-2.7x faster
# on TPUs than EfficientNets of similar accuracy. No library pretrains ResNet-RS with a self-supervised method:
# this one does.

# %% [markdown]
# ## The chapters
#
# | chapter | what it builds | module |
# |---|---|---|
# | [Conventions](00_core.ipynb) | the glossary of names, clear errors for bad input, atomic writes | `pixpro_rs.core` |
# | [ResNet-RS](01_resnet_rs.ipynb) | the ResNet-RS family (RS-50 ... RS-420) exact to the released checkpoints, timm-compatible weights, C5 and C2-C5 features | `pixpro_rs.resnet_rs` |
# | [Two views](02_augment.ipynb) | PixPro's two augmented views with exact crop coordinates | `pixpro_rs.augment` |
# | [Data](03_data.ipynb) | image folders, the embedded `SyntheticScenes`, seeded loaders, bad-file handling | `pixpro_rs.data` |
# | [Positive pairs](04_positives.ipynb) | the positive-pixel rule, the PixPro and PixContrast losses | `pixpro_rs.positives` |
# | [PixPro](05_pixpro.ipynb) | the pixel propagation module, the momentum encoder, the full model | `pixpro_rs.pixpro` |
# | [Recipes](06_recipes.ipynb) | LARS, the warm-up + cosine schedule, the named pretraining and supervised recipes | `pixpro_rs.recipes` |
# | [Training](07_train.ipynb) | the engine: config, Accelerate, the loop, atomic checkpoints, exact resume, the `pixpro-train` command | `pixpro_rs.train` |
# | [Train](train.ipynb) | the papermill notebook: pretrain, then the curves, the throughput and the learned pixel similarity | (runs `pixpro_rs.train`) |
# | [Evaluation and transfer](08_evaluate.ipynb) | linear and dense probes on frozen features (top-1, mIoU), segmentation folders, exports for timm, torchvision and detectron2 | `pixpro_rs.evaluate` |
# | [Detection transfer](09_detection.ipynb) | Faster R-CNN and Mask R-CNN with our backbone (FPN or the paper's C4) in torchvision, boxes and masks from SyntheticScenes, VOC AP and COCOeval (bbox, segm), the paper's schedules, the `pixpro-detect` command for Pascal VOC and COCO | `pixpro_rs.detection` |
# | [Does it learn? The papers' claims at CPU scale](10_claims.ipynb) | PixPro, PixContrast, instance, PixPro + instance, random init and a supervised ceiling under dense probes on held-out scenes, three seeds; T and gamma; a healthy loss curve; ResNet-RS's training methods added one at a time | `pixpro_rs.experiments` |
# | [Supervised fine-tuning](11_finetune.ipynb) | the ResNet-RS recipe: RandAugment on TF's scale, label smoothing, EMA with BN statistics, per-model dropout and stochastic depth, the `pixpro-finetune` command | `pixpro_rs.finetune` |
# | [Fine-tune](finetune.ipynb) | the papermill notebook: fine-tune from a PixPro checkpoint or from scratch | (runs `pixpro_rs.finetune`) |
# | [Segmentation transfer](14_segmentation.ipynb) | MoCo's FCN-16s protocol on our backbones (dilated C5, output stride 16), Pascal VOC and Cityscapes layouts, mIoU, the `pixpro-segment` command | `pixpro_rs.segmentation` |
# | [Augmentation on the GPU](12_gpu_augment.ipynb) | crops in the workers, colour, blur and solarize batched on the device, exact to the CPU path | `pixpro_rs.gpu_augment` |
# | [Performance](13_bench.ipynb) | the benchmark (`python -m pixpro_rs.bench`), the speed switches, H200 and CPU figures, the recipes' cost | `pixpro_rs.bench` |
#
# Each chapter is a notebook in `nbs/` that runs top to bottom in CI.

# %% [markdown]
# ## Getting started
#
# Set up and run the tests (a fresh virtual environment, the package with its development tools, then every
# notebook through `nbdev_test` and the cross-component tests through `pytest`):
#
# ```sh
# python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[dev]" && bash tools/test.sh
# ```
#
# Pretrain on the embedded synthetic data (no download; about 2.5 minutes on 2 CPU cores for ResNet-RS-50, about 4
# for ResNet-RS-101) with the parameterised notebook `nbs/train.ipynb`. The line below also works alone on a fresh
# machine (it makes the same environment; where it exists, the install is quick); `--log-output` streams the
# notebook's output, so the training's progress line appears every 30 seconds while it runs. Any parameter of the
# notebook's `parameters` cell can be set with `-p`, or from a YAML file with `-f params.yaml`:
#
# ```sh
# python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[dev]" && mkdir -p runs && papermill nbs/train.ipynb runs/train.ipynb -p arch resnetrs101 --log-output
# ```
#
# The same run from the command line is `pixpro-train --arch resnetrs101` (or `python -m pixpro_rs.train`), and on
# several processes, GPUs or machines `accelerate launch -m pixpro_rs.train --recipe pixpro_rs50_400ep --data
# /data/imagenet/train --mixed_precision bf16`. The [Train](train.ipynb) notebook gives the full-scale commands
# and their expected cost. Runs resume from their `output_dir` when started again.
#
# A pretrained encoder transfers with the same conventions (`--help` lists every parameter; `--config params.yaml`
# reads them from a file): `pixpro-finetune --init runs/.../encoder.safetensors` (ResNet-RS's supervised recipe),
# `pixpro-segment --recipe voc_aug_30k --data /data/VOCdevkit/VOC2012 --init ...` (MoCo's FCN protocol; also
# `cityscapes_90k`) and `pixpro-detect --dataset coco --data /data/coco --init ... --output_dir runs/coco_1x`
# (Mask R-CNN, COCOeval; `--dataset voc` for Faster R-CNN on Pascal VOC). Without a dataset, each chapter runs the
# same code on SyntheticScenes in a few CPU minutes.
#
# The docs site is built by `bash tools/docs.sh`: with Quarto on `PATH` it runs `nbdev_docs`; without it (as on
# our CI machines) it builds the same chapters offline with Sphinx into `_docs/`.

# %% [markdown]
# ## Working on the book
#
# The notebooks are the source. After editing a notebook, run `bash tools/sync.sh`: it exports the package
# (`nbdev_export`), cleans the notebooks (`nbdev_clean`), refreshes the jupytext twins in `nbs_py/` and regenerates
# this README from `nbs/index.ipynb`. The test command checks that all four are in step.
