"""The command line: convert writes a checkpoint that generates the same tokens; generate runs."""

from __future__ import annotations

import json

from jaxserve import LLM, SamplingParams
from jaxserve.cli import main

ENGINE = dict(max_model_len=64, max_num_batched_tokens=32, max_num_seqs=4, enable_warmup=False)


def test_convert_round_trip(tiny_model_dir, tmp_path):
    dst = tmp_path / "converted"
    assert main(["convert", str(tiny_model_dir), str(dst)]) == 0
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompt = {"prompt_token_ids": [11, 12, 13, 14]}
    outs = []
    for model in (tiny_model_dir, dst):
        with LLM(str(model), show_progress=False, **ENGINE) as llm:
            outs.append(llm.generate(prompt, params, use_tqdm=False)[0].outputs[0])
    assert outs[0].token_ids == outs[1].token_ids
    assert outs[0].text == outs[1].text  # the tokenizer travelled with the checkpoint


def test_generate_prints_json(tiny_model_dir, capsys):
    args = ["generate", "Hello", "--model", str(tiny_model_dir), "--max-tokens", "5", "--json"]
    args += ["--max-model-len", "64", "--max-num-batched-tokens", "32", "--no-warmup"]
    assert main(args) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    record = json.loads(line)
    assert record["prompt"] == "Hello" and record["finish_reason"] in ("length", "stop")


def test_generate_reports_bad_input(tiny_model_dir, capsys):
    args = ["generate", "Hello", "--model", str(tiny_model_dir), "--top-p", "2", "--no-warmup"]
    assert main(args) == 2
    assert "top_p" in capsys.readouterr().err
