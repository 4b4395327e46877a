"""Ingest throughput vs a bare loop (PIL full decode + SHA-256) over the same files and cores.

    python benchmarks/bench_ingest.py [SOURCE] [--workers N] [--repeats R]

SOURCE defaults to the bundled sample (registered as one collection batch). Both sides run in a
process pool of the same size; the bare loop reads each image/mask file, hashes its bytes and
fully decodes it. Ours is ``ingest.run_batch_stage`` on a temporary workspace (layout planning,
decode, 8-bit RGB, content id, perceptual hash, mask validation, metadata-free storage, Parquet,
summary, provenance). Each side runs R times, alternating; the best time of each is reported.
Prints ``ratio = bare_time / ingest_time`` (target >= 0.8).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

from cogalign_core import ingest, raw_batch, raw_layout
from cogalign_core.config import PipelineParams, PrivacyParams, dump_params
from cogalign_core.executor import WORKERS_ENV, default_workers


def bundled_sample() -> Path:
    """The bundled sample folder (installed package data, else the repository copy)."""
    try:
        from importlib.resources import files

        path = Path(str(files("cogalign_core.sample_data")))
        if (path / "kvasir-seg").is_dir():
            return path
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parents[1] / "data" / "sample"


def bare_one(path: str) -> str:
    """The floor any ingest pays per file: read, hash the bytes, decode every pixel."""
    data = Path(path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    with Image.open(io.BytesIO(data)) as im:
        im.load()
    return digest


def bare_loop(paths: list[str], workers: int) -> float:
    start = time.perf_counter()
    if workers == 1:
        for p in paths:
            bare_one(p)
    else:
        chunk = ingest._chunksize(len(paths), workers)
        with ProcessPoolExecutor(max_workers=workers) as pool:
            list(pool.map(bare_one, paths, chunksize=chunk))
    return time.perf_counter() - start


def breakdown(image_paths: list[str], mask_of: dict[str, str], out: Path) -> dict[str, float]:
    """Serial milliseconds per image for each step ingest adds to the bare loop (one process, same files)."""
    import hashlib as _h

    from cogalign_core import imaging

    steps = dict.fromkeys(("bare read+sha256+decode (image and mask)", "pixel id (tobytes+sha256)", "phash",
                           "metadata-free stored bytes", "mask validation", "content-addressed writes"), 0.0)
    for i, path in enumerate(image_paths):
        t = time.perf_counter()
        bare_one(path)
        if path in mask_of:
            bare_one(mask_of[path])
        t1 = time.perf_counter()
        steps["bare read+sha256+decode (image and mask)"] += t1 - t
        data = Path(path).read_bytes()
        im = Image.open(io.BytesIO(data))
        im.load()
        rgb = imaging.to_rgb8(im)
        t2 = time.perf_counter()
        imaging.rgb_sample_id(rgb)
        t3 = time.perf_counter()
        factor = max(1, min(rgb.size) // 64)
        imaging.phash_hex(rgb.reduce(factor) if factor > 1 else rgb)
        t4 = time.perf_counter()
        stored = imaging.strip_jpeg_metadata(data) if im.format == "JPEG" else imaging.encode_png(rgb)
        t5 = time.perf_counter()
        mask = imaging.decode_mask(mask_of[path], rgb.size, 127, 50_000_000) if path in mask_of else None
        t6 = time.perf_counter()
        for j, blob in enumerate((stored, mask.stored if mask else None)):
            if blob is not None:
                (out / f"{i}-{j}-{_h.sha256(blob).hexdigest()}").write_bytes(blob)
        t7 = time.perf_counter()
        for key, dt in zip(list(steps)[1:], (t3 - t2, t4 - t3, t5 - t4, t6 - t5, t7 - t6), strict=True):
            steps[key] += dt
    return {k: v * 1000 / max(1, len(image_paths)) for k, v in steps.items()}


def ours(ws: Path, params: PipelineParams, batch_id: str) -> float:
    shutil.rmtree(ws / ingest.BATCHES_DIR, ignore_errors=True)
    start = time.perf_counter()
    ingest.run_batch_stage(ws, params, batch_id)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", nargs="?", type=Path, default=None)
    parser.add_argument("--workers", type=int, default=0, help="processes for both sides (0 = all cores)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    source = args.source or bundled_sample()
    workers = default_workers(args.workers)
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        ws = Path(tmp)
        batch = raw_batch.register_batch(source, ws / "data/raw", "b0001")
        params = PipelineParams(batches=["b0001"], privacy=PrivacyParams(salt="bench"))
        os.environ[WORKERS_ENV] = str(workers)  # an execution setting, not a param
        (ws / "params.yaml").write_text(dump_params(params))
        files_root = ws / "data/raw/b0001" / raw_batch.FILES_DIR
        paths = sorted(str(p) for p in files_root.rglob("*")
                       if p.is_file() and p.suffix.lower() in raw_layout.IMAGE_SUFFIXES)
        ours_times, bare_times = [], []
        for _ in range(max(1, args.repeats)):
            bare_times.append(bare_loop(paths, workers))
            ours_times.append(ours(ws, params, "b0001"))
        summary = (ws / ingest.BATCHES_DIR / "b0001/summary.json").read_text()
        stored = sum(p.stat().st_size for p in (ws / ingest.BATCHES_DIR / "b0001").rglob("*")
                     if p.is_file() and p.parent.parent.name in ("images", "masks"))
        source_bytes = sum(Path(p).stat().st_size for p in paths)
        images = [p for p in paths if "/masks/" not in p]
        masks = {p: p.replace("/images/", "/masks/").rsplit(".", 1)[0] + ".png" for p in images}
        masks = {k: v for k, v in masks.items() if Path(v).exists()}
        steps_dir = ws / "steps"
        steps_dir.mkdir()
        steps = breakdown(images[:120], masks, steps_dir)
    bare, mine = min(bare_times), min(ours_times)
    print(f"source: {source} (layout {batch['layout']}, {len(paths)} image/mask files, {source_bytes / 1e6:.1f} MB)")
    print(f"workers: {workers}")
    print(f"bare loop (read+sha256+PIL decode): {bare:.3f} s  (runs: {', '.join(f'{t:.3f}' for t in bare_times)})")
    print(f"ingest run_batch_stage:             {mine:.3f} s  (runs: {', '.join(f'{t:.3f}' for t in ours_times)})")
    print(f"stored images+masks: {stored / 1e6:.1f} MB ({stored / max(source_bytes, 1):.2f}x the source files)")
    print(f"ratio bare/ingest = {bare / mine:.2f}  (target >= 0.8)")
    print("batch summary:", summary.replace("\n", " ")[:400])
    print("serial ms per image, first 120 images (what ingest adds to the bare loop, and the loop itself):")
    for name, ms in steps.items():
        print(f"  {name:<42} {ms:6.2f}")


if __name__ == "__main__":
    main()
