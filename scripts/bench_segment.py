"""Segmentation speed on CPU: training images/s of the default model, inference images/s in torch and ONNX Runtime.

Why: the notebook's profile sizes (images, epochs, folds) and the service's latency follow from these
figures. Training = one optimisation step of ``lib.train.fit`` (forward, Dice + BCE loss, backward, Adam
step) on batches of synthetic TRUS images at the default size. Inference = the network alone on
preprocessed batches (torch vs the ``export_segmenter`` graph in ONNX Runtime), and the whole ``segment_array``
call per image (preprocessing + network + mapping back), which is what ``POST /segment`` pays. Random
weights: speed does not depend on training.

Usage: .venv/bin/python scripts/bench_segment.py [--model smp:fpn-resnet18] [--size 128]
       [--batch 16] [--steps 5] [--n 32] [--threads 1] [--denoise none] [--patch 64]

``--patch P`` also times the lesion-aware patch sampler (``SegDataset`` with ``patch_size=P``: MONAI
``RandCropByPosNegLabeld`` + augmentation, patches/s) and a training step on ``P`` x ``P`` patch batches, which is
what a ``patch_size`` run (the MS-lesion recipe) pays per step.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib import config  # noqa: E402
from lib import synth_trus as st  # noqa: E402
from lib.models import checkpoint_meta  # noqa: E402
from lib.segmentation import data as segdata  # noqa: E402
from lib.segmentation import dataset as segdataset  # noqa: E402
from lib.segmentation import infer as seginfer  # noqa: E402
from lib.segmentation import model as segmodel  # noqa: E402
from lib.segmentation import onnx_export as segexport  # noqa: E402
from lib.segmentation import preprocess as segprep  # noqa: E402


def rate(fn: Callable[[int], object], n: int, per_call: int = 1) -> float:
    """Items per second over ``n`` calls of ``fn(i)`` (each handling ``per_call`` items), after one warm-up."""
    fn(0)
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    return n * per_call / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=segmodel.DEFAULT_SEGMENTER, help="lib.models name: smp:<arch>-<encoder> or "
                    "monai:<net>")
    ap.add_argument("--size", type=int, default=segprep.DEFAULT_SIZE, help="network input height/width")
    ap.add_argument("--batch", type=int, default=16, help="training and batched-inference batch size")
    ap.add_argument("--steps", type=int, default=5, help="timed training steps")
    ap.add_argument("--n", type=int, default=32, help="images for the per-image inference timings")
    ap.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime intra-op threads")
    ap.add_argument("--denoise", default="none", choices=segprep.DENOISERS,
                    help="preprocessing filter in segment_array")
    ap.add_argument("--patch", type=int, default=0, help="also time patch sampling + training on patches of this size")
    ap.add_argument("--seed", type=int, default=config.DEFAULT_SEED)
    args = ap.parse_args(argv)

    config.seed_everything(args.seed)
    torch.set_num_threads(args.threads)
    spec = st.TrusSpec(n_patients=8, images_per_patient=max(1, (max(args.batch, args.n) + 7) // 8), size=args.size,
                       seed=args.seed)
    imgs, masks, _ = st.make_arrays(spec)
    pre = segprep.Preprocess(size=args.size, denoise=args.denoise)
    raw = segdata.RawSet([i[None] for i in imgs], list(masks),
                         pd.DataFrame({"case_id": range(len(imgs)), "group": 0}), ["bmode"])
    data = segdataset.prepare_dataset(raw, pre)
    print(f"{args.model} input 1x{args.size}x{args.size}, batch {args.batch}, "
          f"threads {torch.get_num_threads()}, torch {torch.__version__}")

    model = segmodel.build_model(args.model, 1, 1)
    loss_fn, opt = segmodel.make_seg_loss("dicece"), torch.optim.Adam(model.parameters(), lr=1e-3)
    xb, yb = data.x[:args.batch], data.y[:args.batch]

    def train_step(_: int) -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(xb), yb).backward()
        opt.step()

    rows = [("train step (fwd+bwd+Adam)", rate(train_step, args.steps, len(xb)))]
    if args.patch:
        patches = segdataset.SegDataset(data, "light", args.seed, args.patch, 0.5, samples_per_epoch=1 << 30)
        rows.append((f"patch sampler ({args.patch} px, pos_fraction 0.5)", rate(lambda i: patches[i], args.n)))
        pairs = [patches[i] for i in range(args.batch)]
        xp, yp = torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs])

        def patch_step(_: int) -> None:
            model.train()
            opt.zero_grad(set_to_none=True)
            loss_fn(model(xp), yp).backward()
            opt.step()

        rows.append((f"train step on {args.patch} px patches", rate(patch_step, args.steps, len(xp))))
    model.eval()
    meta = {**checkpoint_meta(args.model, 1, 1, "segmentation", ["lesion"], data.preprocessing,
                            **segmodel.network_kwargs(args.model)),
            "threshold": 0.5}
    with tempfile.TemporaryDirectory() as tmp:
        from lib.models import save_checkpoint

        ckpt = save_checkpoint(Path(tmp) / "best.pt", model, meta)
        segexport.export_segmenter(ckpt, Path(tmp) / "export")
        sess, _ = seginfer.load_segmenter(Path(tmp) / "export")
        tmodel, _ = seginfer.load_segmenter(ckpt)
        xnp = data.x[:args.batch].numpy()
        with torch.no_grad():
            rows.append((f"torch network, batch {len(xb)}", rate(lambda i: tmodel(xb), 3, len(xb))))
            rows.append(("torch network, batch 1", rate(lambda i: tmodel(xb[i % len(xb):][:1]), args.n)))
        rows.append((f"onnxruntime network, batch {len(xb)}",
                     rate(lambda i: sess.run(None, {"input": xnp}), 3, len(xb))))
        rows.append(("onnxruntime network, batch 1", rate(lambda i: sess.run(None, {"input": xnp[i % len(xnp):][:1]}),
                                                          args.n)))
        u8 = [np.round(i * 255).astype(np.uint8) for i in imgs]
        rows.append(("torch segment_array (per image)",
                     rate(lambda i: seginfer.segment_array(tmodel, u8[i % len(u8)]), args.n)))
        rows.append(("onnxruntime segment_array (per image)",
                     rate(lambda i: seginfer.segment_array(sess, u8[i % len(u8)]), args.n)))
    print(f"{'what':<42}{'images/s':>10}{'ms/image':>10}")
    for name, r in rows:
        print(f"{name:<42}{r:>10.1f}{1000 / r:>10.1f}")


if __name__ == "__main__":
    main()
