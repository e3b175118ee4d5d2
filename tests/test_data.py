"""What crosses components in the data path: determinism across worker counts and processes, bad files on disk seen
through DataLoader workers, every awkward image mode through the whole pipeline."""
import hashlib
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pixpro_rs.augment import PixProAugment
from pixpro_rs.core import ConfigError
from pixpro_rs.data import (BadImageError, ClassFolders, ImageFiles, SyntheticScenes, data_fingerprint, load_image,
                            make_loader)

SNIPPET = """
import hashlib, torch
from pixpro_rs.data import SyntheticScenes, make_loader
dl = make_loader(SyntheticScenes(16, image_size=40, num_classes=4, seed=5), 4, image_size=24, num_workers={w},
                 seed=9, epoch=2)
h = hashlib.sha256()
for batch in dl:
    for t in batch: h.update(t.contiguous().numpy().tobytes())
print(h.hexdigest())
"""


def digest(loader) -> str:
    h = hashlib.sha256()
    for batch in loader:
        for t in batch: h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def scenes(): return SyntheticScenes(16, image_size=40, num_classes=4, seed=5)


def test_same_batches_for_any_worker_count():
    ref = digest(make_loader(scenes(), 4, image_size=24, num_workers=0, seed=9, epoch=2))
    for w in (1, 2):
        assert digest(make_loader(scenes(), 4, image_size=24, num_workers=w, seed=9, epoch=2)) == ref


def test_same_batches_in_a_fresh_process():
    ref = digest(make_loader(scenes(), 4, image_size=24, num_workers=0, seed=9, epoch=2))
    out = subprocess.run([sys.executable, '-c', SNIPPET.format(w=2)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ref


def test_epoch_and_seed_change_the_batches_and_persistent_workers_follow_set_epoch():
    dl = make_loader(scenes(), 4, image_size=24, num_workers=2, seed=9, persistent_workers=True)
    e0 = digest(dl)
    dl.set_epoch(1)
    e1 = digest(dl)
    assert e0 != e1
    assert e1 == digest(make_loader(scenes(), 4, image_size=24, num_workers=0, seed=9, epoch=1))
    assert digest(make_loader(scenes(), 4, image_size=24, seed=10)) != e0


def test_ranks_split_the_epoch():
    seen = []
    for rank in range(2):
        dl = make_loader(scenes(), 2, image_size=24, rank=rank, world_size=2, seed=3, labels=False)
        assert len(dl) == 4
        seen.append(len(list(dl)))
    assert seen == [4, 4]


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    for c in ('a', 'b'):
        (tmp_path/c).mkdir()
        for k in range(3): rgb.save(tmp_path/c/f'{k}.jpg', quality=90)
    good = (tmp_path/'a'/'0.jpg').read_bytes()
    (tmp_path/'a'/'1.jpg').write_bytes(good[:len(good) // 2])  # truncated
    (tmp_path/'b'/'2.jpg').write_bytes(b'not an image at all')  # garbage
    return tmp_path


def test_bad_files_are_skipped_counted_and_named_through_workers(folder):
    ds = ClassFolders(folder)
    dl = make_loader(ds, 2, image_size=16, num_workers=2, shuffle=False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        batches = list(dl)
    assert len(batches) == 3 and all(len(b) == 5 for b in batches)  # views, coords, labels
    assert sorted(p.name for p in ds.bad_files) == ['1.jpg', '2.jpg']  # found by the workers, seen here
    summary = [str(x.message) for x in w if 'skipped so far' in str(x.message)]
    assert len(summary) == 1 and '2 unreadable' in summary[0] and '1.jpg' in summary[0]


def test_strict_raises_through_a_worker(folder):
    dl = make_loader(ImageFiles(folder, strict=True), 2, image_size=16, num_workers=1, shuffle=False)
    with pytest.raises(Exception, match='1.jpg'):
        list(dl)


def test_missing_and_empty_folders_fail_at_construction(tmp_path):
    with pytest.raises(ConfigError, match=r"invalid data=.*nope.*\.jpg.*does not exist"):
        ImageFiles(tmp_path/'nope')
    (tmp_path/'empty'/'sub').mkdir(parents=True)
    with pytest.raises(ConfigError, match=r'\.png.*none found'):
        ClassFolders(tmp_path/'empty')


@pytest.mark.parametrize('mode', ['L', 'LA', 'RGBA', 'CMYK', 'P', '1', 'I;16', 'I'])
def test_every_mode_goes_through_the_pipeline(tmp_path, mode):
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, (7, 9, 3), dtype=np.uint8))  # smaller than the crop
    if mode in ('I;16', 'I'):
        im = Image.fromarray((np.arange(63, dtype=np.uint16).reshape(7, 9) * 1000).astype(np.uint16))
        im = im if mode == 'I;16' else im.convert('I')
    else:
        im = rgb.convert(mode)
    path = tmp_path/{'CMYK': 'x.jpg', 'I': 'x.tif'}.get(mode, 'x.png')  # PNG cannot hold 32-bit 'I'
    im.save(path)
    x = load_image(path)
    assert x.dtype == torch.uint8 and x.shape == (3, 7, 9)
    if mode in ('I;16', 'I'): assert x.max() > 200, 'scaled, not clipped'
    v1, v2, c1, c2 = PixProAugment(image_size=32)(x, torch.Generator().manual_seed(0))
    assert v1.shape == (3, 32, 32) and torch.isfinite(v1).all() and ((c1 >= 0) & (c1 <= 1)).all()


def test_load_image_names_the_file(tmp_path):
    (tmp_path/'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'\0' * 20)
    with pytest.raises(BadImageError, match='broken.png'):
        load_image(tmp_path/'broken.png')


LOOP_AND_PIPE = """
import sys, warnings
from pixpro_rs.data import ImageFiles, make_loader
warnings.simplefilter('ignore')
ds = ImageFiles(sys.argv[1])
print(len(ds), sum(len(b[0]) for b in make_loader(ds, 2, image_size=16, num_workers=1, shuffle=False)))
"""


@pytest.mark.skipif(not hasattr(os, 'mkfifo'), reason='needs named pipes')
def test_a_link_loop_and_a_named_pipe_neither_multiply_nor_hang(tmp_path):
    "A folder of 4 images with a link to itself and a FIFO called x.jpg: 4 images, and an epoch through a worker ends."
    for k in range(4): Image.new('RGB', (20, 20), (k * 60, 0, 0)).save(tmp_path / f'{k}.jpg')
    os.symlink(tmp_path, tmp_path / 'again')
    os.mkfifo(tmp_path / 'x.jpg')
    out = subprocess.run([sys.executable, '-c', LOOP_AND_PIPE, str(tmp_path)], capture_output=True, text=True,
                         timeout=120, check=True)  # a hang fails here instead of blocking the suite
    assert out.stdout.split() == ['4', '4']
    with pytest.warns(UserWarning, match='x.jpg'):
        fp = ImageFiles(tmp_path).fingerprint()
    assert fp['data_files'] == 4 and fp == data_fingerprint([tmp_path / f'{k}.jpg' for k in range(4)], tmp_path)


AFTER_THREADED_OPENCV = """
import cv2, numpy as np, torch
from pixpro_rs.augment import apply_view, opencv_agrees
from pixpro_rs.data import SyntheticScenes, make_loader
assert opencv_agrees()
cv2.setNumThreads(2)
big = np.random.rand(1500, 1500, 3).astype(np.float32)
for _ in range(3): cv2.sepFilter2D(big, -1, np.ones(5, np.float32) / 5, np.ones(5, np.float32) / 5)  # OpenCV's thread pool runs
dl = make_loader(SyntheticScenes(16, image_size=40, num_classes=4, seed=5), 4, image_size=24, num_workers=2, seed=9)
print(sum(len(b[0]) for b in dl))
"""


def test_workers_forked_after_threaded_opencv_finish():
    "The parent used OpenCV on two threads before forking: the workers' views (OpenCV kernels) must not hang."
    pytest.importorskip('cv2')
    out = subprocess.run([sys.executable, '-c', AFTER_THREADED_OPENCV], capture_output=True, text=True, timeout=120,
                         check=True)  # a hang fails here instead of blocking the suite
    assert out.stdout.split() == ['16']
