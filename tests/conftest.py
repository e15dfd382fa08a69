import json
import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import fastdllm

# dtype "auto" stays fp32 on a CPU with native bf16 too: the parity and invariance tests pin fp32 (tests of the
# auto choice set the variable themselves)
os.environ["FASTDLLM_CPU_BF16"] = "0"

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE = FIXTURES / "reference"


@pytest.fixture(scope="session")
def llada_tiny():
    return fastdllm.load_model(REFERENCE / "llada" / "llada-tiny")


@pytest.fixture(scope="session")
def dream_tiny():
    return fastdllm.load_model(REFERENCE / "dream" / "dream-tiny")


def load_cases(family: str) -> list[dict]:
    return json.loads((REFERENCE / family / "cases.json").read_text())


def random_prompts(model, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    mask = model.config.mask_token_id
    out = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g)
        ids[ids == mask] = (mask + 1) % vocab
        out.append(ids.tolist())
    return out


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    # The tiny test models gain nothing from intra-op threads, and on a busy 2-core machine they lose a lot.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def worker(tmp_path_factory):
    """One ShardWorker (tiny model, batch size 3) for the tests that run shards without Ray."""
    from fastdllm.workers import ShardWorker, WorkerSettings

    out = tmp_path_factory.mktemp("wout")
    return ShardWorker(WorkerSettings(model_source="tiny", output_uri=str(out), batch_size=3,
                                      decode=fastdllm.DecodeConfig(gen_length=8, block_length=4, steps=8)))


@contextmanager
def own_local_ray(**init_kwargs):
    """A new local Ray of 2 CPUs for a test module (never a cluster some `ray start` left on the machine), shut down
    afterwards; an already initialised Ray is reused and left running. Yields its GCS address."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False,
                 **init_kwargs)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        if started:
            ray.shutdown()
