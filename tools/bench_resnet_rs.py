"""Throughput of the ResNet-RS models on one CUDA GPU (the figures of the ResNet-RS chapter).

Supervised training step = forward + backward + SGD step (Nesterov, weight decay) under bf16 autocast, label-smoothed
cross-entropy on random data; inference = forward under `torch.inference_mode` and bf16 autocast. Each case runs
in NCHW (channels_first) and NHWC (channels_last): `--warmup` untimed steps, then `--steps` timed steps between
`torch.cuda.synchronize()` calls. Prints a markdown table; `--json PATH` also writes the raw figures.

    PYTHONPATH=. python tools/bench_resnet_rs.py [--steps 20] [--warmup 5] [--json out.json]
"""
import argparse
import datetime
import json
import time

import torch
import torch.nn.functional as F

from pixpro_rs.resnet_rs import create_model

CASES = [  # (mode, arch, image_size, batch_size): the sizes of timm's published anchors
    ('train', 'resnetrs50', 160, 256),
    ('train', 'resnetrs101', 192, 256),
    ('train', 'resnetrs152', 256, 128),
    ('train', 'resnetrs420', 320, 64),
    ('infer', 'resnetrs50', 224, 256),
]


def bench(mode, arch, image_size, batch_size, channels_last, steps, warmup):
    "Images per second and peak memory (GiB) of one case."
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = create_model(arch).cuda().to(memory_format=fmt)
    x = torch.randn(batch_size, 3, image_size, image_size, device='cuda').to(memory_format=fmt)
    y = torch.randint(0, 1000, (batch_size,), device='cuda')
    if mode == 'train':
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=4e-5)
        def step():
            with torch.autocast('cuda', dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    else:
        model.eval()
        def step():
            with torch.inference_mode(), torch.autocast('cuda', dtype=torch.bfloat16):
                model(x)
    torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup): step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps): step()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    ips, mem = batch_size * steps / dt, torch.cuda.max_memory_allocated() / 2**30
    del model, x, y
    torch.cuda.empty_cache()
    return ips, mem


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--steps', type=int, default=20)
    ap.add_argument('--warmup', type=int, default=5)
    ap.add_argument('--json', default=None)
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    info = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version(), date=datetime.date.today().isoformat(),
                steps=args.steps, warmup=args.warmup)
    print(' '.join(f'{k}={v}' for k, v in info.items()))
    rows = []
    print('| mode | model | image size | batch | img/s NCHW | img/s channels_last | peak GiB (NHWC) |')
    print('|---|---|---:|---:|---:|---:|---:|')
    for mode, arch, size, batch in CASES:
        nchw, _ = bench(mode, arch, size, batch, False, args.steps, args.warmup)
        nhwc, mem = bench(mode, arch, size, batch, True, args.steps, args.warmup)
        rows.append(dict(mode=mode, arch=arch, image_size=size, batch_size=batch, nchw=nchw, nhwc=nhwc, peak_gib=mem))
        print(f'| {mode} | {arch} | {size} | {batch} | {nchw:.0f} | {nhwc:.0f} | {mem:.1f} |', flush=True)
    if args.json:
        with open(args.json, 'w') as f: json.dump(dict(info=info, rows=rows), f, indent=1)


if __name__ == '__main__':
    main()
