"""MagmaImageProcessorTorchvision against the faithful MagmaImageProcessor (PIL) on real photographs.

Prints, per photograph and over all: the max and mean absolute difference of `pixel_values` (after normalisation), the
share of values that differ (> 1e-6), and milliseconds per image for both processors (one image per call, CPU).

    PYTHONPATH=. python tests/benchmarks/bench_image_processors.py [IMAGE_FILE ...] [--size 384] [--repeats 5]

Without files it uses scikit-learn's sample photographs (china.jpg, flower.jpg). Other photographs, e.g. those that
scikit-image ships (`skimage/data/*.png|jpg`), can be named on the command line.
"""

import argparse
import time

import numpy as np


def photographs(paths: list[str]):
    from magma_hf.image_processing_magma import open_image

    if paths:
        return [(path.rsplit("/", 1)[-1], open_image(path)) for path in paths]
    from PIL import Image
    from sklearn.datasets import load_sample_images

    data = load_sample_images()
    return [(name.rsplit("/", 1)[-1], Image.fromarray(array)) for name, array in zip(data.filenames, data.images)]


def ms_per_image(processor, image, repeats: int) -> float:
    processor(image, return_tensors="pt")  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        processor(image, return_tensors="pt")
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("images", nargs="*")
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from magma_hf import MagmaImageProcessor, MagmaImageProcessorTorchvision

    pil, tv = MagmaImageProcessor(image_size=args.size), MagmaImageProcessorTorchvision(image_size=args.size)
    all_diffs, pil_ms, tv_ms = [], [], []
    print(f"{'image':<28} {'size':>10} {'max|d|':>9} {'mean|d|':>9} {'differ':>8} {'PIL ms':>7} {'tv ms':>7}")
    for name, image in photographs(args.images):
        a = pil(image, return_tensors="np")["pixel_values"][0]
        b = tv(image, return_tensors="np")["pixel_values"][0]
        diff = np.abs(a.astype(np.float64) - b)
        all_diffs.append(diff.ravel())
        pil_ms.append(ms_per_image(pil, image, args.repeats))
        tv_ms.append(ms_per_image(tv, image, args.repeats))
        size = f"{image.size[0]}x{image.size[1]}"
        print(
            f"{name[:28]:<28} {size:>10} {diff.max():9.2e} {diff.mean():9.2e} {np.mean(diff > 1e-6):8.2%} "
            f"{pil_ms[-1]:7.1f} {tv_ms[-1]:7.1f}"
        )
    diff = np.concatenate(all_diffs)
    print(
        f"{'all':<28} {'':>10} {diff.max():9.2e} {diff.mean():9.2e} {np.mean(diff > 1e-6):8.2%} "
        f"{np.mean(pil_ms):7.1f} {np.mean(tv_ms):7.1f}"
    )
    # One step of an 8-bit pixel after normalisation is 1 / (255 * std) ~ 0.0146: say how many steps the max is.
    print(f"max difference in 8-bit steps: {diff.max() * 255 * min(pil.image_std):.2f}")


if __name__ == "__main__":
    main()
