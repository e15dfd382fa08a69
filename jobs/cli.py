"""`fastdllm` console script: parse arguments and hand off; no logic lives here."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Batch generation with diffusion language models (LLaDA, Dream)."""


@main.command()
@click.option("--model", "source", default="tiny", show_default=True, help="Built-in name, checkpoint dir or HF repo id.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available).")
@click.option("--dtype", default="auto", show_default=True, help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16.")
@click.option("--gen-length", default=32, show_default=True)
@click.option("--block-length", default=8, show_default=True)
@click.option("--steps", default=None, type=int, help="Quota-rule steps (default: gen-length).")
@click.option("--cache", default="dual", show_default=True, type=click.Choice(["none", "prefix", "dual"]))
@click.option("--rule", default="threshold", show_default=True,
              type=click.Choice(["quota", "threshold", "factor", "frechet"]))
@click.option("--threshold", default=0.9, show_default=True)
@click.option("--temperature", default=0.0, show_default=True)
@click.option("--chat-template/--no-chat-template", default=False, show_default=True)
@click.argument("prompts", nargs=-1, required=True)
def generate(source, device, dtype, gen_length, block_length, steps, cache, rule, threshold, temperature,
             chat_template, prompts):
    """Decode PROMPTS (text) and print each completion with its NFE and the batch's tokens/s."""
    import torch

    import fastdllm

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        cfg = fastdllm.DecodeConfig(gen_length=gen_length, block_length=block_length, steps=steps or gen_length,
                                    cache=cache, rule=rule, threshold=threshold, temperature=temperature)
        model = fastdllm.load_model(source, device=device, dtype=dtype)
        tok = fastdllm.load_tokenizer(source)
        ids = tok.encode_batch(prompts, chat_template=chat_template)
        out = fastdllm.generate(model, ids, cfg)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    for prompt, toks, nfe in zip(prompts, out.tokens, out.nfe):
        click.echo(f"{prompt!r} -> {tok.decode(toks)!r}  (nfe {nfe}, {len(toks)} tokens)")
    s = out.stats
    click.echo(f"{s['rows']} rows, {s['generated_tokens']} tokens in {s['wall_seconds']:.2f}s: "
               f"{s['tokens_per_second']:.1f} tokens/s, {s['forward_passes']} forward passes ({cache} cache, {rule})")


if __name__ == "__main__":
    main()
