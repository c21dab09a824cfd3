from __future__ import annotations

import random

import pytest
import torch

from llm.layout import Layout
from llm.sample import SamplingParams, filter_logits, generate, generate_many
from tests.test_model import tiny


def test_kv_cache_gives_the_same_tokens_as_recomputing():
    model = tiny()  # block_size 32: generation runs past it, where the window slides
    for sp in (SamplingParams(max_new_tokens=50, temperature=0.0),
               SamplingParams(max_new_tokens=50, temperature=1.0, top_k=20, seed=3)):
        with_cache = generate(model, [1, 2, 3], sp, use_cache=True)
        without = generate(model, [1, 2, 3], sp, use_cache=False)
        assert with_cache == without and len(with_cache) == 50


def test_same_seed_same_text_other_seed_other_text():
    model = tiny()
    a = generate(model, [5], SamplingParams(max_new_tokens=30, temperature=1.0, seed=1))
    b = generate(model, [5], SamplingParams(max_new_tokens=30, temperature=1.0, seed=1))
    c = generate(model, [5], SamplingParams(max_new_tokens=30, temperature=1.0, seed=2))
    assert a == b and a != c


def test_top_k_one_and_tiny_top_p_are_greedy():
    model = tiny()
    greedy = generate(model, [7], SamplingParams(max_new_tokens=20, temperature=0.0))
    assert generate(model, [7], SamplingParams(max_new_tokens=20, temperature=1.5, top_k=1, seed=9)) == greedy
    assert generate(model, [7], SamplingParams(max_new_tokens=20, temperature=1.5, top_p=1e-6, seed=9)) == greedy


def test_filter_logits_keeps_exactly_the_top_k_and_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    kept = torch.isfinite(filter_logits(logits, top_k=2, top_p=1.0))
    assert kept.tolist() == [True, True, False, False, False]
    kept = torch.isfinite(filter_logits(logits, top_k=0, top_p=0.8))
    assert kept.tolist() == [True, True, True, False, False]  # 0.5 + 0.2 < 0.8 <= 0.85
    shuffled = logits[[3, 0, 4, 2, 1]]
    kept = torch.isfinite(filter_logits(shuffled, top_k=0, top_p=0.8))
    assert kept.tolist() == [False, True, False, True, True]


@pytest.mark.parametrize("seed", range(6))
def test_many_settings_of_one_prompt_at_once_give_what_each_gives_alone(seed: int):
    """The report's batched samples: each row is `generate`'s own, past the block (cache cropped)
    and with rows that end early at eos or at their own max_new_tokens."""
    model = tiny()
    rnd = random.Random(seed)
    prompt = [rnd.randrange(64) for _ in range(rnd.randint(0, 5))]
    sps = [SamplingParams(max_new_tokens=rnd.choice([5, 40, 70]), temperature=rnd.choice([0.0, 0.7, 1.3]),
                          top_k=rnd.choice([0, 5]), top_p=rnd.choice([1.0, 0.9]), seed=rnd.randrange(1000))
           for _ in range(rnd.randint(2, 5))]
    eos = rnd.choice([None, 3])
    assert generate_many(model, prompt, sps, eos) == [generate(model, prompt, sp, eos) for sp in sps]


def test_generation_stops_at_eos():
    model = tiny()
    greedy = generate(model, [7], SamplingParams(max_new_tokens=20, temperature=0.0))
    eos = greedy[4]
    stopped = generate(model, [7], SamplingParams(max_new_tokens=20, temperature=0.0), eos_id=eos)
    assert stopped == greedy[: greedy.index(eos)]


def test_sample_cli_is_seeded_and_has_an_interactive_mode(built, tmp_path):
    import subprocess
    import sys

    from llm.train import train
    from tests.test_train import project_from

    root, params = project_from(built, tmp_path)
    train(params, Layout(root))
    cmd = [sys.executable, "-m", "llm.cli", "sample", "--max-new-tokens", "12", "--temperature", "1.0"]
    runs = [subprocess.run(cmd + ["--prompt", "ROMEO:", "--seed", str(s)], cwd=root, capture_output=True, text=True,
                           timeout=120)
            for s in (1, 1, 2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr
    assert runs[0].stdout.startswith("ROMEO:") and runs[0].stdout == runs[1].stdout != runs[2].stdout
    interactive = subprocess.run(cmd + ["--seed", "1"], cwd=root, input="ROMEO:\nJULIET:\n\n", capture_output=True,
                                 text=True, timeout=120)
    assert interactive.returncode == 0
    assert (interactive.stdout.count("> ") == 3 and runs[0].stdout.strip() in interactive.stdout
            and "JULIET:" in interactive.stdout)


@pytest.mark.parametrize("flags, named", [
    (["--temperature", "-1"], "--temperature -1.0: input should be greater than or equal to 0"),
    (["--top-p", "2"], "--top-p 2.0: input should be less than or equal to 1"),
    (["--top-p", "0"], "--top-p 0.0: input should be greater than 0"),
    (["--top-k", "-3"], "--top-k -3: input should be greater than or equal to 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0: input should be greater than or equal to 1"),
])
def test_a_bad_sampling_flag_is_one_line_naming_it_and_the_value_params_gives(tmp_path, capsys, flags, named):
    """Checked against params.yaml's sample group (its one home) before any model is loaded: there
    is none here, so only the flag can be the error."""
    from llm.cli import main

    (tmp_path / "params.yaml").write_text("sample:\n  top_p: 0.9\n")
    code = main(["sample", "--params", str(tmp_path / "params.yaml"), "--prompt", "ROMEO:", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: llm sample: {named} (params.yaml's sample.")
    default = {"--temperature": "0.8", "--top-p": "0.9", "--top-k": "50", "--max-new-tokens": "200"}[flags[0]]
    assert err[0].endswith(f" is {default})")


def test_report_sampling_lists_take_the_ranges_of_llm_sample():
    from llm.config import parse_params
    from llm.errors import UserError

    for bad in ({"temperatures": [0.7, -0.1]}, {"top_p": [1.5]}, {"top_k": [-1]}):
        with pytest.raises(UserError, match=r"^params.yaml: report\.(temperatures|top_p|top_k)\[\d\]: "):
            parse_params({"report": bad})
