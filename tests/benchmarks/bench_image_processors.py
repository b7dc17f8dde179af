"""MagmaImageProcessorTorchvision against MagmaImageProcessor (PIL) on real photographs: equality and speed.

Prints, per photograph and over all: the max absolute difference of `pixel_values` in 8-bit steps and the share of
values that differ (both 0 when the backends agree bit for bit), then milliseconds per image for the PIL processor
and the torchvision one, one image per call (best and median of `--repeats` calls: the best is what a quiet machine
gives), and for the torchvision one with all the photographs of one size in one call.

    python -m tests.benchmarks.bench_image_processors [IMAGE_FILE ...] [--size 384] [--repeats 20]
        [--device cuda] [--threads 1] [--clock cpu]

`--clock cpu` times the process's CPU time instead of the wall clock: with `--threads 1` a figure that other work on
a shared machine disturbs far less.

Without files it uses scikit-learn's sample photographs (china.jpg, flower.jpg, 640x427) and the same two scaled
to 4000x2670 (a 10-megapixel camera's size). Other photographs, e.g. those scikit-image ships, can be named.
"""

import argparse
import statistics
import time

import numpy as np


def photographs(paths: list[str]):
    from magma_hf.image_processing_magma import open_image

    if paths:
        return [(path.rsplit("/", 1)[-1], open_image(path)) for path in paths]
    from PIL import Image
    from sklearn.datasets import load_sample_images

    data = load_sample_images()
    photos = [(name.rsplit("/", 1)[-1], Image.fromarray(array)) for name, array in zip(data.filenames, data.images)]
    large = [(f"{name} 4000px", photo.resize((4000, 2670), Image.Resampling.BICUBIC)) for name, photo in photos]
    return photos + large


def milliseconds(call, repeats: int, clock=time.perf_counter) -> tuple[float, float]:
    """Best and median milliseconds of `repeats` calls, after one warm-up call."""
    call()
    times = []
    for _ in range(repeats):
        start = clock()
        call()
        times.append((clock() - start) * 1000)
    return min(times), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("images", nargs="*")
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu", help="where the torchvision processor works (cuda: synchronised)")
    parser.add_argument("--threads", type=int, default=None, help="torch's CPU threads (default: torch's choice)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="wall clock or process CPU time")
    args = parser.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    import torch

    from magma_hf import MagmaImageProcessor, MagmaImageProcessorTorchvision

    if args.threads:
        torch.set_num_threads(args.threads)
    pil, tv = MagmaImageProcessor(image_size=args.size), MagmaImageProcessorTorchvision(image_size=args.size)
    step = 1 / (255 * min(pil.image_std))  # one 8-bit step after normalisation, ~0.0146

    def torchvision(images):
        pixel_values = tv(images, return_tensors="pt", device=args.device).pixel_values
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return pixel_values

    photos = photographs(args.images)
    print(
        f"torch threads {torch.get_num_threads()}, torchvision processor on {args.device}, best / median ms "
        f"({args.clock} clock)"
    )
    print(f"{'image':<24} {'size':>10} {'max steps':>9} {'differ':>8} {'PIL ms':>13} {'torchvision ms':>15}")
    differ, steps, pil_ms, tv_ms = [], [], [], []
    for name, image in photos:
        expected = pil(image, return_tensors="pt").pixel_values
        diff = (torchvision(image).cpu() - expected).abs()
        steps.append(diff.max().item() / step)
        differ.append((diff > 0).double().mean().item())
        pil_ms.append(milliseconds(lambda image=image: pil(image, return_tensors="pt"), args.repeats, clock))
        tv_ms.append(milliseconds(lambda image=image: torchvision(image), args.repeats, clock))
        size = f"{image.size[0]}x{image.size[1]}"
        print(
            f"{name[:24]:<24} {size:>10} {steps[-1]:9.2f} {differ[-1]:8.3%} {pil_ms[-1][0]:6.1f} /{pil_ms[-1][1]:6.1f}"
            f" {tv_ms[-1][0]:7.1f} /{tv_ms[-1][1]:6.1f}"
        )
    print(f"{'all':<24} {'':>10} {max(steps):9.2f} {np.mean(differ):8.3%}")
    by_size: dict = {}
    for _, image in photos:
        by_size.setdefault(image.size, []).append(image)
    for size, images in by_size.items():
        if len(images) > 1:
            best, median = milliseconds(lambda images=images: torchvision(images), args.repeats, clock)
            print(
                f"torchvision, {len(images)} images of {size[0]}x{size[1]} in one call: "
                f"{best / len(images):.1f} / {median / len(images):.1f} ms per image"
            )


if __name__ == "__main__":
    main()
