"""Shared test utilities: tolerances against fp64, NaN poisoning, saved-for-backward accounting, ids."""
from __future__ import annotations

import contextlib

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def randomize_trainable_(model) -> None:
    """Move every trainable tensor away from its (often zero) init, so a round trip that loses one shows."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def on_device(args: dict) -> dict:
    """``args`` with its CPU tensors moved to DEVICE (arguments a test builds on the CPU, e.g. at collection)."""
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) and v.device.type == "cpu" else v for k, v in args.items()}


def backends() -> list:
    """The backends every op test runs on: torch, and triton (on CUDA, or the CPU interpreter conftest.py turns on;
    triton is a test dependency, so an unavailable triton backend fails these tests rather than skipping them)."""
    return ["torch", pytest.param("triton", marks=pytest.mark.triton)]


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref.double()).abs().max().item() if a.numel() else 0.0


def _error(out: torch.Tensor, ref64: torch.Tensor, name: str) -> tuple[float, float]:
    """(max error of ``out`` against ``ref64``, max |ref64|) after checking the shape and that out is finite."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (unwritten output?)"
    return max_err(out, ref64), (ref64.abs().max().item() if ref64.numel() else 0.0)


def assert_close(out: torch.Tensor, ref64: torch.Tensor, *, eager: torch.Tensor | None = None, name: str = "",
                 rtol32: float = 2e-5, atol: float = 1e-6) -> None:
    """fp32/fp64: max error <= rtol32 * max|ref| (+atol); fp16/bf16: :func:`assert_within_eager`."""
    if out.dtype not in (torch.float32, torch.float64):
        assert eager is not None, f"{name}: low precision needs eager's result to compare"
        assert_within_eager(out, ref64, eager, name=name, atol=atol)
        return
    err, scale = _error(out, ref64, name)
    bound = rtol32 * scale + atol
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} (|ref| max {scale:.3e})"


def assert_within_eager(out: torch.Tensor, ref64: torch.Tensor, eager: torch.Tensor, *, name: str = "",
                        atol: float = 1e-6) -> None:
    """Max error vs fp64 <= 2x that of ``eager`` (PyTorch, or a peer, at the same precision) + atol * max(|ref|, 1).

    The rule for low precision, and for an fp32 result that must match another fp32 path: compare both with fp64,
    never each other with a fixed atol (their summation orders, and so their roundings, differ by CPU and GPU)."""
    err, scale = _error(out, ref64, name)
    bound = 2.0 * max_err(eager, ref64) + atol * max(scale, 1.0)
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} (2x eager's + atol; |ref| max {scale:.3e})"


# What reads a CUDA tensor back to the host (a stream sync each call; a CUDA graph cannot capture it): aten ops with
# data-dependent output sizes or scalar results, and the Tensor methods that hand values to Python (on a CPU tensor
# ``tolist`` and ``numpy`` call no aten op, so they are caught as methods)
SYNCING_ATEN_OPS = frozenset({"bincount", "nonzero", "_local_scalar_dense", "is_nonzero", "item", "_unique", "_unique2",
                              "unique_dim", "unique_consecutive", "masked_select", "equal", "allclose"})
SYNCING_METHODS = frozenset({"tolist", "item", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__"})


def _syncs(func, args, kwargs) -> bool:
    name = func._overloadpacket.__name__
    if name in SYNCING_ATEN_OPS:
        return True
    if name in ("index", "index_put", "index_put_"):  # a boolean mask index runs nonzero
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in indices)
    if func is torch.ops.aten.repeat_interleave.Tensor:  # repeats without output_size: their sum read back
        return kwargs.get("output_size", args[1] if len(args) > 1 else None) is None
    return False


@contextlib.contextmanager
def no_host_syncs():
    """Fail if the block calls anything that would sync a CUDA device with the host (see SYNCING_ATEN_OPS): checks on
    the CPU what ``torch.cuda.set_sync_debug_mode("error")`` checks on a GPU, as the ops called (aten dispatch and
    Tensor methods)."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    found = []

    class Functions(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in SYNCING_METHODS:
                found.append(f"Tensor.{func.__name__}")
            return func(*args, **(kwargs or {}))

    class Dispatch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if _syncs(func, args, kwargs or {}):
                found.append(str(func))
            return func(*args, **(kwargs or {}))

    with Functions(), Dispatch():
        yield
    assert not found, f"host syncs on a GPU: {found}"


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN so an unwritten element fails the test."""
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-1)


def shape_id(**dims) -> str:
    return "-".join(f"{k}{v}" for k, v in dims.items())


def tiny_bert(seed: int = 0, hidden: int = 32, layers: int = 2, num_labels: int = 3):
    """A random BertForSequenceClassification without dropout, in eval mode."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                                  intermediate_size=2 * hidden, max_position_embeddings=64, num_labels=num_labels,
                                  attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(cfg).eval()


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 32, **config):
    """A random LlamaForCausalLM with grouped-query attention (4 query heads over 2 key/value heads), in eval mode;
    ``config`` overrides config fields (e.g. ``initializer_range=0.3``: at the default 0.02 the context barely moves
    the logits)."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**{**dict(vocab_size=100, hidden_size=hidden, num_hidden_layers=layers,
                                             num_attention_heads=4, num_key_value_heads=2,
                                             intermediate_size=2 * hidden, max_position_embeddings=64), **config})
    return transformers.LlamaForCausalLM(cfg).eval()


_DROPOUT_OFF = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
# family -> (config class, model class, config fields): hidden 32, 2 layers (each stack), 4 heads, FFN 64, vocab 100,
# 64 positions, no dropout, special token ids inside the vocabulary
TINY_FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                      num_key_value_heads=2, intermediate_size=64)),
    "bert": ("BertConfig", "BertForSequenceClassification", dict(hidden_size=32, num_hidden_layers=2,
                                                                 num_attention_heads=4, intermediate_size=64,
                                                                 **_DROPOUT_OFF)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                                                   embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                                                word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(hidden_size=32, num_hidden_layers=2,
                                                             num_attention_heads=4, intermediate_size=64,
                                                             hidden_dropout=0.0, attention_dropout=0.0)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                   num_key_value_heads=2, intermediate_size=64, resid_pdrop=0.0,
                                                   embd_pdrop=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                      num_key_value_heads=2, intermediate_size=64, bos_token_id=1,
                                                      eos_token_id=2)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(hidden_size=32, num_hidden_layers=2,
                                                            num_attention_heads=4, num_key_value_heads=2,
                                                            intermediate_size=64)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                      num_key_value_heads=2, head_dim=8, intermediate_size=64)),
    "roberta": ("RobertaConfig", "RobertaForSequenceClassification", dict(hidden_size=32, num_hidden_layers=2,
                                                                          num_attention_heads=4, intermediate_size=64,
                                                                          **_DROPOUT_OFF)),
    "distilbert": ("DistilBertConfig", "DistilBertForSequenceClassification",
                   dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64, dropout=0.0, attention_dropout=0.0,
                        seq_classif_dropout=0.0)),
    "t5": ("T5Config", "T5ForConditionalGeneration", dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                                          dropout_rate=0.0, decoder_start_token_id=0)),
    "bart": ("BartConfig", "BartForConditionalGeneration",
             dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                  encoder_ffn_dim=64, decoder_ffn_dim=64, dropout=0.0, attention_dropout=0.0,
                  activation_dropout=0.0)),
}


def tiny_model(family: str, seed: int = 0, **config):
    """A random tiny transformers model of ``family`` (a key of TINY_FAMILIES), the usual task model: ForCausalLM
    for decoders, ForSequenceClassification (2 labels) for encoders, ForConditionalGeneration for T5 and BART; in
    eval mode. ``config`` overrides the config's fields."""
    import transformers

    config_cls, model_cls, fields = TINY_FAMILIES[family]
    defaults = dict(vocab_size=100, max_position_embeddings=64, num_labels=2)
    torch.manual_seed(seed)
    cfg = getattr(transformers, config_cls)(**{**defaults, **fields, **config})
    return getattr(transformers, model_cls)(cfg).eval()


def tiny_batch(model, seed: int = 1, batch: int = 2, seq: int = 8) -> dict:
    """Inputs with labels for ``model``'s task (a tiny_model): token ids in [3, 100), an all-ones attention mask;
    labels the ids (causal LM), decoder targets (encoder-decoder) or classes (sequence classification)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (batch, seq), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        out["labels"] = torch.randint(0, model.config.num_labels, (batch,), generator=g)
    elif name.endswith("ForConditionalGeneration"):
        out["labels"] = torch.randint(3, 100, (batch, seq // 2), generator=g)
    else:
        out["labels"] = ids
    return out


def op_backends(monkeypatch, module, name: str) -> list:
    """The backend argument (an op's last) of every call of ``module.name`` (a custom op the functional API calls),
    recorded from now on."""
    entered = []
    op = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a: entered.append(a[-1]) or op(*a))
    return entered


def seq2seq_losses_agree(ours, peft_model, ids: torch.Tensor, mask: torch.Tensor) -> None:
    """ours and PEFT's encoder-decoder on one batch (labels: the first 4 ids, rows swapped; a padded decoder mask):
    the same logits and loss, then each loss's backward."""
    labels = ids[:, :4].flip(0)
    decoder_mask = torch.ones_like(labels)
    decoder_mask[0, 3] = 0
    out_p = peft_model(input_ids=ids, attention_mask=mask, labels=labels, decoder_attention_mask=decoder_mask)
    out_o = ours(input_ids=ids, attention_mask=mask, labels=labels, decoder_attention_mask=decoder_mask)
    torch.testing.assert_close(out_o.logits, out_p.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_o.loss, out_p.loss)
    out_p.loss.backward()
    out_o.loss.backward()


def next_token_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The logits of one decode step: ``ids`` through ``model`` filling the KV cache, then ids[:, :1] fed alone."""
    out = model(input_ids=ids, use_cache=True)
    return model(input_ids=ids[:, :1], past_key_values=out.past_key_values).logits


def token_kernel_calls(monkeypatch, module, name: str) -> list:
    """The dtype of x of every call of ``module.name`` (a one-token kernel's wrapper) that ran the kernel (did not
    return None), recorded from now on."""
    taken = []
    real = getattr(module, name)

    def spy(x, *args, **kwargs):
        out = real(x, *args, **kwargs)
        if out is not None:
            taken.append(x.dtype)
        return out

    monkeypatch.setattr(module, name, spy)
    return taken


def token_kernel_declines(why: str, monkeypatch, numel: int) -> None:
    """Turn csrc/cpu's one-token kernels away from a weight of ``numel`` elements as ``why`` says: "no-library" (the
    library switched off) or "large-weight" (the size limit just below it); other reasons are the caller's own."""
    from peftkern import _native

    if why == "no-library":
        monkeypatch.setattr(_native, "USE_CPU_LIBRARY", False)
    if why == "large-weight":
        monkeypatch.setattr(_native, "TOKEN_MAX_WEIGHT", numel - 1)


@contextlib.contextmanager
def torch_variant_or_backend(name: str, variant: str, monkeypatch, module, flag: str):
    """Enter backend ``name``; ``variant`` means the torch backend with ``module.<flag>`` turned off (its fallback
    path, e.g. the pure-torch NF4 code without the C++ library)."""
    import peftkern

    if name == variant:
        monkeypatch.setattr(module, flag, False)
    with peftkern.use_backend("torch" if name == variant else name):
        yield name
