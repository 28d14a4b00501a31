"""The backend registry: explicit choice, env override, auto resolution, availability reasons."""
import os
import subprocess
import sys

import pytest
import torch

import peftkern as pk
from peftkern import backend


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        pk.set_backend("cudnn")
    with pytest.raises(ValueError, match="unknown backend"):
        with pk.use_backend("tpu"):
            pass
    with pytest.raises(ValueError, match="unknown backend"):
        backend.register("op", "jax")


def test_use_backend_restores():
    assert pk.get_backend() == "auto"
    with pk.use_backend("torch"):
        assert pk.get_backend() == "torch"
        with pk.use_backend("triton"):
            assert pk.get_backend() == "triton"
        assert pk.get_backend() == "torch"
    assert pk.get_backend() == "auto"


def test_env_override(monkeypatch):
    monkeypatch.setenv("PEFTKERN_BACKEND", "torch")
    assert pk.get_backend() == "torch"
    with pk.use_backend("auto"):
        assert pk.get_backend() == "auto"  # the explicit call wins over the environment
    monkeypatch.setenv("PEFTKERN_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="PEFTKERN_BACKEND"):
        pk.get_backend()


def test_auto_on_cpu_is_torch():
    name, impl = backend.resolve("lora_forward", torch.device("cpu"))
    assert name == "torch" and impl is backend.registered("lora_forward")["torch"]


def test_explicit_backend_never_falls_back(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pk.use_backend("cuda"):
        with pytest.raises(RuntimeError, match="cuda"):
            backend.resolve("lora_forward", torch.device("cpu"))
    if "triton" in backend.registered("lora_forward"):
        with pk.use_backend("triton"):
            with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
                backend.resolve("lora_forward", torch.device("cpu"))


def test_available_backends_reasons(monkeypatch):
    status = pk.available_backends()
    assert set(status) == {"torch", "triton", "cuda"}
    assert status["torch"].available
    if not torch.cuda.is_available():
        assert not status["cuda"].available and "CUDA" in status["cuda"].reason
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert pk.available_backends()["triton"].available  # triton is a test dependency


def test_registry_lists_ops():
    assert {"lora_forward", "lora_backward", "lora_dropout_mask"} <= set(backend.ops())
    with pytest.raises(KeyError):
        backend.resolve("no_such_op", torch.device("cpu"))


def test_env_var_selects_backend_in_fresh_process():
    code = "import peftkern as pk; print(pk.get_backend())"
    env = dict(os.environ, PEFTKERN_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "torch"
