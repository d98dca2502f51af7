"""``qtrain export``: freeze a trained run, write it as a qk file or an ONNX graph, and check
the file against qtrain's frozen inference (:mod:`qtrain.export`, :mod:`qtrain.frozen`).

Light to import: torch, numba and onnx load only when the command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

#: Calibration images used by default (the first ones of the training set).
CALIBRATION_IMAGES = 10_000

FORMATS = ("qk", "onnx")


def add_export_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``RUN_DIR [--format qk|onnx] [--out FILE] [--calibration N] [--check N] [--data-dir
    DIR] [--json]``."""
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (qtrain --out)")
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="qk (numpy archive for qkernels, with the training state) or onnx "
                             "(integer operators); default: from --out's suffix, else qk")
    parser.add_argument("--out", metavar="FILE", default=None,
                        help="the file to write (default RUN_DIR/model.qk or model.onnx)")
    parser.add_argument("--calibration", type=int, default=CALIBRATION_IMAGES, metavar="N",
                        help="training images that fix the activation exponents (default "
                             f"{CALIBRATION_IMAGES})")
    parser.add_argument("--rule", choices=("median", "max"), default="median",
                        help="an activation's exponent from its calibration batches' (of 500): "
                             "the median (default) or the largest (nothing saturates on them)")
    parser.add_argument("--check", type=int, default=None, metavar="N",
                        help="test images on which the exported file must give qtrain's "
                             "frozen logit codes bit for bit (default: all; 0: skip)")
    parser.add_argument("--data-dir", metavar="DIR", default=None,
                        help="where the data is (default: the run's config)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser


def _logit_codes(model, images, exp: int, batch_size: int = 500):
    """qtrain's (frozen) eval logits of ``images`` as int64 codes at exponent ``exp``."""
    import numpy as np
    import torch

    from .quant import pow2
    from .train import to_input

    model.eval()
    out = []
    with torch.no_grad():
        for s in range(0, len(images), batch_size):
            y = model(to_input(images[s:s + batch_size])).double() * pow2(-exp)
            out.append(y.numpy().astype(np.int64))
    return np.concatenate(out)


def _run_exported(fmt: str, path: Path, images, batch_size: int = 500):
    """The exported file's logit codes for ``images`` (uint8, as the loaders give them), and
    what ran it."""
    import numpy as np

    if images.ndim == 3:
        images = images[:, None]
    else:
        images = images.transpose(0, 3, 1, 2)
    if fmt == "qk":
        from qkernels.engine import Network

        net = Network.load(path)
        return np.concatenate([net.forward(images[s:s + batch_size]).q
                               for s in range(0, len(images), batch_size)]), "qkernels.engine"
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(["logit_codes"], {"pixels": images[s:s + batch_size]})[0]
                           for s in range(0, len(images), batch_size)]).astype(np.int64), \
        f"onnxruntime {ort.__version__}"


def run_export(args: argparse.Namespace) -> int:
    """``qtrain export``: freeze, report today's and the frozen test error, write the file,
    check it on test images."""
    import json
    import time

    from .config import UserError
    from .export import ExportError, network_description, training_state, write_qk
    from .files import atomic_write
    from .frozen import calibrate_and_freeze
    from .run import check_trained, load_trained, source_commit
    from .train import evaluate

    run_dir = Path(args.run_dir)
    check_trained(run_dir)
    fmt = args.format
    if fmt is None:
        fmt = "onnx" if args.out and Path(args.out).suffix.lower() == ".onnx" else "qk"
    out = Path(args.out) if args.out else run_dir / f"model.{fmt}"
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: directory {out.parent} does not exist")
    if args.calibration < 1:
        raise UserError(f"--calibration {args.calibration} must be at least 1 image")
    if args.check is not None and args.check < 0:
        raise UserError(f"--check {args.check} must be 0 (skip) or a number of test images")
    if fmt == "onnx":
        try:
            from .onnx_export import to_onnx
        except ImportError as err:
            raise UserError(str(err)) from None
    cfg, model, optimizer, ckpt, train_set, test_set = load_trained(run_dir, args.data_dir)
    if getattr(model, "qconfig", None) is None:
        raise UserError(f"{run_dir} trained a float network ({cfg.bits}); export takes a "
                        "quantized one")
    if cfg.norm_input_exp == "channel" and cfg.norm != "none":
        raise UserError(f"{run_dir} was trained with norm_input_exp channel, which export does "
                        "not support yet (frozen inference rounds a tensor at one exponent)")
    start = time.perf_counter()
    today = evaluate(model, test_set.images, test_set.labels)
    exps = calibrate_and_freeze(model, train_set.images, count=args.calibration,
                                rule=args.rule)
    frozen_error = evaluate(model, test_set.images, test_set.labels)
    shape = train_set.images.shape[1:]
    in_shape = (1, *shape) if len(shape) == 2 else (shape[2], shape[0], shape[1])
    try:
        manifest, arrays = network_description(model, in_shape, list(train_set.classes))
    except ExportError as err:
        raise UserError(f"{run_dir}: {err}") from None
    manifest["source"] = {"run_dir": str(run_dir), "epoch": int(ckpt.get("epoch", 0)),
                          "model": cfg.model, "norm": cfg.norm, "bits": cfg.bits,
                          "qtrain_commit": source_commit(),
                          "calibration_images": min(args.calibration, len(train_set)),
                          "calibration_rule": args.rule,
                          "test_error": today, "frozen_test_error": frozen_error}
    if fmt == "qk":
        state, state_arrays = training_state(model, optimizer, int(ckpt.get("step", 0)))
        manifest["training"] = {**state, "epoch": int(ckpt.get("epoch", 0)),
                                "config": cfg.to_dict()}
        write_qk(out, manifest, {**arrays, **state_arrays})
    else:
        try:
            proto = to_onnx(manifest, arrays, doc=json.dumps(manifest["source"]))
        except ExportError as err:
            raise UserError(f"{run_dir}: {err}") from None
        atomic_write(out, lambda f: f.write(proto.SerializeToString()))
    summary = {"file": str(out), "format": fmt, "bytes": out.stat().st_size,
               "test_error": today, "frozen_test_error": frozen_error,
               "exponents": exps, "logit_exp": manifest["output"]["exp"]}
    n_check = len(test_set) if args.check is None else min(args.check, len(test_set))
    if n_check:
        try:
            got, runner = _run_exported(fmt, out, test_set.images[:n_check])
        except ImportError:
            got, runner = None, None
        if got is not None:
            want = _logit_codes(model, test_set.images[:n_check], manifest["output"]["exp"])
            same = int((got == want).all(axis=1).sum())
            summary["check"] = {"runner": runner, "images": n_check, "identical": same}
    summary["seconds"] = round(time.perf_counter() - start, 1)
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"exported {run_dir} ({cfg.model}, {cfg.norm}, {cfg.bits}) to {out} "
              f"({fmt}, {summary['bytes']:,} bytes)")
        print(f"test error: {100 * today:.2f}% in today's eval (batch exponents), "
              f"{100 * frozen_error:.2f}% frozen ({len(exps)} "
              f"exponents from {manifest['source']['calibration_images']} training images)")
        if "check" in summary:
            c = summary["check"]
            print(f"check: {c['runner']} gives qtrain's frozen logit codes on {c['identical']}"
                  f" of {c['images']} test images")
        elif n_check:
            print("check skipped: onnxruntime is not installed (pip install 'qtrain[onnx]')")
    if "check" in summary and summary["check"]["identical"] != summary["check"]["images"]:
        print(f"qtrain: error: {out} differs from qtrain's frozen inference on "
              f"{n_check - summary['check']['identical']} test images", flush=True)
        return 1
    return 0
