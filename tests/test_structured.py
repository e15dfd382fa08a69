"""Structured outputs: the constraint spec, its OpenAI / vLLM request forms, and constrained decoding of the shipped
tiny model through llguidance, whose finished outputs must all be valid for their constraint."""

import json
import re
import sys

import jsonschema
import pytest

import fastdllm
from fastdllm import Engine, Request, StructuredOutputs, tiny_kit
from fastdllm.structured import _closed

SUM_SCHEMA = {"type": "object", "properties": {"sum": {"type": "integer", "minimum": 0, "maximum": 20000}},
              "required": ["sum"]}
RECORD_SCHEMA = {"type": "object", "properties": {"label": {"enum": ["pos", "neg"]},
                                                  "score": {"type": "integer", "maximum": 100},
                                                  "ok": {"type": "boolean"}}, "required": ["label", "ok"]}


@pytest.fixture(scope="module")
def tiny():
    return fastdllm.load_model("tiny"), fastdllm.load_tokenizer("tiny")


def decode(tiny, prompts, spec, cfg=None, batch=8, **req):
    model, tok = tiny
    eng = Engine(model, cfg or tiny_kit.decode_config("dual", "threshold"), max_batch_size=batch, tokenizer=tok)
    specs = spec if isinstance(spec, list) else [spec] * len(prompts)
    ids = [eng.add(Request(tok.encode(p), structured=s, **req)) for p, s in zip(prompts, specs)]
    out = {}
    while eng.pending:
        for f in eng.step():
            out[f.id] = f
    return [out[i] for i in ids]


def test_spec_takes_exactly_one_valid_constraint():
    assert StructuredOutputs(choice=["a", "b"]).choice == ("a", "b")
    assert StructuredOutputs(json='{"type": "object"}').json == {"type": "object"}
    for bad, match in [({}, "exactly one"), ({"regex": "a", "choice": ["a"]}, "exactly one"),
                       ({"choice": "ab"}, "list of non-empty"), ({"choice": []}, "list of non-empty"),
                       ({"json": "{nope"}, "not valid JSON"), ({"json": 3}, "JSON schema"), ({"regex": ""}, "regex")]:
        with pytest.raises(ValueError, match=match):
            StructuredOutputs(**bad)
    with pytest.raises(ValueError, match="unknown key"):
        StructuredOutputs.from_dict({"regexp": "a"})
    s = StructuredOutputs.from_dict({"choice": ["x", "y"]})
    assert StructuredOutputs.from_dict(s.to_dict()) == s


def test_from_request_body_maps_openai_and_vllm_fields():
    f = StructuredOutputs.from_request_body
    assert f({"messages": []}) is None
    assert f({"response_format": {"type": "text"}}) is None
    assert f({"response_format": {"type": "json_object"}}) == StructuredOutputs(json=True)
    rf = {"type": "json_schema", "json_schema": {"name": "sum", "schema": SUM_SCHEMA, "strict": True}}
    assert f({"response_format": rf}) == StructuredOutputs(json=SUM_SCHEMA)
    assert f({"structured_outputs": {"regex": "[0-9]+"}}) == StructuredOutputs(regex="[0-9]+")
    assert f({"guided_choice": ["yes", "no"]}) == StructuredOutputs(choice=["yes", "no"])
    with pytest.raises(ValueError, match="several constraints"):
        f({"response_format": {"type": "json_object"}, "guided_regex": "a"})
    with pytest.raises(ValueError, match="not supported"):
        f({"response_format": {"type": "xml"}})
    with pytest.raises(ValueError, match="json_schema needs"):
        f({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}})


def test_closed_objects_keep_only_declared_keys():
    c = _closed({"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {}}}},
                 "$defs": {"d": {"properties": {"e": {}}, "additionalProperties": True}}})
    assert c["additionalProperties"] is False and c["properties"]["a"]["additionalProperties"] is False
    assert c["$defs"]["d"]["additionalProperties"] is True  # said by the schema: kept


def test_regex_on_addition_keeps_accuracy(tiny):
    probs = tiny_kit.problem_set("addition", 16, seed=11)
    free = decode(tiny, [p.prompt for p in probs], None)
    fs = decode(tiny, [p.prompt for p in probs], StructuredOutputs(regex="[0-9]+"))
    assert all(f.finish_reason == "stop" and re.fullmatch("[0-9]+", f.text) for f in fs), [f.text for f in fs]
    right = sum(tiny_kit.score(probs, [f.text for f in fs]))
    assert right >= 14 and right >= sum(tiny_kit.score(probs, [f.text for f in free])) - 1
    assert sum(f.nfe for f in fs) < 0.5 * 16 * tiny_kit.GEN_LENGTH  # parallel commits, well under one token/step


@pytest.mark.parametrize("cache,rule", [("none", "quota"), ("dual", "threshold"), ("prefix", "factor")])
def test_json_schema_outputs_parse_and_validate(tiny, cache, rule):
    probs = tiny_kit.problem_set("addition", 8, seed=5)
    cfg = tiny_kit.decode_config(cache, rule)
    for schema in (SUM_SCHEMA, RECORD_SCHEMA):
        fs = decode(tiny, [p.prompt for p in probs], StructuredOutputs(json=schema), cfg)
        assert all(f.finish_reason == "stop" for f in fs), [f.text for f in fs]
        for f in fs:
            jsonschema.validate(json.loads(f.text), schema)


def test_choice_and_grammar(tiny):
    prompts = [p.prompt for p in tiny_kit.problem_set("sorting", 6, seed=2)]
    choices = ["yes", "no", "maybe so"]
    fs = decode(tiny, prompts, StructuredOutputs(choice=choices))
    assert all(f.finish_reason == "stop" and f.text in choices for f in fs)
    fs = decode(tiny, prompts, StructuredOutputs(grammar='start: "[" NUM ("," NUM)? "]"\nNUM: /[0-9]{1,3}/'))
    assert all(f.finish_reason == "stop" and re.fullmatch(r"\[[0-9]{1,3}(,[0-9]{1,3})?\]", f.text) for f in fs)


def test_sampled_rows_stay_valid(tiny):
    prompts = [p.prompt for p in tiny_kit.problem_set("addition", 8, seed=3)]
    cfg = tiny_kit.decode_config("dual", "threshold", temperature=1.0, gen_length=64, steps=64)
    fs = decode(tiny, prompts, StructuredOutputs(json=RECORD_SCHEMA), cfg, seed=1)
    assert sum(f.finish_reason == "stop" for f in fs) >= 7, [f.text for f in fs]
    for f in (f for f in fs if f.finish_reason == "stop"):
        jsonschema.validate(json.loads(f.text), RECORD_SCHEMA)


def test_unconstrained_rows_unchanged_beside_constrained_ones(tiny):
    """Batch invariance both ways: a free row decodes as alone (bit-identical tokens) next to constrained rows, and
    a constrained row as alone."""
    prompts = [p.prompt for p in tiny_kit.problem_set("addition-mixed", 6, seed=9)]
    specs = [None, StructuredOutputs(regex="[0-9]+"), None, StructuredOutputs(json=SUM_SCHEMA), None,
             StructuredOutputs(choice=["a", "bb"])]
    mixed = decode(tiny, prompts, specs, batch=6)
    for p, s, f in zip(prompts, specs, mixed):
        alone = decode(tiny, [p], s, batch=1)[0]
        assert (alone.tokens, alone.nfe, alone.finish_reason) == (f.tokens, f.nfe, f.finish_reason)


def test_length_before_the_grammar_closes(tiny):
    cfg = tiny_kit.decode_config("none", "quota", gen_length=8)
    fs = decode(tiny, ["1+2="], StructuredOutputs(regex="[a-z]{20}"), cfg)
    assert fs[0].finish_reason == "length" and re.fullmatch("[a-z]{8}", fs[0].text)


def test_bad_constraints_are_clear_errors(tiny):
    model, tok = tiny
    eng = Engine(model, tiny_kit.decode_config(), max_batch_size=2, tokenizer=tok)
    with pytest.raises(ValueError, match="regex is not usable"):
        eng.add(Request([5], structured=StructuredOutputs(regex="[0-9")))
    with pytest.raises(ValueError, match="exactly one"):
        eng.add(Request([5], structured={}))
    with pytest.raises(ValueError, match="needs a stop token"):
        eng.add(Request([5], structured={"regex": "a"}, stop_token_ids=[]))
    with pytest.raises(ValueError, match="engine's tokenizer"):
        Engine(model, tiny_kit.decode_config(), max_batch_size=2).add(Request([5], structured={"regex": "a"}))


def test_missing_llguidance_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)
    with pytest.raises(ImportError, match="pip install llguidance"):
        StructuredOutputs(regex="a").llg_grammar()
