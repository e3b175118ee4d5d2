# %% [markdown]
# # The paper's claims at CPU scale
#
# > PixPro, PixContrast, the instance task and PixPro + instance pretrained on SyntheticScenes and compared with random initialisation by a dense and a linear probe, three seeds each, then a small ablation of T and gamma: what comes out, next to what the paper found.

# %%
#| hide
import json
import math
import platform
import statistics
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from fastcore.test import test_eq

from pixpro_rs.data import SyntheticScenes
from pixpro_rs.evaluate import dense_probe, linear_probe, load_backbone
from pixpro_rs.resnet_rs import create_model
from pixpro_rs.train import train

# %% [markdown]
# The PixPro paper (Xie et al., arXiv 2011.10043) makes four claims that its transfer comparisons and ablation
# studies support: the pixel-to-propagation task
# (PixPro) transfers better than the pixel contrast task (PixContrast); pixel-level pretraining transfers better
# than instance-level pretraining for dense tasks; adding the instance branch to PixPro helps a little more; and
# T = 0.7, gamma = 2 are the best values of the threshold and the PPM sharpness. The paper's evidence is 100 or 400
# epochs of ImageNet on 8 V100s and detection fine-tuning on Pascal VOC and COCO. Ours is a few minutes of CPU:
#
# - **pretraining**: `resnetrs_tiny` (1.2 M parameters, the family's structure at a fraction of its width) on 512
#   SyntheticScenes images of 96 pixels, views of 96 pixels (a 3x3 C5 map), batch 32, 6 epochs (96 steps), lr 1.0 at
#   batch 32 (8 per 256), every other value the paper's;
# - **evaluation**: the frozen encoder's C4 map with C5 upsampled beside it (6x6 at 96 pixels; C5 alone is 3x3, too
#   coarse for objects of a few pixels) read by the evaluation chapter's dense linear probe (a 1x1 convolution,
#   upsampled; mIoU and pixel accuracy on the scenes' 9-class label maps: background and 8 object classes) and its
#   linear classification probe (pooled C5; the scene's dominant object class), both trained on 300 scenes and scored
#   on 100 other scenes, none of them seen in pretraining;
# - **arms**: (a) PixPro, (b) PixContrast, (c) instance only (BYOL-style, the paper's instance branch alone), (d) PixPro
#   + instance branch (weight 1), (e) random initialisation, the same initialisation the pretrained arms start from;
#   three seeds each (initialisation, data order, augmentations and probe all change with the seed).
#
# This is a test of the machinery and a first look, not a replication: nothing here is tuned, the data is not
# photographs, and 96 steps are 0.08 % of a 100-epoch ImageNet run. The numbers are whatever came out, including
# where they disagree with the paper.

# %% [markdown]
# ## The experiment
#
# One cell runs everything and writes `claims_results.json` next to this notebook; the cells after it read that file,
# so the tables and figures can be rebuilt without rerunning the experiment. It is flagged `slow`, and CI runs it.

# %%
RESULTS = Path('claims_results.json')
BASE = dict(arch='resnetrs_tiny', image_size=96, batch_size=32, epochs=6, lr=8.0, synthetic_length=512,
            synthetic_size=96, num_workers=1, progress=False, save_every=6)
ARMS = {'PixPro': dict(method='pixpro'), 'PixContrast': dict(method='pixcontrast'), 'instance': dict(method='instance'),
        'PixPro + instance': dict(method='pixpro', instance_weight=1.0)}
ABLATION = {'T = 0.35': dict(threshold=0.35), 'T = 1.4': dict(threshold=1.4), 'gamma = 1': dict(gamma=1.0),
            'gamma = 4': dict(gamma=4.0)}
SEEDS = (0, 1, 2)

# %%
#| slow
torch.set_num_threads(2)
probe_train, probe_val = SyntheticScenes(300, 96, seed=101), SyntheticScenes(100, 96, seed=102)

def evaluate(backbone, seed:int) -> dict:
    "Dense and linear probe scores of a frozen backbone."
    d = dense_probe(backbone, probe_train, probe_val, image_size=96, features='c4c5', seed=seed)
    l = linear_probe(backbone, probe_train, probe_val, image_size=96, seed=seed)
    return dict(miou=d.miou, pixel_acc=d.pixel_acc, top1=l.top1, chance_miou=d.chance_miou,
                chance_pixel_acc=d.chance_pixel_acc, chance_top1=l.chance)

def pretrain(seed:int, **kw) -> dict:
    t = time.perf_counter()
    r = train(**{**BASE, **kw}, seed=seed, output_dir=str(work/f'run-{len(rows)}'))
    return dict(first_loss=r.metrics[0]['loss'], final_loss=r.metrics[-1]['loss'], pretrain_s=time.perf_counter() - t,
                **evaluate(load_backbone(r.model), seed))

work, rows, t0 = Path(tempfile.mkdtemp()), [], time.perf_counter()
for seed in SEEDS:
    torch.manual_seed(seed)  # the initialisation `train` starts from with this seed
    rows.append(dict(arm='random init', seed=seed, **evaluate(create_model(BASE['arch'], num_classes=0).eval(), seed)))
    for arm, kw in ARMS.items(): rows.append(dict(arm=arm, seed=seed, **pretrain(seed, **kw)))
    print(f'seed {seed} done after {time.perf_counter() - t0:.0f} s', flush=True)
for name, kw in ABLATION.items(): rows.append(dict(arm=name, seed=0, ablation=True, **pretrain(0, method='pixpro', **kw)))
RESULTS.write_text(json.dumps(dict(
    rows=rows, base=BASE, seeds=SEEDS, total_s=time.perf_counter() - t0, torch=torch.__version__,
    machine=f'{platform.machine()}, {torch.get_num_threads()} threads, {platform.processor() or "cpu"}'), indent=1))
print(f'{len(rows)} rows in {time.perf_counter() - t0:.0f} s')

# %% [markdown]
# ## Results
#
# Mean +- standard deviation over the three seeds (the random-initialisation arm uses the same three
# initialisations as the pretrained arms). "chance" is the score of always predicting the training set's most
# frequent class (background for the dense probe).

# %%
res = json.loads(RESULTS.read_text())
rows = res['rows']
main_arms = ['random init', 'PixPro', 'PixContrast', 'instance', 'PixPro + instance']
def stats(arm, key):
    v = [r[key] for r in rows if r['arm'] == arm and not r.get('ablation')]
    return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0), len(v)
print(f"{'arm':20s} {'dense mIoU':>15s} {'pixel acc':>15s} {'linear top-1':>15s} {'final loss':>12s}  seeds")
for arm in main_arms:
    cells = [f'{m:.3f} +- {s:.3f}' for m, s, n in (stats(arm, k) for k in ('miou', 'pixel_acc', 'top1'))]
    loss = f"{stats(arm, 'final_loss')[0]:+.2f}" if arm != 'random init' else '-'
    print(f"{arm:20s} {cells[0]:>15s} {cells[1]:>15s} {cells[2]:>15s} {loss:>12s}  {stats(arm, 'miou')[2]}")
ch = rows[0]
print(f"{'chance':20s} {ch['chance_miou']:15.3f} {ch['chance_pixel_acc']:15.3f} {ch['chance_top1']:15.3f}")
print(f"\n{len(rows)} pretraining/probe rows in {res['total_s'] / 60:.1f} min on {res['machine']}, torch {res['torch']}")
test_eq(sorted({r['arm'] for r in rows}), sorted(main_arms + list(ABLATION)))
assert all(0 <= r['miou'] <= 1 and 0 <= r['top1'] <= 1 for r in rows)

# %% [markdown]
# Figure 1: dense-probe mIoU of each arm, one dot per seed, the bar at the mean; the dashed line is chance.

# %%
fig, axs = plt.subplots(1, 2, figsize=(12, 3.6))
for ax, key, title in ((axs[0], 'miou', 'dense probe mIoU'), (axs[1], 'top1', 'linear probe top-1')):
    for i, arm in enumerate(main_arms):
        v = [r[key] for r in rows if r['arm'] == arm and not r.get('ablation')]
        ax.bar(i, statistics.mean(v), color='C0' if arm != 'random init' else 'C7', alpha=.6)
        ax.plot([i] * len(v), v, 'k.', ms=8)
    ax.axhline(rows[0]['chance_' + ('miou' if key == 'miou' else 'top1')], ls='--', c='C3', lw=1)
    ax.set_xticks(range(len(main_arms)), main_arms, rotation=15); ax.set_title(title)
fig.suptitle(f"Figure 1: frozen-feature probes after {res['base']['epochs'] * 16} steps of pretraining on SyntheticScenes (3 seeds)"); fig.tight_layout()

# %% [markdown]
# ## Ablation of T and gamma
#
# PixPro with one seed (0) at other thresholds and sharpness exponents; the T = 0.7, gamma = 2 row is seed 0 of the
# PixPro arm above.

# %%
base0 = next(r for r in rows if r['arm'] == 'PixPro' and r['seed'] == 0)
print(f"{'setting':12s} {'dense mIoU':>10s} {'pixel acc':>10s} {'top-1':>8s} {'final loss':>11s}")
for name, r in [('T 0.7, g 2', base0)] + [(r['arm'], r) for r in rows if r.get('ablation')]:
    print(f"{name:12s} {r['miou']:10.3f} {r['pixel_acc']:10.3f} {r['top1']:8.3f} {r['final_loss']:+11.2f}")

# %% [markdown]
# ## What came out, next to the paper
#
# The committed run (`claims_results.json`, 17.5 minutes on our 2-core CI machine) gives:
#
# | claim of the paper (arXiv 2011.10043) | the paper's evidence | here, dense-probe mIoU (3 seeds) |
# |---|---|---|
# | pretraining beats random initialisation | VOC AP 58.8 (PixPro, 100 epochs) against 33.8 from scratch | every pretrained arm is above random init (0.137 +- 0.003); the best, PixPro, by 0.014 (0.151 +- 0.007) |
# | PixPro > PixContrast | PixPro ahead in every transfer ablation | 0.151 +- 0.007 against 0.143 +- 0.005: same direction, about one standard deviation |
# | pixel-level > instance-level pretraining for dense tasks | PixPro 58.8 VOC AP against 57.6 for MoCo v2 (800 epochs) | 0.151 against 0.148 +- 0.009: within the seeds' spread |
# | the instance branch adds to PixPro | COCO FPN 41.3 / 41.4 box AP with it against 40.8 without | 0.141 +- 0.010, below PixPro alone: not reproduced at this scale |
# | T = 0.7 and gamma = 2 are best | the paper's ablation tables | 0.146-0.150 for T in {0.35, 0.7, 1.4} and gamma in {1, 2, 4} (one seed): no measurable difference |
#
# *Table 1: the paper's claims, its evidence and ours. The paper's numbers as the reference's README at commit
# e390d6b lists them (zdaxie/PixPro: Pascal VOC Faster R-CNN C4 AP; COCO Mask R-CNN FPN 1x box AP, where the 41.3 /
# 41.4 rows are marked as using the instance branch); the T and gamma values of its released scripts
# (`tools/pixpro_base_r50_100ep.sh`, lines 34 and 36). Ours from `claims_results.json`, written by this chapter.*
#
# Read this honestly: the probes are close to their floor. Pixel accuracy sits at the chance level of always
# answering "background" (0.72) for every arm, and the linear probe's top-1 on the dominant object class is at or
# near chance (0.18) for every arm, random initialisation included. The only signal is a small, consistent gain in
# mIoU from pretraining, largest for PixPro, of the order of the seeds' spread. 96 steps of a 1.2 M-parameter network
# are far too few for the paper's differences to appear, and the PixPro loss was still falling (to -3.5 of its
# minimum -4). What the experiment does establish: every arm trains end to end through the same engine, the probes
# separate a pretrained encoder from its initialisation, and the dense probe on SyntheticScenes is not trivial (no arm
# is near a solved task). Longer runs (thousands of steps; the same code with `epochs` raised) are the next step
# before any claim about the methods can be made from this data.

# %% [markdown]
# ## Summary
#
# - Five arms (PixPro, PixContrast, instance only, PixPro with the instance branch, random initialisation), 3 seeds
#   each, and a one-seed ablation of T and gamma, all pretrained by the training chapter's engine on SyntheticScenes
#   and read by the evaluation chapter's frozen-feature probes; the run is stored in `claims_results.json`.
# - Every pretrained arm beats random initialisation on the dense probe, PixPro most, and PixPro is ahead of
#   PixContrast; the other claims (pixel over instance level, the instance branch, the best T and gamma) are not
#   measurable at this scale. The probes sit near their floor: 96 steps of a 1.2 M-parameter network are far from the
#   paper's 100 ImageNet epochs.
#
# ## Exercises
#
# 1. Raise `BASE['epochs']` from 6 to 60 and rerun the arms (each run then takes about ten times as long). Which of
#    the differences of Table 1 grow beyond the seeds' spread?
# 2. Replace the dense probe's C4 + C5 features by C5 alone (`features='c5'` in `evaluate`). Does the ranking of the
#    arms change, and what does that say about which stage pretraining helps at this scale?
# 3. Add an arm with `instance_weight=1.0` and `threshold=1.4`, or any other pair the paper did not try, and place it
#    in Table 1. Which values of the ablation are even distinguishable with 3 seeds?
# 4. Compute the standard error of each arm's mean mIoU from the 3 seeds and redo the comparisons of Table 1 as
#    differences with two standard errors. Which sentences of the table survive?
