"""``digits`` — a small residual CNN trained on scikit-learn's bundled handwritten digits.

The 8x8 images are scaled to [-1, 1] and bilinearly upsampled to 32x32. A stratified 20 % split
(fixed seed) is held out as the evaluation set with its real labels; calibration uses the first
images of the training split. Training is deterministic (fixed seeds, deterministic algorithms,
2 threads) and takes about a minute on 2 cores; the weights are cached under
``$PRECISION_SERVE_CACHE`` (default ``~/.cache/precision-serve``) keyed by a hash of the training
recipe, so rebuilds skip training.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from builder.cache import cache_root
from builder.sources.base import Dataset, LoadedModel, SourceCapabilities
from builder.sources.torch_module import TorchModelSpec, load_torch_spec
from common.model_repository import TensorSpec

log = logging.getLogger(__name__)

IMAGE_SIZE = 32
CALIBRATION_SAMPLES = 256


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the trained weights; its hash keys the cache."""

    architecture: str = "resnet-c32-48-96-128-v1"
    image_size: int = IMAGE_SIZE
    test_fraction: float = 0.2
    split_seed: int = 0
    seed: int = 0
    epochs: int = 10
    batch_size: int = 64
    lr: float = 4e-3
    weight_decay: float = 5e-4
    label_smoothing: float = 0.05
    max_shift: int = 3  # random translation (pixels at 32x32) for augmentation
    threads: int = 2

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def cache_dir() -> Path:
    return cache_root() / "digits"


def load_data(recipe: Recipe) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test); x float32 [N, 1, 32, 32] in [-1, 1], y int64."""
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0) * 2.0 - 1.0
    x = torch.nn.functional.interpolate(
        torch.from_numpy(x[:, None]),
        size=(recipe.image_size, recipe.image_size),
        mode="bilinear",
        align_corners=False,
    ).numpy()
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=recipe.test_fraction, stratify=y, random_state=recipe.split_seed
    )
    return (np.ascontiguousarray(x_tr), y_tr, np.ascontiguousarray(x_te), y_te)


def build_network() -> Any:
    """Residual CNN: stem conv + three downsampling conv-bn-relu residual blocks (~0.42M params)."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                nn.BatchNorm2d(cout),
            )
            self.skip = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):  # type: ignore[no-untyped-def]
            return self.relu(self.body(x) + self.skip(x))

    return nn.Sequential(
        nn.Conv2d(1, 32, 3, 1, 1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(inplace=True),
        Block(32, 48, 2),  # 16x16
        Block(48, 96, 2),  # 8x8
        Block(96, 128, 2),  # 4x4
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, 10),
    )


def _shift(x: Any, max_shift: int, gen: Any) -> Any:
    """Random per-image translation by up to ``max_shift`` pixels, background (-1) filled."""
    import torch

    n, _, h, w = x.shape
    pad = torch.nn.functional.pad(x, (max_shift,) * 4, value=-1.0)
    offs = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen)
    return torch.stack(
        [pad[i, :, oy : oy + h, ox : ox + w] for i, (oy, ox) in enumerate(offs.tolist())]
    )


def train(recipe: Recipe, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Train the network deterministically; returns its state_dict."""
    import torch
    from tqdm import tqdm

    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(recipe.threads)
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(recipe.seed)
        gen = torch.Generator().manual_seed(recipe.seed)
        net = build_network()
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        steps = (len(xt) + recipe.batch_size - 1) // recipe.batch_size
        opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=recipe.lr, epochs=recipe.epochs, steps_per_epoch=steps
        )
        loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
        net.train()
        bar = tqdm(range(recipe.epochs), desc="training digits CNN", unit="epoch")
        for _ in bar:
            order = torch.randperm(len(xt), generator=gen)
            total, correct = 0.0, 0
            for s in range(steps):
                idx = order[s * recipe.batch_size : (s + 1) * recipe.batch_size]
                xb = _shift(xt[idx], recipe.max_shift, gen)
                logits = net(xb)
                loss = loss_fn(logits, yt[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
                correct += int((logits.argmax(1) == yt[idx]).sum())
            bar.set_postfix(loss=f"{total / len(xt):.3f}", train_acc=f"{correct / len(xt):.3f}")
        return {k: v.detach().clone() for k, v in net.state_dict().items()}
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def trained_network(recipe: Recipe, x: np.ndarray, y: np.ndarray) -> tuple[Any, str]:
    """The trained network (from the cache when present) and a note on where it came from."""

    path = cache_dir() / f"{recipe.key()}.pt"
    # builds at once (parallel test workers, two shells) train once: the others wait and reuse
    with _cache_lock(path):
        return _cached_or_trained(path, recipe, x, y)


@contextlib.contextmanager
def _cache_lock(path: Path) -> Iterator[None]:
    from filelock import FileLock

    lock: FileLock | None = FileLock(f"{path}.lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except OSError as e:  # a read-only cache: train without the lock (and without caching)
        log.warning("no lock on the digits cache %s: %s", path.parent, e)
        lock = None
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _cached_or_trained(path: Path, recipe: Recipe, x: np.ndarray, y: np.ndarray) -> tuple[Any, str]:
    import torch

    net = build_network()
    if path.is_file():
        try:
            net.load_state_dict(torch.load(path, weights_only=True))
            return net.eval(), f"trained weights reused from the cache {path}"
        except Exception as e:  # a damaged cache entry: train again and overwrite it
            log.warning("ignoring unreadable cached digits weights %s: %s", path, e)
    start = time.perf_counter()
    state = train(recipe, x, y)
    seconds = time.perf_counter() - start
    net.load_state_dict(state)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        torch.save(state, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("could not cache digits weights in %s: %s", path.parent, e)
    return net.eval(), f"trained in {seconds:.0f} s (cached in {path})"


class DigitsSource:
    capabilities = SourceCapabilities(preview=True)

    def load(self, reference: str, workdir: Path) -> LoadedModel:
        recipe = Recipe()
        x_tr, y_tr, x_te, y_te = load_data(recipe)
        net, how = trained_network(recipe, x_tr, y_tr)
        return _loaded(net, how, recipe, (x_tr, y_tr, x_te, y_te), workdir)

    def preview(self, reference: str, workdir: Path) -> LoadedModel:
        """The same graph with untrained weights (no training): what a precision's refusal
        looks at (builder/pipeline.py), so that int4 refuses the CNN before it is trained."""
        recipe = Recipe()
        return _loaded(build_network(), "untrained preview", recipe, load_data(recipe), workdir)


def _loaded(
    net: Any,
    how: str,
    recipe: Recipe,
    data: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    workdir: Path,
) -> LoadedModel:
    x_tr, y_tr, x_te, y_te = data
    spec = TorchModelSpec(
        module=net.eval(),
        inputs=[TensorSpec("image", "float32", [1, IMAGE_SIZE, IMAGE_SIZE])],
        output_names=["logits"],
        calibration=Dataset(
            {"image": x_tr[:CALIBRATION_SAMPLES]},
            y_tr[:CALIBRATION_SAMPLES],
            f"{CALIBRATION_SAMPLES} training images of sklearn digits",
        ),
        evaluation=Dataset(
            {"image": x_te},
            y_te,
            f"{len(x_te)} held-out sklearn digits images (stratified 20 % split, seed "
            f"{recipe.split_seed})",
        ),
        task="classification",
        max_batch_size=64,
        default_precisions=["fp32", "fp16", "bf16", "int8"],
        notes=[f"residual CNN on sklearn digits (8x8 -> 32x32), {how}"],
    )
    return load_torch_spec(spec, Path(workdir), "digits", "digits")
