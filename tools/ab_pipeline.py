"""Side-by-side timing of the CPU data path of two checkouts of this project (the benchmark chapter's before/after).

    python tools/ab_pipeline.py OLD_CHECKOUT NEW_CHECKOUT [--rounds 12] [--batches 7] [--workers 0] [--crops]

Each round repeats `bench_data`'s protocol once in a fresh process for each checkout (the order alternates), on the
same folder of 256 JPEG files (500x375, `make_jpeg_folder`), 224 px views, batch 32, torch and OpenCV on one thread;
it prints each round's pairs/s and the ratio NEW/OLD, then the medians. Alternating whole processes keeps a drifting
machine from favouring one side.
`--crops` times the crop-only path of the GPU augmentation instead (`make_crop_loader`: uint8 crops, flips and the
decision tensors; the colour work is left for the accelerator).
"""
import argparse, statistics, subprocess, sys, tempfile
from pathlib import Path

CHILD = r'''
import sys, torch
sys.path.insert(0, sys.argv[1]); torch.set_num_threads(1)
try: import cv2; cv2.setNumThreads(0)  # sequential, as in a DataLoader worker
except ImportError: pass
import pixpro_rs
assert pixpro_rs.__file__.startswith(sys.argv[1]), pixpro_rs.__file__
import time
from pixpro_rs.data import ImageFiles, make_loader
batches, workers, crops = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == '1'
if crops:
    from pixpro_rs.gpu_augment import make_crop_loader as make_loader
loader = make_loader(ImageFiles(sys.argv[2]), 32, image_size=224, num_workers=workers, labels=False)
it = iter(loader); next(it)  # the workers have started (bench_data's protocol)
t, n = time.perf_counter(), 0
for _, b in zip(range(batches), it): n += len(b[0])
print(n / (time.perf_counter() - t))
'''

def rate(repo, folder, batches, workers, crops):
    out = subprocess.run([sys.executable, '-c', CHILD, str(repo), str(folder), str(batches), str(workers), str(int(crops))],
                         capture_output=True, text=True, check=True).stdout
    return float(out.split()[-1])

def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('old'); ap.add_argument('new')
    ap.add_argument('--rounds', type=int, default=12); ap.add_argument('--batches', type=int, default=7)
    ap.add_argument('--workers', type=int, default=0, help='DataLoader workers (0: in the timing process)')
    ap.add_argument('--crops', action='store_true', help="the GPU path's crop-only loader instead of the full CPU path")
    a = ap.parse_args()
    old, new = Path(a.old).resolve(), Path(a.new).resolve()
    with tempfile.TemporaryDirectory() as d:
        sys.path.insert(0, str(new))
        from pixpro_rs.bench import make_jpeg_folder
        folder = make_jpeg_folder(d, 256, unique=64)
        rows = []
        for i in range(a.rounds):
            order = (old, new) if i % 2 == 0 else (new, old)
            r = {k: rate(k, folder, a.batches, a.workers, a.crops) for k in order}
            rows.append((r[old], r[new]))
            print(f'round {i + 1:2d}: old {r[old]:6.1f}  new {r[new]:6.1f} pairs/s  new/old {r[new] / r[old]:.3f}', flush=True)
    med = statistics.median
    print(f'median: old {med(o for o, _ in rows):.1f}, new {med(n for _, n in rows):.1f} pairs/s; '
          f'median ratio new/old {med(n / o for o, n in rows):.3f} '
          f'(rounds {min(n / o for o, n in rows):.2f}-{max(n / o for o, n in rows):.2f})')

if __name__ == '__main__': main()
