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
@click.version_option(package_name="fastdllm", message="fastdllm %(version)s")
def main():
    """Batch generation with diffusion language models (LLaDA, Dream).

    \b
    Example:
      fastdllm run job.yaml                 # run (or resume) a job
      fastdllm status out/ && echo done     # exit 0 only when the job is complete
      fastdllm report out/                  # out/report.html"""


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
    """Run (or resume) the job in MANIFEST; committed shards of an earlier run are kept.

    \b
    Example:
      fastdllm run manifests/demo.yaml --set workers.count=2 --set decode.threshold=0.8"""
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
    _report(result, spec.decode.num_samples)


def _report(result, num_samples: int = 1, dataset: bool = True) -> None:
    """The run's one-line summary on stdout; what is missing or wrong on stderr, then exit 1 or the signal's code
    (returns when the run is ok: exit 0). `dataset`: the output is a dataset to load (not an answer file)."""
    from .report import decode_tokens_per_second

    s = result.summary
    t = s.totals
    click.echo(f"{s.committed}/{s.shards} shards committed in {result.output_uri}: {t.rows} prompts "
               f"({t.error_rows} failed), {sum(t.finish_reasons.values()) or t.rows * num_samples} "
               f"output rows, {t.generated_tokens} tokens, decode {decode_tokens_per_second(t):.1f} tokens/s per "
               f"worker; last run {s.run.shards_run} shards, job {s.run.job_tokens_per_second:.1f} tokens/s "
               f"({s.run.wall_seconds - s.run.startup_seconds:.1f}s after {s.run.startup_seconds:.1f}s start-up)")
    if t.error_rows:
        click.echo(f"bad rows by reason: {_commonest(t)}")
    if not result.ran:
        click.echo("this run: nothing to run, every shard was already committed (figures above: the last run)")
    if dataset:
        click.echo(f"load it: datasets.load_dataset({result.output_uri!r}); report: {result.output_uri}/report.html")
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
    _report(result, dataset=False)


@main.command()
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False), required=False)
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE", help="Override a manifest field.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan (or with --schema the fields) as JSON.")
@click.option("--schema", "schema", is_flag=True, help="Print every manifest field (type, default, description) "
                                                      "instead; needs no MANIFEST.")
def plan(manifest, overrides, as_json, schema):
    """Validate MANIFEST and print its shard plan (shards, prompts, output rows, input files); writes nothing.

    \b
    Example:
      fastdllm plan manifests/demo.yaml --set input.rows_per_shard=100
      fastdllm plan --schema            # every manifest field, decode settings included"""
    from .guards import check_no_overlap, check_output_uri
    from .manifest import load_manifest
    from .plan import check_model_source, make_plan

    if schema:
        _print_schema(as_json)
        return
    if manifest is None:
        _fail(InvalidJob("plan needs a MANIFEST (the job's .yaml file), or --schema to list the manifest's fields"))
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
    ns = spec.decode.num_samples
    click.echo(f"job {spec.name}: {len(p.shards)} shards, {p.rows} prompts x {ns} samples = {p.rows * ns} output "
               f"rows, {len(p.files)} files -> {spec.output.uri}")
    click.echo(f"input fingerprint {p.fingerprint[:16]} ({p.source.format})")
    for f in p.files:
        n = sum(1 for s in p.shards if s.file == f.uri)
        click.echo(f"  {f.uri}: {f.rows} rows, {n} shards")
    for s in p.shards:
        click.echo(f"  shard {s.name}: {s.relpath} rows [{s.start}, {s.stop})")


def _print_schema(as_json: bool) -> None:
    """`plan --schema`: the manifest's fields (workers/spec.py manifest_schema), one block each, or JSON."""
    from fastdllm.workers.spec import manifest_schema

    rows = manifest_schema()
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    for r in rows:
        default = "required" if r["required"] else f"default {json.dumps(r['default'], default=str)}"
        click.echo(f"{r['name']}: {r['type']}, {default}\n    {r['description']}")


@main.command()
@click.argument("output_uri")
@click.option("-o", "--storage-option", "options", multiple=True, metavar="KEY=VALUE",
              help="fsspec option, e.g. -o endpoint_url=http://127.0.0.1:9000 (values may use ${VAR}).")
@click.option("--shards/--no-shards", default=False, help="Print the per-shard throughput table.")
@click.option("--quick", is_flag=True, help="Check committed shards' data files by size only, without reading "
                                            "them for their checksums.")
def status(output_uri, options, shards, quick):
    """Committed / pending / failed shards, rows, tokens and throughput of the job in OUTPUT_URI; every committed
    shard is verified against its data file. Exits 0 only when the job is complete (what `run` exits 0 for),
    1 while it is not.

    \b
    Example:
      fastdllm status s3://bucket/out -o endpoint_url=http://127.0.0.1:9000 --shards"""
    from .report import decode_tokens_per_second
    from .status import job_status, throughput_table

    try:
        st = job_status(output_uri, _storage_options(options), verify=not quick)
    except InvalidJob as e:
        _fail(e)
    t = st.totals
    damaged = sum(p.kind == "damaged" for p in st.problems)
    click.echo(f"job {st.name} in {output_uri}: {len(st.committed)}/{st.shards} shards committed, "
               f"{len(st.pending)} pending, {len(st.problems) - damaged} failed, {damaged} damaged")
    click.echo(f"prompts {t.rows}/{st.rows} ({t.error_rows} failed), output rows {t.rows * st.num_samples}/"
               f"{st.rows * st.num_samples}, {t.generated_tokens} tokens, {t.nfe} nfe, occupancy {t.occupancy:.2f}, "
               f"slot utilisation {t.slot_utilisation:.2f}, decode {decode_tokens_per_second(t):.1f} tokens/s per "
               "worker")
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
    if not st.complete:
        why = [f"{len(st.pending)} shards pending"] if st.pending else []
        why += [f"{len(st.problems)} failed or damaged"] if st.problems else []
        why += ["too many error rows"] if st.too_many_errors else []
        click.echo(f"incomplete: {', '.join(why)}{'; a run is in progress' if st.lease else ''}", err=True)
        sys.exit(1)


@main.command()
@click.argument("output_uri")
@click.option("-o", "--storage-option", "options", multiple=True, metavar="KEY=VALUE",
              help="fsspec option, e.g. -o endpoint_url=http://127.0.0.1:9000 (values may use ${VAR}).")
@click.option("--png/--no-png", default=True, show_default=True, help="Also write report.png (needs matplotlib).")
def report(output_uri, options, png):
    """Write the job report of OUTPUT_URI: report.html (one self-contained page: throughput over time and per
    shard, NFE and occupancy per shard, output rows per finish reason, error reasons, the config), report.png,
    and the dataset card README.md. A run writes them too when it ends.

    \b
    Example:
      fastdllm report out/ && xdg-open out/report.html"""
    from fastdllm.workers import JobOutput
    from fastdllm.workers.storage import storage_error

    from .report import write_report

    opts = {}
    for item in options:
        k, sep, v = item.partition("=")
        if not sep:
            _fail(InvalidJob(f"--storage-option {item!r} is not KEY=VALUE"))
        opts[k] = v
    try:
        for k, v in opts.items():
            refuse_inline_secret("-o", k, v)
        written = write_report(JobOutput(output_uri, opts))
    except InvalidJob as e:
        _fail(e)
    except Exception as e:  # no job there, storage errors of any fsspec backend
        _fail(InvalidJob(f"cannot write the report of {output_uri}: {storage_error(e)}"))
    for w in written:
        click.echo(w)


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
@click.option("--seed", default=None, type=int, help="Seed of the sampling noise (decode.seed).")
@click.option("--num-samples", default=1, show_default=True, type=click.IntRange(min=1),
              help="Completions per prompt (use --temperature > 0 for different ones).")
@click.option("--max-batch-size", default=None, type=click.IntRange(min=1), help="Rows in flight (default: all).")
@click.option("--input", "input_file", default=None, type=click.File("r", encoding="utf-8"),
              help="Read prompts from FILE, one a line ('-': stdin), after any PROMPTS.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object a line: prompt, sample_index, completion, "
                                                      "completion_ids, nfe, finish_reason.")
@click.argument("prompts", nargs=-1)
def generate(source, device, dtype, gen_length, block_length, steps, cache, rule, threshold, temperature,
             chat_template, seed, num_samples, max_batch_size, input_file, as_json, prompts):
    """Decode PROMPTS (text) and print each completion with its NFE and the batch's tokens/s.

    \b
    Example:
      fastdllm generate "12+34=" "sort:321="
      printf '7+8=\\n5+5=\\n' | fastdllm generate --input - --json --num-samples 2 --temperature 1 --seed 3"""
    import torch

    import fastdllm

    prompts = list(prompts) + ([ln.rstrip("\n") for ln in input_file if ln.strip()] if input_file else [])
    if not prompts:
        raise click.UsageError("no prompts: give PROMPTS or --input FILE (or - for stdin)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        extra = {"seed": seed} if seed is not None else {}
        cfg = fastdllm.DecodeConfig(gen_length=gen_length, block_length=block_length, steps=steps or gen_length,
                                    cache=cache, rule=rule, threshold=threshold, temperature=temperature, **extra)
        model = fastdllm.load_model(source, device=device, dtype=dtype)
        tok = fastdllm.load_tokenizer(source)
        ids = tok.encode_batch(prompts, chat_template=chat_template)
        rows = [(i, k) for i in range(len(prompts)) for k in range(num_samples)]
        out = fastdllm.generate(model, [ids[i] for i, _ in rows], cfg, max_batch_size=max_batch_size,
                                row_ids=[i * num_samples + k for i, k in rows])
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    for (i, k), toks, nfe, why in zip(rows, out.tokens, out.nfe, out.finish_reasons):
        if as_json:
            click.echo(json.dumps({"prompt": prompts[i], "sample_index": k, "completion": tok.decode(toks),
                                   "completion_ids": list(toks), "nfe": nfe, "finish_reason": why},
                                  ensure_ascii=False))
        else:
            click.echo(f"{prompts[i]!r} -> {tok.decode(toks)!r}  (nfe {nfe}, {len(toks)} tokens)")
    s = out.stats
    click.echo(f"{s['rows']} rows, {s['generated_tokens']} tokens in {s['wall_seconds']:.2f}s: "
               f"{s['tokens_per_second']:.1f} tokens/s, {s['forward_passes']} forward passes ({cache} cache, {rule})",
               err=as_json)


if __name__ == "__main__":
    main()
