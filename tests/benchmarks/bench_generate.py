"""Generation overhead of MAGMA over GPT-J, and the cost of encoding images.

MagmaForConditionalGeneration.generate (images pre-encoded, passed as `mm_encoder_outputs`) against
GPTJForCausalLM.generate on the same weights (GPT-J with the same MAGMA adapters injected through peft) and the same
input embeddings (`inputs_embeds`), greedy, exactly 64 new tokens, batch 1 and 8. Also plain GPT-J without adapters,
for reference, and the time to encode one batch of 384 px images with the RN50x16 trunk + projection.

    python -m tests.benchmarks.bench_generate [--hidden 512] [--layers 8] [--repeats 5] [--threads N]

Target: MAGMA / GPT-J(+adapters) <= 1.05.
"""

import argparse
import statistics
import time

import torch
from peft import inject_adapter_in_model
from transformers import GPTJForCausalLM
from transformers.modeling_outputs import BaseModelOutputWithPooling

from magma_hf import MagmaConfig, MagmaForConditionalGeneration
from magma_hf.modeling_magma import adapter_peft_config
from magma_hf.weights_magma import gptj_name, is_adapter_weight


def build(hidden: int, layers: int) -> tuple[MagmaForConditionalGeneration, GPTJForCausalLM, GPTJForCausalLM]:
    config = MagmaConfig(
        text_config={"n_embd": hidden, "n_layer": layers, "n_head": hidden // 64, "rotary_dim": 32},
    )
    torch.manual_seed(0)
    magma = MagmaForConditionalGeneration(config).eval()
    gptj_weights = {gptj_name(name): param.detach() for name, param in magma.gptj_named_parameters()}
    plain = GPTJForCausalLM(config.text_config).eval()
    plain.load_state_dict(gptj_weights)
    adapted = GPTJForCausalLM(config.text_config).eval()
    adapted.load_state_dict(gptj_weights)
    inject_adapter_in_model(adapter_peft_config(config), adapted)
    adapter_weights = {gptj_name(name): param for name, param in magma.named_parameters() if is_adapter_weight(name)}
    missing = adapted.load_state_dict(adapter_weights, strict=False)
    assert not missing.unexpected_keys and not [k for k in missing.missing_keys if is_adapter_weight(k)]
    return magma, adapted, plain


def median_seconds(fn, repeats: int) -> float:
    return interleaved_medians([fn], repeats)[0]


def interleaved_medians(fns, repeats: int) -> list[float]:
    """Median wall time of each function, the functions taking turns so that drift hits them alike."""
    for fn in fns:
        fn()  # warm-up
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return [statistics.median(bucket) for bucket in times]


def bench_batch(magma, adapted, plain, batch: int, args) -> None:
    config = magma.config
    n_image = config.num_image_tokens
    greedy = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    generator = torch.Generator().manual_seed(batch)
    image_embeddings = magma.get_image_features(torch.randn(batch, 3, 384, 384, generator=generator)).pooler_output
    text = torch.randint(0, 50000, (batch, args.text_tokens), generator=generator)
    input_ids = torch.cat([torch.full((batch, n_image), config.image_token_id), text], dim=1)
    attention_mask = torch.ones_like(input_ids)
    inputs_embeds = magma.model.language_model.wte(input_ids).clone()
    inputs_embeds[:, :n_image] = image_embeddings

    def run_magma():
        encoded = {"image": BaseModelOutputWithPooling(pooler_output=image_embeddings)}
        return magma.generate(input_ids=input_ids, attention_mask=attention_mask, mm_encoder_outputs=encoded, **greedy)

    def run_gptj(model):
        return lambda: model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **greedy)

    magma_tokens = run_magma()[:, input_ids.shape[1] :]
    assert torch.equal(magma_tokens, run_gptj(adapted)()), "MAGMA and GPT-J+adapters must generate the same tokens"
    t_magma, t_adapted, t_plain = interleaved_medians([run_magma, run_gptj(adapted), run_gptj(plain)], args.repeats)
    print(f"{batch:>5} {t_magma:>9.3f} {t_adapted:>16.3f} {t_magma / t_adapted:>6.3f} {t_plain:>13.3f}")


def bench_image_encoding(magma, batch: int, repeats: int) -> None:
    pixel_values = torch.randn(batch, 3, 384, 384)
    seconds = median_seconds(lambda: magma.get_image_features(pixel_values), repeats)
    print(f"  batch {batch}: {seconds:.3f} s ({seconds / batch:.3f} s per image)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--text-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    magma, adapted, plain = build(args.hidden, args.layers)
    print(
        f"GPT-J hidden {args.hidden}, {args.layers} layers, vocab {magma.config.text_config.vocab_size}; prompt "
        f"{magma.config.num_image_tokens} image + {args.text_tokens} text tokens; {args.new_tokens} new tokens; "
        f"{args.threads} threads; median of {args.repeats}, interleaved"
    )
    print(f"{'batch':>5} {'magma s':>9} {'gptj+adapters s':>16} {'ratio':>6} {'plain gptj s':>13}")
    with torch.inference_mode():
        for batch in (1, 8):
            bench_batch(magma, adapted, plain, batch, args)
        print("\nimage encoding (RN50x16 trunk at 384 px + projection + LayerNorm):")
        for batch in (1, 8):
            bench_image_encoding(magma, batch, max(2, args.repeats // 2))


if __name__ == "__main__":
    main()
