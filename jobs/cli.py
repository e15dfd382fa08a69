"""`fastdllm` console script: parse arguments and hand off; no logic lives here.

Exit codes: 0 every planned shard committed and verified; 1 some shards missing (each named, with why); 2 invalid
manifest, input, output or cluster address, or an output another run holds (one line on stderr, detected before
any work); 130 stopped by Ctrl-C, 143 stopped by SIGTERM (actors killed, summary written; rerun to resume).
"""

from __future__ import annotations

import json
import logging
import sys

import click

from fastdllm.models import DTYPE_NAMES
from fastdllm.policies import CACHE_POLICIES
from fastdllm.rules import RULES

from .manifest import InvalidJob, refuse_inline_secret


class _Scrub(logging.Filter):
    """Log lines without the credentials URIs may carry (http://user:pass@..., presigned parameters)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from fastdllm.workers.storage import scrub

        msg = record.getMessage()
        clean = scrub(msg)
        if clean != msg:
            record.msg, record.args = clean, ()
        return True


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_Scrub())
    for noisy in ("fsspec", "s3fs", "botocore", "aiobotocore", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(e: InvalidJob):
    from fastdllm.workers.storage import scrub

    click.echo(scrub(f"error: {e}"), err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Batch generation with diffusion language models (LLaDA, Dream)."""


@main.command()
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
              help="Override a manifest field, e.g. --set decode.threshold=0.8 (repeatable).")
@click.option("--address", default=None, help="Join a Ray cluster (auto, ray://host:10001, host:port); "
                                                "default: start a local one (or RAY_ADDRESS).")
@click.option("--force", is_flag=True, help="Discard an existing output made with another input or config "
                                            "(never while another run holds the output).")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@click.option("--dashboard/--no-dashboard", default=True, show_default=True,
              help="Start the Ray dashboard (and its metrics) with a local Ray; a joined cluster keeps its own.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logs (one line per committed shard).")
def run(manifest, overrides, address, force, progress, dashboard, verbose):
    """Run (or resume) the job in MANIFEST; committed shards of an earlier run are kept."""
    from .cluster import JobInterrupted
    from .manifest import load_manifest
    from .runner import run_job

    _setup_logging(verbose)
    try:
        spec = load_manifest(manifest, overrides)
        result = run_job(spec, address=address, force=force, progress=progress, dashboard=dashboard)
    except InvalidJob as e:
        _fail(e)
    except (KeyboardInterrupt, JobInterrupted) as e:  # before any shard ran: nothing to summarise
        code = e.exit_code if isinstance(e, JobInterrupted) else 130
        click.echo(f"stopped by {e or 'SIGINT'}; rerun the same command to resume", err=True)
        sys.exit(code)
    _report(result)


def _report(result) -> None:
    """The run's one-line summary on stdout; what is missing or wrong on stderr, then exit 1 or the signal's code
    (returns when the run is ok: exit 0)."""
    s = result.summary
    t = s.totals
    click.echo(f"{s.committed}/{s.shards} shards committed in {result.output_uri}: {t.rows} rows "
               f"({t.error_rows} bad), {t.generated_tokens} tokens; this run {s.run.shards_run} shards "
               f"at {s.run.tokens_per_second:.1f} tokens/s")
    if t.error_rows:
        click.echo(f"bad rows by reason: {_commonest(t)}")
    if result.interrupted:
        click.echo(f"stopped by {result.interrupted}: {len(s.missing)} of {s.shards} shards not committed; rerun "
                   "the same command to resume", err=True)
        sys.exit(result.interrupted.exit_code)
    if not result.ok:
        for missing in s.missing:
            click.echo(missing.line(), err=True)
        if result.problem:
            click.echo(f"error: {result.problem}", err=True)
        if s.too_many_errors:
            click.echo(f"error: {s.too_many_errors}", err=True)
        if s.missing:
            todo = ("fix the input named above, then rerun the same command" if any(x.kind == "data" for x in s.missing)
                    else "rerun the same command to compute them")
            click.echo(f"incomplete: {len(s.missing)} of {s.shards} shards missing; {todo}", err=True)
        sys.exit(1)


def _commonest(t) -> str:
    return "; ".join(f"{why} ({k})" for why, k in t.commonest_errors(5))


def _storage_options(options) -> dict:
    """-o KEY=VALUE items as fsspec options (InvalidJob for a malformed item or an inline secret)."""
    opts = {}
    for item in options:
        k, sep, v = item.partition("=")
        if not sep:
            raise InvalidJob(f"--storage-option {item!r} is not KEY=VALUE")
        refuse_inline_secret("-o", k, v)
        opts[k] = v
    return opts


BATCH_EXAMPLE = """\b
Example (the built-in tiny model; every line of in.jsonl is one request):
  {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
   "body": {"model": "tiny", "messages": [{"role": "user", "content": "12+34="}], "max_tokens": 16}}
  $ fastdllm run-batch -i in.jsonl -o out.jsonl --model tiny
Rerunning the same command resumes from OUT.work/ (or --work-dir)."""


@main.command("run-batch", epilog=BATCH_EXAMPLE)
@click.option("-i", "--input", "input_uri", required=True, help="OpenAI Batch API request file (JSONL; any fsspec URI).")
@click.option("-o", "--output", "output_uri", required=True, help="Answer file to write (JSONL; any fsspec URI).")
@click.option("--model", "source", required=True, help="Built-in name (tiny), checkpoint dir or HF repo id. A line's "
                                                       "body.model is recorded, not used to pick a model.")
@click.option("--work-dir", default=None, help="The job's shards and markers (default: OUT.work); rerun to resume.")
@click.option("--gen-length", type=int, default=None, help="Generated length of lines without max_tokens "
                                                           "(default: 32 for tiny, else 256).")
@click.option("--block-length", type=int, default=None, help="Block length (default: 8 for tiny, else 32).")
@click.option("--steps", type=int, default=None, help="Quota-rule steps (default: gen-length).")
@click.option("--cache", default=None, type=click.Choice(list(CACHE_POLICIES)), help="Cache mode (default: dual).")
@click.option("--rule", default=None, type=click.Choice(RULES), help="Commit rule (default: threshold).")
@click.option("--threshold", type=float, default=None, help="Threshold rule's confidence (default: 0.9).")
@click.option("--temperature", type=float, default=None, help="For lines without one (default: 0, greedy).")
@click.option("--seed", type=int, default=None, help="For lines without one (default: 0).")
@click.option("--dtype", default=None, help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16.")
@click.option("--device", default=None, help="cpu, cuda, ... (default: cuda when the worker has a GPU).")
@click.option("--workers", "count", type=int, default=None, help="Actors, each holding one model (default: 1).")
@click.option("--num-gpus", type=float, default=None, help="GPUs per actor (default: 0).")
@click.option("--num-cpus", type=float, default=None, help="CPUs per actor (default: 1).")
@click.option("--batch-size", type=int, default=None, help="Rows in flight per worker (default: 16).")
@click.option("--rows-per-shard", type=int, default=None, help="Request lines per shard (default: 1000).")
@click.option("--storage-option", "options", multiple=True, metavar="KEY=VALUE",
              help="fsspec option for IN, OUT and the work dir, e.g. endpoint_url=http://127.0.0.1:9000.")
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
              help="Any other manifest field, e.g. --set model.chat_template=false (repeatable).")
@click.option("--address", default=None, help="Join a Ray cluster; default: start a local one (or RAY_ADDRESS).")
@click.option("--force", is_flag=True, help="Discard a work dir made with another input or config.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@click.option("--dashboard/--no-dashboard", default=False, show_default=True, help="Start the Ray dashboard.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logs.")
def run_batch(input_uri, output_uri, source, work_dir, gen_length, block_length, steps, cache, rule, threshold,
              temperature, seed, dtype, device, count, num_gpus, num_cpus, batch_size, rows_per_shard, options,
              overrides, address, force, progress, dashboard, verbose):
    """Answer an OpenAI Batch API file (/v1/chat/completions and /v1/completions lines) like `vllm run-batch`:
    OUT gets one answer line per request line, in input order, written once every line is answered. Per line,
    max_tokens / max_completion_tokens, temperature, n, seed and stop set that request's decoding; a line that
    cannot be honoured gets an error line. Exit codes as for `run`."""
    from .batch import batch_manifest, run_batch as run_batch_job
    from .cluster import JobInterrupted

    _setup_logging(verbose)
    decode = dict(gen_length=gen_length, block_length=block_length, steps=steps, cache=cache, rule=rule,
                  threshold=threshold, temperature=temperature, seed=seed)
    workers = dict(count=count, num_gpus=num_gpus, num_cpus=num_cpus, batch_size=batch_size)
    try:
        spec = batch_manifest(input_uri, output_uri, source, work_dir, decode, workers, {"dtype": dtype, "device": device},
                              rows_per_shard, _storage_options(options), overrides)
        result, lines = run_batch_job(spec, output_uri, address=address, force=force, progress=progress,
                                      dashboard=dashboard)
    except InvalidJob as e:
        _fail(e)
    except (KeyboardInterrupt, JobInterrupted) as e:
        code = e.exit_code if isinstance(e, JobInterrupted) else 130
        click.echo(f"stopped by {e or 'SIGINT'}; rerun the same command to resume", err=True)
        sys.exit(code)
    t = result.summary.totals
    if lines is not None:
        click.echo(f"wrote {output_uri}: {lines} answer lines, {t.rows - t.error_rows} answered, {t.error_rows} "
                   "per-line errors")
    else:
        click.echo(f"{output_uri} not written: some request lines have no answer yet", err=True)
    _report(result)


@main.command()
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE", help="Override a manifest field.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(manifest, overrides, as_json):
    """Validate MANIFEST and print its shard plan (shards, rows, input files); writes nothing."""
    from .guards import check_no_overlap, check_output_uri
    from .manifest import load_manifest
    from .plan import check_model_source, make_plan

    try:
        spec = load_manifest(manifest, overrides)
        check_model_source(spec)
        check_output_uri(spec)
        p = make_plan(spec)
        check_no_overlap(spec, p)  # what `run` would refuse
    except InvalidJob as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps(p.to_dict(), indent=2))
        return
    click.echo(f"job {spec.name}: {len(p.shards)} shards, {p.rows} rows, {len(p.files)} files -> {spec.output.uri}")
    click.echo(f"input fingerprint {p.fingerprint[:16]} ({p.source.format})")
    for f in p.files:
        n = sum(1 for s in p.shards if s.file == f.uri)
        click.echo(f"  {f.uri}: {f.rows} rows, {n} shards")
    for s in p.shards:
        click.echo(f"  shard {s.name}: {s.relpath} rows [{s.start}, {s.stop})")


@main.command()
@click.argument("output_uri")
@click.option("-o", "--storage-option", "options", multiple=True, metavar="KEY=VALUE",
              help="fsspec option, e.g. -o endpoint_url=http://127.0.0.1:9000 (values may use ${VAR}).")
@click.option("--shards/--no-shards", default=False, help="Print the per-shard throughput table.")
@click.option("--quick", is_flag=True, help="Check committed shards' data files by size only, without reading "
                                            "them for their checksums.")
def status(output_uri, options, shards, quick):
    """Committed / pending / failed shards, rows, tokens and throughput of the job in OUTPUT_URI; every committed
    shard is verified against its data file."""
    from .status import job_status, throughput_table

    try:
        st = job_status(output_uri, _storage_options(options), verify=not quick)
    except InvalidJob as e:
        _fail(e)
    t = st.totals
    damaged = sum(p.kind == "damaged" for p in st.problems)
    click.echo(f"job {st.name} in {output_uri}: {len(st.committed)}/{st.shards} shards committed, "
               f"{len(st.pending)} pending, {len(st.problems) - damaged} failed, {damaged} damaged")
    click.echo(f"rows {t.rows}/{st.rows} ({t.error_rows} bad), {t.generated_tokens} tokens, {t.nfe} nfe, "
               f"occupancy {t.occupancy:.2f}, slot utilisation {t.slot_utilisation:.2f}, "
               f"{t.tokens_per_second:.1f} tokens/s per worker")
    if t.error_rows:
        click.echo(f"bad rows by reason: {_commonest(t)}")
    if st.lease is not None:
        click.echo(f"running: lease held by {st.lease.describe()}")
    for p in st.problems:
        click.echo(p.line())
    if st.too_many_errors:
        click.echo(f"too many errors: {st.too_many_errors}")
    if shards and st.committed:
        click.echo(throughput_table(st.committed))


@main.command()
@click.option("--model", "source", default="tiny", show_default=True, help="Built-in name, checkpoint dir or HF repo id.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available).")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(DTYPE_NAMES),
              help="auto: bf16 on GPU, fp32 on CPU.")
@click.option("--gen-length", default=32, show_default=True)
@click.option("--block-length", default=8, show_default=True)
@click.option("--steps", default=None, type=int, help="Quota-rule steps (default: gen-length).")
@click.option("--cache", default="dual", show_default=True, type=click.Choice(list(CACHE_POLICIES)))
@click.option("--rule", default="threshold", show_default=True,
              type=click.Choice(RULES))
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
