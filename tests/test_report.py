from __future__ import annotations

import re
from pathlib import Path

import torch

from llm.evaluate import evaluate
from llm.layout import Layout
from llm.report import report, sink_scores
from llm.train import train
from tests.test_train import project_from


def test_report_renders_and_escapes_what_the_model_wrote(built, tmp_path: Path):
    hostile = "<script>alert('x')</script> ROMEO:"
    root, params = project_from(built, tmp_path, report={"prompts": [hostile, "```\nJULIET:"],
                                                         "temperatures": [0.8, 1.2]})
    train(params, Layout(root))
    evaluate(params, Layout(root))
    report(params, Layout(root))
    html = (Layout(root).reports / "report.html").read_text()
    md = (Layout(root).reports / "report.md").read_text()
    assert "<script>" not in html and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html
    assert re.findall(r'<img[^>]+src="([^"]{0,22})', html) == ["data:image/png;base64,"] * 2  # self-contained
    for section in ("Model card", "Held-out bits per byte", "Loss curve", "Samples", "Attention"):
        assert f"<h2>{section}</h2>" in html and f"## {section}" in md
    assert html.count("<pre>") == 4  # 2 prompts x 2 temperatures
    assert "bz2" in html and "this model" in html
    assert "tokens/step" in md and "cosine" not in html  # the tests' recipe is the default: WSD, Muon
    assert (f"WSD: {params.train.warmup_steps} warmup steps, the peak held, then a linear decay to 0 x peak over the "
            f"last 30% of the steps") in html
    assert f"Muon for the blocks&#x27; matrices (lr {params.train.muon_learning_rate:g}" in html
    assert "rotary positions, RMSNorm, QK-norm, SwiGLU MLP, no biases, zero-init output projections, head tied" in md
    assert "````text\n```\nJULIET:" in md  # a fence longer than the backticks the text holds
    assert sorted(p.name for p in Layout(root).reports.iterdir()) == ["attention.png", "loss.png", "report.html",
                                                                      "report.md"]
    run = Layout.of(root, root / "ladder" / "a")  # a run directory (a ladder rung's) keeps its model beside it
    assert run.reports == run.run_dir / "reports" and run.reports.parent != run.final


def test_what_the_model_writes_is_escaped_too(built, tmp_path: Path, monkeypatch):
    """A continuation that closes the <pre> and opens a script stays text, in HTML and Markdown."""
    import llm.report

    root, params = project_from(built, tmp_path, report={"prompts": ["ROMEO:"], "temperatures": [0.8]})
    train(params, Layout(root))
    evaluate(params, Layout(root))
    real = llm.report.complete_many
    monkeypatch.setattr(llm.report, "complete_many",
                        lambda *a: ["</pre><script>alert(1)</script>\n```\n" + text for text in real(*a)])
    report(params, Layout(root))
    html = (Layout(root).reports / "report.html").read_text()
    md = (Layout(root).reports / "report.md").read_text()
    assert "<script>" not in html and "</pre><script>" not in html
    assert "&lt;/pre&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert html.count("<pre>") == html.count("</pre>") == 1
    sample = md.split("## Samples", 1)[1]
    assert "````" in sample  # the fence outgrows the backticks the model wrote


def test_sink_score_is_the_mean_attention_on_the_first_token():
    w = torch.zeros(1, 2, 3, 3)
    w[0, 0, :, 0] = 1.0  # head 0 always looks at token 0
    w[0, 1, 0, 0] = 1.0
    w[0, 1, 1, 1] = 1.0
    w[0, 1, 2, 0], w[0, 1, 2, 2] = 0.5, 0.5
    assert torch.allclose(sink_scores(w), torch.tensor([[1.0, 0.25]]))


def test_the_card_names_the_recipe_that_ran():
    from llm.config import ModelParams, TrainParams
    from llm.report import recipe

    classic = ModelParams(position="learned", norm="layernorm", qk_norm=False, mlp="gelu", bias=True, zero_init=False,
                          tie_embeddings=False).model_dump()
    card = recipe(classic, TrainParams(optimizer="adamw", schedule="cosine", learning_rate=6e-4, min_lr_ratio=0.1,
                                       warmup_steps=20))
    assert card == {"architecture": "learned positions, LayerNorm, GELU MLP, biases, head of its own",
                    "optimizer": "AdamW (lr 0.0006, betas 0.9/0.95) for every parameter",
                    "schedule": "cosine: 20 warmup steps, then a cosine decay to 0.1 x peak"}
    card = recipe(ModelParams(mlp="relu2").model_dump(), TrainParams(decay_fraction=0.5))
    assert "ReLU² MLP" in card["architecture"] and "over the last 50% of the steps" in card["schedule"]
    assert card["optimizer"].startswith("Muon for the blocks' matrices (lr 0.006, momentum 0.95), AdamW (lr 0.002")
