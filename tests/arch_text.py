"""Text architectures built from Hugging Face configs with random weights (no download).

``ARCHITECTURES[name].small(attn)`` builds a tiny model (hidden 32-64, 2 layers, vocab 128, batch 2, seq 8-12)
for the coverage tests; ``.full(attn)`` builds the same graph at the size of the paper's model (random weights),
for benchmarks only. Both return ``(model, inputs, output_fn)``; ``output_fn`` selects what is explained (the
last position's logits for causal LMs, start and end logits at once for extractive QA).

``attn`` is ``"sdpa"`` or ``"eager"``; ``Arch.attn`` lists the modes to try (a transformers release may refuse
``"sdpa"`` for a model: T5 and DeBERTa-v2 in 4.57). Every config is deep-copied before use, so the two modes
never share a config object.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

VOCAB = 128
BATCH = 2
SEQ = 10


@dataclass(frozen=True)
class Arch:
    model: str  # transformers class name
    config: str  # transformers config class name
    small_kw: dict
    full_kw: dict
    output: Callable | None = None
    attn: tuple[str, ...] = ("sdpa", "eager")
    inputs: Callable | None = None  # (config, batch, seq, generator) -> dict of model inputs
    config_fix: Callable | None = None  # edits the config after construction (variants)
    model_fix: Callable | None = None  # edits the built model (variants)
    default_double: bool = False  # the model needs torch's default dtype float64 to run in float64
    experts: str | None = None  # transformers >= 5: experts_implementation of a mixture of experts

    def build(self, kw: dict, attn: str | None = None, batch: int = BATCH, seq: int = SEQ, seed: int = 0,
              device: str | None = None):
        """``device="meta"`` builds the model without memory (to count parameters of the full sizes)."""
        import transformers

        cfg = getattr(transformers, self.config)(**copy.deepcopy(kw))
        if self.config_fix is not None:
            self.config_fix(cfg)
        torch.manual_seed(seed)
        cls = getattr(transformers, self.model)
        extra = {} if attn is None else {"attn_implementation": attn}  # None: the library's default
        if self.experts is not None and _major(transformers.__version__) >= 5:
            extra["experts_implementation"] = self.experts
        with torch.device(device) if device is not None else contextlib.nullcontext():
            model = cls._from_config(copy.deepcopy(cfg), **extra).eval()
        if self.model_fix is not None:
            self.model_fix(model)
        g = torch.Generator().manual_seed(seed)
        make = self.inputs or _ids
        return model, make(cfg, batch, seq, g), self.output

    def small(self, attn: str | None = None):
        return self.build(self.small_kw, attn)

    def full(self, attn: str | None = None, batch: int = 1, seq: int = 32, device: str | None = None):
        return self.build(self.full_kw, attn, batch=batch, seq=seq, device=device)

    def variant(self, **changes) -> Arch:
        return dataclasses.replace(self, **changes)


def _major(version: str) -> int:
    return int(version.split(".")[0])


def _vocab(cfg) -> int:
    return getattr(cfg, "vocab_size", VOCAB)


def _ids(cfg, batch, seq, g):
    # ids from 3 up: avoid pad / bos / eos ids, which some models treat specially
    return {"input_ids": torch.randint(3, _vocab(cfg), (batch, seq), generator=g)}


def _ids_mask(cfg, batch, seq, g):
    """Token ids with an attention mask that pads the end of the second row (a real padding mask)."""
    ids = torch.randint(3, _vocab(cfg), (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1:, seq - 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _seq2seq(cfg, batch, seq, g):
    ids = torch.randint(3, _vocab(cfg), (batch, seq), generator=g)
    dec = torch.randint(3, _vocab(cfg), (batch, seq // 2), generator=g)
    dec[:, 0] = cfg.decoder_start_token_id
    return {"input_ids": ids, "decoder_input_ids": dec}


def last_logits(o):
    return o.logits[:, -1]


def qa_logits(o):
    return o.start_logits, o.end_logits


def logits(o):
    return o.logits


def last_hidden(o):
    return o.last_hidden_state[:, -1]


def pooled(o):
    return o.pooler_output


_TINY = dict(vocab_size=VOCAB)

ARCHITECTURES: dict[str, Arch] = {
    "gpt2": Arch(
        "GPT2LMHeadModel", "GPT2Config",
        dict(_TINY, n_embd=32, n_layer=2, n_head=4, n_positions=64),
        dict(vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024),
        last_logits,
    ),
    "roberta": Arch(
        "RobertaForQuestionAnswering", "RobertaConfig",
        dict(_TINY, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=SEQ + 4, pad_token_id=1, type_vocab_size=1),
        dict(vocab_size=50265, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
             intermediate_size=4096, max_position_embeddings=514, pad_token_id=1, type_vocab_size=1,
             layer_norm_eps=1e-5),
        qa_logits, inputs=_ids_mask,
    ),
    "llama": Arch(
        "LlamaForCausalLM", "LlamaConfig",
        dict(_TINY, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, max_position_embeddings=64),
        dict(vocab_size=128256, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, intermediate_size=8192, max_position_embeddings=131072, rope_theta=500000.0,
             rope_scaling=dict(rope_type="llama3", factor=32.0, high_freq_factor=4.0, low_freq_factor=1.0,
                               original_max_position_embeddings=8192),
             tie_word_embeddings=True, head_dim=64, rms_norm_eps=1e-5),
        last_logits,
    ),
    "gemma3": Arch(
        "Gemma3ForCausalLM", "Gemma3TextConfig",
        dict(_TINY, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
             head_dim=16, intermediate_size=64, max_position_embeddings=64, sliding_window=4,
             layer_types=["sliding_attention", "full_attention"]),
        dict(vocab_size=262144, hidden_size=640, num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1,
             head_dim=256, intermediate_size=2048, max_position_embeddings=32768, sliding_window=512,
             query_pre_attn_scalar=256, rope_theta=1000000.0, rope_local_base_freq=10000.0),
        last_logits,
    ),
    "qwen3": Arch(
        "Qwen3ForCausalLM", "Qwen3Config",
        dict(_TINY, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, intermediate_size=64, max_position_embeddings=64),
        dict(vocab_size=151936, hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
             num_key_value_heads=8, head_dim=128, intermediate_size=3072, max_position_embeddings=40960,
             rope_theta=1000000.0, tie_word_embeddings=True),
        last_logits,
    ),
    "t5": Arch(
        "T5ForConditionalGeneration", "T5Config",
        dict(_TINY, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
             feed_forward_proj="gated-gelu", decoder_start_token_id=0, relative_attention_num_buckets=8,
             relative_attention_max_distance=16, tie_word_embeddings=False),
        dict(vocab_size=32128, d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_decoder_layers=24,
             num_heads=16, feed_forward_proj="gated-gelu", decoder_start_token_id=0, tie_word_embeddings=False),
        last_logits, inputs=_seq2seq,
    ),
    "mamba": Arch(
        "MambaForCausalLM", "MambaConfig",
        dict(_TINY, hidden_size=32, state_size=8, expand=2, conv_kernel=4, num_hidden_layers=2,
             use_mambapy=False),
        dict(vocab_size=50280, hidden_size=768, state_size=16, expand=2, conv_kernel=4, num_hidden_layers=24,
             use_mambapy=False),
        last_logits, attn=("eager",),  # no attention: one mode
    ),
    "mixtral": Arch(
        "MixtralForCausalLM", "MixtralConfig",
        dict(_TINY, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2),
        # Mixtral-8x7B itself (47B parameters) is not a benchmark size: its shape (GQA, 8 experts, top-2), reduced
        dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=4, intermediate_size=2816, num_local_experts=8, num_experts_per_tok=2),
        # transformers 5 runs the experts with torch._grouped_mm by default (float32 / bfloat16 only); the loop
        # over experts with index_add_ ("eager", the only implementation of 4.x) runs in float64
        last_logits, experts="eager",
    ),
    "bart": Arch(
        "BartForConditionalGeneration", "BartConfig",
        dict(_TINY, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
             decoder_start_token_id=2, pad_token_id=1, bos_token_id=0, eos_token_id=2),
        dict(vocab_size=50265, d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
             decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096, max_position_embeddings=1024),
        last_logits, inputs=_seq2seq,
    ),
    "clip_text": Arch(
        "CLIPTextModel", "CLIPTextConfig",
        dict(_TINY, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=SEQ + 4, bos_token_id=0, pad_token_id=1, eos_token_id=2),
        dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
             num_attention_heads=8, max_position_embeddings=77, eos_token_id=2),
        pooled, default_double=True,  # 4.x builds the causal mask in the default dtype (overflows in float32)
    ),
    "bert": Arch(
        "BertForSequenceClassification", "BertConfig",
        dict(_TINY, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64),
        dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
             intermediate_size=3072),
        logits, inputs=_ids_mask,
    ),
    "distilbert": Arch(
        "DistilBertForSequenceClassification", "DistilBertConfig",
        dict(_TINY, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64),
        dict(vocab_size=30522, dim=768, n_layers=6, n_heads=12, hidden_dim=3072),
        logits, inputs=_ids_mask,
    ),
    "deberta_v2": Arch(
        "DebertaV2Model", "DebertaV2Config",
        dict(_TINY, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64, relative_attention=True, position_buckets=8, max_relative_positions=16,
             pos_att_type=["p2c", "c2p"], position_biased_input=False, norm_rel_ebd="layer_norm",
             share_att_key=True),
        dict(vocab_size=128100, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
             intermediate_size=3072, relative_attention=True, position_buckets=256, max_relative_positions=-1,
             pos_att_type=["p2c", "c2p"], position_biased_input=False, norm_rel_ebd="layer_norm",
             share_att_key=True),
        last_hidden, inputs=_ids_mask,
    ),
}


# ----------------------------------------------------------------------------------------------------------
# Variants: the same graph with one thing changed, to isolate a known engine gap (see tests/test_coverage_text.py)


def _fused_gelu_t5(cfg):
    """Flan-T5's gated-gelu runs ``gelu_new``, the tanh GELU written out with primitives (``1 + tanh``); the fused
    ``gelu_pytorch_tanh`` computes the same function in one node."""
    cfg.dense_act_fn = "gelu_pytorch_tanh"


def untie_encoder_embedding(model):
    """Give the encoder its own copy of the token table that encoder and decoder share (``shared.weight``)."""
    enc = model.get_encoder()
    enc.embed_tokens = copy.deepcopy(enc.embed_tokens)


def bias_as_parameter(model):
    """BART adds ``final_logits_bias``, a buffer (zeros), to the logits; make it a parameter, as a bias usually is."""
    b = model.final_logits_bias
    del model._buffers["final_logits_bias"]
    model.final_logits_bias = torch.nn.Parameter(b.detach().clone())


def _bart_fix(model):
    untie_encoder_embedding(model)
    bias_as_parameter(model)


VARIANTS: dict[str, Arch] = {
    "gpt2_fused_gelu": ARCHITECTURES["gpt2"].variant(
        small_kw=dict(ARCHITECTURES["gpt2"].small_kw, activation_function="gelu_pytorch_tanh")),
    "t5_fused_gelu_untied": ARCHITECTURES["t5"].variant(config_fix=_fused_gelu_t5, model_fix=untie_encoder_embedding),
    "bart_untied_bias_param": ARCHITECTURES["bart"].variant(model_fix=_bart_fix),
}
