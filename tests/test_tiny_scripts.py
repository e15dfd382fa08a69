"""scripts/train_tiny.py and scripts/eval_tiny.py on a toy shape: training is a fixed function of the seed, a resumed
run equals an uninterrupted one, growing a model keeps its function, and the eval scores with the kit."""

import json
import sys
from pathlib import Path

import pytest
import torch

import fastdllm
from fastdllm.tiny_kit import decode_config, problem_set, score

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import eval_tiny  # noqa: E402
import train_tiny  # noqa: E402

TOY = ["--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--mlp-hidden", "64", "--batch-size", "4",
       "--warmup", "1", "--min-lr-ratio", "1.0", "--eval-every", "0", "--eval-n", "2", "--log-every", "1",
       "--ckpt-every", "3", "--seed", "5"]


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    n = torch.get_num_threads()  # the scripts set their --threads; the rest of the suite keeps its own
    yield
    torch.set_num_threads(n)


def _train(tmp_path: Path, name: str, *extra: str) -> dict:
    state = tmp_path / name
    train_tiny.main([*TOY, "--state-dir", str(state), "--out", str(state / "model"), *extra])
    return torch.load(state / "state.pt", map_location="cpu", weights_only=False)


def test_training_is_seeded_and_resume_equals_an_uninterrupted_run(tmp_path):
    straight = _train(tmp_path, "a", "--steps", "6")
    again = _train(tmp_path, "b", "--steps", "6")
    half = _train(tmp_path, "c", "--steps", "3")
    resumed = _train(tmp_path, "d", "--steps", "6", "--resume", str(tmp_path / "c" / "state.pt"))
    assert half["step"] == 3 and resumed["step"] == straight["step"] == 6
    for k, v in straight["model"].items():
        assert torch.equal(v, again["model"][k]), k
        assert torch.equal(v, resumed["model"][k]), k
    assert any(not torch.equal(v, half["model"][k]) for k, v in straight["model"].items())
    other = _train(tmp_path, "e", "--steps", "6", "--seed", "6")
    assert any(not torch.equal(v, other["model"][k]) for k, v in straight["model"].items())
    model = fastdllm.load_model(tmp_path / "a" / "model")  # the export is a loadable checkpoint with the tokenizer
    assert model.config.n_layers == 1 and fastdllm.load_tokenizer(tmp_path / "a" / "model").encode("1+2=")


@pytest.mark.parametrize("extra", [1, 2, 5])
def test_grow_keeps_the_function(extra):
    model = fastdllm.load_model("tiny", dtype="float32")
    grown = train_tiny.grow(model, extra)
    assert grown.config.n_layers == model.config.n_layers + extra
    x = torch.randint(4, model.config.vocab_size, (3, 20))
    with torch.no_grad():
        torch.testing.assert_close(grown(x), model(x), rtol=0, atol=0)


def test_init_from_a_training_state_and_grow(tmp_path):
    _train(tmp_path, "a", "--steps", "3")
    grown = _train(tmp_path, "g", "--steps", "2", "--init-from", str(tmp_path / "a" / "state.pt"), "--add-layers", "1")
    assert grown["args"]["n_layers"] == 2 and "layers.1.attn.o.weight" in grown["model"]
    with pytest.raises(SystemExit):
        train_tiny.parse_args(["--add-layers", "1"])  # growing needs a model to grow


def test_eval_scores_with_the_kit(tmp_path):
    out = tmp_path / "ev"
    eval_tiny.main(["--n", "6", "--caches", "none,dual", "--rules", "quota,threshold", "--out", str(out)])
    report = json.loads(out.with_suffix(".json").read_text())
    assert [(r["cache"], r["rule"]) for r in report["results"]] == [
        ("none", "quota"), ("none", "threshold"), ("dual", "quota"), ("dual", "threshold")]
    model, tok = fastdllm.load_model("tiny"), fastdllm.load_tokenizer("tiny")
    for name, m in report["results"][0]["tasks"].items():
        probs = problem_set(name, 6, 1234)
        texts = tok.decode_batch(fastdllm.generate(model, tok.encode_batch([p.prompt for p in probs]),
                                                   decode_config()).tokens)
        assert m["accuracy"] == sum(score(probs, texts)) / 6
    assert "| none | quota (steps=32) |" in out.with_suffix(".md").read_text() and out.with_suffix(".png").stat().st_size
