"""The LM family as Hugging Face transformers models that load with no custom code.

A causal softmax-attention model computes exactly what a transformers architecture computes:
- the classic block (LayerNorm, fused qkv without bias, RoPE rotate-half over the whole head,
  sequential residual, exact-GELU MLP with biases) is GPT-NeoX with `use_parallel_residual`
  off, `partial_rotary_factor` 1 and no attention biases. GPT-NeoX's fused qkv rows are
  interleaved per head, (heads, 3, head_dim), ours are (3, heads, head_dim): the rows are
  reordered.
- the llama block (RMSNorm, SwiGLU MLP, RoPE rotate-half) is Llama, with as many key/value
  heads as heads; our fused qkv rows split into q_proj, k_proj, v_proj as they are.
FLASH, linear attention and the masked objective have no transformers class (`unsupported`).

Weights are converted one tensor at a time (`HFExport.convert`), so an exporter can stream a
checkpoint shard by shard. Tokens: a subword model ships its tokenizer.json; a byte-level one
gets `byte_tokenizer`, whose ids are the byte values our model reads.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from models.lm.workload import MASK

BLOCKS = {"classic": "GPTNeoXForCausalLM", "llama": "LlamaForCausalLM"}
# ByteLevel's printable stand-ins: these bytes are their own character, the others 256 + n
_PRINTABLE_BYTES = frozenset([*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)])


def block_of(cfg) -> str:
    block = cfg.block
    if block not in BLOCKS:
        raise ValueError(f"model.block '{block}': no transformers mapping (known: {', '.join(BLOCKS)})")
    return block


def unsupported(cfg) -> str | None:
    """Why a model has no transformers class, or None when it has one."""
    if cfg.objective != "causal":
        return f"model.objective={cfg.objective}: transformers has no class for our masked (span) objective"
    if cfg.attention != "softmax":
        return f"model.attention={cfg.attention}: transformers has no {cfg.attention} attention class"
    block_of(cfg)
    return None


@dataclass(frozen=True)
class SpecialIds:
    bos: int | None = None
    eos: int | None = None
    pad: int | None = None  # a token of its own, never a real one
    pad_for_generation: int | None = None  # pad, else the separator (what generate pads with)


# ---------------------------------------------------------------- weights


def _neox_qkv(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows (3, heads, head_dim) -> GPT-NeoX's (heads, 3, head_dim)."""
    return weight.unflatten(0, (3, heads, -1)).transpose(0, 1).flatten(0, 2).contiguous()


_CLASSIC = {
    "attn_norm": "input_layernorm",
    "out": "attention.dense",
    "mlp_norm": "post_attention_layernorm",
    "mlp.0": "mlp.dense_h_to_4h",
    "mlp.2": "mlp.dense_4h_to_h",
}
_LLAMA = {
    "attn_norm": "input_layernorm",
    "out": "self_attn.o_proj",
    "mlp_norm": "post_attention_layernorm",
    "mlp.gate": "mlp.gate_proj",
    "mlp.up": "mlp.up_proj",
    "mlp.down": "mlp.down_proj",
}
_BLOCK_TENSOR = re.compile(r"blocks\.(\d+)\.(.+)\.(weight|bias)")


class HFExport:
    """One model's transformers export: its config, and its tensors under transformers' names.

    `model` is ours, built from the run's config (on the meta device: only shapes and
    hyperparameters are read)."""

    def __init__(self, cfg, model: nn.Module, ids: SpecialIds):
        reason = unsupported(cfg)
        if reason:
            raise ValueError(reason)
        self.cfg, self.block, self.ids = cfg, block_of(cfg), ids
        self.tied = bool(cfg.tie_embeddings)
        self.config = self._config(model)
        self.dtypes: set[torch.dtype] = set()

    # ------------------------------------------------------------ config
    def _config(self, model: nn.Module):
        from transformers import GPTNeoXConfig, LlamaConfig

        first = model.blocks[0]
        vocab, dim = model.embed.weight.shape
        common = dict(
            vocab_size=vocab,
            hidden_size=dim,
            num_hidden_layers=len(model.blocks),
            num_attention_heads=first.heads,
            max_position_embeddings=self.cfg.seq_len,
            bos_token_id=self.ids.bos,
            eos_token_id=self.ids.eos,
            # Llama's embedding skips the pad row in training: a real token (the separator) must not be it
            pad_token_id=self.ids.pad,
            attention_dropout=0.0,
            tie_word_embeddings=self.tied,
            architectures=[BLOCKS[self.block]],
        )
        rope = {"rope_type": "default", "rope_theta": float(first.rotary.base)}
        if first.rotary.dim != first.head_dim:
            raise ValueError(f"RoPE over {first.rotary.dim} of {first.head_dim} head dims: not mapped")
        eps = {m.eps for m in (model.norm, *(n for b in model.blocks for n in (b.attn_norm, b.mlp_norm)))}
        if len(eps) != 1:
            raise ValueError(f"norms with several eps {sorted(eps)}: transformers has one for all")
        if self.block == "classic":
            if not isinstance(first.mlp[1], nn.GELU) or first.mlp[1].approximate != "none":
                raise ValueError(f"classic block MLP activation {first.mlp[1]}: only exact GELU maps to GPT-NeoX")
            return GPTNeoXConfig(
                **common,
                intermediate_size=first.mlp[0].out_features,
                hidden_act="gelu",
                hidden_dropout=0.0,
                layer_norm_eps=eps.pop(),
                use_parallel_residual=False,
                attention_bias=False,
                rope_parameters={**rope, "partial_rotary_factor": 1.0},
            )
        return LlamaConfig(
            **common,
            intermediate_size=first.mlp.gate.out_features,
            num_key_value_heads=first.heads,
            head_dim=first.head_dim,
            hidden_act="silu",
            rms_norm_eps=eps.pop(),
            attention_bias=False,
            mlp_bias=False,
            rope_parameters=rope,
        )

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the transformers model loads, by name and shape (built on meta)."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            hf = AutoModelForCausalLM.from_config(self.config)
        shapes = {n: tuple(t.shape) for n, t in hf.state_dict().items()}
        if self.tied:
            shapes.pop("lm_head.weight", None)
        return shapes

    def save(self, out: Path) -> None:
        """config.json and generation_config.json, with the dtype the weights were written in."""
        from transformers import GenerationConfig

        if len(self.dtypes) > 1:
            raise ValueError(f"weights in several dtypes {sorted(map(str, self.dtypes))}: one is expected")
        self.config.dtype = next(iter(self.dtypes), torch.float32)
        self.config.save_pretrained(out)
        ids = self.ids
        GenerationConfig(
            bos_token_id=ids.bos, eos_token_id=ids.eos, pad_token_id=ids.pad_for_generation
        ).save_pretrained(out)

    # ------------------------------------------------------------ weights
    def convert(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Our tensor `name` as transformers' tensor(s); raises on a name the mapping lacks."""
        self.dtypes.add(tensor.dtype)
        neox = self.block == "classic"
        base = "gpt_neox" if neox else "model"
        top = {
            "embed.weight": f"{base}.{'embed_in' if neox else 'embed_tokens'}.weight",
            "head.weight": "lm_head.weight",
            "norm.weight": f"{base}.{'final_layer_norm' if neox else 'norm'}.weight",
            "norm.bias": f"{base}.final_layer_norm.bias",
        }
        if name == "head.weight" and self.tied:
            return []  # transformers ties lm_head to the embedding itself
        if name in top and (neox or name != "norm.bias"):
            return [(top[name], tensor)]
        m = _BLOCK_TENSOR.fullmatch(name)
        if m:
            i, module, kind = m.groups()
            layer = f"{base}.layers.{i}"
            heads = self.config.num_attention_heads
            if module == "qkv" and kind == "weight":
                if neox:
                    return [(f"{layer}.attention.query_key_value.weight", _neox_qkv(tensor, heads))]
                q, k, v = (t.clone() for t in tensor.chunk(3, 0))  # clones: no shared storage in a file
                return [(f"{layer}.self_attn.{p}_proj.weight", t) for p, t in zip("qkv", (q, k, v))]
            mapped = (_CLASSIC if neox else _LLAMA).get(module)
            if mapped is not None:
                return [(f"{layer}.{mapped}.{kind}", tensor)]
        raise ValueError(f"'{name}' {tuple(tensor.shape)}: no {BLOCKS[self.block]} tensor for it")


# ---------------------------------------------------------------- tokenizers


def byte_tokenizer(objective: str):
    """A `tokenizers` Tokenizer whose ids are the bytes of the UTF-8 text (what our byte-level
    model reads): ByteLevel's character per byte, a BPE vocabulary of those 256 characters with
    no merges, id == byte value, and a ByteLevel decoder. Id 256 (the embedding's extra row) is a
    special token: `<mask>` under the masked objective, `<pad>` under the causal one (it never
    occurs in training, so padding with it is harmless)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    chars, extra = {}, 0
    for b in range(256):
        if b in _PRINTABLE_BYTES:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    tok = Tokenizer(models.BPE(vocab={c: b for b, c in chars.items()}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<mask>" if objective == "masked" else "<pad>", special=True)])
    assert tok.get_vocab_size() == MASK + 1
    return tok


def write_tokenizer(out: Path, cfg, tokenizer: Path | None) -> SpecialIds:
    """tokenizer.json + tokenizer_config.json in `out` for AutoTokenizer (class
    PreTrainedTokenizerFast, model_max_length = seq_len). `tokenizer`: the model's tokenizer.json
    or folder; None for a byte-level model."""
    from transformers import PreTrainedTokenizerFast

    if tokenizer is None:
        special = "<mask>" if cfg.objective == "masked" else "<pad>"
        kwargs = {"mask_token" if cfg.objective == "masked" else "pad_token": special}
        fast = PreTrainedTokenizerFast(
            tokenizer_object=byte_tokenizer(cfg.objective),
            model_max_length=cfg.seq_len,
            split_special_tokens=True,  # text that reads "<pad>" is bytes, as our pipeline reads it
            **kwargs,
        )
        pad = MASK if cfg.objective == "causal" else None
        ids = SpecialIds(pad=pad, pad_for_generation=pad)
    else:
        from data_pipelines.text_tokenizer import load_tokenizer

        tok, info = load_tokenizer(tokenizer)
        # our shards encode a document with the tokenizer's template (Llama's: a BOS first) and
        # special tokens written in the text as plain text; AutoTokenizer does the same
        probe = tok.encode("a")
        bos = probe.ids[0] if probe.special_tokens_mask[:1] == [1] else info.eos_id  # else GPT-2's: eos opens one too
        named = {"eos_token": info.eos_token} if info.eos_token else {}
        if bos is not None:
            named["bos_token"] = tok.id_to_token(bos)
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, model_max_length=cfg.seq_len, split_special_tokens=True, **named
        )
        ids = SpecialIds(bos=bos, eos=info.eos_id, pad_for_generation=info.eos_id)
    fast.save_pretrained(out)
    # transformers 5 writes its own class name; PreTrainedTokenizerFast is what 4.x reads too
    config_file = Path(out) / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return ids
