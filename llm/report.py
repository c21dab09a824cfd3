"""Stage `report`: reports/report.html (self-contained) and reports/report.md (its twin).

A model card (size, data, tokenizer, training), val bits-per-byte against the baselines, the
loss curve, samples over a small temperature / top-k / top-p grid, and attention diagnostics:
per layer and head the attention-sink score (mean attention on the first token) and a heat
map for one prompt. Everything the model wrote is escaped.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from llm.artifacts import load_final
from llm.config import Params, TrainParams
from llm.errors import UserError
from llm.io import atomic_dir, code_fence, read_json
from llm.layout import Layout
from llm.sample import SamplingParams, complete_many
from llm.shards import read_manifest

log = logging.getLogger(__name__)


@dataclass
class Sample:
    prompt: str
    temperature: float
    top_k: int
    top_p: float
    text: str


@torch.no_grad()
def attention_maps(model, tokenizer, prompt: str) -> tuple[list[str], torch.Tensor]:
    """Pieces of the prompt and its attention weights, (layers, heads, T, T), through the
    explicit attention path."""
    ids = tokenizer.encode(prompt)[: model.config.block_size]
    weights = model.attention_weights(torch.tensor([ids], device=next(model.parameters()).device))
    return [tokenizer.piece(i) for i in ids], torch.stack([w[0] for w in weights]).float().cpu()


def sink_scores(weights: torch.Tensor) -> torch.Tensor:
    """Per layer and head, the mean attention mass that queries after the first put on the
    first token: near 1 means the head parks its attention there (an attention sink)."""
    if weights.size(-1) < 2:
        return torch.zeros(weights.shape[:2])
    return weights[:, :, 1:, 0].mean(dim=-1)


def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def loss_plot(history: list[dict]) -> bytes:
    from matplotlib.figure import Figure  # not pyplot: no GUI backend, no global figures, half the import

    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.subplots()
    steps = [r["step"] for r in history]
    ax.plot(steps, [r["train_loss"] for r in history], label="train", marker="o", ms=3)
    ax.plot(steps, [r["val_loss"] for r in history], label="val", marker="o", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    return png(fig)


def attention_plot(pieces: list[str], weights: torch.Tensor) -> bytes:
    from matplotlib.figure import Figure

    L, H = weights.shape[:2]
    fig = Figure(figsize=(2.2 * H, 2.2 * L))
    axes = fig.subplots(L, H, squeeze=False)
    labels = [p.replace("\u2581", "_").replace("\n", "\\n") for p in pieces]
    for layer, head in itertools.product(range(L), range(H)):
        ax = axes[layer][head]
        ax.imshow(weights[layer, head].numpy(), cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"layer {layer} head {head}", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    if len(labels) <= 24:
        axes[-1][0].set_xticks(range(len(labels)), labels, rotation=90, fontsize=5)
        axes[-1][0].set_yticks(range(len(labels)), labels, fontsize=5)
    return png(fig)


def _needs(path: Path, stage: str) -> Path:
    if not path.is_file():
        raise UserError(f"{path}: not found (run `llm {stage}` first)")
    return path


def read_history(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def report(params: Params, layout: Layout) -> dict:
    """Model card, metrics against baselines, loss curve, samples and attention -> reports/."""
    lay = layout
    model, tok, info = load_final(lay.final)
    evaluation = read_json(_needs(lay.metrics("eval"), "evaluate"))
    history = read_history(_needs(lay.loss_csv, "train"))
    tok_stats = read_json(lay.tokenizer / "stats.json")
    splits = read_manifest(lay.shards)["splits"]
    rp = params.report
    samples = []
    settings = list(itertools.product(rp.temperatures, rp.top_k, rp.top_p))
    for prompt in rp.prompts:  # a prompt's settings sampled together: one forward pass a token for all
        sps = [SamplingParams(max_new_tokens=rp.max_new_tokens, temperature=t, top_k=k, top_p=p, seed=rp.seed)
               for t, k, p in settings]
        samples += [Sample(prompt, *setting, text)
                    for setting, text in zip(settings, complete_many(model, tok, prompt, sps), strict=True)]
    pieces, weights = attention_maps(model, tok, rp.attention_prompt)
    sinks = sink_scores(weights)
    cfg, train = info["model"], read_json(_needs(lay.metrics("train"), "train"))
    card = {
        "parameters": f"{train['params'] / 1e6:.2f} M (non-embedding positions excluded)",
        "shape": f"{cfg['n_layer']} layers, {cfg['n_head']} heads, width {cfg['n_embd']}, block {cfg['block_size']}",
        "tokenizer": f"sentencepiece {tok_stats['params']['model_type']}, vocab {cfg['vocab_size']}, "
                     f"{tok_stats['val_bytes_per_token']:.2f} bytes/token on val",
        "data": f"{splits['train']['documents']} train / {splits['val']['documents']} val documents; "
                f"{splits['train']['tokens']:,} train / {splits['val']['tokens']:,} val tokens",
        "training": f"{train['steps']} steps, {train['tokens_seen']:,} tokens, {train['train_seconds']:.0f} s "
                    f"({train['tokens_per_sec']:,} tokens/s, MFU {100 * train['mfu']:.1f}%), stopped by "
                    f"{train['stopped_by']}",
        **recipe(cfg, params.train),
        "hyperparameters": f"{params.train.tokens_per_step:,} tokens/step (batch {params.train.batch_size}), "
                           f"weight decay {params.train.weight_decay:g}, "
                           f"dropout {cfg['dropout']:g}, grad clip {params.train.grad_clip:g}, seed {params.seed}",
        "device": f"{train['device']} x {train['processes']}",
        "FLOPs per token": f"{train['flops_per_token'] / 1e6:.1f} M",
    }
    loss_png, attn_png = loss_plot(history), attention_plot(pieces, weights)
    with atomic_dir(lay.reports) as tmp:
        (tmp / "loss.png").write_bytes(loss_png)
        (tmp / "attention.png").write_bytes(attn_png)
        (tmp / "report.html").write_text(
            render_html(card, evaluation, samples, sinks, pieces, loss_png, attn_png, rp.attention_prompt),
            encoding="utf-8"
        )
        (tmp / "report.md").write_text(render_markdown(card, evaluation, samples, sinks, rp.attention_prompt),
                                       encoding="utf-8")
        if params.tracking.enabled:
            _track(params, lay, tmp)
    log.info("report: %s (%d samples)", lay.reports / "report.html", len(samples))
    return {"samples": len(samples), "path": str(lay.reports / "report.html")}


def recipe(cfg: dict, tp: TrainParams) -> dict[str, str]:
    """The card's names for what ran: each architecture choice (from the model's saved config),
    the optimizers and the learning-rate schedule (from the train params)."""
    mlp = {"gelu": "GELU", "relu2": "ReLU²", "swiglu": "SwiGLU"}[cfg["mlp"]]
    arch = [
        "rotary positions" if cfg["position"] == "rope" else "learned positions",
        "RMSNorm" if cfg["norm"] == "rmsnorm" else "LayerNorm", *(["QK-norm"] if cfg["qk_norm"] else []),
        f"{mlp} MLP", "biases" if cfg["bias"] else "no biases",
        *(["zero-init output projections"] if cfg["zero_init"] else []),
        "head tied to the embedding" if cfg.get("tie_embeddings", True) else "head of its own",
    ]
    adamw = f"AdamW (lr {tp.learning_rate:g}, betas {tp.beta1:g}/{tp.beta2:g})"
    optimizer = (f"Muon for the blocks' matrices (lr {tp.muon_learning_rate:g}, momentum {tp.muon_momentum:g}), "
                 f"{adamw} for embeddings, head, norms and biases" if tp.optimizer == "muon"
                 else f"{adamw} for every parameter")
    floor = f"{tp.min_lr_ratio:g} x peak"
    schedule = (f"WSD: {tp.warmup_steps} warmup steps, the peak held, then a "
                f"{'linear' if tp.decay_shape == 'linear' else '1 - sqrt'} decay to {floor} over the last "
                f"{100 * tp.decay_fraction:g}% of the steps" if tp.schedule == "wsd"
                else f"cosine: {tp.warmup_steps} warmup steps, then a cosine decay to {floor}")
    return {"architecture": ", ".join(arch), "optimizer": optimizer, "schedule": schedule}


def _baseline_rows(evaluation: dict) -> list[tuple[str, float, str]]:
    rows = [("this model", evaluation["val_bpb"], "")]
    for name, value in sorted(evaluation["baseline_bpb"].items(), key=lambda kv: kv[1]):
        rows.append((name, value, "beaten" if evaluation["val_bpb"] < value else "not beaten"))
    return rows


def render_html(card, evaluation, samples, sinks, pieces, loss_png, attn_png, attention_prompt) -> str:
    e = html.escape
    img = lambda data, alt: f'<img alt="{e(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
    card_rows = "".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in card.items())
    metric_rows = "".join(
        f"<tr><td>{e(n)}</td><td>{v:.4f}</td><td>{e(s)}</td></tr>" for n, v, s in _baseline_rows(evaluation)
    )
    sample_rows = "".join(
        f"<tr><td>{s.temperature}</td><td>{s.top_k}</td><td>{s.top_p}</td>"
        f"<td><pre><b>{e(s.prompt)}</b>{e(s.text)}</pre></td></tr>"
        for s in samples
    )
    L, H = sinks.shape
    sink_head = "".join(f"<th>head {h}</th>" for h in range(H))
    sink_rows = "".join(
        f"<tr><th>layer {layer}</th>" + "".join(f"<td>{sinks[layer, h]:.2f}</td>" for h in range(H)) + "</tr>"
        for layer in range(L)
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Model report</title>
<style>
body {{ font: 15px/1.45 system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222 }}
table {{ border-collapse: collapse; margin: .5rem 0 1.5rem }} \
th, td {{ border: 1px solid #ccc; padding: .3rem .6rem; text-align: left; vertical-align: top }}
pre {{ white-space: pre-wrap; margin: 0; font-size: 13px }} img {{ max-width: 100% }}
</style></head><body>
<h1>Model report</h1>
<h2>Model card</h2><table>{card_rows}</table>
<h2>Held-out bits per byte</h2>
<p>val loss {evaluation['val_loss']:.4f} nats/token, perplexity {evaluation['val_ppl']:.1f}, \
on {evaluation['val_bytes']:,} bytes of val text.
Lower is better; the baselines compress the same text.</p>
<table><tr><th>model</th><th>bits per byte</th><th></th></tr>{metric_rows}</table>
<h2>Loss curve</h2>{img(loss_png, "train and val loss per step")}
<h2>Samples</h2>
<table><tr><th>temperature</th><th>top-k</th><th>top-p</th><th>prompt (bold) and continuation</th></tr>\
{sample_rows}</table>
<h2>Attention</h2>
<p>Attention-sink score per layer and head: the mean attention that tokens after the first put on the first token,
for the prompt <code>{e(attention_prompt)}</code> ({len(pieces)} tokens).</p>
<table><tr><th></th>{sink_head}</tr>{sink_rows}</table>
{img(attn_png, "attention heat maps per layer and head")}
</body></html>
"""


def render_markdown(card, evaluation, samples, sinks, attention_prompt) -> str:
    e = html.escape  # Markdown renders inline HTML: escape what the model wrote there too
    lines = ["# Model report", "", "## Model card", "", "| | |", "| --- | --- |"]
    lines += [f"| {k} | {e(str(v))} |" for k, v in card.items()]
    lines += ["", "## Held-out bits per byte", "",
              f"val loss {evaluation['val_loss']:.4f} nats/token, perplexity {evaluation['val_ppl']:.1f}, "
              f"on {evaluation['val_bytes']:,} bytes of val text.", "", "| model | bits per byte | |",
              "| --- | ---: | --- |"]
    lines += [f"| {n} | {v:.4f} | {s} |" for n, v, s in _baseline_rows(evaluation)]
    lines += ["", "## Loss curve", "", "![train and val loss per step](loss.png)", "", "## Samples", ""]
    for s in samples:
        body = s.prompt + s.text
        fence = code_fence(body)
        lines += [f"temperature {s.temperature}, top-k {s.top_k}, top-p {s.top_p}:", "", f"{fence}text", body, fence,
                  ""]
    L, H = sinks.shape
    lines += ["## Attention", "",
              f"Attention-sink score (mean attention on the first token) for `{e(attention_prompt)}`:", "",
              "| | " + " | ".join(f"head {h}" for h in range(H)) + " |", "| --- |" + " ---: |" * H]
    lines += [f"| layer {layer} | " + " | ".join(f"{sinks[layer, h]:.2f}" for h in range(H)) + " |"
              for layer in range(L)]
    lines += ["", "![attention heat maps per layer and head](attention.png)", ""]
    return "\n".join(lines)


def _track(params: Params, lay: Layout, report_dir: Path) -> None:
    from llm.stage_log import RunLog, log_to_run

    artifacts = [(str(report_dir), "report"), (str(lay.loss_csv), "plots"), (str(lay.tokenizer), "tokenizer")]
    run_id = log_to_run(RunLog(artifacts=artifacts), params, lay)
    log.info("report: logged to MLflow run %s", run_id)
