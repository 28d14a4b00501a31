"""Where methods attach in a transformers model, found from the model: per transformer layer its attention
projections (q, k, v and the output projection ``attn_out``; one fused projection where q, k and v share one), the
FFN's input linear(s) and output linear, for encoders, decoders and encoder-decoders (encoder self-attention,
decoder self- and cross-attention).

How they are found: the layers are the blocks of the outermost ``nn.ModuleList`` s of identical modules (or the
classes transformers names in ``_no_split_modules``); within a block, ``FAMILIES[config.model_type]`` names each
site by a regular expression over the names relative to the block, and a family that is not in the table is read
structurally (attention linears under a child whose name holds "att", told apart by their names; the FFN is the rest:
its output is the last linear back to the hidden size). Adding a family takes one entry in ``FAMILIES``, or none where
the structural reading finds it; a user names the sites of any model with ``sites={key: regex}`` (keys in
:data:`SITE_KEYS`, each regex matched against names relative to the block or full names), which ``pk.patch`` takes
for the methods that place modules by site.

Linear layers are ``nn.Linear`` (also bitsandbytes' 4-bit ones and peftkern's wrappers) and transformers' ``Conv1D``
(GPT-2; weight stored [in, out]).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Optional

import torch
from torch import nn

from ..nn.lora import is_conv1d, linear_features

SITE_KEYS = ("q", "k", "v", "attn_out", "cross_q", "cross_k", "cross_v", "cross_out", "ffn", "ffn_in", "ffn_out")

_LLAMA = dict(q=r"self_attn\.q_proj", k=r"self_attn\.k_proj", v=r"self_attn\.v_proj", attn_out=r"self_attn\.o_proj",
              ffn=r"mlp", ffn_in=r"mlp\.(gate|up)_proj", ffn_out=r"mlp\.down_proj")
_BERT = dict(q=r"attention\.self\.query", k=r"attention\.self\.key", v=r"attention\.self\.value",
             attn_out=r"attention\.output\.dense", cross_q=r"crossattention\.self\.query",
             cross_k=r"crossattention\.self\.key", cross_v=r"crossattention\.self\.value",
             cross_out=r"crossattention\.output\.dense", ffn=r"intermediate", ffn_in=r"intermediate\.dense",
             ffn_out=r"output\.dense")
_BART = dict(q=r"self_attn\.q_proj", k=r"self_attn\.k_proj", v=r"self_attn\.v_proj", attn_out=r"self_attn\.out_proj",
             cross_q=r"encoder_attn\.q_proj", cross_k=r"encoder_attn\.k_proj", cross_v=r"encoder_attn\.v_proj",
             cross_out=r"encoder_attn\.out_proj", ffn=r"fc1", ffn_in=r"fc1", ffn_out=r"fc2")

# model_type -> site key -> regex over module names relative to a layer's block. q, k and v matching one module make
# it a fused projection; "qkv_layout" says how its output features interleave: "blocks" [q | k | v] (default) or
# "heads" (per head [q_h | k_h | v_h], GPT-NeoX). "ffn": the module whose input is the FFN's input.
FAMILIES: dict[str, dict[str, str]] = {
    "llama": _LLAMA, "qwen2": _LLAMA, "mistral": _LLAMA, "gemma": _LLAMA,
    "phi3": dict(q=r"self_attn\.qkv_proj", k=r"self_attn\.qkv_proj", v=r"self_attn\.qkv_proj",
                 attn_out=r"self_attn\.o_proj", ffn=r"mlp", ffn_in=r"mlp\.gate_up_proj", ffn_out=r"mlp\.down_proj"),
    "bert": _BERT, "roberta": _BERT,
    "gpt2": dict(q=r"attn\.c_attn", k=r"attn\.c_attn", v=r"attn\.c_attn", attn_out=r"attn\.c_proj",
                 cross_q=r"crossattention\.q_attn", cross_k=r"crossattention\.c_attn",
                 cross_v=r"crossattention\.c_attn", cross_out=r"crossattention\.c_proj", ffn=r"mlp",
                 ffn_in=r"mlp\.c_fc", ffn_out=r"mlp\.c_proj"),
    "opt": _BART,
    "gpt_neox": dict(q=r"attention\.query_key_value", k=r"attention\.query_key_value",
                     v=r"attention\.query_key_value", qkv_layout="heads", attn_out=r"attention\.dense", ffn=r"mlp",
                     ffn_in=r"mlp\.dense_h_to_4h", ffn_out=r"mlp\.dense_4h_to_h"),
    "distilbert": dict(q=r"attention\.q_lin", k=r"attention\.k_lin", v=r"attention\.v_lin",
                       attn_out=r"attention\.out_lin", ffn=r"ffn", ffn_in=r"ffn\.lin1", ffn_out=r"ffn\.lin2"),
    "t5": dict(q=r"layer\.0\.SelfAttention\.q", k=r"layer\.0\.SelfAttention\.k", v=r"layer\.0\.SelfAttention\.v",
               attn_out=r"layer\.0\.SelfAttention\.o", cross_q=r"layer\.1\.EncDecAttention\.q",
               cross_k=r"layer\.1\.EncDecAttention\.k", cross_v=r"layer\.1\.EncDecAttention\.v",
               cross_out=r"layer\.1\.EncDecAttention\.o", ffn=r"layer\.\d+\.DenseReluDense",
               ffn_in=r"layer\.\d+\.DenseReluDense\.wi(_\d)?", ffn_out=r"layer\.\d+\.DenseReluDense\.wo"),
    "bart": _BART,
}


@dataclasses.dataclass(frozen=True)
class Projection:
    """A projection: the linear module ``name`` and, where it is fused with others, the output features that are
    this projection's as (start, stop) ranges (None: all of them)."""
    name: str
    rows: Optional[tuple[tuple[int, int], ...]] = None

    def indices(self, device=None) -> Optional[torch.Tensor]:
        """The output features of the module that are this projection's (int64), None where it has all of them."""
        if self.rows is None:
            return None
        return torch.cat([torch.arange(a, b, device=device) for a, b in self.rows])


@dataclasses.dataclass(frozen=True)
class Attention:
    """One attention sublayer: ``module`` the attention module (the parent of the query projection: where prefix
    methods act), its q / k / v projections and the output projection ``out``."""
    module: str
    q: Projection
    k: Projection
    v: Projection
    out: Projection

    @property
    def fused(self) -> bool:
        """q, k and v (or two of them) are slices of one projection."""
        return len({self.q.name, self.k.name, self.v.name}) < 3


@dataclasses.dataclass(frozen=True)
class Layer:
    """The sites of one transformer layer (module names in the model).

    ``stack``: the module list holding the layer, ``index`` its position there; ``role`` "decoder" where its
    self-attention is causal (or its stack is named a decoder's), else "encoder".
    ``ffn`` the module whose input is the FFN's input (the FFN module where there is one, else its first linear),
    ``ffn_in`` the linears that read it, ``ffn_out`` the linear that writes the FFN's output."""
    name: str
    stack: str
    index: int
    role: str
    attention: Attention
    cross_attention: Optional[Attention]
    ffn: str
    ffn_in: tuple[str, ...]
    ffn_out: str


def _how_to_name(what: str) -> str:
    return (f"{what}. Name the modules yourself: target_modules=[...] (module names or dotted suffixes) for the LoRA "
            f"family, FAR and UniPELT's LoRA, or sites={{key: regex}} for the methods that place modules per layer "
            f"(adapters, UniPELT, MAM; keys {list(SITE_KEYS)}; each regex is matched against module names relative "
            f"to the layer's block, or full names), e.g. sites={{'attn_out': r'attn\\.c_proj', "
            f"'ffn': r'mlp', 'ffn_out': r'mlp\\.c_proj'}}")


def is_linear(module: nn.Module) -> bool:
    """A linear layer a method can adapt or sit beside: ``nn.Linear`` (bitsandbytes' subclasses too), transformers'
    ``Conv1D``, or a peftkern layer standing in for one (it has ``in_features`` and ``out_features``)."""
    return (isinstance(module, nn.Linear) or is_conv1d(module)
            or (hasattr(module, "in_features") and hasattr(module, "out_features")))


def _blocks(model: nn.Module) -> list[tuple[str, list[tuple[str, nn.Module]]]]:
    """(stack name, its blocks) for the outermost module lists of identical modules that hold linear layers, in
    model order; else the modules whose class transformers names in ``_no_split_modules``, one stack."""
    stacks, taken = [], []
    for name, m in model.named_modules():
        if any(name.startswith(t + ".") for t in taken) or not isinstance(m, nn.ModuleList) or len(m) == 0:
            continue
        if len({type(b) for b in m}) == 1 and any(is_linear(x) for x in m[0].modules()):
            stacks.append((name, [(f"{name}.{i}", b) for i, b in enumerate(m)]))
            taken.append(name)
    if stacks:
        return stacks
    classes = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [(n, m) for n, m in model.named_modules() if type(m).__name__ in classes]
    return [("", blocks)] if blocks else []


def _match(pattern: str, block: str, names: list[str]) -> list[str]:
    """Names relative to ``block`` (in model order) that ``pattern`` fully matches, relative or as a full name."""
    if not pattern:
        return []
    rx = re.compile(pattern)
    return [n for n in names if rx.fullmatch(n) or rx.fullmatch(f"{block}.{n}")]


def _structural(block: nn.Module) -> dict[str, str]:
    """Site regexes for a block of an unknown family, read from its linears' names and shapes."""
    linears = [n for n, m in block.named_modules() if n and is_linear(m)]
    groups: dict[str, list[str]] = {}
    for n in linears:
        parts = n.split(".")
        at = next((i for i, p in enumerate(parts[:-1]) if "att" in p.lower()), None)
        if at is not None:
            groups.setdefault(".".join(parts[:at + 1]), []).append(n)
    found: dict[str, list[str]] = {}
    for group, names in groups.items():
        prefix = "cross_" if any(w in group.lower() for w in ("cross", "encdec", "enc_dec", "encoder_attn")) else ""
        roles = _attention_roles(names)
        if roles is not None and prefix + "q" not in found:
            for key, name in roles.items():
                found[("cross_out" if prefix else key) if key == "attn_out" else prefix + key] = [name]
    attn = {n for names in groups.values() for n in names}
    ffn = [n for n in linears if n not in attn]
    if "attn_out" in found and len(ffn) >= 2:
        hidden = linear_features(block.get_submodule(found["attn_out"][0]))[1]
        outs = [n for n in ffn if linear_features(block.get_submodule(n))[1] == hidden]
        ins = [n for n in ffn if linear_features(block.get_submodule(n))[0] == hidden and n not in outs[-1:]]
        if outs and ins:
            found["ffn_out"], found["ffn_in"] = outs[-1:], ins
            parents = {n.rpartition(".")[0] for n in ins + outs[-1:]}
            found["ffn"] = [parents.pop() if len(parents) == 1 and "" not in parents else ins[0]]
    return {key: "|".join(map(re.escape, names)) for key, names in found.items()}


def _attention_roles(names: list[str]) -> Optional[dict[str, str]]:
    """q / k / v / attn_out among one attention sublayer's linears, from their names (None if unclear)."""
    def has(name: str, words) -> bool:  # q_proj, query, q_lin, q, wq (Meta's naming)
        tokens = set(re.split(r"[_.\d]+", name.split(".")[-1].lower()))
        return bool(tokens & {*words, *("w" + w for w in words)})

    fused = [n for n in names if re.search(r"qkv|query_key_value|c_attn|w_pack|in_proj", n.split(".")[-1].lower())]
    roles = {}
    for key, words in (("q", ("q", "query")), ("k", ("k", "key")), ("v", ("v", "value"))):
        hit = [n for n in names if has(n, words) and n not in fused]
        roles[key] = hit[0] if len(hit) == 1 else (fused[0] if len(fused) == 1 and not hit else None)
    rest = [n for n in names if n not in roles.values()]
    if None in roles.values() or not rest:
        return None
    roles["attn_out"] = rest[-1]
    return roles


def _rows(model: nn.Module, module: nn.Module, parts: list[str], layout: str) -> dict[str, tuple]:
    """Output-feature ranges of the parts (among q, k, v, in that order) that share ``module``."""
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    heads = getattr(cfg, "num_attention_heads", None)
    out = linear_features(module)[1]
    if not heads:
        raise ValueError(_how_to_name(f"a fused attention projection ({out} outputs) needs config.num_attention_heads "
                                      f"to split it into {parts}"))
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    sizes = {"q": heads * dim, "k": kv * dim, "v": kv * dim}
    if sum(sizes[p] for p in parts) != out:
        raise ValueError(_how_to_name(f"a fused attention projection has {out} outputs, not the {parts} sizes "
                                      f"{[sizes[p] for p in parts]} of {heads} query / {kv} key-value heads of {dim}"))
    if layout == "heads":
        per = len(parts) * dim
        return {p: tuple((h * per + i * dim, h * per + (i + 1) * dim) for h in range(heads))
                for i, p in enumerate(parts)}
    starts = [sum(sizes[q] for q in parts[:i]) for i in range(len(parts))]
    return {p: ((s, s + sizes[p]),) for p, s in zip(parts, starts)}


def _attention(model: nn.Module, block_name: str, block: nn.Module, found: dict[str, list[str]], prefix: str,
               layout: str) -> Optional[Attention]:
    keys = [prefix + k for k in ("q", "k", "v")] + ["cross_out" if prefix else "attn_out"]
    if not any(found[k] for k in keys):
        return None
    bad = [k for k in keys if len(found[k]) != 1]
    if bad:
        raise ValueError(_how_to_name(f"layer {block_name!r}: site(s) {bad} matched "
                                      f"{[found[k] for k in bad]}, need one module each"))
    q, k, v, out = (found[key][0] for key in keys)
    rows: dict[str, tuple] = {}
    for name in {q, k, v}:
        parts = [p for p, n in zip("qkv", (q, k, v)) if n == name]
        if len(parts) > 1:
            rows.update(_rows(model, block.get_submodule(name), parts, layout))
    proj = {p: Projection(f"{block_name}.{n}", rows.get(p)) for p, n in zip("qkv", (q, k, v))}
    return Attention(proj["q"].name.rpartition(".")[0], proj["q"], proj["k"], proj["v"],
                     Projection(f"{block_name}.{out}"))


def check_sites(sites: Optional[Mapping[str, str]]) -> None:
    """``ValueError`` unless ``sites`` is None or a dict of site keys (:data:`SITE_KEYS`) -> valid regexes."""
    if sites is None:
        return
    if not isinstance(sites, Mapping) or not all(isinstance(v, str) for v in sites.values()):
        raise ValueError(f"sites must be a dict of site key -> regex str, got {sites!r}")
    unknown = sorted(set(sites) - set(SITE_KEYS))
    if unknown:
        raise ValueError(f"sites has unknown key(s) {unknown}; valid keys: {list(SITE_KEYS)}")
    for key, pattern in sites.items():
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"sites[{key!r}] is not a valid regular expression: {e}") from None


def find_layers(model: nn.Module, sites: Optional[Mapping[str, str]] = None) -> list[Layer]:
    """Every transformer layer's sites, in model order (an encoder's layers before its decoder's).

    ``sites``: regexes that override the family's (keys in :data:`SITE_KEYS`). Raises ``ValueError`` saying what
    it looked for, and how to name it, when a layer's sites cannot be found."""
    check_sites(sites)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = FAMILIES.get(model_type)
    stacks = _blocks(model)
    if not stacks:
        raise ValueError(_how_to_name(f"no transformer layers found in {type(model).__name__} (model_type "
                                      f"{model_type!r}): looked for nn.ModuleList s of identical blocks and the "
                                      f"model's _no_split_modules"))
    layers, skipped = [], []
    for stack, blocks in stacks:
        for index, (block_name, block) in enumerate(blocks):
            spec = dict(family) if family is not None else _structural(block)
            spec.update(sites or {})
            names = [n for n, _ in block.named_modules() if n]
            found = {key: _match(spec.get(key, ""), block_name, names) for key in SITE_KEYS}
            missing = [k for k in ("q", "k", "v", "attn_out", "ffn", "ffn_in", "ffn_out") if not found[k]]
            if index == 0 and len(missing) == 7:  # a list of something else than transformer layers
                skipped.append(stack)
                break
            if missing:
                how = (f"the {model_type!r} names {({k: spec.get(k) for k in missing})}" if family is not None
                       else "attention linears under a child named '*att*' (q/k/v/output by name) and FFN linears")
                raise ValueError(_how_to_name(f"layer {block_name!r} of {type(model).__name__}: no {missing} site "
                                              f"found (looked for {how})"))
            if len(found["ffn"]) != 1 or len(found["ffn_out"]) != 1:
                raise ValueError(_how_to_name(f"layer {block_name!r}: ffn / ffn_out matched {found['ffn']} / "
                                              f"{found['ffn_out']}, need one module each"))
            layout = spec.get("qkv_layout", "blocks")
            attention = _attention(model, block_name, block, found, "", layout)
            cross = _attention(model, block_name, block, found, "cross_", layout)
            causal = getattr(model.get_submodule(attention.module), "is_causal", False)
            role = "decoder" if causal or "decoder" in stack.lower() else "encoder"
            layers.append(Layer(block_name, stack, index, role, attention, cross, f"{block_name}.{found['ffn'][0]}",
                                tuple(f"{block_name}.{n}" for n in found["ffn_in"]),
                                f"{block_name}.{found['ffn_out'][0]}"))
    if not layers:
        how = f"the {model_type!r} names {family}" if family is not None else "attention and FFN linears"
        raise ValueError(_how_to_name(f"no transformer layer of {type(model).__name__} has the sites looked for "
                                      f"({how}) in the module lists {skipped}"))
    return layers


def attention_modules(model: nn.Module, cross: bool = False,
                      sites: Optional[Mapping[str, str]] = None) -> list[tuple[Layer, nn.Module]]:
    """(layer, attention module) per layer in model order: the self-attention modules, or with ``cross`` the
    cross-attention modules of the layers that have one (decoders of encoder-decoders). For prefix methods: the
    module is the one that makes the layer's attention call (transformers' attention functions get it)."""
    out = []
    for layer in find_layers(model, sites):
        att = layer.cross_attention if cross else layer.attention
        if att is not None:
            out.append((layer, model.get_submodule(att.module)))
    return out
