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


# Workers inherit the environment of the Ray that starts them: the S3 tests' credentials (tests/test_jobs.py,
# test_integrity.py, test_openai_batch.py use these values) reach every worker of the shared Ray below.
S3_TEST_ENV = {"AWS_ACCESS_KEY_ID": "fdl-test-key", "AWS_SECRET_ACCESS_KEY": "fdl-test-secret-value",
               "AWS_DEFAULT_REGION": "us-east-1"}

# The local Ray the test modules share, run by a helper process for the whole session: a `ray.init` of its own
# took 10-20 s per module on this 2-core machine (joining a running one takes a fraction of a second). It reports
# metrics every half second (tests/test_cluster.py reads them), and its worker processes import torch and
# transformers before they take an actor (~5 s of a model load here), as a long-lived cluster's warm workers have;
# fastdllm itself is still imported by each actor, so the shadowing test in tests/test_jobs.py sees what an actor
# imports. The helper stops its Ray when its stdin closes: at the end of the session, or when pytest dies.
_SHARED_RAY_SCRIPT = r"""
import json, os, sys
import ray
# what an actor's model load imports: torch, torch._dynamo (a module's init), transformers' tokenizer classes
PRELOAD = ["torch", "torch._dynamo", "pyarrow.parquet", "transformers.models.auto.tokenization_auto",
           "transformers.tokenization_utils_fast"]
ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False,
         _system_config={"metrics_report_interval_ms": 500, "preload_python_modules": PRELOAD})
print(json.dumps({"address": ray.get_runtime_context().gcs_address,
                  "auth_mode": os.environ.get("RAY_AUTH_MODE")}), flush=True)
sys.stdin.read()
ray.shutdown()
"""
_shared_ray: dict = {}


def _shared_ray_address() -> str:
    """The GCS address of the session's shared local Ray, started on first use."""
    if "address" in _shared_ray:
        return _shared_ray["address"]
    import subprocess
    import sys
    import threading

    proc = subprocess.Popen([sys.executable, "-c", _SHARED_RAY_SCRIPT], env={**os.environ, **S3_TEST_ENV},
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = []
    reader = threading.Thread(target=lambda: first.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(300)
    if not first or not first[0].strip():
        proc.kill()
        raise RuntimeError(f"the shared test Ray did not start: {proc.stderr.read()[-2000:]}")
    info = json.loads(first[0])
    if info["auth_mode"] and "RAY_AUTH_MODE" not in os.environ:  # this process and its drivers must send the token
        os.environ["RAY_AUTH_MODE"] = info["auth_mode"]
        from ray._raylet import Config

        Config.initialize("")  # Ray reads the mode into its cached config
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # never let its warnings fill the pipe
    _shared_ray.update(address=info["address"], proc=proc)
    return info["address"]


def pytest_sessionfinish(session, exitstatus):
    proc = _shared_ray.get("proc")
    if proc is not None and proc.poll() is None:
        proc.stdin.close()  # the helper shuts its Ray down
        try:
            proc.wait(60)
        except Exception:  # noqa: BLE001 - a helper that hangs in shutdown must not fail the session
            proc.kill()


@contextmanager
def own_local_ray():
    """The session's shared local Ray of 2 CPUs for a test module (never a cluster some `ray start` left on the
    machine): this process joins it, and leaves it afterwards, which ends the module's actors; an already
    initialised Ray is reused and left running. Yields its GCS address."""
    import time

    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address=_shared_ray_address(), configure_logging=False, log_to_driver=False)
        deadline = time.monotonic() + 60  # the actors of a driver that just left are being ended
        while time.monotonic() < deadline and ray.available_resources().get("CPU", 0) < 2:
            time.sleep(0.1)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        if started:
            ray.shutdown()
